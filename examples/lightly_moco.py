"""MoCo v2 written with lightly's pieces, with salmask's saliency-guided masking of the query.

A training loop in the style of lightly's MoCo example (``MoCoProjectionHead``, ``update_momentum``,
``cosine_schedule``, ``NTXentLoss`` with a memory bank). lightly's view transforms cannot carry a
saliency map, so the two views come from salmask's ``TwoViews`` (torchvision v2, the map cropped with
each view) and ``MaskedViews`` masks the query and makes the hard negatives once per step, on the
device::

    pip install 'salmask[lightly]'
    python examples/lightly_moco.py                  # synthetic shapes at 32 px, on the CPU
    python examples/lightly_moco.py --strategy blur --epochs 10 --device cuda

The loss is salmask's ``NTXentLoss`` built as lightly's is, ``NTXentLoss(temperature=...,
memory_bank_size=(K, 128))``: the one line that changes in a lightly loop is its import. It computes what
lightly's loss computes, with the memory bank inside, and also takes each image's hard negative (the key
view with its foreground masked, embedded by the momentum branch). The temperature here is MoCo v2's
0.2, salmask's default; lightly's default is SimCLR's 0.5.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from lightly.models.modules.heads import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from salmask.data import SyntheticShapes
from salmask.losses import NTXentLoss  # in a lightly loop: was `from lightly.loss import NTXentLoss`
from salmask.saliency import IMAGENET_MEAN, IMAGENET_STD
from salmask.ssl import MaskedViews, MaskedViewsOutput, TwoViews, build_encoder

MASKING_STRATEGIES = ("high_pass", "blur", "mean", "mscn", "none")


class MoCoModel(nn.Module):
    """A backbone and lightly's MoCo projection head, with momentum copies for the keys."""

    def __init__(self, backbone: nn.Module, feature_dim: int, dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(feature_dim, feature_dim, dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(images).flatten(start_dim=1))

    @torch.no_grad()
    def forward_momentum(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(images).flatten(start_dim=1))


def two_views(image_size: int) -> TwoViews:
    """MoCo v2's augmentation, drawn afresh for the query and the key, moving each view's saliency along."""
    augment = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True)]
    augment += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
    augment += [v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
    augment += [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return TwoViews(v2.Compose(augment))


def training_step(
    model: MoCoModel,
    masker: MaskedViews,
    criterion: NTXentLoss,
    batch: tuple,
    momentum: float,
    device: torch.device,
) -> tuple[torch.Tensor, MaskedViewsOutput]:
    """One step's loss: lightly's momentum update, salmask's masking, the loss with hard negatives."""
    (query, query_saliency, key, key_saliency), _ = batch
    update_momentum(model.backbone, model.backbone_momentum, m=momentum)
    update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
    views = masker(query.to(device), key.to(device), query_saliency.to(device), key_saliency.to(device))
    embedded_query = model(views.query)
    embedded_key = model.forward_momentum(views.key)
    # Hard negatives go through the key (momentum) branch, without gradient, and never enter the bank;
    # the mscn and none strategies make none (the loss is then lightly's).
    embedded_hard = None if views.hard_negatives is None else model.forward_momentum(views.hard_negatives)
    return criterion(embedded_query, embedded_key, embedded_hard, views.hard_negative_valid), views


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--strategy", choices=MASKING_STRATEGIES, default="high_pass", help="masking of the query (default high_pass)")
    add("--synthetic-size", type=int, default=1024, help="synthetic training images (default 1024)")
    add("--image-size", type=int, default=32, help="side of the views (default 32)")
    add("--batch-size", type=int, default=64, help="batch size (default 64)")
    add("--queue-size", type=int, default=4096, help="memory bank size, MoCo's K (default 4096)")
    add("--temperature", type=float, default=0.2, help="tau (default 0.2, MoCo v2's; lightly's default is 0.5)")
    add("--epochs", type=int, default=2, help="epochs (default 2)")
    add("--lr", type=float, default=0.06, help="SGD learning rate (default 0.06)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available")
    add("--seed", type=int, default=0, help="seed (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dataset = SyntheticShapes(
        "train",
        num_images=args.synthetic_size,
        image_size=args.image_size,
        seed=args.seed,
        in_memory=True,
        transform=two_views(args.image_size),
        return_saliency=True,
    )
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    backbone = build_encoder("resnet18", small_images=args.image_size < 96)
    model = MoCoModel(backbone, backbone.num_features).to(device)
    masker = MaskedViews(args.strategy, patch_size=max(1, args.image_size // 7)).to(device)
    criterion = NTXentLoss(temperature=args.temperature, memory_bank_size=(args.queue_size, 128))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)

    total_steps = args.epochs * len(loader)
    step = 0
    for epoch in range(args.epochs):
        total = 0.0
        for batch in loader:
            momentum = cosine_schedule(step, total_steps, 0.99, 1.0)
            loss, _ = training_step(model, masker, criterion, batch, momentum, device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            step += 1
        print(f"epoch {epoch}: loss {total / len(loader):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
