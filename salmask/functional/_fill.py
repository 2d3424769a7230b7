"""How to mask: the fills that replace masked pixels, each a pass or two over the batch.

Every fill takes a boolean pixel mask that broadcasts against the image (``(B, 1, H, W)`` for spatial
masks, ``(B, C, H, W)`` for channel-wise ones) and leaves unmasked pixels bit-identical. A fill is a
*source* (what masked pixels take: a per-channel mean, a constant, a blurred copy) written into the
masked pixels; the high-pass recipe is no fill of its own but the view-wide
:func:`~salmask.functional.high_pass` filter followed by :func:`fill_noise`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from salmask._defaults import BLUR_KERNEL_SIZE, BLUR_SIGMA
from salmask._validation import check_bool, check_float_image, check_generator, check_image, check_mask, check_real
from salmask.functional._filters import gaussian_blur

__all__ = ["fill_blur", "fill_constant", "fill_mean", "fill_noise"]


def _as_image_dtype(source: Tensor, image: Tensor) -> Tensor:
    if source.dtype == image.dtype:
        return source
    if not image.is_floating_point():
        source = source.round().clamp(0, 255)
    return source.to(image.dtype)


def where_masked(mask: Tensor, source: Tensor, image: Tensor, inplace: bool = False) -> Tensor:
    """``source`` where ``mask`` is set, ``image`` elsewhere, in the image's dtype."""
    source = _as_image_dtype(source, image)
    if inplace:
        return torch.where(mask, source, image, out=image)
    return torch.where(mask, source, image)


def plane_sums(image: Tensor) -> Tensor:
    """The sum of every image channel, ``(..., C, 1, 1)``, in floating point."""
    return (image if image.is_floating_point() else image.float()).sum(dim=(-2, -1), keepdim=True)


def mean_source(image: Tensor, sums: Tensor | None = None) -> Tensor:
    """The per-image, per-channel mean, ``(..., C, 1, 1)``; ``sums`` reuses :func:`plane_sums` already taken."""
    # The sum divided by the pixel count is bit-identical to Tensor.mean and reads the image twice as fast.
    return (plane_sums(image) if sums is None else sums) / (image.shape[-2] * image.shape[-1])


def constant_source(image: Tensor, value: float = 0.0) -> Tensor:
    """``value`` as a 0-dim tensor of the image's dtype, checked against the uint8 range."""
    if not image.is_floating_point() and not 0 <= value <= 255:
        raise ValueError(f"value must be in [0, 255] for a uint8 image, got {value}")
    return torch.tensor(value, dtype=image.dtype, device=image.device)


def blur_source(image: Tensor, kernel_size: int = BLUR_KERNEL_SIZE, sigma: float = BLUR_SIGMA) -> Tensor:
    """The strongly blurred copy of the view."""
    return gaussian_blur(image if image.is_floating_point() else image.float(), kernel_size, sigma)


def _checked(image: Tensor, mask: Tensor, inplace: bool) -> None:
    check_image(image)
    check_mask(mask, image)
    check_bool(inplace, "inplace")


def fill_constant(image: Tensor, mask: Tensor, value: float = 0.0, *, inplace: bool = False) -> Tensor:
    """Set masked pixels to a constant (zero masking, the plain baseline).

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` float or uint8 image.
        mask: boolean mask broadcasting against ``image``, ``True`` where to fill.
        value: the fill value, in the image's units.
        inplace: write into ``image`` instead of a new tensor.

    Returns:
        The filled image.

    Example:
        >>> image = torch.ones(3, 4, 4)
        >>> mask = torch.zeros(1, 4, 4, dtype=torch.bool)
        >>> mask[:, :2] = True
        >>> fill_constant(image, mask, 0.0)[0, :, 0].tolist()
        [0.0, 0.0, 1.0, 1.0]
    """
    _checked(image, mask, inplace)
    check_real(value, "value")
    return where_masked(mask, constant_source(image, value), image, inplace)


def fill_mean(image: Tensor, mask: Tensor, *, inplace: bool = False) -> Tensor:
    """Fill masked pixels with the per-image, per-channel mean of the whole view.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` float or uint8 image.
        mask: boolean mask broadcasting against ``image``.
        inplace: write into ``image``.

    Returns:
        The filled image.

    Example:
        >>> image = torch.arange(16.0).reshape(1, 4, 4)
        >>> mask = torch.zeros(1, 4, 4, dtype=torch.bool)
        >>> mask[0, 0, 0] = True
        >>> fill_mean(image, mask)[0, 0, 0].item()
        7.5
    """
    _checked(image, mask, inplace)
    return where_masked(mask, mean_source(image), image, inplace)


def fill_blur(
    image: Tensor,
    mask: Tensor,
    kernel_size: int = BLUR_KERNEL_SIZE,
    sigma: float = BLUR_SIGMA,
    *,
    inplace: bool = False,
) -> Tensor:
    """Fill masked pixels with a strongly blurred copy of the view (the strong-blur strategy).

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` float or uint8 image.
        mask: boolean mask broadcasting against ``image``.
        kernel_size: odd Gaussian kernel length (31, the release's).
        sigma: Gaussian standard deviation in pixels (10, the release's).
        inplace: write into ``image``.

    Returns:
        The filled image.

    Example:
        >>> image = torch.rand(3, 64, 64)
        >>> mask = torch.zeros(1, 64, 64, dtype=torch.bool)
        >>> mask[:, :32, :32] = True
        >>> out = fill_blur(image, mask)
        >>> torch.equal(out[:, 32:], image[:, 32:]), bool(out[:, :32, :32].std() < image.std())
        (True, True)
    """
    _checked(image, mask, inplace)
    return where_masked(mask, blur_source(image, kernel_size, sigma), image, inplace)


def fill_noise(
    image: Tensor,
    mask: Tensor,
    std: float = 1.0,
    mean: float = 0.0,
    *,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> Tensor:
    """Fill masked pixels with Gaussian noise, fresh for every pixel and channel.

    On a CPU only the masked elements draw a sample (the CPU generator is serial, so this is most of the
    fill's cost); on other devices every pixel draws one, in parallel and without a host synchronisation.
    Either way the same generator state gives the same result on the same device.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` float image.
        mask: boolean mask broadcasting against ``image``.
        std: standard deviation of the noise.
        mean: mean of the noise.
        generator: source of randomness.
        inplace: write into ``image``.

    Returns:
        The filled image.

    Example:
        >>> image = torch.zeros(3, 64, 64)
        >>> out = fill_noise(image, torch.ones(1, 64, 64, dtype=torch.bool), std=0.5)
        >>> round(out.std().item(), 1)
        0.5
    """
    _checked(image, mask, inplace)
    check_float_image(image, "the noise fill")
    check_real(std, "std", low=0.0)
    check_real(mean, "mean")
    check_generator(generator)
    if image.device.type == "cpu" and not torch.compiler.is_compiling():
        # The CPU generator draws serially, about twenty copies of the batch for one sample per pixel: draw
        # only as many samples as there are masked elements. Counting them reads host memory, not a device.
        # Counted before broadcasting: every mask element stands for the same number of image elements.
        count = int(torch.count_nonzero(mask)) * (image.numel() // max(mask.numel(), 1))
        noise = image.new_empty(count).normal_(mean, std, generator=generator)
        return (image if inplace else image.clone()).masked_scatter_(mask.expand_as(image), noise)
    # Elsewhere one sample per pixel, drawn in parallel and without reading the mask on the host; the
    # out-of-place result is written over the noise buffer instead of a fresh allocation.
    noise = torch.empty_like(image).normal_(mean, std, generator=generator)
    return torch.where(mask, noise, image, out=image if inplace else noise)


def fill_patch_rows(
    image: Tensor, patch_mask: Tensor, source: Tensor, patch_size: tuple[int, int], *, inplace: bool = False
) -> Tensor:
    """Write ``source`` into the masked patches of an image whose sides are multiples of the patch.

    The same result as rendering the patch mask into pixels and filling through it, on a CPU without the
    element-wise select: the image is copied and only the masked patches' pixel rows are written, each
    a contiguous run of ``patch_width`` values.

    Args:
        image: ``(..., C, H, W)`` image, ``H`` and ``W`` multiples of the patch.
        patch_mask: ``(..., S, rows, cols)`` masked patches, ``S`` 1 (every channel) or ``C``.
        source: what masked pixels take, broadcasting against ``image``.
        patch_size: ``(patch_height, patch_width)``.
        inplace: write into ``image``.
    """
    patch_height, patch_width = patch_size
    *leading, channels, height, _ = image.shape
    sets, rows, cols = patch_mask.shape[-3:]
    # The image viewed as runs of patch_width pixels (a patch's share of a pixel row), numbered
    # ((plane * height) + pixel_row) * cols + patch_column; each masked patch covers patch_height runs per channel.
    *images, patch_set, patch_row, patch_col = patch_mask.reshape(-1, sets, rows, cols).nonzero().unbind(1)
    image_index = images[0] if images else torch.zeros_like(patch_set)
    channel = torch.arange(channels, device=image.device) if sets == 1 else patch_set[:, None]
    plane = image_index[:, None] * channels + channel  # (n, C) for spatial patch sets, (n, 1) channel-wise
    first_run = (plane * height + (patch_row * patch_height)[:, None]) * cols + patch_col[:, None]
    offsets = torch.arange(patch_height, device=image.device) * cols
    index = (first_run[..., None] + offsets).flatten()
    if source.ndim < 2 or source.shape[-2:] == (1, 1):
        # One value per image and channel (or one for all): look it up by the run's plane.
        planes = source.expand(*leading, channels, 1, 1).reshape(-1)
        values = planes[index // (height * cols)][:, None].expand(-1, patch_width)
    else:
        values = source.expand(image.shape).reshape(-1, patch_width)[index]
    output = image if inplace else image.clone()
    # Copying whole runs is several times faster than an index assignment.
    output.view(-1, patch_width).index_copy_(0, index, _as_image_dtype(values, image))
    return output
