"""Saliency cache: each dataset image's SCDA activation map, computed once, stored in one small file.

The file is written like a checkpoint (atomically, mode 0600, with a digest of its content that loading
verifies), so a byte changed on disk never serves a different map.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from salmask._storage import load_verified, save_verified
from salmask._validation import check_bool, check_mapping, check_path
from salmask.saliency._scda import scda_foreground
from salmask.tv_tensors import Saliency

__all__ = [
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "SaliencyCache",
    "SaliencyCacheError",
    "load_saliency_cache",
]

CACHE_FORMAT = "salmask.saliency-cache"
#: Version of the cache file layout: 2 stores a digest of the content (version 1 files load unverified);
#: files of a newer version are refused on load.
CACHE_FORMAT_VERSION = 2

_HEADER_KEYS = (
    "format",
    "version",
    "backbone",
    "threshold_std",
    "largest_component",
    "image_size",
    "grid",
    "num_images",
    "complete",
)


class SaliencyCacheError(ValueError):
    """A saliency cache file is malformed, incomplete, or does not belong to the dataset it is used with."""


def quantize_activation(activation: Tensor) -> Tensor:
    """Min-max scale each ``(U, V)`` activation map to ``[0, 255]`` and round to uint8.

    The SCDA rule ``A >= mean - k * std`` is unchanged by a positive affine map of ``A``, so the stored
    bytes keep the foreground for every ``k`` up to rounding. A constant map becomes all zeros (and is
    then all foreground, as in :func:`~salmask.saliency.scda_foreground`).
    """
    values = activation.float().flatten(1)
    low = values.amin(dim=1, keepdim=True)
    spread = values.amax(dim=1, keepdim=True) - low
    scaled = torch.where(spread > 0, (values - low) / spread.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return (scaled * 255).round().clamp(0, 255).to(torch.uint8).view_as(activation)


def _kind(value: Any) -> str:
    return f"dtype {value.dtype}, shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _nearest_indices(source: int, target: int, device: torch.device) -> Tensor:
    # Centre-aligned nearest neighbour: target pixel i samples source cell floor((i + 0.5) * source / target).
    positions = (torch.arange(target, device=device, dtype=torch.float64) + 0.5) * (source / target)
    return positions.floor().long().clamp_(0, source - 1)


class SaliencyCache:
    """SCDA activation maps of every image of a dataset, loaded from a cache file.

    Holds the per-image min-max quantised activation maps ``(N, U, V)`` uint8 (the network's native grid
    for the whole image), the dataset's relative file paths and the header they were made with. The
    foreground rule is applied on access, so the threshold can differ from the one recorded.

    Attributes:
        header: ``backbone``, ``threshold_std``, ``largest_component``, ``image_size``, ``grid``,
            ``num_images``, ``complete``, ``format``, ``version``.
        activation: ``(N, U, V)`` uint8 quantised activation maps.
        done: ``(N,)`` bool, which entries have been computed (all of them in a complete cache).
        paths: relative file paths of the images, in dataset order.
    """

    def __init__(self, header: dict[str, Any], activation: Tensor, done: Tensor, paths: Sequence[str]) -> None:
        check_mapping(header, "header")
        missing = [key for key in _HEADER_KEYS if key not in header]
        if missing:
            raise SaliencyCacheError(f"header lacks the fields {missing}")
        num_images, grid = header["num_images"], tuple(header["grid"])
        if not isinstance(activation, Tensor) or activation.dtype != torch.uint8 or activation.ndim != 3:
            raise TypeError(f"activation must be a (N, U, V) uint8 tensor, got {_kind(activation)}")
        if tuple(activation.shape) != (num_images, *grid):
            raise SaliencyCacheError(
                f"activation shape {tuple(activation.shape)} does not match header {(num_images, *grid)}"
            )
        if not isinstance(done, Tensor) or done.dtype != torch.bool:
            raise TypeError(f"done must be a ({num_images},) bool tensor, got {_kind(done)}")
        if tuple(done.shape) != (num_images,):
            raise SaliencyCacheError(f"done must be a ({num_images},) bool tensor, got shape {tuple(done.shape)}")
        if not isinstance(paths, Sequence) or isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
            raise TypeError(f"paths must be a list of relative file paths (str), got {type(paths).__name__}")
        if len(paths) != num_images:
            raise SaliencyCacheError(f"expected {num_images} paths, found {len(paths)}")
        self.header = dict(header)
        self.activation = activation
        self.done = done
        self.paths = list(paths)

    def __len__(self) -> int:
        return self.activation.shape[0]

    def __repr__(self) -> str:
        header = self.header
        return (
            f"SaliencyCache(num_images={len(self)}, backbone={header['backbone']!r}, "
            f"grid={tuple(header['grid'])}, "
            f"image_size={tuple(header['image_size'])}, threshold_std={header['threshold_std']}, "
            f"complete={header['complete']})"
        )

    @property
    def grid(self) -> tuple[int, int]:
        """``(U, V)`` size of the stored maps."""
        return tuple(self.activation.shape[1:])  # type: ignore[return-value]

    def _checked_index(self, index: int | Tensor) -> int | Tensor:
        # Entries are dataset indices: a negative one is a mistake here, not "from the end".
        if isinstance(index, Tensor) and not index.is_floating_point() and index.dtype != torch.bool:
            low, high = (int(index.min()), int(index.max())) if index.numel() else (0, 0)
        elif isinstance(index, int) and not isinstance(index, bool):
            low = high = index
        else:
            raise TypeError(f"index must be an int or an integer tensor, got {type(index).__name__}")
        if low < 0 or high >= len(self):
            bad = low if low < 0 else high
            raise IndexError(f"index {bad} is outside the saliency cache's entries 0..{len(self) - 1}")
        return index

    def activation_map(self, index: int | Tensor) -> Tensor:
        """Stored activation map(s) as floats in ``[0, 1]``: ``(U, V)`` for an int, ``(B, U, V)`` else.

        Raises:
            IndexError: an entry outside ``0 .. len(cache) - 1``.
        """
        return self.activation[self._checked_index(index)].float() / 255

    def foreground(
        self,
        index: int | Tensor,
        threshold_std: float | None = None,
        largest_component: bool | None = None,
    ) -> Tensor:
        """Boolean foreground of the stored map(s), with the recorded rule unless overridden.

        Args:
            index: an entry, or a 1-D tensor of entries (batched, no Python loop).
            threshold_std: ``k`` in ``mean - k * std``; ``None`` uses the header's.
            largest_component: keep the largest component only; ``None`` uses the header's.

        Returns:
            ``(U, V)`` or ``(B, U, V)`` bool tensor.
        """
        threshold_std = self.header["threshold_std"] if threshold_std is None else threshold_std
        largest_component = self.header["largest_component"] if largest_component is None else largest_component
        return scda_foreground(self.activation_map(index), threshold_std, largest_component=largest_component)

    def saliency(
        self,
        index: int,
        size: Sequence[int],
        threshold_std: float | None = None,
        largest_component: bool | None = None,
    ) -> Saliency:
        """Foreground of entry ``index`` resized (nearest) to an image's ``(H, W)``, as a bool Saliency.

        At the image's own size, torchvision's v2 geometric transforms crop and flip the map exactly as
        they crop and flip the image.
        """
        if len(size) != 2 or not all(int(s) > 0 for s in size):
            raise ValueError(f"size must be a pair (H, W) of positive ints, got {size!r}")
        if not bool(self.done[self._checked_index(index)]):
            raise SaliencyCacheError(f"entry {index} of the saliency cache has not been computed yet")
        foreground = self.foreground(index, threshold_std, largest_component)
        height, width = int(size[0]), int(size[1])
        rows = _nearest_indices(foreground.shape[0], height, foreground.device)
        columns = _nearest_indices(foreground.shape[1], width, foreground.device)
        return Saliency(foreground[rows[:, None], columns[None, :]])

    def state(self) -> dict[str, Any]:
        """The dict written to disk: header fields, ``paths``, ``activation`` and ``done``."""
        return {**self.header, "paths": list(self.paths), "activation": self.activation, "done": self.done}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically with a digest of the content, as a checkpoint is written: a temporary file next
        to ``path``, then a rename, so a crash never leaves a half-written cache; mode 0600."""
        self.header["version"] = CACHE_FORMAT_VERSION  # a resumed build of an older cache is rewritten as current
        save_verified(self.state(), path, what="saliency cache")


def fail(path: Path, message: str) -> SaliencyCacheError:
    return SaliencyCacheError(f"saliency cache {str(path)!r}: {message}")


def load_saliency_cache(path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> SaliencyCache:
    """Load and validate a saliency cache written by :func:`build_saliency_cache`.

    Args:
        path: the cache file.
        allow_incomplete: accept a cache whose build was interrupted (to resume it).

    Returns:
        The :class:`SaliencyCache`.

    The content is checked against the digest stored with it (one reading pass over the maps). A cache
    written before digests were stored (layout version 1) loads with a warning.

    Raises:
        SaliencyCacheError: unreadable or corrupt (its content does not match its digest), wrong format or
            version, inconsistent shapes or dtypes, or an incomplete cache.
    """
    path = check_path(path, "path")
    check_bool(allow_incomplete, "allow_incomplete")
    if not path.is_file():
        raise FileNotFoundError(
            f"saliency cache {str(path)!r} does not exist; build it with "
            "`python -m salmask.saliency.build_cache --root <ImageFolder> --out <file>`"
        )
    state, verified = load_verified(path, what="saliency cache", error=SaliencyCacheError, mmap=True)
    if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT:
        raise fail(path, f"not a salmask saliency cache (expected format {CACHE_FORMAT!r})")
    version = state.get("version")
    if version not in range(1, CACHE_FORMAT_VERSION + 1):
        raise fail(path, f"format version {version!r}, this salmask reads versions 1 to {CACHE_FORMAT_VERSION}")
    if version >= 2 and not verified:
        raise fail(path, f"lacks the digest of its content that version {version} stores; it is corrupt or altered")
    if not verified:
        # A rebuild takes hours on ImageNet-100; an old cache stays usable, with a warning.
        warnings.warn(
            f"saliency cache {path} was written before caches stored a digest of their content (no digest): it "
            "loads unverified; rebuild it, or resume a build into it, to add one",
            UserWarning,
            stacklevel=2,
        )
    missing = [key for key in (*_HEADER_KEYS, "paths", "activation", "done") if key not in state]
    if missing:
        raise fail(path, f"missing fields {missing}")
    try:
        cache = SaliencyCache(
            {key: state[key] for key in _HEADER_KEYS}, state["activation"], state["done"], state["paths"]
        )
    except (TypeError, ValueError) as error:
        raise fail(path, str(error)) from error
    num_images, done = cache.header["num_images"], cache.done
    complete = bool(state["complete"]) and bool(done.all())
    if not complete and not allow_incomplete:
        raise fail(
            path,
            f"incomplete ({int(done.sum())} of {num_images} images computed); re-run the same "
            "`python -m salmask.saliency.build_cache` command to finish it",
        )
    return cache
