"""Pretrain a ResNet with MoCo v2 or SimCLR and saliency-guided masking.

With no ``--data`` it trains a narrow ResNet-18 with SimCLR on the built-in synthetic shapes at 32 px on
the CPU for a few minutes, then prints the kNN top-1 of the trained encoder beside the same encoder
untrained and kNN on raw pixels, on the same held-out images::

    python examples/pretrain.py
    python examples/pretrain.py --method moco
    python examples/pretrain.py --dataset fashion-mnist   # Debian's dataset-fashion-mnist package

On an ImageFolder dataset (``train/`` and ``val/`` subfolders), with a preset reproducing a run of the
paper (the preset names its method), on 4 GPUs, with saliency from a cache built by
``python -m salmask.saliency.build_cache``::

    torchrun --nproc_per_node=4 examples/pretrain.py --preset in100_moco_high_pass \\
        --data /datasets/imagenet100 --saliency-cache imagenet100-train-saliency.pt

Interrupted runs (SIGTERM writes a checkpoint and exits 0) continue where they stopped::

    python examples/pretrain.py --resume outputs/pretrain_simclr_synthetic/checkpoint.pt

Settings come from, in increasing priority: the defaults below (the method's, and the data set's for the
two data sets held in memory), the ``--preset`` file, and the flags given on the command line. The
resolved settings are stored in every checkpoint; ``linear_eval.py`` and ``knn_eval.py`` read them from
there.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

# The scripts' shared helpers: examples/_common.py (a script's own folder is on sys.path when it runs).
from _batch_views import BatchViews
from _common import (
    DATASETS,
    IN_MEMORY,
    dataset_splits,
    evaluation_transform,
    finish,
    ordered_loader,
    run,
    seed_everything,
    setup_logging,
)
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2
from tqdm import tqdm

from salmask.data import SaliencyDataset, SaliencyImageFolder
from salmask.distributed import get_rank, get_world_size, init_distributed
from salmask.losses import HardNegativeInfoNCE
from salmask.saliency import IMAGENET_MEAN, IMAGENET_STD, build_scda, compute_saliency_cache
from salmask.ssl import (
    STRATEGIES,
    MaskedViews,
    MoCo,
    ResumableSampler,
    SeededDataset,
    SimCLR,
    StopSignal,
    TwoViews,
    build_encoder,
    check_queue_size,
    finite_or_raise,
    input_filter_of,
    knn_top1,
    load_checkpoint,
    record_input_filter,
    restore_training_state,
    save_checkpoint,
    scaled_release_filters,
    training_state,
)

logger = logging.getLogger("pretrain")
PRESETS = Path(__file__).resolve().parent / "presets"
DDP_OPTIONS = inspect.signature(DistributedDataParallel).parameters
METHODS = ("moco", "simclr")
METHOD_NAMES = {"moco": "MoCo v2", "simclr": "SimCLR"}

# Settings shared by both methods, as the paper trains them (its section 4 and appendix).
DEFAULTS: dict[str, Any] = {
    "method": "moco",
    "dataset": "imagefolder",
    "data": None,
    "arch": "resnet50",
    "small_images": False,
    "stem_stride": 1,
    "width": 64,
    "image_size": 224,
    "strategy": "high_pass",
    "saliency": "scda",
    "saliency_cache": None,
    "scda_backbone": "efficientnet_lite0",
    "scda_weights": "imagenet",
    "scda_threshold": 0.6,
    "scda_image_size": 224,
    "hard_negatives": None,
    "mask_ratio": [0.05, 0.25],
    "hard_negative_ratio": [0.4, 0.7],
    "patch_size": None,
    "blur_probability": 0.5,
    "hue_jitter": None,
    "epochs": 200,
    "warmup_epochs": 10,
    "momentum": 0.9,
    "dim": 128,
    "temperature": 0.2,
    "hard_negative_weight": 2.0,
    "workers": 8,
    "threads": None,
    "seed": 0,
    "device": "auto",
    "amp": None,
    "channels_last": None,
    "log_every": 50,
    "knn_every": 10,
    "knn_k": 200,
    "knn_temperature": 0.1,
    "knn_baselines": False,
    "on_bad_image": "fail",
    "train_images": None,
    "val_images": None,
}

# Each method's own settings: MoCo v2 with SGD, a queue and a momentum encoder; SimCLR with LARS, the
# global batch as negatives, and stronger crops and colour jitter. A run holds only its method's keys.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "moco": {
        "output_dir": "outputs/pretrain_moco",
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.015,
        "weight_decay": 1e-4,
        "crop_scale": [0.2, 1.0],
        "color_jitter": 0.4,
        "queue_size": 65536,
        "moco_momentum": 0.999,
        "batch_norm": "shuffle",
    },
    "simclr": {
        "output_dir": "outputs/pretrain_simclr",
        "batch_size": 256,
        "optimizer": "lars",
        "lr": 0.3,
        "weight_decay": 1e-6,
        "crop_scale": [0.08, 1.0],
        "color_jitter": 0.8,
        "sync_batch_norm": True,
    },
}

# The two data sets held in memory train a run that learns visibly in a few CPU minutes; each choice below
# was measured against its alternative (README, "The main job, and why its defaults"):
# - a ResNet-18 sixteen times narrower (widths 16-128) with a stride-2 3x3 stem, so that two CPU cores
#   take about a thousand steps of 128 views of 32 px in three minutes;
# - SimCLR by default: no queue to fill and no momentum encoder lagging behind, so its features move
#   from the first steps, where MoCo v2 learns slower;
# - AdamW at 2e-3 (LARS learned slower), a temperature of 0.1, crops of 50-100 % of the image so that a
#   crop keeps the object, MoCo v2's colour jitter with its hue jitter, no Gaussian blur (SimCLR's CIFAR
#   recipe drops it at 32 px);
# - the views drawn a batch at a time in the training process (BatchViews), not per image in data workers,
#   where they cost nearly as much as the training step itself;
# - the synthetic images carry their object's true mask, used as saliency ("truth"); "scda" computes
#   SCDA maps once per image, each upsampled to 224 px (at 32 px the network would see a 1 x 1 map).
IN_MEMORY_DEFAULTS: dict[str, Any] = {
    "method": "simclr",
    "arch": "resnet18",
    "small_images": True,
    "stem_stride": 2,
    "width": 16,
    "optimizer": "adamw",
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "temperature": 0.1,
    "crop_scale": [0.5, 1.0],
    "color_jitter": 0.4,
    "blur_probability": 0.0,
    "warmup_epochs": 1,
    "batch_size": 128,
    "workers": 0,
    "log_every": 10,
    "knn_every": 0,
    "knn_baselines": True,
}
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": {
        **IN_MEMORY_DEFAULTS,
        "image_size": 32,
        "saliency": "truth",
        "strategy": "none",
        "epochs": 60,
        "train_images": 2048,
        "val_images": 1000,
    },
    "fashion-mnist": {
        **IN_MEMORY_DEFAULTS,
        "image_size": 28,
        "strategy": "none",
        "epochs": 10,
        "train_images": 10000,
        "val_images": 10000,
    },
}
# Per method and data set: MoCo's queue stays well below the training set (check_queue_size) and its key
# encoder follows faster over a short run.
DATASET_METHOD_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("moco", "synthetic"): {"output_dir": "outputs/pretrain_moco_synthetic", "queue_size": 512, "moco_momentum": 0.99},
    ("simclr", "synthetic"): {"output_dir": "outputs/pretrain_simclr_synthetic"},
    ("moco", "fashion-mnist"): {
        "output_dir": "outputs/pretrain_moco_fashion_mnist",
        "queue_size": 2048,
        "moco_momentum": 0.99,
    },
    ("simclr", "fashion-mnist"): {"output_dir": "outputs/pretrain_simclr_fashion_mnist"},
}
# Recorded by the script itself, never set by a user.
DERIVED = ("input_filter",)


def default_method(dataset: str) -> str:
    return DATASET_DEFAULTS.get(dataset, DEFAULTS)["method"]


def defaults_for(method: str, dataset: str) -> dict[str, Any]:
    config = {**DEFAULTS, **METHOD_DEFAULTS[method]}
    if dataset in DATASET_DEFAULTS:
        config.update({**DATASET_DEFAULTS[dataset], **DATASET_METHOD_DEFAULTS[(method, dataset)]})
    return {**config, "method": method, "dataset": dataset}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    def default(key: str) -> str:
        """The default of ``key``, per method where they differ, and per data set where that differs."""
        parts = {}
        for dataset in ("imagefolder", *IN_MEMORY):
            values = {method: defaults_for(method, dataset).get(key) for method in METHODS}
            values = {method: value for method, value in values.items() if value is not None or key in DEFAULTS}
            if len(set(map(str, values.values()))) == 1:
                parts[dataset] = str(next(iter(values.values())))
            else:
                parts[dataset] = ", ".join(f"{value} {method}" for method, value in values.items())
        text = f" (default: {parts.pop('imagefolder')}"
        for dataset, value in parts.items():
            if value != text.removeprefix(" (default: "):
                text += f"; {dataset}: {value}"
        return text + ")"

    # SUPPRESS keeps unset flags out of the namespace, so that a preset is only overridden by flags given.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    add(
        "--method",
        choices=METHODS,
        help="MoCo v2 or SimCLR (default: the preset's or checkpoint's, else moco; simclr for synthetic and "
        "fashion-mnist)",
    )
    add("--preset", help="name of a file in examples/presets (without .yaml) or a path to a YAML file")
    add("--resume", help="checkpoint to continue from; its settings apply unless overridden by flags")
    add(
        "--dataset",
        choices=DATASETS,
        help="synthetic shapes, Fashion-MNIST (held in memory) or an ImageFolder (default: imagefolder with --data, "
        "else synthetic)",
    )
    add("--data", help="ImageFolder root with train/ and val/, or the Fashion-MNIST folder (default: Debian's)")
    add("--output-dir", help="checkpoint, metrics and TensorBoard directory" + default("output_dir"))
    add("--arch", help="torchvision ResNet" + default("arch"))
    add("--small-images", action=argparse.BooleanOptionalAction, help="3x3 stem, no max-pool" + default("small_images"))
    add("--stem-stride", type=int, help="stride of the small-image stem, 1 or 2" + default("stem_stride"))
    add("--width", type=int, help="channels of the first ResNet stage, doubled per stage" + default("width"))
    add("--image-size", type=int, help="side of the training views" + default("image_size"))
    add("--strategy", choices=STRATEGIES, help="masking strategy" + default("strategy"))
    add(
        "--saliency",
        choices=("scda", "cache", "truth", "none"),
        help="saliency source: SCDA (on every view; once per image for the data sets held in memory), "
        "--saliency-cache, the synthetic data's true masks, or none (uniform masks, for strategies mscn and none)"
        + default("saliency"),
    )
    add(
        "--saliency-cache",
        help="saliency cache of the training images (implies --saliency cache): of the train/ folder "
        "(salmask.saliency.build_cache), or of a data set held in memory (compute_saliency_cache(...).save)",
    )
    add("--scda-backbone", help="SCDA localization network" + default("scda_backbone"))
    add("--scda-weights", help="'imagenet' or a state-dict file" + default("scda_weights"))
    add("--scda-threshold", type=float, help="SCDA foreground rule mean - k*std" + default("scda_threshold"))
    add(
        "--scda-image-size",
        type=int,
        help="side each whole image is upsampled to for SCDA, data sets held in memory" + default("scda_image_size"),
    )
    add(
        "--hard-negatives",
        action=argparse.BooleanOptionalAction,
        help="make hard negatives (default: as the strategy does)",
    )
    add("--mask-ratio", type=float, nargs=2, help="alpha range of the query masks" + default("mask_ratio"))
    add("--hard-negative-ratio", type=float, nargs=2, help="beta range" + default("hard_negative_ratio"))
    add("--patch-size", type=int, help="mask patch side in pixels (default: image size // 7)")
    add("--crop-scale", type=float, nargs=2, help="area range of the random resized crops" + default("crop_scale"))
    add("--color-jitter", type=float, help="colour jitter strength s: (s, s, s, s/4)" + default("color_jitter"))
    add("--hue-jitter", type=float, help="hue jitter, in [0, 0.5] (default: colour jitter strength / 4)")
    add("--blur-probability", type=float, help="chance of a Gaussian blur per view" + default("blur_probability"))
    add("--epochs", type=int, help="training epochs" + default("epochs"))
    add("--warmup-epochs", type=int, help="linear warm-up epochs" + default("warmup_epochs"))
    add("--batch-size", type=int, help="global batch size, split over the ranks" + default("batch_size"))
    add("--optimizer", choices=("sgd", "lars", "adamw"), help="optimizer" + default("optimizer"))
    add("--lr", type=float, help="peak learning rate" + default("lr"))
    add("--momentum", type=float, help="optimizer momentum" + default("momentum"))
    add("--weight-decay", type=float, help="weight decay (SimCLR: not on biases and BN)" + default("weight_decay"))
    add("--dim", type=int, help="embedding size, the projection head's output" + default("dim"))
    add("--temperature", type=float, help="tau" + default("temperature"))
    add("--hard-negative-weight", type=float, help="rho" + default("hard_negative_weight"))
    add("--queue-size", type=int, help="MoCo: K, queued keys" + default("queue_size"))
    add("--moco-momentum", type=float, help="MoCo: m, key encoder momentum" + default("moco_momentum"))
    add("--batch-norm", choices=("shuffle", "sync", "local"), help="MoCo: key-encoder BN" + default("batch_norm"))
    add(
        "--sync-batch-norm",
        action=argparse.BooleanOptionalAction,
        help="SimCLR: batch norm over the global batch under DDP" + default("sync_batch_norm"),
    )
    add("--workers", type=int, help="data-loading processes per rank" + default("workers"))
    add(
        "--threads",
        type=int,
        help="CPU threads of the training process (default: the CPUs left to each rank after its data workers; "
        "a busy or oversubscribed CPU runs several times slower)",
    )
    add("--seed", type=int, help="random seed" + default("seed"))
    add("--device", help="'auto', 'cpu', 'cuda'" + default("device"))
    add("--amp", action=argparse.BooleanOptionalAction, help="mixed precision (default: on with CUDA)")
    add("--channels-last", action=argparse.BooleanOptionalAction, help="channels-last (default: on with CUDA)")
    add("--log-every", type=int, help="steps between metric records" + default("log_every"))
    add("--knn-every", type=int, help="epochs between kNN monitors, 0: at the end only" + default("knn_every"))
    add("--knn-k", type=int, help="kNN neighbours" + default("knn_k"))
    add("--knn-temperature", type=float, help="kNN weight temperature" + default("knn_temperature"))
    add(
        "--knn-baselines",
        action=argparse.BooleanOptionalAction,
        help="at the end, also kNN of the same encoder untrained and of raw pixels" + default("knn_baselines"),
    )
    add("--on-bad-image", choices=("fail", "skip"), help="unreadable images" + default("on_bad_image"))
    add("--train-images", type=int, help="training images of a data set held in memory" + default("train_images"))
    add("--val-images", type=int, help="held-out images of a data set held in memory" + default("val_images"))
    return parser


def load_preset(name: str) -> dict[str, Any]:
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESETS / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise SystemExit(f"--preset {name!r}: no file {path}; presets: {', '.join(available)}")
    preset = yaml.safe_load(path.read_text()) or {}
    if not isinstance(preset, dict):
        raise SystemExit(f"--preset {name!r}: {path} must hold a mapping of settings")
    known = set(DEFAULTS).union(*METHOD_DEFAULTS.values())
    unknown = sorted(set(preset) - known)
    if unknown:
        raise SystemExit(f"--preset {name!r}: {path} has unknown settings {unknown}")
    if preset.get("method", "moco") not in METHODS:
        raise SystemExit(f"--preset {name!r}: method must be one of {METHODS}, got {preset['method']!r}")
    return preset


def resolve_config(argv: list[str] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Merge defaults, preset, checkpoint and flags; check the result."""
    given = vars(build_parser().parse_args(argv))
    checkpoint = None
    if "resume" in given:
        checkpoint = load_checkpoint(given["resume"])
        trained = checkpoint["config"].get("method", "moco")
        if given.get("method", trained) != trained:
            raise SystemExit(f"--method {given['method']}: the checkpoint continues a {trained} run")
        recorded = dict(checkpoint["config"])
        # Checkpoints of earlier versions: the data set was implied by --data, the sizes named for synthetic.
        recorded.setdefault("dataset", "imagefolder" if recorded.get("data") else "synthetic")
        for old, new in (("synthetic_train_size", "train_images"), ("synthetic_val_size", "val_images")):
            if old in recorded:
                recorded[new] = recorded.pop(old)
        config = {**defaults_for(trained, recorded["dataset"]), **recorded}
        config.update({k: v for k, v in given.items() if k not in ("resume", "preset")})
        if "output_dir" not in given:
            # The run continues beside its checkpoint: the recorded directory may be relative to another working
            # directory, or, in a file from elsewhere, point anywhere.
            config["output_dir"] = str(Path(given["resume"]).resolve().parent)
        source = f"the checkpoint {given['resume']}"
    else:
        data = given.get("data")
        dataset = given.get("dataset", "imagefolder" if data else "synthetic")
        preset = load_preset(given["preset"]) if "preset" in given else {}
        if preset and (dataset != "imagefolder" or not data):
            raise SystemExit(f"--data: preset {given['preset']!r} reproduces an ImageFolder run; give the data's root")
        method = given.get("method", preset.get("method", default_method(dataset)))
        if preset.get("method", method) != method:
            raise SystemExit(f"--method {method}: preset {given['preset']!r} is a {preset['method']} run")
        config = {**defaults_for(method, dataset), **preset, **given}
        config.pop("preset", None)
        source = f"preset {given['preset']!r}" if preset else "the flags"
    # A setting of the other method is a mistake to name, not to carry silently into the checkpoint.
    allowed = set(DEFAULTS) | set(METHOD_DEFAULTS[config["method"]]) | set(DERIVED)
    foreign = sorted(set(config) - allowed)
    if foreign:
        raise SystemExit(
            f"{flag(foreign[0])}: not a setting of --method {config['method']} (from {source}); "
            f"{', '.join(flag(key) for key in foreign)} belong to another method"
        )
    if config.get("saliency_cache"):
        config["saliency"] = "cache"
    if "stem_stride" not in given and not config["small_images"]:
        # The stride is the small-image stem's: --no-small-images brings back torchvision's stem.
        config["stem_stride"] = 1
    # Recorded absolute, so that a run resumed from another working directory finds the same files.
    for key in ("output_dir", "data", "saliency_cache"):
        if isinstance(config.get(key), str) and config[key]:
            config[key] = str(Path(config[key]).expanduser().resolve())
    if "warmup_epochs" not in given and config["warmup_epochs"] >= config["epochs"]:
        # A short run (--epochs 1) keeps the default warm-up from covering all of it.
        shortened = config["epochs"] // 10
        logger.warning(
            "--warmup-epochs: the default %d would cover all %d epochs; warming up for %d",
            config["warmup_epochs"], config["epochs"], shortened,
        )  # fmt: skip
        config["warmup_epochs"] = shortened
    check_config(config)
    return config, checkpoint


def check_config(config: dict[str, Any]) -> None:
    """Every setting, before any work: a bad one must not cost a run (or its last epoch) first."""

    def fail(key: str, message: str) -> None:
        raise SystemExit(f"{flag(key)}: {message}")

    def integer(key: str, minimum: int) -> None:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, f"must be an int, got {value!r}")
        if value < minimum:
            fail(key, f"must be at least {minimum}, got {value}")

    def number(key: str, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, f"must be a number, got {value!r}")
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (above and below and math.isfinite(value)):
            bounds = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or high == math.inf else ']'}"
            fail(key, f"must be a finite number in {bounds}, got {value}")

    for key, choices in (
        ("method", METHODS),
        ("dataset", DATASETS),
        ("optimizer", ("sgd", "lars", "adamw")),
        ("stem_stride", (1, 2)),
        ("strategy", STRATEGIES),
        ("saliency", ("scda", "cache", "truth", "none")),
        ("on_bad_image", ("fail", "skip")),
        ("batch_norm", ("shuffle", "sync", "local")),
    ):
        if key in config and config[key] not in choices:
            fail(key, f"must be one of {choices}, got {config[key]!r}")
    for key in ("epochs", "batch_size", "image_size", "dim", "queue_size", "log_every", "knn_k", "width"):
        if key in config:
            integer(key, 1)
    for key in ("workers", "knn_every", "warmup_epochs", "seed"):
        integer(key, 0)
    if config["threads"] is not None:
        integer("threads", 1)
    integer("scda_image_size", 32)
    in_memory = config["dataset"] in IN_MEMORY
    for key in ("train_images", "val_images"):
        if in_memory and (config[key] is not None or config["dataset"] == "synthetic"):
            integer(key, 1)
        elif not in_memory and config[key] is not None:
            fail(
                key, "applies to the data sets held in memory (synthetic, fashion-mnist); an ImageFolder is used whole"
            )
    if config["stem_stride"] != 1 and not config["small_images"]:
        fail("stem_stride", "is the stride of the small-image stem; add --small-images")
    number("color_jitter", 0.0)
    if config.get("hue_jitter") is not None:
        number("hue_jitter", 0.0, 0.5)
    number("blur_probability", 0.0, 1.0)
    if in_memory and config["blur_probability"] > 0:
        fail("blur_probability", "must be 0 for the data sets held in memory: their views are drawn without blur")
    scale = config["crop_scale"]
    if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale)):
        fail("crop_scale", f"must be two numbers, low and high, got {scale!r}")
    if not 0 < scale[0] <= scale[1] <= 1:
        fail("crop_scale", f"must be 0 < low <= high <= 1, got {list(scale)}")
    if config["patch_size"] is not None:
        integer("patch_size", 1)
        if config["patch_size"] > config["image_size"]:
            fail("patch_size", f"{config['patch_size']} is larger than the views ({config['image_size']} px)")
    number("lr", 0.0, open_low=True)
    number("momentum", 0.0, 1.0, open_high=True)
    number("weight_decay", 0.0)
    number("temperature", 0.0, open_low=True)
    number("hard_negative_weight", 0.0, open_low=True)
    number("knn_temperature", 0.0, open_low=True)
    number("scda_threshold", -math.inf)
    if "moco_momentum" in config:
        number("moco_momentum", 0.0, 1.0)
    try:
        # The loss's own check: the logits must be finite in float32.
        HardNegativeInfoNCE(config["temperature"], config["hard_negative_weight"])
    except ValueError as error:
        fail("temperature", str(error))
    for key in ("mask_ratio", "hard_negative_ratio"):
        value = config[key]
        if not (
            isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
        ):
            fail(key, f"must be two numbers, low and high, got {value!r}")
        if not 0 <= value[0] <= value[1] <= 1:
            fail(key, f"must be 0 <= low <= high <= 1, got {list(value)}")
    for key in ("small_images", "sync_batch_norm"):
        if key in config and not isinstance(config[key], bool):
            fail(key, f"must be true or false, got {config[key]!r}")
    if not isinstance(config["knn_baselines"], bool):
        fail("knn_baselines", f"must be true or false, got {config['knn_baselines']!r}")
    for key in ("hard_negatives", "amp", "channels_last"):
        if config[key] is not None and not isinstance(config[key], bool):
            fail(key, f"must be true, false or unset, got {config[key]!r}")
    if config["strategy"] == "none" and config["hard_negatives"]:
        fail("hard_negatives", "strategy 'none' masks nothing and makes no hard negatives")
    if config["device"] != "auto":
        try:
            torch.device(config["device"])
        except (RuntimeError, TypeError) as error:
            fail("device", f"not a device: {error}")
    output_dir = Path(config["output_dir"])
    existing = next(folder for folder in (output_dir, *output_dir.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        fail("output_dir", f"{output_dir} cannot be written ({existing} is not a writable folder)")
    if not 0 <= config["warmup_epochs"] < config["epochs"]:
        fail("warmup_epochs", f"must be in [0, epochs={config['epochs']}), got {config['warmup_epochs']}")
    if config["batch_size"] % get_world_size():
        fail("batch_size", f"{config['batch_size']} does not divide among {get_world_size()} ranks")
    if config["saliency"] == "truth" and config["dataset"] != "synthetic":
        fail("saliency", f"'truth' exists only for the synthetic shapes, not for dataset {config['dataset']!r}")
    if config["saliency"] == "cache" and not config.get("saliency_cache"):
        fail("saliency_cache", "--saliency cache needs the cache file")
    if config["dataset"] == "imagefolder" and not config["data"]:
        fail("data", "an ImageFolder run needs the root of its train/ and val/ folders")
    if config["dataset"] == "synthetic" and config["data"]:
        fail("data", "the synthetic shapes are drawn, not read; drop --data or give --dataset imagefolder")
    if config["dataset"] == "imagefolder" and not all(
        (Path(config["data"]) / split).is_dir() for split in ("train", "val")
    ):
        fail("data", f"{config['data']} lacks train/ or val/ (expected an ImageFolder root with train/ and val/)")
    if config["saliency"] == "cache" and not Path(config["saliency_cache"]).is_file():
        fail("saliency_cache", f"{config['saliency_cache']} does not exist")


def hue_jitter(config: dict[str, Any]) -> float:
    """The hue jitter's range: ``--hue-jitter``, else MoCo v2's quarter of the colour jitter strength."""
    return config["color_jitter"] / 4 if config.get("hue_jitter") is None else config["hue_jitter"]


def augmentation(config: dict[str, Any]) -> v2.Compose:
    """The method's views; the v2 transforms crop and flip a Saliency map together with its image.

    MoCo v2 and SimCLR differ in crop scale and jitter strength (SimCLR: crops from 8 % of the image and
    twice the jitter), each a setting.
    """
    size, strength = config["image_size"], config["color_jitter"]
    blur_kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # about 10% of the view, odd
    blur = []
    if config["blur_probability"] > 0:
        blur = [v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=config["blur_probability"])]
    return v2.Compose(
        [
            v2.RGB(),
            v2.RandomResizedCrop(size, scale=tuple(config["crop_scale"]), antialias=True),
            v2.ToImage(),
            v2.RandomApply([v2.ColorJitter(strength, strength, strength, hue_jitter(config))], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *blur,
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def build_datasets(
    config: dict[str, Any], device: torch.device, needs_saliency: bool = True
) -> tuple[Any, Any, Any, int]:
    """(training set, kNN bank, kNN queries, number of classes).

    Data sets held in memory give a ``TensorDataset`` of uint8 images (their saliency where the masking
    needs some) and targets, whose views :class:`BatchViews` draws a batch at a time in the training loop;
    an ImageFolder gives view pairs drawn per image by the v2 pipeline, with saliency from a cache.
    """
    name, in_memory = config["dataset"], config["dataset"] in IN_MEMORY
    splits = {
        "image_size": config["image_size"], "train_images": config["train_images"],
        "val_images": config["val_images"], "seed": config["seed"],
    }  # fmt: skip
    evaluation = evaluation_transform(config["image_size"], resize=not in_memory)
    bank, queries, num_classes = dataset_splits(
        name, config["data"], train_transform=evaluation, val_transform=evaluation, **splits
    )
    if in_memory:
        return in_memory_training_set(config, device, needs_saliency, splits), bank, queries, num_classes
    views = TwoViews(augmentation(config))
    if config["saliency"] == "cache":
        train = SaliencyImageFolder(Path(config["data"]) / "train", config["saliency_cache"], transform=views)
    else:
        train = datasets.ImageFolder(Path(config["data"]) / "train", transform=views)
    return train, bank, queries, num_classes


def in_memory_training_set(
    config: dict[str, Any], device: torch.device, needs_saliency: bool, splits: dict[str, Any]
) -> TensorDataset:
    """``(images, [saliency,] targets)`` of a data set held in memory: uint8 ``(3, H, W)`` images, and bool
    ``(1, H, W)`` saliency where the masking needs some: the synthetic shapes' true masks, a saliency cache,
    or SCDA maps computed once here for every image."""
    with_saliency = needs_saliency and config["saliency"] != "none"
    truth = with_saliency and config["saliency"] == "truth"
    items, _, _ = dataset_splits(
        config["dataset"], config["data"], train_transform=None, val_transform=None, return_saliency=truth, **splits
    )
    if with_saliency and not truth:
        cache = config["saliency_cache"]
        if cache is None:
            scda = build_scda(config["scda_backbone"], config["scda_weights"], threshold_std=config["scda_threshold"])
            logger.info("SCDA maps of the %d training images at %d px, once", len(items), config["scda_image_size"])
            cache = compute_saliency_cache(items, scda, image_size=config["scda_image_size"], device=device)
        items = SaliencyDataset(items, cache, return_target=True)
    images, maps, targets = [], [], []
    for sample, target in items:
        image, saliency = sample if with_saliency else (sample, None)
        image = v2.functional.to_dtype(v2.functional.to_image(image), torch.uint8, scale=True)
        images.append(image.as_subclass(torch.Tensor))
        if saliency is not None:
            maps.append(saliency.as_subclass(torch.Tensor).reshape(1, *image.shape[-2:]).bool())
        targets.append(int(target))
    tensors = [torch.stack(images), *([torch.stack(maps)] if with_saliency else []), torch.tensor(targets)]
    return TensorDataset(*tensors)


def batch_views(config: dict[str, Any]) -> BatchViews:
    """The views of :func:`augmentation`, drawn a batch at a time (data held in memory)."""
    return BatchViews(
        config["image_size"], tuple(config["crop_scale"]), config["color_jitter"], hue_jitter(config),
        tuple(IMAGENET_MEAN), tuple(IMAGENET_STD),
    )  # fmt: skip


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """The seed of one step's views on one rank: a resumed run draws the views it would have drawn."""
    return (((seed * 1_000_003 + rank) * 1_000_003 + epoch) * 1_000_003 + step) % 2**63


def patch_size(config: dict[str, Any]) -> int:
    """The mask patches' side: ``--patch-size``, else a seventh of the view (the paper's 32 px at 224 px)."""
    return config["patch_size"] or max(1, config["image_size"] // 7)


def build_masker(config: dict[str, Any], device: torch.device) -> MaskedViews:
    scda = None
    if config["saliency"] == "scda" and config["dataset"] not in IN_MEMORY and config["strategy"] not in ("none",):
        scda = build_scda(config["scda_backbone"], config["scda_weights"], threshold_std=config["scda_threshold"])
    options: dict[str, Any] = {}
    if config["strategy"] != "none":
        options = {
            "mask_ratio": tuple(config["mask_ratio"]),
            "hard_negative_mask_ratio": tuple(config["hard_negative_ratio"]),
        }
    # The release's filters were made for 224 px views: scaled with the view, as the patch grid is.
    high_pass, blur = scaled_release_filters(config["image_size"])
    if config["strategy"] in ("high_pass", "mscn"):
        options["input_filter"] = high_pass
    elif config["strategy"] == "blur":
        options.update(fill_options=blur, hard_negative_fill_options=blur)
    masker = MaskedViews(
        config["strategy"],
        scda=scda,
        hard_negatives=config["hard_negatives"],
        patch_size=patch_size(config),
        **options,
    )
    if masker.needs_saliency and config["saliency"] == "none":
        raise SystemExit(
            f"--saliency none: strategy {config['strategy']!r} places its masks (or hard negatives) by saliency; "
            "use --strategy mscn or none, or --no-hard-negatives"
        )
    return masker.to(device)


def build_model(config: dict[str, Any], world_size: int, on_gpu: bool) -> torch.nn.Module:
    """The encoder inside its method: MoCo's query and momentum encoders with the queue, or SimCLR's."""
    encoder = build_encoder(
        config["arch"], small_images=config["small_images"], stem_stride=config["stem_stride"], width=config["width"]
    )
    common = {key: config[key] for key in ("dim", "temperature", "hard_negative_weight")}
    if config["method"] == "moco":
        return MoCo(
            encoder,
            queue_size=config["queue_size"],
            momentum=config["moco_momentum"],
            batch_norm=config["batch_norm"],
            **common,
        )
    # Under DDP every rank's views are negatives for all.
    model = SimCLR(encoder, gather_distributed=world_size > 1, **common)
    if world_size > 1 and config["sync_batch_norm"] and on_gpu:
        # SimCLR's batch norm sees the global batch; the converted layers keep the state-dict names.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif world_size > 1 and config["sync_batch_norm"]:
        logger.warning("SyncBatchNorm needs CUDA: on the CPU each rank normalises over its own batch")
    return model


def build_optimizer(config: dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (MoCo v2: weight decay on every parameter, as MoCo's code), or timm's LARS (SimCLR: each weight
    matrix's step adapted to its norm) or AdamW, both without weight decay on biases and batch norms."""
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
        )
    options = {"momentum": config["momentum"]} if config["optimizer"] == "lars" else {}
    return create_optimizer_v2(
        model, config["optimizer"], lr=config["lr"], weight_decay=config["weight_decay"], **options
    )


def cpu_threads(config: dict[str, Any], world_size: int) -> int:
    """Threads for a CPU run: given, or the CPUs each rank has left beside its data workers. More threads than
    cores make the threads wait on each other: with two cores, one data worker and two threads, a step took
    five times as long as with one thread."""
    if config["threads"] is not None:
        return config["threads"]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // world_size - config["workers"])


def check_room_for_checkpoints(output_dir: Path, model: torch.nn.Module) -> None:
    """Stop before training when the disk cannot hold a checkpoint: the model's state and the optimizer's
    momentum (one buffer per trained parameter)."""
    tensors = [*model.state_dict().values(), *(p for p in model.parameters() if p.requires_grad)]
    needed = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise SystemExit(
            f"--output-dir: {output_dir} has {free / 2**20:.1f} MB free; a checkpoint of this run takes about "
            f"{needed / 2**20:.1f} MB: free some space or write elsewhere"
        )


class MetricsLog:
    """Rank 0 appends records to metrics.jsonl and, when TensorBoard is installed, to its event files."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.file = None
        self.writer = None
        if not enabled:
            return
        self.file = (output_dir / "metrics.jsonl").open("a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("TensorBoard is not installed; metrics go to %s only", output_dir / "metrics.jsonl")
        else:
            self.writer = SummaryWriter(output_dir / "tensorboard")

    def write(self, global_step: int, **record: Any) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"global_step": global_step, "time": round(time.time(), 3), **record}) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(key, value, global_step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def main(argv: list[str] | None = None) -> int:
    config, checkpoint = resolve_config(argv)
    device = init_distributed(config["device"])
    rank, world_size = get_rank(), get_world_size()
    setup_logging(rank)
    on_gpu = device.type == "cuda"
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(config, world_size))
    amp = on_gpu if config["amp"] is None else config["amp"]
    channels_last = on_gpu if config["channels_last"] is None else config["channels_last"]
    if amp and not on_gpu:
        raise SystemExit("--amp needs a CUDA device")
    if config.get("batch_norm") == "sync" and world_size > 1 and not on_gpu:
        raise SystemExit("--batch-norm sync: SyncBatchNorm needs CUDA; use shuffle on the CPU")
    # Each rank draws its own masks; items draw their augmentation from (seed, epoch, index).
    seed_everything(config["seed"] + rank)
    output_dir = Path(config["output_dir"])
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)

    # Data: a sampler that can start an epoch part-way, items whose augmentation a resume repeats exactly.
    masker = build_masker(config, device)
    train_set, bank_set, query_set, num_classes = build_datasets(config, device, masker.needs_saliency)
    # Views of data held in memory are drawn per step on the device; an ImageFolder's per item in the workers.
    views_of = batch_views(config) if config["dataset"] in IN_MEMORY else None
    if views_of is None:
        train_set = SeededDataset(train_set, seed=config["seed"], on_bad_image=config["on_bad_image"])
    views_generator = torch.Generator(device)
    per_rank_batch = config["batch_size"] // world_size
    sampler = ResumableSampler(train_set, shuffle=True, seed=config["seed"], drop_last=True)
    steps_per_epoch = len(sampler) // per_rank_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {config['batch_size']} is larger than the training set ({len(train_set)})")
    if config["method"] == "moco":
        try:
            check_queue_size(config["queue_size"], len(train_set), config["batch_size"])
        except ValueError as error:
            raise SystemExit(f"--queue-size: {error}") from None
    loader_options = {
        "num_workers": config["workers"],
        "pin_memory": on_gpu,
        # A generator of its own: creating an epoch's iterator must not draw from the global one, or a resumed
        # run would draw different masks than an uninterrupted one.
        "generator": torch.Generator().manual_seed(config["seed"] + rank),
    }
    train_loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, drop_last=True, **loader_options)
    knn_loaders = [
        ordered_loader(
            dataset, per_rank_batch * 2, seed=config["seed"], on_bad_image=config["on_bad_image"], **loader_options
        )
        for dataset in (bank_set, query_set)
    ]

    config["input_filter"] = record_input_filter(masker.input_filter)
    logger.info("settings: %s", json.dumps(config, sort_keys=True))
    if rank == 0:
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
    # Every rank starts from the same weights (and MoCo's queue: DDP broadcasts parameters, not buffers);
    # the ranks' own seeds take over afterwards, for their masks.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        model = build_model(config, world_size, on_gpu).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    if rank == 0:
        check_room_for_checkpoints(output_dir, model)
    # Per-step schedule: linear warm-up, then cosine to zero over the remaining steps.
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=(config["epochs"] - config["warmup_epochs"]) * steps_per_epoch,
        warmup_t=config["warmup_epochs"] * steps_per_epoch,
        warmup_lr_init=config["lr"] * 1e-3,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    start_epoch, start_step = 0, 0
    if checkpoint is not None:
        # The schedule is a function of the step; a run resumed with other --epochs gets a schedule for them.
        same_schedule = all(checkpoint["config"][key] == config[key] for key in ("epochs", "warmup_epochs"))
        if not same_schedule:
            logger.warning("the learning-rate schedule is recomputed for %d epochs", config["epochs"])
        start_epoch, start_step = restore_training_state(
            checkpoint, model=model, optimizer=optimizer, scheduler=scheduler if same_schedule else None, scaler=scaler
        )
        logger.info("resumed from %s in epoch %d after step %d", checkpoint["path"], start_epoch + 1, start_step)
    ddp_model = model
    if world_size > 1:
        options = {}
        if config["method"] == "moco":
            # The queue is the same on every rank (keys are gathered before enqueueing): broadcasting it at every
            # step would copy 32 MB for nothing. Newer torch names this option forward_sync_buffers.
            sync_option = "forward_sync_buffers" if "forward_sync_buffers" in DDP_OPTIONS else "broadcast_buffers"
            options[sync_option] = config["batch_norm"] == "sync"
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None, **options)
    # An encoder trained on high-pass filtered views is evaluated on filtered images too.
    eval_filter = input_filter_of(config)
    metrics = MetricsLog(output_dir, enabled=rank == 0)

    def save(epoch: int, step: int, record: dict[str, Any]) -> None:
        state = training_state(
            model=model, config=config, epoch=epoch, step=step, optimizer=optimizer, scheduler=scheduler,
            scaler=scaler, metrics=record,
        )  # fmt: skip
        if rank == 0:
            save_checkpoint(state, output_dir / "checkpoint.pt")

    def knn_monitor() -> float:
        return knn_top1(
            model.encoder, *knn_loaders, num_classes, k=config["knn_k"], temperature=config["knn_temperature"],
            device=device, transform=eval_filter, channels_last=channels_last, autocast=amp,
        )  # fmt: skip

    logger.info(
        "%s %s, strategy %s, saliency %s, %d images, %d steps of %d per epoch on %d rank(s), %s",
        METHOD_NAMES[config["method"]], config["arch"], config["strategy"], config["saliency"], len(train_set),
        steps_per_epoch, config["batch_size"], world_size, device,
    )  # fmt: skip
    knn_accuracy = None
    with StopSignal() as stop:
        for epoch in range(start_epoch, config["epochs"]):
            first_step = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, start=first_step * per_rank_batch)
            if views_of is None:
                train_set.set_epoch(epoch)
            model.train()
            progress = tqdm(
                total=steps_per_epoch * config["batch_size"], initial=first_step * config["batch_size"],
                unit="img", desc=f"epoch {epoch + 1}/{config['epochs']}", disable=rank != 0,
                dynamic_ncols=True, file=sys.stderr,
            )  # fmt: skip
            step, loss_sum, accuracy_sum, started = first_step, 0.0, 0.0, time.perf_counter()
            for batch in train_loader:
                global_step = epoch * steps_per_epoch + step
                scheduler.step_update(global_step)
                if views_of is None:
                    views, _ = batch
                    views = [view.to(device, non_blocking=True) for view in views]
                    query, key = (views[0], views[2]) if len(views) == 4 else views
                    query_saliency, key_saliency = (views[1], views[3]) if len(views) == 4 else (None, None)
                else:
                    images, saliency = batch[0].to(device), batch[1].to(device) if len(batch) == 3 else None
                    views_generator.manual_seed(step_seed(config["seed"], rank, epoch, step))
                    query, query_saliency = views_of(images, saliency, views_generator)
                    key, key_saliency = views_of(images, saliency, views_generator)
                with torch.no_grad():
                    masked = masker(query, key, query_saliency, key_saliency)
                inputs = [masked.query, masked.key, masked.hard_negatives]
                if channels_last:
                    inputs = [x if x is None else x.contiguous(memory_format=torch.channels_last) for x in inputs]
                with torch.autocast(device.type, enabled=amp):
                    output = ddp_model(*inputs, masked.hard_negative_valid)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(output.loss).backward()
                scaler.step(optimizer)
                scaler.update()

                step += 1
                loss = finite_or_raise(output.loss.item(), "the loss", f"epoch {epoch + 1}, step {step}")
                accuracy = 100.0 * (output.logits.argmax(1) == output.targets).float().mean().item()
                loss_sum, accuracy_sum = loss_sum + loss, accuracy_sum + accuracy
                progress.update(config["batch_size"])
                progress.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.1f}", refresh=False)
                if step % config["log_every"] == 0 or step == steps_per_epoch:
                    elapsed = time.perf_counter() - started
                    metrics.write(
                        global_step + 1, epoch=epoch + 1, step=step, loss=loss, instance_accuracy=accuracy,
                        lr=optimizer.param_groups[0]["lr"],
                        images_per_s=(step - first_step) * config["batch_size"] / max(elapsed, 1e-9),
                    )  # fmt: skip
                if stop.should_stop():
                    progress.close()
                    save(epoch, step, {"loss": loss})
                    logger.info("stopped by signal in epoch %d after step %d; checkpoint written", epoch + 1, step)
                    metrics.close()
                    return finish()
            progress.close()

            done_steps = max(step - first_step, 1)
            record = {"epoch": epoch + 1, "loss": loss_sum / done_steps, "instance_accuracy": accuracy_sum / done_steps}
            # The epoch is saved before it is evaluated: an evaluation that fails costs no training.
            save(epoch + 1, 0, record)
            last_epoch = epoch + 1 == config["epochs"]
            if last_epoch or (config["knn_every"] and (epoch + 1) % config["knn_every"] == 0):
                knn_accuracy = record["knn_top1"] = knn_monitor()
            logger.info("epoch %d: %s", epoch + 1, json.dumps({k: round(v, 4) for k, v in record.items()}))
            metrics.write((epoch + 1) * steps_per_epoch, **record)

    metrics.close()
    if knn_accuracy is None:
        # Resumed from the checkpoint of the last epoch: evaluate the final encoder now (on every rank: the
        # kNN monitor gathers features).
        knn_accuracy = knn_monitor()
    scores = {"trained": knn_accuracy}
    if config["knn_baselines"]:
        scores.update(knn_baselines(config, knn_loaders, num_classes, device, eval_filter, world_size, on_gpu))
    if rank == 0:
        report = {
            **{key: round(value, 2) for key, value in scores.items()},
            "k": config["knn_k"], "temperature": config["knn_temperature"], "num_queries": len(query_set),
            "num_classes": num_classes, "epochs": config["epochs"],
        }  # fmt: skip
        (output_dir / "knn.json").write_text(json.dumps(report, indent=1) + "\n")
        print(knn_summary(scores, config, len(query_set), num_classes, output_dir / "checkpoint.pt"))
    return finish()


def knn_baselines(
    config: dict[str, Any],
    loaders: list[DataLoader],
    num_classes: int,
    device: torch.device,
    eval_filter: Any,
    world_size: int,
    on_gpu: bool,
) -> dict[str, float]:
    """kNN top-1 of the same encoder at its initial weights, and of the raw pixels, by the same protocol
    (same bank, queries, inputs, k and temperature) as the trained encoder."""
    with torch.random.fork_rng(devices=[]):
        # The seed the run's model was built with: the very weights training started from.
        torch.manual_seed(config["seed"])
        untrained = build_model(config, world_size, on_gpu).encoder.to(device)
    protocol = {"k": config["knn_k"], "temperature": config["knn_temperature"], "device": device}
    return {
        "untrained": knn_top1(untrained, *loaders, num_classes, transform=eval_filter, **protocol),
        "raw_pixels": knn_top1(nn.Flatten(), *loaders, num_classes, transform=eval_filter, **protocol),
    }


def knn_summary(
    scores: dict[str, float], config: dict[str, Any], num_queries: int, num_classes: int, checkpoint: Path
) -> str:
    """The run's last lines: the trained encoder's score and, with the baselines, theirs and what they mean."""
    trained = scores["trained"]
    first = (
        f"kNN top-1: {trained:.2f}% (k={config['knn_k']}, T={config['knn_temperature']}, {num_queries} held-out "
        f"images) after {config['epochs']} epochs; checkpoint {checkpoint}"
    )
    if "untrained" not in scores:
        return first
    untrained, raw = scores["untrained"], scores["raw_pixels"]
    baselines = (
        f"  by the same protocol: the same encoder untrained {untrained:.2f}%, raw pixels {raw:.2f}%, "
        f"chance {100 / num_classes:.1f}%"
    )
    gain, margin = trained - untrained, trained - raw
    if gain >= 5 and margin > 0:
        meaning = (
            f"Pretraining learned: its features sort unseen images by class {gain:.1f} points better than the "
            f"random initialisation and {margin:.1f} points better than the pixels themselves."
        )
    elif gain > 0:
        meaning = (
            f"Pretraining helped little: {gain:.1f} points over the random initialisation, {margin:+.1f} against "
            "raw pixels; the run is too short or its recipe does not suit the data."
        )
    else:
        meaning = (
            f"Pretraining did not learn: {trained:.2f}% against {untrained:.2f}% for the random initialisation; "
            "check the recipe (learning rate, temperature, queue size, warm-up) before a longer run."
        )
    return "\n".join([first, baselines, meaning])


if __name__ == "__main__":
    run(main)
