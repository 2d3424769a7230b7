"""Linear evaluation: train a linear classifier on the frozen encoder of a pretraining checkpoint.

The encoder is built and loaded from the checkpoint's recorded settings. An encoder pretrained with the
high-pass recipe (strategies high_pass and mscn) only saw high-pass filtered views, so its inputs here go
through the same filter; the log says when it does. Two recipes of the paper, by name::

    python examples/linear_eval.py outputs/pretrain_moco_synthetic/checkpoint.pt  # MoCo: x0.1 at 60 and 80
    python examples/linear_eval.py CKPT --recipe simclr --data /datasets/imagenet100  # SimCLR: cosine
    python examples/linear_eval.py CKPT --dataset flowers102 --data /datasets --download
    python examples/linear_eval.py CKPT --finetune  # fine-tuning: the encoder trains too, at lr / 10

The classifier is MAE's linear probe: a batch norm without affine parameters (eps 1e-6) standardises each
feature before the linear layer. Probe learning rates depend on the scale of the features: the paper's
lr 30 (MoCo) and 1.0 (SimCLR) suit those encoders' features on ImageNet, and on another encoder the same
lr 30 sent the loss into the thousands and the accuracy below chance. With standardised features one
learning rate serves any encoder, so both recipes keep their schedule (MoCo: steps x0.1 at 60 % and 80 %
of the epochs; SimCLR: cosine) and use lr 0.1 per 256 images in place of 30 and 1.0 (scaled linearly
with the batch: 0.025 for the synthetic run's 64), with SGD, momentum 0.9, no weight decay.
L2-normalised features, the other usual remedy, fix each feature vector's length but not how the variance
spreads over the dimensions, so their best learning rate still moves with the encoder and its width. At
evaluation the batch norm applies its running mean and variance, a fixed affine map, so the
classifier stays linear in the encoder's features: the checkpoint's ``model`` is that one
``nn.Linear(num_features, num_classes)`` with the batch norm folded in, which loads into a plain linear
layer on the encoder's pooled features. A step whose loss is not finite or exceeds a hundred times that
of a uniform guess (100 ln C) stops the run with a message naming ``--lr``.

``--finetune`` trains the whole encoder with the classifier (the encoder's batch norms in training mode),
the encoder at ``--backbone-lr`` (default a tenth of the classifier's); the checkpoint then also holds
the fine-tuned ``encoder`` under torchvision's ResNet names, which loads with the ``model`` layer as
``fc`` into the ResNet the checkpoint names.

Without ``--dataset``/``--data`` it evaluates on the pretraining data (the synthetic shapes or
Fashion-MNIST, the same images as the pretraining, or the pretraining ImageFolder). A run is
checkpointed every epoch; SIGTERM writes a checkpoint and exits 0; ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# The scripts' shared helpers: examples/_common.py (a script's own folder is on sys.path when it runs).
from _common import (
    DATASETS,
    IN_MEMORY,
    dataset_splits,
    evaluation_transform,
    finish,
    ordered_loader,
    pretraining_dataset,
    run,
    seed_everything,
    setup_logging,
)
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Subset
from torchvision import datasets
from torchvision.transforms import v2
from tqdm import tqdm

from salmask.distributed import get_rank, get_world_size, init_distributed
from salmask.ssl import (
    ResumableSampler,
    SeededDataset,
    StopSignal,
    extract_features,
    input_filter_of,
    load_checkpoint,
    load_state_dict_checked,
    pretrained_encoder,
    restore_training_state,
    save_checkpoint,
    training_state,
)

logger = logging.getLogger("linear_eval")

# The paper's linear evaluations (appendix): 100 epochs on the frozen encoder, with their schedules. The
# learning rates are for standardised features (the probe's batch norm), one for both, per 256 images:
# the paper's 30 (MoCo) and 1.0 (SimCLR) were for the raw features of its encoders.
RECIPE_BATCH = 256
RECIPES: dict[str, dict[str, Any]] = {
    "moco": {"lr": 0.1, "batch_size": 256, "schedule": "step", "milestones": [60, 80], "weight_decay": 0.0},
    "simclr": {"lr": 0.1, "batch_size": 256, "schedule": "cosine", "milestones": [], "weight_decay": 0.0},
}
# The encoder's learning rate when fine-tuning, as a fraction of the classifier's.
BACKBONE_LR_FRACTION = 0.1
# A step loss above this many times ln(C), the loss of a uniform guess over C classes, means divergence.
DIVERGED_LOSS_FACTOR = 100.0
EVALUATION_DATASETS = (*DATASETS, "caltech101", "flowers102")
CALTECH_TRAIN_PER_CLASS = 30  # the usual Caltech-101 protocol: 30 training images per class, the rest for testing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("checkpoint", nargs="?", help="pretraining checkpoint (not needed with --resume)")
    add("--resume", help="linear-evaluation checkpoint to continue from")
    add(
        "--dataset",
        choices=EVALUATION_DATASETS,
        help="default: the pretraining data (synthetic, fashion-mnist, or the --data ImageFolder)",
    )
    add("--data", help="ImageFolder root with train/ and val/, or the download root of caltech101/flowers102")
    add("--download", action="store_true", help="download caltech101/flowers102 into --data")
    add("--recipe", choices=sorted(RECIPES), help="default: the checkpoint's method (moco or simclr)")
    add("--epochs", type=int, default=None, help="default: 100 (the synthetic run: 10)")
    add("--lr", type=float, default=None, help="classifier learning rate (default: 0.1 x batch size / 256)")
    add("--finetune", action="store_true", help="train the encoder too (default: a linear probe, encoder frozen)")
    add("--backbone-lr", type=float, default=None, help="the encoder's lr with --finetune (default: lr / 10)")
    add("--batch-size", type=int, default=None, help="global batch size (default: the recipe's, 256)")
    add("--weight-decay", type=float, default=None, help="default: 0")
    add("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    add("--image-size", type=int, default=None, help="default: the pretraining view size")
    add(
        "--input-filter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="high-pass filter the inputs (default: when the encoder was pretrained on filtered views)",
    )
    add("--output-dir", default="outputs/linear_eval", help="checkpoint and metrics (default: outputs/linear_eval)")
    add("--workers", type=int, default=None, help="data-loading processes per rank (default: the pretraining's)")
    add("--seed", type=int, default=0, help="random seed (default: 0)")
    add("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default: auto)")
    add("--on-bad-image", choices=("fail", "skip"), default="fail", help="unreadable images (default: fail)")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(linear-evaluation settings, pretraining checkpoint, own checkpoint to resume or None)."""
    resumed = None
    if args.resume:
        resumed = load_checkpoint(args.resume)
        config = dict(resumed["config"])
        config["epochs"] = args.epochs or config["epochs"]
        config["output_dir"] = args.output_dir if args.output_dir != "outputs/linear_eval" else config["output_dir"]
        return config, load_checkpoint(config["checkpoint"]), resumed
    if args.checkpoint is None:
        raise SystemExit("checkpoint: give the pretraining checkpoint to evaluate (or --resume)")
    pretraining = load_checkpoint(args.checkpoint)
    trained = pretraining["config"]
    dataset = args.dataset or pretraining_dataset(trained, args.data)
    data = args.data or (trained.get("data") if dataset == pretraining_dataset(trained) else None)
    if dataset not in ("synthetic", "fashion-mnist") and not data:
        raise SystemExit(f"--data: dataset {dataset} needs a root folder")
    if dataset == "imagefolder" and not (Path(data) / "train").is_dir():
        raise SystemExit(f"--data: {data} has no train/ folder (expected an ImageFolder root with train/ and val/)")
    recipe_name = args.recipe or trained.get("method", "moco")
    recipe = RECIPES[recipe_name]
    in_memory = dataset in IN_MEMORY
    batch_size = args.batch_size or (64 if in_memory else recipe["batch_size"])
    # The recipes' rate is per 256 images; other batches scale it linearly (MAE's and MoCo v3's rule).
    lr = recipe["lr"] * batch_size / RECIPE_BATCH if args.lr is None else args.lr
    if args.backbone_lr is not None and not args.finetune:
        raise SystemExit("--backbone-lr: applies with --finetune only (a linear probe keeps the encoder frozen)")
    config = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "dataset": dataset,
        "data": data,
        "download": args.download,
        "recipe": recipe_name,
        "epochs": args.epochs or (10 if in_memory else 100),
        "lr": lr,
        "finetune": args.finetune,
        "backbone_lr": (lr * BACKBONE_LR_FRACTION if args.backbone_lr is None else args.backbone_lr)
        if args.finetune
        else None,
        "batch_size": batch_size,
        "weight_decay": recipe["weight_decay"] if args.weight_decay is None else args.weight_decay,
        "momentum": args.momentum,
        "schedule": recipe["schedule"],
        "milestones": recipe["milestones"],
        "image_size": args.image_size or trained["image_size"],
        "input_filter": args.input_filter,
        "output_dir": args.output_dir,
        "workers": trained.get("workers", 4) if args.workers is None else args.workers,
        "seed": args.seed,
        "device": args.device,
        "on_bad_image": args.on_bad_image,
        # The pretraining's own images when it trained on a data set held in memory.
        "train_images": trained.get("train_images", trained.get("synthetic_train_size")) if in_memory else None,
        "val_images": trained.get("val_images", trained.get("synthetic_val_size")) if in_memory else None,
        "data_seed": trained.get("seed", 0),
    }
    if config["schedule"] == "step" and config["epochs"] != 100:
        # The MoCo recipe decays at 60% and 80% of its 100 epochs; keep the proportions for other lengths.
        config["milestones"] = [round(config["epochs"] * 0.6), round(config["epochs"] * 0.8)]
    for key in ("epochs", "batch_size", "image_size"):
        if config[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')}: must be at least 1, got {config[key]}")
    if config["batch_size"] % get_world_size():
        raise SystemExit(f"--batch-size: {config['batch_size']} does not divide among {get_world_size()} ranks")
    if config["batch_size"] // get_world_size() < 2:
        raise SystemExit(
            "--batch-size: the classifier standardises the features over each batch, which takes at least 2 "
            f"images per rank; got {config['batch_size']} on {get_world_size()} rank(s)"
        )
    for key in ("lr", "backbone_lr"):
        if config[key] is not None and not (math.isfinite(config[key]) and config[key] > 0):
            raise SystemExit(f"--{key.replace('_', '-')}: must be a positive number, got {config[key]}")
    return config, pretraining, None


def transforms(size: int, resize: bool) -> tuple[v2.Compose, v2.Compose]:
    """(training, evaluation) transforms of the linear-evaluation protocol."""
    crop = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    return v2.Compose([*crop, evaluation_transform(size, resize=False)]), evaluation_transform(size, resize)


def caltech101_split(dataset: datasets.Caltech101, seed: int) -> tuple[list[int], list[int]]:
    """30 random training images per class, the rest for testing; the same split for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(dataset.y)
    train, test = [], []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        train += members[:CALTECH_TRAIN_PER_CLASS]
        test += members[CALTECH_TRAIN_PER_CLASS:]
    return sorted(train), sorted(test)


def build_datasets(config: dict[str, Any]) -> tuple[Any, Any, int]:
    """(training set, test set, number of classes)."""
    name, root, size = config["dataset"], config["data"], config["image_size"]
    train_transform, test_transform = transforms(size, resize=name not in IN_MEMORY)
    if name in DATASETS:
        return dataset_splits(
            name, root, image_size=size, train_transform=train_transform, val_transform=test_transform,
            train_images=config.get("train_images"), val_images=config.get("val_images"),
            seed=config.get("data_seed", 0),
        )  # fmt: skip
    if name == "flowers102":
        train = ConcatDataset(
            [
                datasets.Flowers102(root, split=split, transform=train_transform, download=config["download"])
                for split in ("train", "val")
            ]
        )
        test = datasets.Flowers102(root, split="test", transform=test_transform, download=config["download"])
        return train, test, 102
    # caltech101: no official split; the categories (without the background class) and 30 images per class.
    train_full = datasets.Caltech101(root, "category", transform=train_transform, download=config["download"])
    test_full = datasets.Caltech101(root, "category", transform=test_transform, download=False)
    train_indices, test_indices = caltech101_split(train_full, config["seed"])
    return Subset(train_full, train_indices), Subset(test_full, test_indices), len(train_full.categories)


class LinearClassifier(nn.Module):
    """The encoder and a linear classifier on its features, behind a batch norm without affine parameters.

    The batch norm (MAE's linear probe) standardises each feature with the batch's statistics while
    training and with its running ones at evaluation, where it is a fixed affine map: the classifier is
    linear in the encoder's features, and :meth:`linear` gives it as one ``nn.Linear``. A linear probe
    freezes the encoder and keeps it in eval mode (its batch-norm statistics stay those of pretraining);
    with ``finetune`` the encoder trains too.
    """

    def __init__(
        self, encoder: nn.Module, num_classes: int, input_filter: nn.Module | None, *, finetune: bool = False
    ) -> None:
        super().__init__()
        self.finetune = finetune
        self.encoder = encoder.requires_grad_(finetune)
        self.input_filter = input_filter
        num_features = encoder.num_features
        self.head = nn.Sequential(
            OrderedDict(
                norm=nn.BatchNorm1d(num_features, affine=False, eps=1e-6), fc=nn.Linear(num_features, num_classes)
            )
        )
        nn.init.normal_(self.head.fc.weight, std=0.01)
        nn.init.zeros_(self.head.fc.bias)

    def train(self, mode: bool = True) -> LinearClassifier:
        super().train(mode)
        if not self.finetune:
            self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            if self.input_filter is not None:
                images = self.input_filter(images)
            features = self.encoder(images)
        return self.head(features)

    @torch.no_grad()
    def linear(self) -> nn.Linear:
        """The classifier at evaluation as one ``nn.Linear`` on the encoder's features (the norm folded in)."""
        norm, fc = self.head.norm, self.head.fc
        weight = fc.weight * torch.rsqrt(norm.running_var + norm.eps)
        linear = nn.Linear(fc.in_features, fc.out_features).to(fc.weight.device)
        linear.weight.copy_(weight)
        linear.bias.copy_(fc.bias - weight @ norm.running_mean)
        return linear


def checked_loss(loss: float, num_classes: int, lr: float, where: str) -> float:
    """``loss``, or the end of the run when the classifier diverged (a non-finite or exploding loss).

    A uniform guess over C classes scores ln(C); a loss many times that means the weights are running
    away, however the accuracy looks, and the learning rate is the usual cause.
    """
    limit = DIVERGED_LOSS_FACTOR * math.log(num_classes)
    if not (math.isfinite(loss) and loss <= limit):
        raise SystemExit(
            f"--lr: the classifier diverged at {where}: its loss is {loss:.4g}, above {limit:.4g} "
            f"({DIVERGED_LOSS_FACTOR:g} x ln {num_classes}, a uniform guess scoring ln {num_classes}); "
            f"lower the learning rate (now --lr {lr:g})"
        )
    return loss


def evaluate(model: LinearClassifier, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(top-1, top-5) accuracy in percent over the whole test set, each image counted once (all ranks)."""
    # extract_features gathers the ranks' shares in dataset order; it L2-normalises each row of logits,
    # which keeps their ranking.
    scores, labels = extract_features(model, loader, device=device)
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    top1_accuracy = (top5[:, 0] == labels).float().mean().item()
    top5_accuracy = (top5 == labels[:, None]).any(1).float().mean().item()
    return 100.0 * top1_accuracy, 100.0 * top5_accuracy


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = init_distributed(args.device)
    rank, world_size = get_rank(), get_world_size()
    setup_logging(rank)
    config, pretraining, resumed = resolve_config(args)
    seed_everything(config["seed"] + rank)
    output_dir = Path(config["output_dir"])
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    logger.info("settings: %s", json.dumps(config, sort_keys=True))

    # The encoder, exactly as pretrained, and the filter its inputs went through in pretraining.
    encoder = pretrained_encoder(pretraining)
    trained = pretraining["config"]
    recorded_filter = input_filter_of(trained)
    input_filter = input_filter_of(trained, enabled=config["input_filter"])
    if input_filter is not None:
        logger.info(
            "applying %r to every input: the encoder was pretrained with strategy %r on high-pass filtered views",
            input_filter,
            trained.get("strategy"),
        )
    elif recorded_filter is not None:
        logger.warning(
            "not filtering the inputs (--no-input-filter) although the encoder was pretrained on filtered views"
        )

    train_set, test_set, num_classes = build_datasets(config)
    train_set = SeededDataset(train_set, seed=config["seed"], on_bad_image=config["on_bad_image"])
    per_rank_batch = config["batch_size"] // world_size
    sampler = ResumableSampler(train_set, shuffle=True, seed=config["seed"], drop_last=False)
    loader_options = {
        "num_workers": config["workers"],
        "pin_memory": device.type == "cuda",
        "generator": torch.Generator().manual_seed(config["seed"] + rank),
    }
    train_loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, drop_last=True, **loader_options)
    test_loader = ordered_loader(
        test_set, per_rank_batch, seed=config["seed"], on_bad_image=config["on_bad_image"], **loader_options
    )
    # Whole batches only: the classifier's batch norm standardises over each batch.
    steps_per_epoch = len(sampler) // per_rank_batch
    if steps_per_epoch == 0:
        raise SystemExit(
            f"--batch-size: {per_rank_batch} images per rank, more than the {len(sampler)} training images each "
            "rank has; lower it"
        )

    finetune = bool(config.get("finetune", False))
    model = LinearClassifier(encoder, num_classes, input_filter, finetune=finetune).to(device)
    # The classifier first; with --finetune the encoder at its own, smaller learning rate.
    param_groups = [{"params": list(model.head.parameters()), "lr": config["lr"]}]
    if finetune:
        param_groups.append({"params": list(model.encoder.parameters()), "lr": config["backbone_lr"]})
    optimizer = torch.optim.SGD(param_groups, momentum=config["momentum"], weight_decay=config["weight_decay"])
    if config["schedule"] == "step":
        scheduler = MultiStepLRScheduler(optimizer, decay_t=config["milestones"], decay_rate=0.1)
    else:
        scheduler = CosineLRScheduler(optimizer, t_initial=config["epochs"])
    start_epoch, start_step = 0, 0
    if resumed is not None:
        if "head" not in resumed:
            raise SystemExit(
                f"--resume: {resumed['path']} holds a classifier on raw features, from before the classifier "
                "standardised them; it cannot continue: start the evaluation again"
            )
        if finetune:
            load_state_dict_checked(model.encoder, resumed["encoder"], f"checkpoint {resumed['path']} (encoder)")
        start_epoch, start_step = restore_training_state(
            {**resumed, "model": resumed["head"]}, model=model.head, optimizer=optimizer, scheduler=scheduler
        )
        logger.info("resumed from %s in epoch %d after step %d", resumed["path"], start_epoch + 1, start_step)
    ddp_model = model
    if world_size > 1:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    metrics_file = (output_dir / "metrics.jsonl").open("a", buffering=1) if rank == 0 else None

    def save(epoch: int, step: int, record: dict[str, Any]) -> None:
        state = training_state(
            model=model.head, config=config, epoch=epoch, step=step, optimizer=optimizer, scheduler=scheduler,
            metrics=record,
        )  # fmt: skip
        # "model" is the classifier as used: one linear layer on the encoder's features. "head" (the norm's
        # statistics, the layer before folding) and, when fine-tuning, "encoder" resume the run.
        state["head"] = state.pop("model")
        state["model"] = {name: value.cpu() for name, value in model.linear().state_dict().items()}
        if finetune:
            state["encoder"] = model.encoder.state_dict()
        if rank == 0:
            save_checkpoint(state, output_dir / "checkpoint.pt")

    criterion = nn.CrossEntropyLoss()
    top1 = top5 = None
    with StopSignal() as stop:
        for epoch in range(start_epoch, config["epochs"]):
            first_step = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, start=first_step * per_rank_batch)
            train_set.set_epoch(epoch)
            scheduler.step(epoch)
            model.train()
            progress = tqdm(
                total=steps_per_epoch, initial=first_step, unit="step", desc=f"epoch {epoch + 1}/{config['epochs']}",
                disable=rank != 0, dynamic_ncols=True, file=sys.stderr,
            )  # fmt: skip
            step, loss_sum, started = first_step, 0.0, time.perf_counter()
            for images, targets in train_loader:
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                loss = criterion(ddp_model(images), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                loss_value = checked_loss(loss.item(), num_classes, config["lr"], f"epoch {epoch + 1}, step {step}")
                loss_sum += loss_value
                progress.update()
                progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                if stop.should_stop():
                    progress.close()
                    save(epoch, step, {"loss": loss_value})
                    logger.info("stopped by signal in epoch %d after step %d; checkpoint written", epoch + 1, step)
                    if metrics_file is not None:
                        metrics_file.close()
                    return finish()
            progress.close()
            if world_size > 1:
                # DDP broadcast rank 0's batch-norm statistics before the last step, which then moved each
                # rank's own: evaluate, and save, with one set.
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=0)
            top1, top5 = evaluate(model, test_loader, device)
            record = {
                "epoch": epoch + 1,
                "loss": loss_sum / max(step - first_step, 1),
                "top1": top1,
                "top5": top5,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
            }
            logger.info("epoch %d: %s", epoch + 1, json.dumps({k: round(v, 4) for k, v in record.items()}))
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
            save(epoch + 1, 0, record)

    if top1 is None:
        top1, top5 = evaluate(model, test_loader, device)
    if rank == 0:
        print(
            f"{'fine-tuning' if finetune else 'linear'} top-1: {top1:.2f}% top-5: {top5:.2f}% on {config['dataset']} "
            f"({len(test_set)} test images), "
            f"{config['recipe']} recipe, {config['epochs']} epochs, input filter: "
            f"{'high-pass' if input_filter is not None else 'none'}"
        )
        metrics_file.close()
    return finish()


if __name__ == "__main__":
    run(main)
