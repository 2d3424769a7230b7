"""Argument checks shared by the kernels and the transforms: every message names the argument."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def check_patch_size(patch_size: int | Sequence[int], image_size: Sequence[int]) -> tuple[int, int]:
    """Validate ``patch_size`` against an image and return it as ``(patch_height, patch_width)``."""
    if isinstance(patch_size, bool) or not (
        isinstance(patch_size, int)
        or (isinstance(patch_size, Sequence) and len(patch_size) == 2 and all(isinstance(p, int) for p in patch_size))
    ):
        raise TypeError(f"patch_size must be an int or a pair of ints, got {patch_size!r}")
    patch_height, patch_width = as_pair(patch_size)
    if patch_height < 1 or patch_width < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    height, width = int(image_size[0]), int(image_size[1])
    if patch_height > height or patch_width > width:
        raise ValueError(
            f"patch_size {(patch_height, patch_width)} is larger than the image ({height}, {width}); "
            "pass a smaller patch_size"
        )
    return patch_height, patch_width


def check_ratio(ratio: float | Sequence[float], name: str = "ratio") -> tuple[float, float]:
    """Validate a fraction or a ``(low, high)`` range of fractions and return it as a range."""
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        low = high = float(ratio)
    elif isinstance(ratio, Sequence) and len(ratio) == 2 and all(isinstance(r, (int, float)) for r in ratio):
        low, high = float(ratio[0]), float(ratio[1])
    else:
        raise TypeError(f"{name} must be a number or a (low, high) pair of numbers, got {ratio!r}")
    # Comparisons alone (they reject nan and inf too) also hold for the symbolic floats of torch.compile.
    if not (0.0 <= low <= 1.0 and 0.0 <= high <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {ratio!r}")
    if low > high:
        raise ValueError(f"{name} range is reversed: low {low} > high {high}")
    return low, high


def check_probability(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_image(image: Tensor, name: str = "image") -> None:
    """A ``(C, H, W)`` or ``(B, C, H, W)`` tensor."""
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim not in (3, 4):
        raise ValueError(f"{name} must be shaped (C, H, W) or (B, C, H, W), got shape {tuple(image.shape)}")
    if image.shape[-1] == 0 or image.shape[-2] == 0 or image.shape[-3] == 0:
        raise ValueError(f"{name} must have at least one channel and one pixel, got shape {tuple(image.shape)}")
    if not (image.is_floating_point() or image.dtype == torch.uint8):
        raise TypeError(f"{name} must be a float or uint8 tensor, got dtype {image.dtype}")


def check_float_image(image: Tensor, fill: str) -> None:
    if not image.is_floating_point():
        raise TypeError(
            f"the {fill!r} fill needs a float image (its values leave the uint8 range), got dtype "
            f"{image.dtype}; convert with torchvision.transforms.v2.ToDtype(torch.float32, scale=True)"
        )


def check_mask(mask: Tensor, image: Tensor) -> None:
    """A boolean pixel mask that broadcasts against a ``(B, C, H, W)`` image."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.ndim != image.ndim or any(m not in (1, i) for m, i in zip(mask.shape, image.shape, strict=True)):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast against image of shape {tuple(image.shape)}"
        )


def check_kernel(kernel_size: int, sigma: float, name: str = "kernel_size") -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{name} must be a positive odd int, got {kernel_size!r}")
    if not (isinstance(sigma, (int, float)) and 0 < sigma < math.inf):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")


def values_readable(tensor: Tensor) -> bool:
    """Whether a check may read ``tensor``'s values: not a meta tensor, not while torch.compile or FX trace."""
    if torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return False
    return tensor.device.type != "meta"


def check_finite_image(image: Tensor, sums: Tensor | None = None, name: str = "image") -> None:
    """Reject an image with NaN or infinite values, in one reading pass over it (or none, given its ``sums``).

    ``sums`` are any sums that cover every value of the image, e.g. the per-channel sums a mean fill needs.
    """
    if not image.is_floating_point():
        return
    # A sum is non-finite when any of its terms is, and reads the image at memory speed without a mask the
    # size of the image; only a sum that overflowed from finite values needs the exact test.
    sums = image.sum() if sums is None else sums
    if bool(torch.isfinite(sums).all()) or bool(torch.isfinite(image).all()):
        return
    raise ValueError(f"{name} has non-finite values (nan or inf)")


def check_saliency_scores(saliency: Tensor) -> None:
    """Float saliency scores must lie in ``[0, 1]``."""
    if saliency.is_floating_point() and not bool(((saliency >= 0) & (saliency <= 1)).all()):
        raise ValueError("saliency scores must lie in [0, 1] (and be finite); threshold raw maps first")
