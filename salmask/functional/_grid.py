"""The patch grid: the unit of masking, and the bridge between saliency maps and pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from salmask._validation import (
    as_pair,
    check_fraction,
    check_patch_size,
    check_saliency,
    check_saliency_scores,
    check_size,
    check_tensor,
    values_readable,
)

__all__ = ["expand_patch_mask", "patch_grid_size", "saliency_to_patch_grid"]


def patch_grid_size(image_size: tuple[int, int], patch_size: int | tuple[int, int]) -> tuple[int, int]:
    """Number of patch rows and columns that cover an image.

    Sizes that are not multiples of the patch get a ceil grid: the last row and column of patches are
    smaller, so every pixel belongs to exactly one patch.

    Args:
        image_size: ``(H, W)`` of the image.
        patch_size: side of a square patch, or ``(patch_height, patch_width)``.

    Returns:
        ``(rows, cols)``.

    Example:
        >>> patch_grid_size((224, 224), 32)
        (7, 7)
        >>> patch_grid_size((100, 150), 32)
        (4, 5)
    """
    height, width = check_size(image_size, "image_size")
    patch_height, patch_width = check_patch_size(patch_size, image_size)
    return -(-height // patch_height), -(-width // patch_width)


def expand_patch_mask(patch_mask: Tensor, image_size: tuple[int, int], patch_size: int | tuple[int, int]) -> Tensor:
    """Turn a mask over the patch grid into a mask over pixels.

    Args:
        patch_mask: ``(..., rows, cols)`` mask over the grid of ``patch_grid_size(image_size, patch_size)``.
        image_size: ``(H, W)`` of the image.
        patch_size: the patch the grid was made with.

    Returns:
        ``(..., H, W)`` tensor of ``patch_mask``'s dtype, each pixel carrying its patch's value.

    Example:
        >>> grid = torch.tensor([[True, False], [False, False]])
        >>> expand_patch_mask(grid, (3, 3), 2).int()
        tensor([[1, 1, 0],
                [1, 1, 0],
                [0, 0, 0]], dtype=torch.int32)
    """
    check_tensor(patch_mask, "patch_mask")
    rows, cols = patch_grid_size(image_size, patch_size)
    if patch_mask.ndim < 2 or tuple(patch_mask.shape[-2:]) != (rows, cols):
        raise ValueError(
            f"patch_mask must end in the patch grid {(rows, cols)} for image_size={tuple(image_size)} and "
            f"patch_size={patch_size}, got shape {tuple(patch_mask.shape)}"
        )
    patch_height, patch_width = as_pair(patch_size)
    # Widen the columns first (a copy the size of one pixel row per patch row), then repeat whole pixel rows:
    # each copy moves contiguous runs of a full row instead of one patch width at a time, which is an order
    # of magnitude faster than broadcasting each patch over its pixels in one step.
    leading = patch_mask.shape[:-2]
    pixel_rows = patch_mask[..., None].expand(*leading, rows, cols, patch_width)
    pixel_rows = pixel_rows.reshape(*leading, rows, 1, cols * patch_width)
    pixels = pixel_rows.expand(*leading, rows, patch_height, cols * patch_width)
    pixels = pixels.reshape(*leading, rows * patch_height, cols * patch_width)
    height, width = image_size
    if (rows * patch_height, cols * patch_width) != (height, width):
        pixels = pixels[..., :height, :width].contiguous()
    return pixels


def _patch_areas(image_size: tuple[int, int], patch_size: tuple[int, int], device: torch.device) -> Tensor:
    """``(rows, cols)`` pixel count of every patch; the last row and column may be smaller."""
    sides = []
    for length, patch in zip(image_size, patch_size, strict=True):
        starts = torch.arange(0, length, patch, device=device)
        sides.append((length - starts).clamp(max=patch))
    return sides[0][:, None] * sides[1][None, :]


def saliency_to_patch_grid(
    saliency: Tensor,
    image_size: tuple[int, int],
    patch_size: int | tuple[int, int],
    threshold: float = 0.5,
) -> Tensor:
    """Resample a saliency map of any spatial size onto the patch grid of an image.

    The map is taken to cover the whole image. A patch is foreground when the mean saliency over its
    area reaches ``threshold``: for a boolean map, when at least that fraction of its pixels is
    foreground. A map already on the grid (e.g. SCDA's 7x7 for a 224 px view and 32 px patches) is only
    thresholded.

    Args:
        saliency: ``(B, h, w)`` boolean map or float scores in ``[0, 1]`` (checked; boolean maps need no
            check and no host synchronisation).
        image_size: ``(H, W)`` of the images the map belongs to.
        patch_size: side of a square patch, or ``(patch_height, patch_width)``.
        threshold: mean saliency a patch needs to count as foreground, in ``(0, 1]``.

    Returns:
        ``(B, rows, cols)`` boolean foreground grid.

    Raises:
        ValueError: float scores outside ``[0, 1]`` or NaN.

    Example:
        >>> saliency = torch.zeros(1, 224, 224, dtype=torch.bool)
        >>> saliency[:, 64:160, 64:160] = True
        >>> saliency_to_patch_grid(saliency, (224, 224), 32)[0].int()
        tensor([[0, 0, 0, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0, 0],
                [0, 0, 1, 1, 1, 0, 0],
                [0, 0, 1, 1, 1, 0, 0],
                [0, 0, 1, 1, 1, 0, 0],
                [0, 0, 0, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    """
    saliency = check_saliency(saliency)
    if saliency.is_floating_point() and values_readable(saliency):
        # Scores are compared with the threshold here: 0-255 floats would make every patch foreground, NaN
        # none. A read of the small map (a host synchronisation on an accelerator, which boolean maps skip).
        check_saliency_scores(saliency)
    check_fraction(threshold, "saliency_threshold")
    image_size = check_size(image_size, "image_size")
    patch_height, patch_width = check_patch_size(patch_size, image_size)
    rows, cols = patch_grid_size(image_size, (patch_height, patch_width))
    scores = saliency if saliency.is_floating_point() else saliency.float()
    if tuple(scores.shape[-2:]) != (rows, cols):
        height, width = image_size
        if tuple(scores.shape[-2:]) != (height, width):
            # Area interpolation averages when shrinking and replicates when growing, so the map is
            # brought to pixel resolution without inventing foreground.
            scores = F.interpolate(scores[:, None], size=(height, width), mode="area")[:, 0]
        padded = F.pad(scores, (0, cols * patch_width - width, 0, rows * patch_height - height))
        sums = F.avg_pool2d(padded[:, None], (patch_height, patch_width), divisor_override=1)[:, 0]
        scores = sums / _patch_areas(image_size, (patch_height, patch_width), scores.device)
    return scores >= threshold
