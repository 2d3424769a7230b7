"""Datasets that serve each image with its cached saliency map, ready for torchvision v2 transforms."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from salmask._validation import check_bool, check_callable, check_path, check_real
from salmask.saliency._cache import SaliencyCache, SaliencyCacheError, load_saliency_cache

__all__ = ["SaliencyDataset", "SaliencyImageFolder"]


def _check_matches(dataset: Any, cache: SaliencyCache) -> None:
    if len(dataset) != len(cache):
        raise SaliencyCacheError(
            f"the saliency cache has {len(cache)} entries but the dataset has {len(dataset)} images; "
            "build the cache for this dataset"
        )
    # Folder datasets list their files: check that entry i of the cache is image i of the dataset.
    samples, root = getattr(dataset, "samples", None), getattr(dataset, "root", None)
    if samples is None or root is None:
        return
    for index, ((path, _), cached) in enumerate(zip(samples, cache.paths, strict=True)):
        relative = Path(path).relative_to(root).as_posix()
        if relative != cached:
            raise SaliencyCacheError(
                f"entry {index} of the saliency cache is {cached!r} but the dataset's image {index} is "
                f"{relative!r}; the cache was built for another dataset or version of it"
            )


class SaliencyDataset(Dataset):
    """Wrap a dataset so that each item comes with its cached saliency map, cropped along with the image.

    Item ``i`` is ``(image, saliency)``: the dataset's image (PIL or tensor, a ``(image, target)`` item is
    unpacked) and entry ``i`` of the cache as a boolean :class:`~salmask.Saliency` at the image's own
    ``(H, W)`` (nearest-neighbour), so torchvision v2's ``RandomResizedCrop``, flips and resizes move both
    together. With ``transform``, the item is ``transform(image, saliency)`` (a two-view transform may
    return both views). With ``return_target``, the item is ``(item, target)``.

    The cache is checked against the dataset: same number of images and, for folder datasets
    (``samples`` and ``root`` attributes, e.g. ``ImageFolder``), the same file at every index.

    Args:
        dataset: map-style dataset whose items are images or ``(image, target)`` pairs, in the order the
            cache was built.
        cache: a :class:`~salmask.saliency.SaliencyCache` or the path of a cache file.
        transform: called as ``transform(image, saliency)``.
        threshold_std: foreground rule ``mean - k * std``; ``None`` uses the one recorded in the cache.
        largest_component: keep the largest component only; ``None`` uses the cache's setting.
        return_target: also return the dataset's target.
    """

    def __init__(
        self,
        dataset: Any,
        cache: SaliencyCache | str | os.PathLike[str],
        transform: Callable[..., Any] | None = None,
        *,
        threshold_std: float | None = None,
        largest_component: bool | None = None,
        return_target: bool = False,
    ) -> None:
        if not isinstance(cache, (SaliencyCache, str, os.PathLike)):
            raise TypeError(f"cache must be a SaliencyCache or the path of a cache file, got {type(cache).__name__}")
        check_callable(transform, "transform")
        if threshold_std is not None:
            check_real(threshold_std, "threshold_std")
        check_bool(largest_component, "largest_component", optional=True)
        check_bool(return_target, "return_target")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"dataset must be a map-style dataset (__getitem__ and __len__), got {type(dataset).__name__}"
            )
        self.dataset = dataset
        self.cache = cache if isinstance(cache, SaliencyCache) else load_saliency_cache(cache)
        self.transform = transform
        self.threshold_std = threshold_std
        self.largest_component = largest_component
        self.return_target = return_target
        _check_matches(dataset, self.cache)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        image, target = item if isinstance(item, tuple) else (item, None)
        saliency = self.cache.saliency(
            index,
            TF.get_size(image),
            threshold_std=self.threshold_std,
            largest_component=self.largest_component,
        )
        sample = (image, saliency) if self.transform is None else self.transform(image, saliency)
        return (sample, target) if self.return_target else sample


class SaliencyImageFolder(SaliencyDataset):
    """An ``ImageFolder`` whose samples come with their saliency from a cache built on ``root``.

    Like ``ImageFolder``, item ``i`` is ``(sample, target)``: the sample is ``(image, saliency)``, or
    ``transform(image, saliency)`` with a transform, and the target the class index. Pass
    ``return_target=False`` for the sample alone.

    Args:
        root: ImageFolder root, the one the cache was built from.
        cache: a :class:`~salmask.saliency.SaliencyCache` or the path of a cache file.
        transform: called as ``transform(image, saliency)`` (e.g. a v2 ``Compose``, or a multi-view
            transform such as :class:`~salmask.ssl.ThreeViews`).
        return_target: return ``(sample, target)`` as ``ImageFolder`` does; ``False`` returns the sample.
        **options: ``threshold_std`` and ``largest_component`` as in :class:`SaliencyDataset`; ``loader``
            and ``is_valid_file`` go to ``ImageFolder``.

    Example:
        >>> from torchvision.transforms import v2
        >>> augment = v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()])
        >>> # dataset = SaliencyImageFolder("train", "train-saliency.pt", transform=augment)
        >>> # (image, saliency), target = dataset[0]
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        cache: SaliencyCache | str | os.PathLike[str],
        transform: Callable[..., Any] | None = None,
        *,
        return_target: bool = True,
        **options: Any,
    ) -> None:
        from torchvision.datasets import ImageFolder

        check_path(root, "root")
        check_bool(return_target, "return_target")
        folder_options = {key: options.pop(key) for key in ("loader", "is_valid_file") if key in options}
        super().__init__(
            ImageFolder(os.fspath(root), **folder_options), cache, transform, return_target=return_target, **options
        )
