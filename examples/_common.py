"""What the training and evaluation scripts share: logging per rank, seeding, the evaluation transform,
the labelled splits of the data sets they train on (the synthetic shapes, Fashion-MNIST, the train/ and
val/ folders of an ImageFolder root with one numbering of the classes), the ordered loaders of
evaluation, and the way a script ends.

Each script runs with its own folder on ``sys.path`` and imports these with ``from _common import ...``.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision.transforms import v2

from salmask.data import FASHION_MNIST_ROOT, FashionMNIST, SyntheticShapes
from salmask.saliency import IMAGENET_MEAN, IMAGENET_STD
from salmask.ssl import BadImageError, CheckpointError, ResumableSampler, SeededDataset


def setup_logging(rank: int) -> None:
    """Log to stderr with the time and rank; ranks other than 0 report warnings only."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def seed_everything(seed: int) -> None:
    """Seed torch's, NumPy's (for third-party transforms) and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)


def evaluation_transform(size: int, resize: bool) -> v2.Compose:
    """The images an encoder is evaluated on: RGB, resized and centre-cropped (``resize``), normalised.

    ``v2.RGB()`` first, so that grayscale and RGBA files of a dataset give three channels.
    """
    steps = [v2.Resize(size * 8 // 7, antialias=True), v2.CenterCrop(size)] if resize else []
    return v2.Compose(
        [
            v2.RGB(),
            *steps,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class _FolderOfClasses(datasets.ImageFolder):
    """An ImageFolder numbered by a given list of class names (another folder's) instead of its own."""

    def __init__(self, root: Path, classes: Sequence[str], **options: Any) -> None:
        self.given_classes = list(classes)
        super().__init__(root, allow_empty=True, **options)

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        return self.given_classes, {name: index for index, name in enumerate(self.given_classes)}


def image_folder_splits(
    root: str | os.PathLike[str], train_transform: Any, val_transform: Any
) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """``root/train`` and ``root/val`` as ImageFolders whose labels are the same class names.

    Each ImageFolder numbers its own class folders, so a ``val/`` that lacks one class would shift every
    later label against ``train/``. Here ``val/`` is numbered by ``train/``'s classes: it may lack some
    (logged), but a class that ``train/`` does not have ends the run with both lists.
    """
    root = Path(root)
    train = datasets.ImageFolder(root / "train", transform=train_transform)
    val_classes, _ = datasets.folder.find_classes(root / "val")
    unknown = sorted(set(val_classes) - set(train.classes))
    if unknown:
        raise SystemExit(
            f"--data: {root / 'val'} has classes that {root / 'train'} lacks: {unknown}; the classes of train/ are "
            f"{train.classes}, those of val/ {val_classes}"
        )
    val = _FolderOfClasses(root / "val", train.classes, transform=val_transform)
    absent = sorted(set(train.classes) - set(val_classes))
    if absent:
        logging.getLogger(__name__).warning(
            "%s has no folder for %d of the %d classes of train/ (%s); it is labelled by class name",
            root / "val", len(absent), len(train.classes), ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else ""),
        )  # fmt: skip
    return train, val


#: The data sets the scripts train and evaluate on: two held in memory, and any ImageFolder root.
DATASETS = ("synthetic", "fashion-mnist", "imagefolder")
IN_MEMORY = ("synthetic", "fashion-mnist")
FASHION_MNIST_SIZE = 28


def _first(dataset: Any, count: int | None) -> Any:
    # Fashion-MNIST's files list the classes in random order: the first images are a fair sample.
    return dataset if count is None or count >= len(dataset) else Subset(dataset, range(count))


def dataset_splits(
    name: str,
    root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    train_transform: Any,
    val_transform: Any,
    train_images: int | None = None,
    val_images: int | None = None,
    seed: int = 0,
    return_saliency: bool = False,
) -> tuple[Any, Any, int]:
    """``(train, val, num_classes)``: the labelled training and held-out images of a data set.

    ``synthetic``: ``train_images`` and ``val_images`` shapes rendered at ``image_size`` from ``seed``
    (with their true masks as saliency when ``return_saliency``); ``fashion-mnist``: the first
    ``train_images`` training and ``val_images`` test images (all when ``None``) from ``root`` (Debian's
    folder when ``None``), three channels, resized to ``image_size`` when it is not their 28 px;
    ``imagefolder``: ``root/train`` and ``root/val`` with one numbering of the classes.
    """
    if name == "synthetic":
        common = {"image_size": image_size, "seed": seed, "in_memory": True}
        train = SyntheticShapes(
            "train", num_images=train_images, transform=train_transform, return_saliency=return_saliency, **common
        )
        val = SyntheticShapes("val", num_images=val_images, transform=val_transform, **common)
        return train, val, train.num_classes
    if name == "fashion-mnist":
        if image_size != FASHION_MNIST_SIZE:
            resize = v2.Resize((image_size, image_size), antialias=True)
            train_transform = resize if train_transform is None else v2.Compose([resize, train_transform])
            val_transform = resize if val_transform is None else v2.Compose([resize, val_transform])
        root = FASHION_MNIST_ROOT if root is None else root
        train = FashionMNIST(root, "train", num_output_channels=3, transform=train_transform)
        val = FashionMNIST(root, "test", num_output_channels=3, transform=val_transform)
        return _first(train, train_images), _first(val, val_images), len(train.classes)
    if name != "imagefolder":
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    train, val = image_folder_splits(root, train_transform, val_transform)
    return train, val, len(train.classes)


def pretraining_dataset(trained: dict[str, Any], data: str | os.PathLike[str] | None = None) -> str:
    """The data set a checkpoint was pretrained on (``imagefolder`` when ``data`` names another root)."""
    if data is not None:
        return "imagefolder"
    # Checkpoints of earlier versions record no data set: synthetic unless they name a data root.
    return trained.get("dataset", "imagefolder" if trained.get("data") else "synthetic")


def pretraining_splits(
    trained: dict[str, Any],
    train_transform: Any,
    val_transform: Any,
    *,
    data: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
) -> tuple[Any, Any, int]:
    """:func:`dataset_splits` of the data a checkpoint was pretrained on, from its recorded settings;
    ``data`` evaluates on another ImageFolder root instead."""
    name = pretraining_dataset(trained, data)
    root = data if data is not None else trained.get("data")
    if name == "imagefolder" and not (root and (Path(root) / "train").is_dir()):
        raise SystemExit(f"--data: {root} has no train/ folder (expected an ImageFolder root with train/ and val/)")
    return dataset_splits(
        name,
        root,
        image_size=image_size or trained["image_size"],
        train_transform=train_transform,
        val_transform=val_transform,
        train_images=trained.get("train_images", trained.get("synthetic_train_size")),
        val_images=trained.get("val_images", trained.get("synthetic_val_size")),
        seed=trained.get("seed", 0),
    )


def ordered_loader(
    dataset: Any, batch_size: int, *, seed: int = 0, on_bad_image: str = "fail", **options: Any
) -> DataLoader:
    """A loader that serves ``dataset`` once, in order, split among the ranks (for features and accuracy).

    ``options`` go to the :class:`~torch.utils.data.DataLoader` (``num_workers``, ``pin_memory``, ...).
    """
    return DataLoader(
        SeededDataset(dataset, seed=seed, on_bad_image=on_bad_image),
        batch_size=batch_size,
        sampler=ResumableSampler(dataset, shuffle=False),
        **options,
    )


def finish() -> int:
    """End a script's run: leave the process group (under torchrun); the exit status 0."""
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def run(main: Callable[[], int]) -> None:
    """Run a script's ``main`` and exit with its status; bad input (named in the message) ends in one line."""
    try:
        sys.exit(main())
    except (BadImageError, CheckpointError) as error:
        sys.exit(f"error: {error}")
