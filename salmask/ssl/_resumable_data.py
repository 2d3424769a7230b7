"""The data side of exact resumption: a sampler that starts an epoch part-way, items seeded by position.

:class:`ResumableSampler` starts an epoch part-way; :class:`SeededDataset` draws each item's augmentation
from a seed of ``(seed, epoch, index)``, so an item gets the same views whichever worker loads it and
whether or not the run was interrupted.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import ConcatDataset, Dataset, DistributedSampler, Subset

from salmask._storage import first_line
from salmask._validation import check_bool, check_choice, check_int
from salmask.distributed import get_rank, get_world_size

__all__ = ["BAD_IMAGE_POLICIES", "BadImageError", "ResumableSampler", "SeededDataset"]

logger = logging.getLogger(__name__)

#: What :class:`SeededDataset` does with an image it cannot read.
BAD_IMAGE_POLICIES = ("fail", "skip")

# Errors an image decoder raises for a broken file: PIL raises OSError (truncated, unidentified),
# SyntaxError (broken chunks) or ValueError; a decompression bomb has its own class.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)
_MAX_SKIPS = 100


class BadImageError(RuntimeError):
    """An image of the dataset cannot be read; the message names its path."""


class ResumableSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` that can start an epoch part-way through.

    It works with or without a process group (one process is rank 0 of 1). The order of an epoch depends
    only on ``seed`` and the epoch, so after ``set_epoch(epoch, start=n)`` the sampler yields exactly the
    indices the uninterrupted epoch would have yielded from its ``n``-th on, without loading the skipped
    items.

    Args:
        dataset: the dataset to sample.
        shuffle: shuffle every epoch.
        seed: seed of the shuffle, the same on every rank.
        drop_last: drop the tail that does not divide among the ranks.
        num_replicas: number of ranks; default the process group's size (1 without one).
        rank: this rank; default the process group's rank (0 without one).

    Example:
        >>> from salmask.ssl import ResumableSampler
        >>> sampler = ResumableSampler(range(6), seed=1)
        >>> full = list(sampler)
        >>> sampler.set_epoch(0, start=4)
        >>> list(sampler) == full[4:], len(sampler)
        (True, 2)
    """

    def __init__(
        self,
        dataset: Any,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        check_bool(shuffle, "shuffle")
        check_bool(drop_last, "drop_last")
        check_int(seed, "seed")
        if num_replicas is not None:
            check_int(num_replicas, "num_replicas", minimum=1)
        if rank is not None:
            check_int(rank, "rank", minimum=0)
        super().__init__(
            dataset,
            num_replicas=get_world_size() if num_replicas is None else num_replicas,
            rank=get_rank() if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` indices (of this rank)."""
        if not 0 <= check_int(start, "start") <= self.num_samples:
            raise ValueError(f"start must be an int in [0, {self.num_samples}], got {start!r}")
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _item_file(dataset: Any, index: int) -> tuple[Any, str] | None:
    """The folder dataset that holds item ``index`` of ``dataset`` and the item's file, if there is one.

    Follows subsets and concatenations to the item they stand for, and wrappers (``SaliencyDataset``)
    through their ``dataset``; folder datasets (``ImageFolder``) list their files in ``samples``.
    """
    while dataset is not None:
        if isinstance(dataset, Subset):
            dataset, index = dataset.dataset, dataset.indices[index]
            continue
        if isinstance(dataset, ConcatDataset):
            part = bisect.bisect_right(dataset.cumulative_sizes, index)
            index -= dataset.cumulative_sizes[part - 1] if part else 0
            dataset = dataset.datasets[part]
            continue
        samples = getattr(dataset, "samples", None)
        if samples is not None:
            entry = samples[index]
            return dataset, str(entry[0] if isinstance(entry, tuple) else entry)
        dataset = getattr(dataset, "dataset", None)
    return None


def _file_is_unreadable(folder: Any, path: str) -> bool:
    # The folder's own loader (PIL's, for ImageFolder) decodes the file again: the error of an item is the
    # file's only if the file alone fails.
    loader = getattr(folder, "loader", None)
    try:
        if callable(loader):
            loader(path)
        else:
            with PIL.Image.open(path) as image:
                image.load()
    except Exception:
        return True
    return False


class SeededDataset(Dataset):
    """Wrap a dataset so that each item's random augmentation is fixed by ``(seed, epoch, index)``.

    Each access seeds torch's generator for that item alone (the caller's generator state is put back
    afterwards), so an item gets the same views in any DataLoader worker, with any number of workers, and
    in a resumed run as in an uninterrupted one. Set the epoch with :meth:`set_epoch` before iterating
    (DataLoader workers receive a copy of the dataset when an epoch's iterator starts).

    An item whose image cannot be read is reported by path: ``on_bad_image="fail"`` raises a
    :class:`BadImageError` naming the file; ``"skip"`` logs a warning naming it and serves the next
    readable item instead, so batches keep their size. The file is blamed only when the dataset's loader
    fails on it again: an error raised by the dataset's transforms, or by an item without a file, is
    raised as it is, and never skipped. Items of folder datasets are found through ``Subset``,
    ``ConcatDataset`` and wrappers with a ``dataset`` attribute.

    Args:
        dataset: map-style dataset whose items apply random transforms with torch's generator (torchvision).
        seed: base seed of the run.
        on_bad_image: ``"fail"`` or ``"skip"``.

    Example:
        >>> import torch
        >>> from torch.utils.data import Dataset
        >>> from salmask.ssl import SeededDataset
        >>> class Noise(Dataset):
        ...     def __len__(self): return 4
        ...     def __getitem__(self, index): return torch.rand(2)
        >>> data = SeededDataset(Noise(), seed=0)
        >>> torch.equal(data[1], data[1]), torch.equal(data[1], data[2])
        (True, False)
    """

    def __init__(self, dataset: Any, seed: int = 0, on_bad_image: str = "fail") -> None:
        check_choice(on_bad_image, "on_bad_image", BAD_IMAGE_POLICIES)
        check_int(seed, "seed", minimum=0)
        self.dataset = dataset
        self.seed = seed
        self.on_bad_image = on_bad_image
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _item_seed(self, index: int) -> int:
        entropy = np.random.SeedSequence((self.seed, self.epoch, index)).generate_state(2, dtype=np.uint32)
        return int(entropy[0]) << 31 | int(entropy[1]) >> 1

    def __getitem__(self, index: int) -> Any:
        size = len(self.dataset)
        for attempt in range(min(size, _MAX_SKIPS)):
            position = (index + attempt) % size
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self._item_seed(position))
                    return self.dataset[position]
            except _IMAGE_ERRORS as error:
                located = _item_file(self.dataset, position)
                if located is None or not _file_is_unreadable(*located):
                    # Raised by the user's transforms (or by a dataset without files): not the image's fault.
                    raise
                message = f"cannot read image {located[1]}: {type(error).__name__}: {first_line(error)}"
                if self.on_bad_image == "fail":
                    raise BadImageError(f"{message} (pass --on-bad-image skip to leave it out)") from error
                logger.warning("%s; skipped", message)
        raise BadImageError(
            f"{min(size, _MAX_SKIPS)} images in a row from item {index} on cannot be read; check the dataset"
        )
