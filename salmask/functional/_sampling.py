"""Where to mask: saliency-constrained patch sampling, focal windows and mask types, batched.

Every draw takes an optional ``torch.Generator`` and happens on the device of its inputs; nothing here
loops over images or synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from salmask._defaults import MASK_TYPES as _MASK_TYPES
from salmask._validation import (
    check_bool,
    check_fraction,
    check_int,
    check_mask_ratio,
    check_mask_type_probs,
    check_size,
    check_tensor,
)

__all__ = [
    "MASK_TYPES",
    "draw_focal_windows",
    "draw_mask_ratios",
    "draw_mask_types",
    "focal_window_mask",
    "masked_patch_counts",
    "sample_patch_mask",
]

#: Names of the mask types, in the order of their integer codes in ``params["mask_type"]``.
MASK_TYPES = _MASK_TYPES


def _rand(shape: Sequence[int], device: torch.device, generator: torch.Generator | None) -> Tensor:
    return torch.rand(tuple(shape), device=device, generator=generator)


def draw_mask_ratios(
    mask_ratio: float | tuple[float, float],
    batch_size: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    same_on_batch: bool = False,
) -> Tensor:
    """Draw one masking ratio per image, uniformly from ``mask_ratio = (low, high)`` or fixed.

    Args:
        mask_ratio: a fraction in ``[0, 1]`` or a ``(low, high)`` range of fractions.
        batch_size: number of images.
        device: where the draws live.
        generator: source of randomness.
        same_on_batch: one draw shared by every image.

    Returns:
        ``(batch_size,)`` float32 ratios.

    Example:
        >>> draw_mask_ratios((0.05, 0.25), 4, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([4])
    """
    low, high = check_mask_ratio(mask_ratio)
    _check_batch(batch_size, same_on_batch)
    device = torch.device(device) if device is not None else torch.device("cpu")
    draws = _rand((1 if same_on_batch else batch_size,), device, generator)
    return (low + (high - low) * draws).expand(batch_size)


def _check_batch(batch_size: int, same_on_batch: bool) -> None:
    check_int(batch_size, "batch_size", minimum=0)
    check_bool(same_on_batch, "same_on_batch")


def _check_counts_inputs(foreground: Tensor, mask_ratio: Tensor) -> None:
    check_tensor(foreground, "foreground", ndim=2)
    if foreground.dtype != torch.bool:
        raise TypeError(f"foreground must be a bool tensor, got dtype {foreground.dtype}")
    check_tensor(mask_ratio, "mask_ratio", ndim=1, floating=True)
    if mask_ratio.shape[0] != foreground.shape[0]:
        raise ValueError(
            f"mask_ratio must hold one ratio per row of foreground ({foreground.shape[0]}), got {mask_ratio.shape[0]}"
        )


def _round_half_up(values: Tensor) -> Tensor:
    # Half-up, not torch.round's half-to-even, so that counts grow monotonically with the ratio.
    return torch.floor(values + 0.5).long()


def masked_patch_counts(
    foreground: Tensor, mask_ratio: Tensor, *, hard_negative: bool = False
) -> tuple[Tensor, Tensor]:
    """How many foreground and background patches each image masks.

    Positive views (``hard_negative=False``): the total is ``round(mask_ratio * N)`` patches of the grid,
    split in proportion ``gamma : 1 - gamma`` where ``gamma`` is the foreground fraction; the foreground
    share is ``round(mask_ratio * n_foreground)`` and the background takes the rest. Counts never go
    negative and never exceed their group: when one group cannot hold its share the other takes the
    excess, so the total is exact for every ratio in ``[0, 1]``.

    Hard negatives (``hard_negative=True``): ``round(mask_ratio * n_foreground)`` foreground patches and no
    background, at least one when the image has any foreground (a hard negative with nothing masked
    would equal the positive key).

    Args:
        foreground: ``(B, N)`` boolean foreground over the flattened patch grid.
        mask_ratio: ``(B,)`` ratios in ``[0, 1]``.
        hard_negative: count for a hard negative instead of a positive view.

    Returns:
        ``(foreground_count, background_count)``, each ``(B,)`` int64.

    Example:
        >>> foreground = torch.zeros(1, 49, dtype=torch.bool)
        >>> foreground[:, :20] = True
        >>> masked_patch_counts(foreground, torch.tensor([0.25]))
        (tensor([5]), tensor([7]))
        >>> masked_patch_counts(foreground, torch.tensor([0.5]), hard_negative=True)
        (tensor([10]), tensor([0]))
    """
    _check_counts_inputs(foreground, mask_ratio)
    check_bool(hard_negative, "hard_negative")
    num_patches = foreground.shape[-1]
    num_foreground = foreground.sum(dim=-1)
    num_background = num_patches - num_foreground
    # Double precision on these (B,) tensors keeps products like 0.7 * 5 from rounding across a half.
    mask_ratio = mask_ratio.double()
    foreground_share = _round_half_up(mask_ratio * num_foreground)
    if hard_negative:
        # Clamping to [1, n_foreground] in this order leaves 0 exactly when there is no foreground.
        foreground_count = foreground_share.clamp(min=1).minimum(num_foreground)
        return foreground_count, torch.zeros_like(foreground_count)
    total = _round_half_up(mask_ratio * num_patches)
    foreground_count = foreground_share.minimum(num_foreground)
    background_count = (total - foreground_count).clamp(min=0).minimum(num_background)
    foreground_count = (total - background_count).clamp(min=0).minimum(num_foreground)
    return foreground_count, background_count


def sample_patch_mask(
    foreground: Tensor | None,
    mask_ratio: Tensor,
    *,
    num_patches: int | None = None,
    hard_negative: bool = False,
    num_sets: int = 1,
    generator: torch.Generator | None = None,
    same_on_batch: bool = False,
) -> Tensor:
    """Choose the patches to mask, uniformly at random inside the foreground and the background.

    Each image (and each of its ``num_sets`` independent sets, e.g. one per channel for channel-wise
    masks) masks exactly :func:`masked_patch_counts` patches of each group. Without saliency
    (``foreground=None``) the whole grid is one group: uniform random masking, as in MSCN.

    Args:
        foreground: ``(B, N)`` boolean foreground over the flattened patch grid, or ``None``.
        mask_ratio: ``(B,)`` ratios in ``[0, 1]``.
        num_patches: ``N``, needed only when ``foreground`` is ``None``.
        hard_negative: mask foreground patches only (see :func:`masked_patch_counts`); needs saliency.
        num_sets: independent patch sets per image, all with the same counts.
        generator: source of randomness.
        same_on_batch: share the random draw across the batch (masks still follow each image's saliency).

    Returns:
        ``(B, num_sets, N)`` boolean mask, ``True`` where a patch is masked.

    Example:
        >>> foreground = torch.zeros(2, 49, dtype=torch.bool)
        >>> foreground[:, 10:30] = True
        >>> mask = sample_patch_mask(foreground, torch.tensor([0.25, 0.25]))
        >>> (mask & foreground[:, None]).sum(-1).flatten().tolist()
        [5, 5]
        >>> (mask & ~foreground[:, None]).sum(-1).flatten().tolist()
        [7, 7]
    """
    check_tensor(mask_ratio, "mask_ratio", ndim=1, floating=True)
    check_bool(hard_negative, "hard_negative")
    check_bool(same_on_batch, "same_on_batch")
    check_int(num_sets, "num_sets", minimum=1)
    if num_patches is not None:
        check_int(num_patches, "num_patches", minimum=1)
    batch_size = mask_ratio.shape[0]
    if foreground is None:
        if hard_negative:
            raise ValueError("hard negatives mask the foreground only and need a saliency map; got none")
        if num_patches is None:
            raise ValueError("num_patches is required when foreground is None")
        foreground = torch.ones(batch_size, num_patches, dtype=torch.bool, device=mask_ratio.device)
    check_tensor(foreground, "foreground")
    if foreground.dtype != torch.bool:
        raise TypeError(f"foreground must be a bool tensor, got dtype {foreground.dtype}")
    if foreground.ndim != 2 or foreground.shape[0] != batch_size:
        raise ValueError(
            f"foreground must be shaped (B, N) with B={batch_size} like mask_ratio, got {tuple(foreground.shape)}"
        )
    num_patches = foreground.shape[-1]
    foreground_count, background_count = masked_patch_counts(foreground, mask_ratio, hard_negative=hard_negative)

    # Foreground keys in [0, 1) sort before background keys in [1, 2), so a single sort ranks each group
    # independently: a patch's rank inside its group is its sorted position minus the size of the
    # groups sorted before it.
    draw_shape = (1 if same_on_batch else batch_size, num_sets, num_patches)
    keys = _rand(draw_shape, foreground.device, generator).expand(batch_size, num_sets, num_patches)
    is_background = ~foreground[:, None, :]
    keys = keys + is_background
    order = keys.argsort(dim=-1)
    positions = torch.arange(num_patches, device=foreground.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    num_foreground = foreground.sum(dim=-1)[:, None, None]
    rank_in_group = torch.where(is_background, rank - num_foreground, rank)
    count = torch.where(is_background, background_count[:, None, None], foreground_count[:, None, None])
    return rank_in_group < count


def draw_mask_types(
    probabilities: dict[str, float],
    batch_size: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    same_on_batch: bool = False,
) -> Tensor:
    """Draw a mask type per image: ``0`` spatial, ``1`` channel-wise, ``2`` focal (see ``MASK_TYPES``).

    Args:
        probabilities: probability of each type name in ``MASK_TYPES``; they must sum to 1. The
            high-pass release mixture is ``{"spatial": 0.24, "channel": 0.56, "focal": 0.2}``.
        batch_size: number of images.
        device: where the draws live.
        generator: source of randomness.
        same_on_batch: one type for every image.

    Returns:
        ``(batch_size,)`` int64 type codes.

    Example:
        >>> draw_mask_types({"spatial": 1.0}, 3)
        tensor([0, 0, 0])
    """
    probabilities = check_mask_type_probs(probabilities, "probabilities")
    _check_batch(batch_size, same_on_batch)
    cumulative = torch.tensor([probabilities.get(name, 0.0) for name in MASK_TYPES], dtype=torch.float64).cumsum(0)
    device = torch.device(device) if device is not None else torch.device("cpu")
    draws = _rand((1 if same_on_batch else batch_size,), device, generator).double()
    # The last boundary is treated as 1 so that rounding in the cumulative sum never yields code 3.
    boundaries = cumulative[:-1].to(device)
    return torch.bucketize(draws, boundaries, right=True).expand(batch_size)


def draw_focal_windows(
    batch_size: int,
    image_size: tuple[int, int],
    window_fraction: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    same_on_batch: bool = False,
) -> Tensor:
    """Draw one focal window per image, uniformly among the positions that fit in the image.

    The window's sides are ``window_fraction`` of the image's (the release keeps a 200/224 window of a
    positive and fills a 130/224 window of a hard negative, so the windows scale with the view);
    :func:`focal_window_mask` renders them.

    Args:
        batch_size: number of images.
        image_size: ``(H, W)``.
        window_fraction: window side as a fraction of the image side, in ``(0, 1]``.
        device: where the windows live.
        generator: source of randomness.
        same_on_batch: one window for every image.

    Returns:
        ``(B, 4)`` int64 windows as ``(top, left, height, width)``.

    Example:
        >>> draw_focal_windows(2, (224, 224), 130 / 224)[:, 2:].tolist()
        [[130, 130], [130, 130]]
    """
    check_fraction(window_fraction, "window_fraction")
    _check_batch(batch_size, same_on_batch)
    height, width = check_size(image_size, "image_size")
    device = torch.device(device) if device is not None else torch.device("cpu")
    window_height = max(1, round(height * window_fraction))
    window_width = max(1, round(width * window_fraction))
    draws = _rand((1 if same_on_batch else batch_size, 2), device, generator).expand(batch_size, 2)
    top = (draws[:, 0] * (height - window_height + 1)).long().clamp(max=height - window_height)
    left = (draws[:, 1] * (width - window_width + 1)).long().clamp(max=width - window_width)
    sizes = torch.tensor([window_height, window_width], device=device).expand(batch_size, 2)
    return torch.cat([top[:, None], left[:, None], sizes], dim=1)


def focal_window_mask(window: Tensor, image_size: tuple[int, int], *, keep_window: bool) -> Tensor:
    """Render focal windows as pixel masks: everything outside the window (positives) or the window itself.

    Args:
        window: ``(B, 4)`` int64 windows as ``(top, left, height, width)``, e.g. from
            :func:`draw_focal_windows`.
        image_size: ``(H, W)``.
        keep_window: ``True`` masks everything outside the window; ``False`` masks the window.

    Returns:
        ``(B, 1, H, W)`` boolean pixel mask.

    Example:
        >>> window = torch.tensor([[2, 3, 4, 5]])
        >>> int(focal_window_mask(window, (16, 16), keep_window=False).sum())
        20
    """
    height, width = check_size(image_size, "image_size")
    check_bool(keep_window, "keep_window")
    check_tensor(window, "window", ndim=2)
    if window.is_floating_point() or window.dtype == torch.bool or window.shape[1] != 4:
        raise ValueError(
            f"window must be (B, 4) integer (top, left, height, width), got {window.dtype} {tuple(window.shape)}"
        )
    top, left, window_height, window_width = window.unbind(-1)
    rows = torch.arange(height, device=window.device)[None, :]
    cols = torch.arange(width, device=window.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + window_height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + window_width)[:, None])
    # Negate the small per-row and per-column vectors, not the (B, H, W) mask: one pass over the pixels.
    if keep_window:
        mask = ~in_rows[:, :, None] | ~in_cols[:, None, :]
    else:
        mask = in_rows[:, :, None] & in_cols[:, None, :]
    return mask[:, None]
