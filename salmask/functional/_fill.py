"""How to mask: the fills that replace masked pixels, each a pass or two over the batch.

Every fill takes a boolean pixel mask that broadcasts against the image (``(B, 1, H, W)`` for spatial
masks, ``(B, C, H, W)`` for channel-wise ones) and leaves unmasked pixels bit-identical, except the
high-pass fill, which filters the whole view first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from salmask.functional._checks import check_float_image, check_image, check_mask
from salmask.functional._filters import gaussian_blur, high_pass

__all__ = ["fill_blur", "fill_constant", "fill_high_pass", "fill_mean", "fill_noise"]


def _where(mask: Tensor, fill: Tensor, image: Tensor, inplace: bool) -> Tensor:
    if fill.dtype != image.dtype:
        fill = fill.round().clamp(0, 255) if not image.is_floating_point() else fill
        fill = fill.to(image.dtype)
    if inplace:
        return torch.where(mask, fill, image, out=image)
    return torch.where(mask, fill, image)


def _checked(image: Tensor, mask: Tensor) -> None:
    check_image(image)
    check_mask(mask, image)


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
    _checked(image, mask)
    if not image.is_floating_point() and not 0 <= value <= 255:
        raise ValueError(f"value must be in [0, 255] for a uint8 image, got {value}")
    fill = torch.tensor(value, dtype=image.dtype, device=image.device)
    return _where(mask, fill, image, inplace)


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
    _checked(image, mask)
    compute = image if image.is_floating_point() else image.float()
    mean = compute.mean(dim=(-2, -1), keepdim=True)
    return _where(mask, mean, image, inplace)


def fill_blur(
    image: Tensor, mask: Tensor, kernel_size: int = 31, sigma: float = 10.0, *, inplace: bool = False
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
    _checked(image, mask)
    compute = image if image.is_floating_point() else image.float()
    return _where(mask, gaussian_blur(compute, kernel_size, sigma), image, inplace)


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
    _checked(image, mask)
    check_float_image(image, "noise")
    if not std >= 0:
        raise ValueError(f"std must be non-negative, got {std}")
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


def fill_high_pass(
    image: Tensor,
    mask: Tensor,
    noise_std: float = 0.18,
    kernel_size: int = 11,
    sigma: float = 5.0,
    *,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> Tensor:
    """High-pass filter the whole view, then replace masked pixels with Gaussian noise.

    The recipe of MSCN used by the high-pass strategy: the filter removes the low frequencies that make
    the masks' edges stand out, and the noise matches the statistics of the filtered view.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` float image (the release filters the normalised view).
        mask: boolean mask broadcasting against ``image``.
        noise_std: standard deviation of the noise (release: 0.18 for positives, 0.14 for hard negatives).
        kernel_size: odd Gaussian kernel length of the filter.
        sigma: Gaussian standard deviation of the filter.
        generator: source of randomness.
        inplace: write into ``image``.

    Returns:
        The filtered and filled image.

    Example:
        >>> image = torch.rand(3, 64, 64)
        >>> mask = torch.zeros(1, 64, 64, dtype=torch.bool)
        >>> out = fill_high_pass(image, mask)
        >>> torch.allclose(out, high_pass(image))
        True
    """
    _checked(image, mask)
    check_float_image(image, "high_pass")
    filtered = high_pass(image, kernel_size, sigma)
    if inplace:
        filtered = image.copy_(filtered)
    return fill_noise(filtered, mask, noise_std, generator=generator, inplace=True)
