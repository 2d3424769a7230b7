"""MoCo v2 with saliency-guided masking in PyTorch Lightning: the masking runs in ``on_after_batch_transfer``.

The DataLoader serves two augmented views of each image with their saliency (``TwoViews``); Lightning
moves the batch to the device and ``on_after_batch_transfer`` turns it into the masked query, the key and
the hard negatives (``MaskedViews``), once per step on the device, before ``training_step`` sees it::

    pip install 'salmask[lightning]'
    python examples/lightning_moco.py                      # synthetic shapes at 32 px, on the CPU
    python examples/lightning_moco.py --data /datasets/imagenet100 --saliency-cache in100-train-saliency.pt \\
        --image-size 224 --arch resnet50 --batch-size 128 --queue-size 65536 --max-steps 200000 --devices 4

Without ``--data`` the images are salmask's synthetic shapes, whose true object masks serve as saliency.
With ``--data`` (an ImageFolder root with ``train/``) the saliency comes from a cache built by
``python -m salmask.saliency.build_cache``. On several devices the run uses DDP without buffer broadcasts (the
MoCo queue is the same on every rank) and MoCo's shuffle BN across ranks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from salmask.data import SaliencyImageFolder, SyntheticShapes
from salmask.saliency import IMAGENET_MEAN, IMAGENET_STD
from salmask.ssl import STRATEGIES, MaskedViews, MaskedViewsOutput, MoCo, TwoViews, build_encoder


class MaskedMoCo(L.LightningModule):
    """MoCo v2 whose training batches are masked on the device right after Lightning moves them there.

    Args:
        strategy: masking strategy of :class:`~salmask.ssl.MaskedViews` (``"none"`` trains plain MoCo v2).
        arch: torchvision ResNet of the encoder; the small-image stem below 96 px.
        image_size: side of the views, which sets the patch size (a 7 x 7 grid).
        queue_size: MoCo's K.
        momentum: the key encoder's m.
        lr: SGD learning rate, cosine-decayed over ``max_steps``.
        max_steps: length of the run, for the schedule.
    """

    def __init__(
        self,
        strategy: str = "high_pass",
        arch: str = "resnet18",
        image_size: int = 32,
        queue_size: int = 4096,
        momentum: float = 0.99,
        lr: float = 0.06,
        max_steps: int = 100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = MoCo(build_encoder(arch, small_images=image_size < 96), queue_size=queue_size, momentum=momentum)
        self.masker = MaskedViews(strategy, patch_size=max(1, image_size // 7))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this on the device, after the transfer: the masks are drawn there, per image, with
        # no host round trip. Only training batches are masked.
        if not self.trainer.training:
            return batch
        (query, query_saliency, key, key_saliency), _ = batch
        return self.masker(query, key, query_saliency, key_saliency)

    def training_step(self, views: MaskedViewsOutput, batch_idx: int) -> torch.Tensor:
        out = self.model(views.query, views.key, views.hard_negatives, views.hard_negative_valid)
        accuracy = (out.logits.argmax(dim=1) == out.targets).float().mean()
        self.log_dict({"loss": out.loss, "accuracy": accuracy}, prog_bar=True)
        return out.loss

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [parameter for parameter in self.parameters() if parameter.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def two_views(image_size: int) -> TwoViews:
    """MoCo v2's augmentation, drawn afresh for the query and the key, moving each view's saliency along."""
    augment = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True)]
    augment += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
    augment += [v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
    augment += [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return TwoViews(v2.Compose(augment))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", help="ImageFolder root with train/ (default: the built-in synthetic shapes)")
    add("--saliency-cache", help="saliency cache of DATA/train (python -m salmask.saliency.build_cache)")
    add("--synthetic-size", type=int, default=1024, help="synthetic training images (default 1024)")
    add("--strategy", choices=STRATEGIES, default="high_pass", help="masking strategy (default high_pass)")
    add("--arch", default="resnet18", help="torchvision ResNet (default resnet18)")
    add("--image-size", type=int, default=32, help="side of the views (default 32)")
    add("--batch-size", type=int, default=64, help="batch size per device (default 64)")
    add("--queue-size", type=int, default=4096, help="MoCo's K (default 4096)")
    add("--momentum", type=float, default=0.99, help="key encoder momentum m (default 0.99)")
    add("--lr", type=float, default=0.06, help="SGD learning rate (default 0.06)")
    add("--max-steps", type=int, default=100, help="training steps (default 100)")
    add("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    add("--accelerator", default="auto", help="Lightning accelerator (default auto)")
    add("--devices", type=int, default=1, help="devices (default 1)")
    add("--seed", type=int, default=0, help="seed (default 0)")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    views = two_views(args.image_size)
    if args.data is None:
        dataset = SyntheticShapes(
            "train",
            num_images=args.synthetic_size,
            image_size=args.image_size,
            seed=args.seed,
            in_memory=True,
            transform=views,
            return_saliency=True,
        )
    elif args.saliency_cache is None:
        raise SystemExit("--data needs --saliency-cache (build it with python -m salmask.saliency.build_cache)")
    else:
        dataset = SaliencyImageFolder(Path(args.data) / "train", args.saliency_cache, transform=views)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    module = MaskedMoCo(
        args.strategy, args.arch, args.image_size, args.queue_size, args.momentum, args.lr, args.max_steps
    )
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=DDPStrategy(broadcast_buffers=False) if args.devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress,
        log_every_n_steps=1,
    )
    trainer.fit(module, loader)
    metrics = trainer.callback_metrics
    print(f"step {trainer.global_step}: loss {float(metrics['loss']):.4f}, accuracy {float(metrics['accuracy']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
