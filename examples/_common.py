"""What the training and evaluation scripts share: logging per rank, seeding, the evaluation transform,
the train/ and val/ folders of an ImageFolder root with one numbering of the classes, the ordered loaders
of evaluation, and the way a script ends.

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
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

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
