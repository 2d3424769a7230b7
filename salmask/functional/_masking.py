"""The whole masking step for a batch: draw every image's mask, render it where it is applied, fill it.

:func:`draw_mask_params` draws the random part of a batch's masks, a few small tensors per image (patch
sets on the grid, ratios, mask types, focal windows); :func:`render_mask` turns them into a pixel mask
and :func:`apply_mask` fills the pixels they mask. Replaying a draw is calling :func:`apply_mask` again
with the same parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from salmask._defaults import (
    FOCAL_FILL_FRACTION,
    FOCAL_KEEP_FRACTION,
    MASK_RATIO,
    PATCH_SIZE,
    SALIENCY_THRESHOLD,
    SPATIAL_ONLY,
)
from salmask._validation import (
    as_pair,
    check_bool,
    check_finite_image,
    check_fraction,
    check_generator,
    check_image,
    check_kernel,
    check_mapping,
    check_mask,
    check_mask_ratio,
    check_mask_type_probs,
    check_patch_size,
    check_probability,
    check_real,
    check_saliency,
    is_int,
    values_readable,
)
from salmask.functional._fill import (
    blur_source,
    constant_source,
    fill_blur,
    fill_constant,
    fill_mean,
    fill_noise,
    fill_patch_rows,
    mean_source,
    plane_sums,
    where_masked,
)
from salmask.functional._grid import expand_patch_mask, patch_grid_size, saliency_to_patch_grid
from salmask.functional._sampling import (
    MASK_TYPES,
    draw_focal_windows,
    draw_mask_ratios,
    draw_mask_types,
    focal_window_mask,
    sample_patch_mask,
)

__all__ = ["FILLS", "apply_fill", "apply_mask", "draw_mask_params", "mask_images", "render_mask"]

#: The fills by name; each takes ``(image, mask, **fill_options)``.
FILLS: dict[str, Callable[..., Tensor]] = {
    "noise": fill_noise,
    "blur": fill_blur,
    "mean": fill_mean,
    "constant": fill_constant,
}
# What masked pixels take, for the fills that draw no noise.
_SOURCES: dict[str, Callable[..., Tensor]] = {"blur": blur_source, "mean": mean_source, "constant": constant_source}

# The options each fill kernel takes after (image, mask), with the kernel's own defaults.
_FILL_OPTIONS = {
    name: {
        parameter.name: parameter.default
        for parameter in list(inspect.signature(kernel).parameters.values())[2:]
        if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    }
    for name, kernel in FILLS.items()
}

SPATIAL, CHANNEL, FOCAL = range(len(MASK_TYPES))


def check_fill(fill: str, fill_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate a fill's name and options; return its options completed with the kernel's defaults."""
    if fill == "high_pass":
        raise ValueError(
            "fill 'high_pass' is a recipe, not a fill: the high-pass filter of the whole view followed by the "
            "noise fill (HighPassMask, or MaskedViews('high_pass'))"
        )
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {sorted(FILLS)}, got {fill!r}")
    check_mapping(fill_options, "fill_options", optional=True)
    defaults = _FILL_OPTIONS[fill]
    unknown = set(fill_options or {}) - set(defaults)
    if unknown:
        raise ValueError(f"fill_options {sorted(unknown)} do not apply to fill {fill!r}; it takes {sorted(defaults)}")
    options = {**defaults, **(fill_options or {})}
    if "kernel_size" in options:
        check_kernel(options["kernel_size"], options["sigma"])
    if "std" in options:
        check_real(options["std"], "std", low=0.0)
    for name in ("mean", "value"):
        if name in options:
            check_real(options[name], name)
    return options


_PARAMS_KEYS = ("patch_mask", "mask_type", "applied", "valid")


def check_params(params: Any, name: str = "params") -> None:
    """The drawn parameters of :func:`draw_mask_params`: a dict holding at least its tensors."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be the dict of tensors draw_mask_params returns, got {type(params).__name__}")
    missing = [key for key in _PARAMS_KEYS if not isinstance(params.get(key), Tensor)]
    if missing:
        raise ValueError(f"{name} lacks the tensors {missing}; pass the dict draw_mask_params returned")


def draw_mask_params(
    image_shape: tuple[int, ...] | torch.Size,
    saliency: Tensor | None = None,
    *,
    mask_ratio: float | tuple[float, float] = MASK_RATIO,
    patch_size: int | tuple[int, int] = PATCH_SIZE,
    hard_negative: bool = False,
    mask_type_probs: dict[str, float] | None = None,
    focal_keep_fraction: float = FOCAL_KEEP_FRACTION,
    focal_fill_fraction: float = FOCAL_FILL_FRACTION,
    saliency_threshold: float = SALIENCY_THRESHOLD,
    p: float = 1.0,
    same_on_batch: bool = False,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Draw the masks of a batch: ratios, mask types, patch sets and focal windows, per image.

    This is the "where to mask" half of the method; :func:`apply_mask` is the "how". The result holds
    the random draws only, a few small tensors per image (about 60 kB for 256 images at 224 px with
    channel-wise masks possible); :func:`render_mask` turns them into pixels where they are applied.
    They can be read back (for figures and tests) and replayed on the same images.

    Args:
        image_shape: ``(B, C, H, W)`` (or ``(C, H, W)`` for one image) of the images to mask.
        saliency: ``(B, h, w)`` (or ``(h, w)``) boolean map or float scores of any spatial size, resampled
            onto the patch grid; ``None`` for uniform random masking (the MSCN baseline).
        mask_ratio: fraction of the patch grid to mask (positives: alpha, default ``U(0.05, 0.25)``) or of the
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

        - ``"patch_mask"``: ``(B, S, rows, cols)`` bool, the masked patches (``S`` is ``C`` when
          channel-wise masks are possible, else 1; empty for focal masks);
        - ``"mask_ratio"``: ``(B,)`` float; ``"mask_type"``: ``(B,)`` int64 codes into ``MASK_TYPES``;
        - ``"focal_window"``: ``(B, 4)`` int64 ``(top, left, height, width)`` of the window a focal
          positive keeps (a focal hard negative fills it); present only when focal masks can be drawn;
        - ``"applied"``: ``(B,)`` bool, the images that drew ``p``;
        - ``"valid"``: ``(B,)`` bool; for hard negatives, ``False`` where none could be made (no
          foreground, also for focal masks, or not applied), so the loss can drop it instead of
          contrasting the positive with itself; always ``True`` for positives;
        - ``"foreground"``: ``(B, rows, cols)`` bool, the saliency on the patch grid (all ``True`` without
          saliency).

    Example:
        >>> saliency = torch.zeros(2, 7, 7, dtype=torch.bool)
        >>> saliency[:, 2:5, 2:5] = True
        >>> params = draw_mask_params((2, 3, 224, 224), saliency, mask_ratio=0.5, hard_negative=True)
        >>> params["patch_mask"].sum(dim=(1, 2, 3)).tolist(), params["valid"].tolist()
        ([5, 5], [True, True])
    """
    if not isinstance(image_shape, Sequence) or not all(is_int(side) for side in image_shape):
        raise TypeError(f"image_shape must be a torch.Size or a tuple of ints, got {image_shape!r}")
    if len(image_shape) not in (3, 4) or min(image_shape) < 0:
        raise ValueError(f"image_shape must be (C, H, W) or (B, C, H, W), got {tuple(image_shape)}")
    check_bool(hard_negative, "hard_negative")
    check_bool(same_on_batch, "same_on_batch")
    check_generator(generator)
    batched = len(image_shape) == 4
    batch_size = image_shape[0] if batched else 1
    num_channels, height, width = (int(s) for s in image_shape[-3:])
    image_size = (height, width)
    check_mask_ratio(mask_ratio)
    p = check_probability(p, "p")
    for name, fraction in (("focal_keep_fraction", focal_keep_fraction), ("focal_fill_fraction", focal_fill_fraction)):
        check_fraction(fraction, name)
    mask_type_probs = check_mask_type_probs(mask_type_probs or SPATIAL_ONLY)
    if device is None:
        device = saliency.device if saliency is not None else torch.device("cpu")
    device = torch.device(device)
    rows, cols = patch_grid_size(image_size, patch_size)

    if saliency is not None:
        saliency = check_saliency(saliency, batch_size=batch_size, batched=batched).to(device)
        foreground = saliency_to_patch_grid(saliency, image_size, patch_size, saliency_threshold)
    elif hard_negative:
        raise ValueError("a hard negative masks the object and needs a saliency map; got saliency=None")
    else:
        foreground = torch.ones(batch_size, rows, cols, dtype=torch.bool, device=device)

    draw: dict[str, Any] = {"device": device, "generator": generator, "same_on_batch": same_on_batch}
    ratios = draw_mask_ratios(mask_ratio, batch_size, **draw)
    mask_type = draw_mask_types(mask_type_probs, batch_size, **draw)
    applied = torch.rand((1 if same_on_batch else batch_size,), device=device, generator=generator) < p
    applied = applied.expand(batch_size)

    channel_wise = mask_type_probs.get("channel", 0.0) > 0
    patch_sets = sample_patch_mask(
        foreground.flatten(1),
        ratios,
        hard_negative=hard_negative,
        num_sets=num_channels if channel_wise else 1,
        generator=generator,
        same_on_batch=same_on_batch,
    )
    # Spatial images use their first set on every channel; channel-wise images keep one set per channel.
    patch_mask = torch.where((mask_type == CHANNEL)[:, None, None], patch_sets, patch_sets[:, :1])
    patch_mask = patch_mask & ((mask_type != FOCAL) & applied)[:, None, None]
    patch_mask = patch_mask.unflatten(-1, (rows, cols))
    params = {
        "patch_mask": patch_mask,
        "mask_ratio": ratios,
        "mask_type": mask_type,
        "applied": applied,
        # A hard negative exists where some patch of the object is masked (or, below, a focal window).
        "valid": patch_mask.flatten(1).any(dim=1) if hard_negative else torch.ones_like(applied),
        "foreground": foreground,
    }
    if mask_type_probs.get("focal", 0.0) > 0:
        fraction = focal_fill_fraction if hard_negative else focal_keep_fraction
        params["focal_window"] = draw_focal_windows(batch_size, image_size, fraction, **draw)
        if hard_negative:
            # A focal window ignores saliency; on an image without foreground it would hide background only,
            # and the "negative" would be the key itself (the release counts it anyway).
            is_focal = (mask_type == FOCAL) & applied & foreground.flatten(1).any(dim=1)
            params["valid"] = params["valid"] | is_focal
    if not batched:
        params = {name: value[0] for name, value in params.items()}
    return params


def render_mask(
    params: dict[str, Tensor],
    image_size: tuple[int, int],
    patch_size: int | tuple[int, int] = PATCH_SIZE,
    *,
    hard_negative: bool = False,
) -> Tensor:
    """The pixel mask of a draw: its patch sets spread over their pixels, or its focal windows.

    Args:
        params: from :func:`draw_mask_params`.
        image_size: ``(H, W)`` of the images the draw was made for.
        patch_size: the patch the draw was made with.
        hard_negative: the draw is a hard negative's, whose focal windows are filled, not kept.

    Returns:
        ``(B, S, H, W)`` (or ``(S, H, W)`` for one image) bool, ``True`` where to fill.

    Example:
        >>> params = draw_mask_params((2, 3, 64, 64), mask_ratio=0.25, patch_size=16)
        >>> render_mask(params, (64, 64), 16).sum(dim=(1, 2, 3)).tolist()
        [1024, 1024]
    """
    check_params(params)
    check_bool(hard_negative, "hard_negative")
    batched = params["mask_type"].ndim == 1
    if not batched:
        params = {name: value[None] for name, value in params.items()}
    mask = expand_patch_mask(params["patch_mask"], image_size, patch_size)
    window = params.get("focal_window")
    if window is not None:
        # Skipped when focal masks cannot be drawn: two passes over the pixels saved.
        is_focal = (params["mask_type"] == FOCAL) & params["applied"] & params["valid"]
        focal_mask = focal_window_mask(window, image_size, keep_window=not hard_negative)
        mask = torch.where(is_focal[:, None, None, None], focal_mask, mask)
    return mask if batched else mask[0]


def apply_fill(
    image: Tensor,
    mask: Tensor,
    fill: str = "noise",
    *,
    generator: torch.Generator | None = None,
    inplace: bool = False,
    **fill_options: Any,
) -> Tensor:
    """Fill the masked pixels of ``image`` with the fill named ``fill`` (see ``FILLS``).

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` image.
        mask: boolean pixel mask broadcasting against ``image``, e.g. from :func:`render_mask`.
        fill: ``"noise"``, ``"blur"``, ``"mean"`` or ``"constant"``.
        generator: source of randomness for the noise fill.
        inplace: write into ``image``.
        **fill_options: the fill's own options (``std``, ``kernel_size``, ``sigma``, ``value``, ...).

    Returns:
        The masked image.

    Example:
        >>> image = torch.rand(2, 3, 64, 64)
        >>> mask = render_mask(draw_mask_params(image.shape, mask_ratio=0.25), (64, 64))
        >>> apply_fill(image, mask, "mean").shape
        torch.Size([2, 3, 64, 64])
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {sorted(FILLS)}, got {fill!r}")
    check_generator(generator)
    if fill == "noise":
        fill_options["generator"] = generator
    return FILLS[fill](image, mask, inplace=inplace, **fill_options)


def _writes_patch_rows(image: Tensor, params: dict[str, Tensor], patch_size: tuple[int, int]) -> bool:
    """Whether the masked patches can be written directly instead of through a rendered pixel mask."""
    if image.device.type != "cpu" or torch.compiler.is_compiling() or not image.is_contiguous():
        return False
    if image.shape[-2] % patch_size[0] or image.shape[-1] % patch_size[1]:
        return False
    if "focal_window" not in params:
        return True
    # Reading these few flags costs nothing on a CPU.
    return not bool(((params["mask_type"] == FOCAL) & params["applied"] & params["valid"]).any())


def apply_mask(
    image: Tensor,
    params: dict[str, Tensor],
    fill: str = "noise",
    *,
    patch_size: int | tuple[int, int] = PATCH_SIZE,
    hard_negative: bool = False,
    generator: torch.Generator | None = None,
    inplace: bool = False,
    check_finite: bool = False,
    **fill_options: Any,
) -> Tensor:
    """Mask ``image`` as ``params`` say: render the draw's pixel mask and fill it.

    The one way to apply (and to replay) a draw of :func:`draw_mask_params`; the transforms and
    :class:`~salmask.ssl.MaskedViews` call it. On a CPU, patch-aligned spatial and channel-wise masks
    of the fills that draw no noise are written patch by patch: the same pixels without an element-wise
    select over the whole image.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` image the draw was made for.
        params: from :func:`draw_mask_params`.
        fill: name of the fill (see ``FILLS``).
        patch_size: the patch the draw was made with.
        hard_negative: the draw is a hard negative's (its focal windows are filled, not kept).
        generator: source of randomness for the noise fill.
        inplace: write into ``image``.
        check_finite: raise ``ValueError`` for an image with NaN or infinite values. It costs one reading
            pass over the image (none with the mean fill, whose means it reuses) and, on an accelerator, a
            host synchronisation; it is skipped where values cannot be read (meta tensors, tracing).
        **fill_options: the fill's own options.

    Returns:
        The masked image.

    Example:
        >>> image = torch.rand(4, 3, 64, 64)
        >>> params = draw_mask_params(image.shape, mask_ratio=0.25, patch_size=16)
        >>> torch.equal(apply_mask(image, params, "mean", patch_size=16),
        ...             apply_mask(image, params, "mean", patch_size=16))
        True
    """
    check_image(image)
    check_params(params)
    fill_options = check_fill(fill, fill_options)
    check_patch_size(patch_size)
    for name, flag in (("hard_negative", hard_negative), ("inplace", inplace), ("check_finite", check_finite)):
        check_bool(flag, name)
    check_generator(generator)
    sums = None
    if check_finite and image.is_floating_point() and values_readable(image):
        sums = plane_sums(image)
        check_finite_image(image, sums)
    patch_pair = as_pair(patch_size)
    if fill == "noise":
        mask = render_mask(params, tuple(image.shape[-2:]), patch_size, hard_negative=hard_negative)
        return fill_noise(image, mask, generator=generator, inplace=inplace, **fill_options)
    source = mean_source(image, sums) if fill == "mean" else _SOURCES[fill](image, **fill_options)
    if _writes_patch_rows(image, params, patch_pair):
        return fill_patch_rows(image, params["patch_mask"], source, patch_pair, inplace=inplace)
    mask = render_mask(params, tuple(image.shape[-2:]), patch_size, hard_negative=hard_negative)
    check_mask(mask, image)
    return where_masked(mask, source, image, inplace)


def mask_images(
    image: Tensor,
    saliency: Tensor | None = None,
    fill: str = "noise",
    *,
    generator: torch.Generator | None = None,
    fill_options: dict[str, Any] | None = None,
    **mask_options: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mask a batch in one call: :func:`draw_mask_params` followed by :func:`apply_mask`.

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
        >>> masked, params = mask_images(image, fill="blur", mask_ratio=0.25)
        >>> params["patch_mask"].sum(dim=(1, 2, 3)).tolist()
        [12, 12, 12, 12]
    """
    check_image(image)
    check_mapping(fill_options, "fill_options", optional=True)
    params = draw_mask_params(image.shape, saliency, device=image.device, generator=generator, **mask_options)
    masked = apply_mask(
        image,
        params,
        fill,
        patch_size=mask_options.get("patch_size", PATCH_SIZE),
        hard_negative=mask_options.get("hard_negative", False),
        generator=generator,
        **(fill_options or {}),
    )
    return masked, params
