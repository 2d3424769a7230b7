"""Linear evaluation: train a linear classifier on the frozen encoder of a pretraining checkpoint.

The encoder is built and loaded from the checkpoint's recorded settings. An encoder pretrained with the
high-pass recipe (strategies high_pass and mscn) only saw high-pass filtered views, so its inputs here go
through the same filter; the log says when it does. Two recipes of the paper::

    python examples/linear_eval.py outputs/pretrain_moco_synthetic/checkpoint.pt  # MoCo: lr 30, x0.1 at 60, 80
    python examples/linear_eval.py CKPT --recipe simclr --data /datasets/imagenet100  # SimCLR: lr 1.0, cosine
    python examples/linear_eval.py CKPT --dataset flowers102 --data /datasets --download

Without ``--dataset``/``--data`` it evaluates on the pretraining data (the synthetic shapes, or the
pretraining ImageFolder). A run is checkpointed every epoch; SIGTERM writes a checkpoint and exits 0;
``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

# The scripts' shared helpers: examples/_common.py (a script's own folder is on sys.path when it runs).
from _common import (
    evaluation_transform,
    finish,
    image_folder_splits,
    ordered_loader,
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

from salmask.data import SyntheticShapes
from salmask.distributed import get_rank, get_world_size, init_distributed
from salmask.ssl import (
    ResumableSampler,
    SeededDataset,
    StopSignal,
    extract_features,
    finite_or_raise,
    input_filter_of,
    load_checkpoint,
    pretrained_encoder,
    restore_training_state,
    save_checkpoint,
    training_state,
)

logger = logging.getLogger("linear_eval")

# The paper's linear evaluations (appendix): 100 epochs on the frozen encoder.
RECIPES: dict[str, dict[str, Any]] = {
    "moco": {"lr": 30.0, "batch_size": 256, "schedule": "step", "milestones": [60, 80], "weight_decay": 0.0},
    "simclr": {"lr": 1.0, "batch_size": 256, "schedule": "cosine", "milestones": [], "weight_decay": 0.0},
}
DATASETS = ("synthetic", "imagefolder", "caltech101", "flowers102")
CALTECH_TRAIN_PER_CLASS = 30  # the usual Caltech-101 protocol: 30 training images per class, the rest for testing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("checkpoint", nargs="?", help="pretraining checkpoint (not needed with --resume)")
    add("--resume", help="linear-evaluation checkpoint to continue from")
    add("--dataset", choices=DATASETS, help="default: the pretraining data (synthetic, or the --data ImageFolder)")
    add("--data", help="ImageFolder root with train/ and val/, or the download root of caltech101/flowers102")
    add("--download", action="store_true", help="download caltech101/flowers102 into --data")
    add("--recipe", choices=sorted(RECIPES), help="default: the checkpoint's method (moco or simclr)")
    add("--epochs", type=int, default=None, help="default: 100 (the synthetic run: 10)")
    add("--lr", type=float, default=None, help="default: the recipe's (moco 30, simclr 1.0)")
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
    synthetic = trained.get("data") is None
    dataset = args.dataset or ("imagefolder" if args.data or not synthetic else "synthetic")
    data = args.data or (trained.get("data") if dataset == "imagefolder" else None)
    if dataset != "synthetic" and not data:
        raise SystemExit(f"--data: dataset {dataset} needs a root folder")
    if dataset == "imagefolder" and not (Path(data) / "train").is_dir():
        raise SystemExit(f"--data: {data} has no train/ folder (expected an ImageFolder root with train/ and val/)")
    recipe_name = args.recipe or trained.get("method", "moco")
    recipe = RECIPES[recipe_name]
    config = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "dataset": dataset,
        "data": data,
        "download": args.download,
        "recipe": recipe_name,
        "epochs": args.epochs or (10 if dataset == "synthetic" else 100),
        "lr": recipe["lr"] if args.lr is None else args.lr,
        "batch_size": args.batch_size or (64 if dataset == "synthetic" else recipe["batch_size"]),
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
        "synthetic_train_size": trained.get("synthetic_train_size"),
        "synthetic_val_size": trained.get("synthetic_val_size"),
        "synthetic_seed": trained.get("seed", 0),
    }
    if config["schedule"] == "step" and config["epochs"] != 100:
        # The MoCo recipe decays at 60% and 80% of its 100 epochs; keep the proportions for other lengths.
        config["milestones"] = [round(config["epochs"] * 0.6), round(config["epochs"] * 0.8)]
    for key in ("epochs", "batch_size", "image_size"):
        if config[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')}: must be at least 1, got {config[key]}")
    if config["batch_size"] % get_world_size():
        raise SystemExit(f"--batch-size: {config['batch_size']} does not divide among {get_world_size()} ranks")
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
    if name == "synthetic":
        train_transform, test_transform = transforms(size, resize=False)
        common = {"image_size": size, "seed": config["synthetic_seed"], "in_memory": True}
        train = SyntheticShapes("train", num_images=config["synthetic_train_size"], transform=train_transform, **common)
        test = SyntheticShapes("val", num_images=config["synthetic_val_size"], transform=test_transform, **common)
        return train, test, train.num_classes
    train_transform, test_transform = transforms(size, resize=True)
    if name == "imagefolder":
        train, test = image_folder_splits(root, train_transform, test_transform)
        return train, test, len(train.classes)
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
    """A frozen encoder (always in eval mode: its batch-norm statistics stay those of pretraining) and a
    trainable linear layer on its features."""

    def __init__(self, encoder: nn.Module, num_classes: int, input_filter: nn.Module | None) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.input_filter = input_filter
        self.fc = nn.Linear(encoder.num_features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def train(self, mode: bool = True) -> LinearClassifier:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.input_filter is not None:
                images = self.input_filter(images)
            features = self.encoder(images)
        return self.fc(features)


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
    train_loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, **loader_options)
    test_loader = ordered_loader(
        test_set, per_rank_batch, seed=config["seed"], on_bad_image=config["on_bad_image"], **loader_options
    )
    steps_per_epoch = -(-len(sampler) // per_rank_batch)

    model = LinearClassifier(encoder, num_classes, input_filter).to(device)
    optimizer = torch.optim.SGD(
        model.fc.parameters(), lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    if config["schedule"] == "step":
        scheduler = MultiStepLRScheduler(optimizer, decay_t=config["milestones"], decay_rate=0.1)
    else:
        scheduler = CosineLRScheduler(optimizer, t_initial=config["epochs"])
    start_epoch, start_step = 0, 0
    if resumed is not None:
        start_epoch, start_step = restore_training_state(
            resumed, model=model.fc, optimizer=optimizer, scheduler=scheduler
        )
        logger.info("resumed from %s in epoch %d after step %d", resumed["path"], start_epoch + 1, start_step)
    ddp_model = model
    if world_size > 1:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    metrics_file = (output_dir / "metrics.jsonl").open("a", buffering=1) if rank == 0 else None

    def save(epoch: int, step: int, record: dict[str, Any]) -> None:
        state = training_state(
            model=model.fc, config=config, epoch=epoch, step=step, optimizer=optimizer, scheduler=scheduler,
            metrics=record,
        )  # fmt: skip
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
                loss_value = finite_or_raise(loss.item(), "the loss", f"epoch {epoch + 1}, step {step}")
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
            f"linear top-1: {top1:.2f}% top-5: {top5:.2f}% on {config['dataset']} ({len(test_set)} test images), "
            f"{config['recipe']} recipe, {config['epochs']} epochs, input filter: "
            f"{'high-pass' if input_filter is not None else 'none'}"
        )
        metrics_file.close()
    return finish()


if __name__ == "__main__":
    run(main)
