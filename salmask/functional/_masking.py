"""The whole masking step for a batch: draw every image's mask, then fill it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from salmask.functional._checks import check_image, check_probability, check_ratio
from salmask.functional._fill import fill_blur, fill_constant, fill_high_pass, fill_mean, fill_noise
from salmask.functional._grid import expand_patch_mask, patch_grid_size, saliency_to_patch_grid
from salmask.functional._sampling import (
    MASK_TYPES,
    draw_mask_types,
    draw_ratios,
    focal_window_mask,
    sample_patch_mask,
)

__all__ = ["FILLS", "apply_fill", "draw_mask_params", "mask_images"]

#: The fills by name; each takes ``(image, mask, **fill_options)``.
FILLS: dict[str, Callable[..., Tensor]] = {
    "high_pass": fill_high_pass,
    "blur": fill_blur,
    "mean": fill_mean,
    "constant": fill_constant,
    "noise": fill_noise,
}

SPATIAL, CHANNEL, FOCAL = range(len(MASK_TYPES))


def check_mask_type_probs(mask_type_probs: dict[str, float]) -> dict[str, float]:
    if not isinstance(mask_type_probs, dict) or not mask_type_probs:
        raise TypeError(f"mask_type_probs must be a dict from {MASK_TYPES} to probabilities, got {mask_type_probs!r}")
    unknown = set(mask_type_probs) - set(MASK_TYPES)
    if unknown:
        raise ValueError(f"mask_type_probs has unknown mask types {sorted(unknown)}; known: {MASK_TYPES}")
    for name, probability in mask_type_probs.items():
        check_probability(probability, f"mask_type_probs[{name!r}]")
    if not math.isclose(sum(mask_type_probs.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"mask_type_probs must sum to 1, got {mask_type_probs!r}")
    return {name: float(probability) for name, probability in mask_type_probs.items()}


def canonical_saliency(saliency: Tensor, batch_size: int, batched: bool) -> Tensor:
    """Bring a saliency map to ``(B, h, w)``, checking it belongs to ``batch_size`` images."""
    if not isinstance(saliency, Tensor):
        raise TypeError(f"saliency must be a tensor, got {type(saliency).__name__}")
    if saliency.dtype != torch.bool and not saliency.is_floating_point():
        raise TypeError(f"saliency must be bool or float scores in [0, 1], got dtype {saliency.dtype}")
    if saliency.ndim == 4 and saliency.shape[1] == 1:
        saliency = saliency[:, 0]
    if saliency.ndim == 2:
        saliency = saliency[None]
    if saliency.ndim != 3:
        raise ValueError(
            f"saliency must be shaped (H, W), (1, H, W), (B, H, W) or (B, 1, H, W), got {tuple(saliency.shape)}"
        )
    if saliency.shape[0] != batch_size:
        expected = f"a batch of {batch_size}" if batched else "one image"
        raise ValueError(
            f"saliency holds {saliency.shape[0]} maps but the images are {expected}; pass one saliency map per image"
        )
    return saliency


def draw_mask_params(
    image_shape: tuple[int, ...] | torch.Size,
    saliency: Tensor | None = None,
    *,
    ratio: float | tuple[float, float] = (0.05, 0.25),
    patch_size: int | tuple[int, int] = 32,
    hard_negative: bool = False,
    mask_type_probs: dict[str, float] | None = None,
    focal_keep_fraction: float = 200 / 224,
    focal_fill_fraction: float = 130 / 224,
    saliency_threshold: float = 0.5,
    p: float = 1.0,
    same_on_batch: bool = False,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Draw the masks of a batch: ratios, mask types, patch sets and focal windows, per image.

    This is the "where to mask" half of the method; :func:`apply_fill` is the "how". The result can be
    read back (for figures and tests) and replayed on the same images.

    Args:
        image_shape: ``(B, C, H, W)`` (or ``(C, H, W)`` for one image) of the images to mask.
        saliency: ``(B, h, w)`` (or ``(h, w)``) boolean map or float scores of any spatial size, resampled
            onto the patch grid; ``None`` for uniform random masking (the MSCN baseline).
        ratio: fraction of the patch grid to mask (positives: alpha, default ``U(0.05, 0.25)``) or of the
            foreground (hard negatives: beta, typically ``U(0.4, 0.7)``), fixed or a ``(low, high)`` range.
        patch_size: patch side in pixels, or ``(height, width)``; 32 gives the 7x7 grid at 224 px.
        hard_negative: mask foreground patches only, to make a hard negative from the key view.
        mask_type_probs: probability of each of ``"spatial"``, ``"channel"`` (a patch set per channel) and
            ``"focal"`` (a window, no saliency); default spatial only.
        focal_keep_fraction: side of the window a focal positive keeps, as a fraction of the view.
        focal_fill_fraction: side of the window a focal hard negative fills.
        saliency_threshold: mean saliency a patch needs to count as foreground.
        p: probability that an image is masked at all.
        same_on_batch: share every random draw across the batch.
        device: where the parameters live (default: the saliency's device, else CPU).
        generator: source of randomness for every draw.

    Returns:
        A dict of tensors, ``B`` first:

        - ``"mask"``: ``(B, S, H, W)`` bool, the pixels to fill (``S`` is ``C`` when channel-wise masks are
          possible, else 1);
        - ``"patch_mask"``: ``(B, S, rows, cols)`` bool, the masked patches (empty for focal masks);
        - ``"ratio"``: ``(B,)`` float; ``"mask_type"``: ``(B,)`` int64 codes into ``MASK_TYPES``;
        - ``"focal_window"``: ``(B, 4)`` int64 ``(top, left, height, width)`` of the focal window;
        - ``"applied"``: ``(B,)`` bool, the images that drew ``p``;
        - ``"valid"``: ``(B,)`` bool; for hard negatives, ``False`` where none could be made (no
          foreground, also for focal masks, or not applied), so the loss can drop it instead of
          contrasting the positive with itself; always ``True`` for positives;
        - ``"foreground"``: ``(B, rows, cols)`` bool, the saliency on the patch grid (all ``True`` without
          saliency).

    Example:
        >>> saliency = torch.zeros(2, 7, 7, dtype=torch.bool)
        >>> saliency[:, 2:5, 2:5] = True
        >>> params = draw_mask_params((2, 3, 224, 224), saliency, ratio=0.5, hard_negative=True)
        >>> params["patch_mask"].sum(dim=(1, 2, 3)).tolist(), params["valid"].tolist()
        ([5, 5], [True, True])
    """
    if len(image_shape) not in (3, 4):
        raise ValueError(f"image_shape must be (C, H, W) or (B, C, H, W), got {tuple(image_shape)}")
    batched = len(image_shape) == 4
    batch_size = image_shape[0] if batched else 1
    num_channels, height, width = (int(s) for s in image_shape[-3:])
    image_size = (height, width)
    check_ratio(ratio)
    p = check_probability(p, "p")
    mask_type_probs = check_mask_type_probs(mask_type_probs or {"spatial": 1.0})
    if device is None:
        device = saliency.device if saliency is not None else torch.device("cpu")
    device = torch.device(device)
    rows, cols = patch_grid_size(image_size, patch_size)

    if saliency is not None:
        saliency = canonical_saliency(saliency, batch_size, batched).to(device)
        foreground = saliency_to_patch_grid(saliency, image_size, patch_size, saliency_threshold)
    elif hard_negative:
        raise ValueError("a hard negative masks the object and needs a saliency map; got saliency=None")
    else:
        foreground = torch.ones(batch_size, rows, cols, dtype=torch.bool, device=device)

    draw: dict[str, Any] = {"device": device, "generator": generator, "same_on_batch": same_on_batch}
    ratios = draw_ratios(ratio, batch_size, **draw)
    mask_type = draw_mask_types(mask_type_probs, batch_size, **draw)
    applied = torch.rand((1 if same_on_batch else batch_size,), device=device, generator=generator) < p
    applied = applied.expand(batch_size)

    channel_wise = mask_type_probs.get("channel", 0.0) > 0
    num_sets = num_channels if channel_wise else 1
    patch_sets = sample_patch_mask(
        foreground.flatten(1),
        ratios,
        hard_negative=hard_negative,
        num_sets=num_sets,
        generator=generator,
        same_on_batch=same_on_batch,
    )
    # Spatial images use their first set on every channel; channel-wise images keep one set per channel.
    patch_mask = torch.where((mask_type == CHANNEL)[:, None, None], patch_sets, patch_sets[:, :1])
    patch_mask = patch_mask & ((mask_type != FOCAL) & applied)[:, None, None]
    patch_mask = patch_mask.unflatten(-1, (rows, cols))
    mask = expand_patch_mask(patch_mask, image_size, patch_size)

    # A hard negative exists where some patch of the object, or a focal window, is masked.
    valid = (
        patch_mask.flatten(1).any(dim=1) if hard_negative else torch.ones(batch_size, dtype=torch.bool, device=device)
    )
    uses_focal = mask_type_probs.get("focal", 0.0) > 0
    if uses_focal:
        focal_mask, focal_window = focal_window_mask(
            batch_size,
            image_size,
            focal_fill_fraction if hard_negative else focal_keep_fraction,
            keep_window=not hard_negative,
            **draw,
        )
        is_focal = (mask_type == FOCAL) & applied
        if hard_negative:
            # A focal window ignores saliency; on an image without foreground it would hide background only,
            # and the "negative" would be the key itself (the release counts it anyway).
            is_focal = is_focal & foreground.flatten(1).any(dim=1)
        mask = torch.where(is_focal[:, None, None, None], focal_mask, mask)
        if hard_negative:
            valid = valid | is_focal
    else:
        # Skipping the focal pass when focal masks cannot be drawn saves two passes over the pixels.
        focal_window = torch.zeros(batch_size, 4, dtype=torch.long, device=device)
    params = {
        "mask": mask,
        "patch_mask": patch_mask,
        "ratio": ratios,
        "mask_type": mask_type,
        "focal_window": focal_window,
        "applied": applied,
        "valid": valid,
        "foreground": foreground,
    }
    if not batched:
        params = {name: value[0] for name, value in params.items()}
    return params


def apply_fill(
    image: Tensor,
    mask: Tensor,
    fill: str = "high_pass",
    *,
    generator: torch.Generator | None = None,
    inplace: bool = False,
    **fill_options: Any,
) -> Tensor:
    """Fill the masked pixels of ``image`` with the fill named ``fill`` (see ``FILLS``).

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` image.
        mask: boolean pixel mask broadcasting against ``image``, e.g. ``params["mask"]``.
        fill: ``"high_pass"``, ``"blur"``, ``"mean"``, ``"constant"`` or ``"noise"``.
        generator: source of randomness for the fills that draw noise.
        inplace: write into ``image``.
        **fill_options: the fill's own options (``noise_std``, ``kernel_size``, ``sigma``, ``value``, ...).

    Returns:
        The masked image.

    Example:
        >>> image = torch.rand(2, 3, 64, 64)
        >>> params = draw_mask_params(image.shape, ratio=0.25)
        >>> apply_fill(image, params["mask"], "mean").shape
        torch.Size([2, 3, 64, 64])
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {sorted(FILLS)}, got {fill!r}")
    if fill in ("high_pass", "noise"):
        fill_options["generator"] = generator
    return FILLS[fill](image, mask, inplace=inplace, **fill_options)


def mask_images(
    image: Tensor,
    saliency: Tensor | None = None,
    fill: str = "high_pass",
    *,
    generator: torch.Generator | None = None,
    fill_options: dict[str, Any] | None = None,
    **mask_options: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mask a batch in one call: :func:`draw_mask_params` followed by :func:`apply_fill`.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` image.
        saliency: the images' saliency (see :func:`draw_mask_params`), or ``None``.
        fill: name of the fill (see ``FILLS``).
        generator: source of randomness for masks and fills.
        fill_options: options of the fill.
        **mask_options: options of :func:`draw_mask_params`.

    Returns:
        ``(masked_image, params)``.

    Example:
        >>> image = torch.rand(4, 3, 224, 224)
        >>> masked, params = mask_images(image, fill="blur", ratio=0.25)
        >>> params["patch_mask"].sum(dim=(1, 2, 3)).tolist()
        [12, 12, 12, 12]
    """
    check_image(image)
    params = draw_mask_params(image.shape, saliency, device=image.device, generator=generator, **mask_options)
    return apply_fill(image, params["mask"], fill, generator=generator, **(fill_options or {})), params
