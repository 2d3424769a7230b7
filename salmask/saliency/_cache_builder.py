"""Computing saliency caches: an ImageFolder's maps into a resumable file, or any dataset's in memory.

Both run :class:`~salmask.saliency.SCDA` once on every whole image (resized to a square, normalised with
the ImageNet statistics) and keep its activation map at the network's native grid, quantised to bytes
(:func:`~salmask.saliency.quantize_activation`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from salmask._validation import check_bool, check_int, check_path, check_real
from salmask.saliency._backbones import IMAGENET_MEAN, IMAGENET_STD
from salmask.saliency._cache import (
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    SaliencyCache,
    fail,
    load_saliency_cache,
    quantize_activation,
)
from salmask.saliency._scda import SCDA

__all__ = ["build_saliency_cache", "compute_saliency_cache"]


def _network_input(image_size: int) -> v2.Compose:
    """A whole image as the localization network sees it: three channels, square, normalised."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class _IndexedImages(Dataset):
    """A dataset's images (items that are images or ``(image, target)`` pairs), each with its index."""

    def __init__(self, dataset: Any, indices: Tensor, transform: Callable[[Any], Tensor] | None = None) -> None:
        self.dataset = dataset
        self.indices = indices.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        index = self.indices[position]
        item = self.dataset[index]
        image = item[0] if isinstance(item, tuple) else item
        return (image if self.transform is None else self.transform(image)), index


def _checked_scda(scda: Any, image_size: Any, batch_size: Any, device: Any) -> tuple[SCDA, torch.device]:
    if not isinstance(scda, SCDA):
        raise TypeError(f"scda must be an SCDA module, got {type(scda).__name__}")
    check_int(image_size, "image_size", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    if device is not None:
        scda = scda.to(device)
    return scda, next(iter(scda.parameters()), torch.empty(0)).device


def _empty_cache(scda: SCDA, image_size: int, paths: Sequence[str], device: torch.device) -> SaliencyCache:
    grid = tuple(scda.activation_map(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-2:])
    header = {
        "format": CACHE_FORMAT,
        "version": CACHE_FORMAT_VERSION,
        "backbone": scda.name,
        "threshold_std": check_real(scda.threshold_std, "threshold_std"),
        "largest_component": scda.largest_component,
        "image_size": [image_size, image_size],
        "grid": list(grid),
        "num_images": len(paths),
        "complete": False,
    }
    return SaliencyCache(
        header, torch.zeros(len(paths), *grid, dtype=torch.uint8), torch.zeros(len(paths), dtype=torch.bool), paths
    )


def _progress_bar(progress: bool, total: int, initial: int) -> Any:
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="img", desc="saliency cache")


def _fill(
    cache: SaliencyCache,
    scda: SCDA,
    loader: DataLoader,
    device: torch.device,
    bar: Any,
    checkpoint: Callable[[], None] | None = None,
) -> None:
    """Compute the entries the loader serves into ``cache``; ``checkpoint`` is called after each batch."""
    with torch.no_grad():
        for images, indices in loader:
            activation = scda.activation_map(images.to(device, non_blocking=True))
            cache.activation[indices] = quantize_activation(activation).cpu()
            cache.done[indices] = True
            if bar is not None:
                bar.update(len(indices))
            if checkpoint is not None:
                checkpoint()


def compute_saliency_cache(
    dataset: Any,
    scda: SCDA,
    *,
    image_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> SaliencyCache:
    """The SCDA map of every image of a dataset, computed once and kept in memory.

    For datasets held in memory (:class:`~salmask.data.SyntheticShapes`, :class:`~salmask.data.FashionMNIST`,
    a ``TensorDataset``...), whose images are too small for a localization network to see them at their
    own size: each whole image is upsampled to ``image_size``, so a 32 px image gets a 7 x 7 map at 224 px.
    Wrap the dataset in :class:`~salmask.data.SaliencyDataset` with the result to serve each image with its
    map at the image's size, which crops and flips then move with the image; ``cache.save(path)`` writes
    it. The entries' ``paths`` are the item indices.

    Args:
        dataset: map-style dataset whose items are images (tensors, ``tv_tensors.Image`` or PIL, grey or
            RGB) or ``(image, target)`` pairs.
        scda: the localization network.
        image_size: side each whole image is resized to before the network.
        batch_size: images per forward.
        device: where to run ``scda``; ``None`` keeps the module where it is.
        progress: show a tqdm progress bar if tqdm is installed.

    Returns:
        A complete :class:`SaliencyCache` of ``len(dataset)`` entries.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from salmask.saliency import build_scda, compute_saliency_cache
        >>> images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
        >>> images[:, :, 8:24, 8:24] = 255  # a bright square in each image
        >>> scda = build_scda("resnet18", weights=None, threshold_std=0.0)
        >>> cache = compute_saliency_cache(TensorDataset(images), scda, image_size=64)
        >>> len(cache), cache.grid, tuple(cache.saliency(0, (32, 32)).shape)
        (4, (2, 2), (32, 32))
    """
    scda, device = _checked_scda(scda, image_size, batch_size, device)
    check_bool(progress, "progress")
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset must be a map-style dataset (len and indexing), got {type(dataset).__name__}")
    cache = _empty_cache(scda, image_size, [str(index) for index in range(len(dataset))], device)
    images = _IndexedImages(dataset, torch.arange(len(dataset)), _network_input(image_size))
    bar = _progress_bar(progress, len(dataset), 0)
    try:
        _fill(cache, scda, DataLoader(images, batch_size=batch_size, shuffle=False), device, bar)
    finally:
        if bar is not None:
            bar.close()
    cache.header["complete"] = True
    return cache


def _relative_paths(folder: Any) -> list[str]:
    root = Path(folder.root)
    return [Path(path).relative_to(root).as_posix() for path, _ in folder.samples]


def build_saliency_cache(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    scda: SCDA,
    *,
    image_size: int = 448,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    checkpoint_seconds: float = 60.0,
    progress: bool = True,
) -> SaliencyCache:
    """Compute the SCDA activation map of every image of an ImageFolder once and store them in one file.

    Each whole image is resized to ``image_size`` x ``image_size`` (aspect ratio not kept: the map is
    stretched back to the image's own size when served), normalised with the ImageNet statistics and run
    through ``scda``; the map is stored at the network's native grid (14 x 14 for stride-32 networks at
    448 px: 196 bytes per image, 26 MB for ImageNet-100).

    The build is resumable: the file is checkpointed atomically every ``checkpoint_seconds`` and on
    interruption, and re-running the same call continues with the images not yet computed. A file made
    with another backbone, image size or set of images is refused rather than mixed.

    Args:
        root: ImageFolder root (``root/<class>/<image>``).
        out: cache file to write (conventionally ``*.pt``).
        scda: the localization network; its ``name``, ``threshold_std`` and ``largest_component`` are
            recorded in the header.
        image_size: side the whole image is resized to before the network.
        batch_size: images per forward.
        num_workers: DataLoader worker processes that decode images.
        device: where to run ``scda``; ``None`` keeps the module where it is.
        checkpoint_seconds: time between checkpoints of an unfinished cache.
        progress: show a tqdm progress bar if tqdm is installed.

    Returns:
        The complete :class:`SaliencyCache`.
    """
    from torchvision.datasets import ImageFolder

    root = check_path(root, "root")
    out = check_path(out, "out")
    scda, device = _checked_scda(scda, image_size, batch_size, device)
    check_int(num_workers, "num_workers", minimum=0)
    check_real(checkpoint_seconds, "checkpoint_seconds", low=0.0)
    check_bool(progress, "progress")
    folder = ImageFolder(os.fspath(root))
    paths = _relative_paths(folder)
    cache = _empty_cache(scda, image_size, paths, device)

    if out.exists():
        existing = load_saliency_cache(out, allow_incomplete=True)
        for key in ("backbone", "image_size", "grid", "num_images"):
            if existing.header[key] != cache.header[key]:
                raise fail(
                    out,
                    f"was built with {key}={existing.header[key]!r}, this run has {cache.header[key]!r}; "
                    "write to another file or delete it",
                )
        if existing.paths != paths:
            first = next(i for i, (a, b) in enumerate(zip(existing.paths, paths, strict=True)) if a != b)
            raise fail(out, f"entry {first} is {existing.paths[first]!r} in the cache but {paths[first]!r} under root")
        # Thresholds are applied on access, so a resumed build may record a new one.
        existing.header.update(
            threshold_std=cache.header["threshold_std"], largest_component=cache.header["largest_component"]
        )
        existing.activation = existing.activation.clone()
        existing.done = existing.done.clone()
        cache = existing
    else:
        out.parent.mkdir(parents=True, exist_ok=True)

    remaining = (~cache.done).nonzero().flatten()
    images = _IndexedImages(folder, remaining, _network_input(image_size))
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    bar = _progress_bar(progress, len(paths), int(cache.done.sum()))
    last_checkpoint = time.monotonic()

    def checkpoint() -> None:
        nonlocal last_checkpoint
        if time.monotonic() - last_checkpoint >= checkpoint_seconds:
            cache.save(out)
            last_checkpoint = time.monotonic()

    try:
        _fill(cache, scda, loader, device, bar, checkpoint)
    finally:
        if bar is not None:
            bar.close()
        cache.header["complete"] = bool(cache.done.all())
        cache.save(out)
    return cache
