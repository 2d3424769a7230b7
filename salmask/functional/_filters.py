"""Separable Gaussian blur and the high-pass filter, batched and device-agnostic."""

from __future__ import annotations

import torch
from torch import Tensor

from salmask._defaults import HIGH_PASS_KERNEL_SIZE, HIGH_PASS_SIGMA
from salmask._validation import check_float_image, check_image, check_kernel, check_tensor

__all__ = ["gaussian_blur", "high_pass"]


def _gaussian_weights(kernel_size: int, sigma: float, device: torch.device) -> Tensor:
    radius = kernel_size // 2
    taps = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    return weights / weights.sum()


def _reflected(positions: Tensor, length: int) -> Tensor:
    """Indices into ``[0, length)`` of positions past either end, reflected without repeating the edge
    (torch's "reflect"), any number of bounces, so kernels longer than the image stay defined."""
    if length == 1:
        return torch.zeros_like(positions)
    period = 2 * (length - 1)
    positions = positions.remainder(period)
    return torch.where(positions >= length, period - positions, positions)


def _blur_matrix(length: int, kernel_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(length, length)`` matrix ``M`` such that ``x @ M`` blurs ``x`` along its last axis.

    Reflect padding is folded into the matrix, so the blur needs no padded copy. A banded matrix product
    does more arithmetic than a direct 1-D convolution but runs on tuned matrix kernels: on CPUs it is
    about seven times faster than a depthwise convolution with a kernel of 31.
    """
    radius = kernel_size // 2
    output_index = torch.arange(length, device=device)[None, :]
    source_index = _reflected(output_index + torch.arange(-radius, radius + 1, device=device)[:, None], length)
    matrix = torch.zeros(length, length, device=device, dtype=torch.float64)
    weights = _gaussian_weights(kernel_size, sigma, device)
    matrix.index_put_(
        (source_index, output_index.expand_as(source_index)),
        weights[:, None].expand_as(source_index),
        accumulate=True,
    )
    return matrix.to(dtype)


def _blur_by_matrices(image: Tensor, kernel_size: int, sigma: float) -> Tensor:
    height, width = image.shape[-2:]
    rows = _blur_matrix(height, kernel_size, sigma, image.dtype, image.device)
    cols = _blur_matrix(width, kernel_size, sigma, image.dtype, image.device)
    return rows.T @ (image @ cols)


def _blur_by_convolution(image: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """The same blur as two 1-D convolutions over a reflected copy: a pixel reaches only its kernel's
    window, so a NaN or infinite one spoils no more than that (as torchvision's blur)."""
    height, width = image.shape[-2:]
    radius = kernel_size // 2
    weights = _gaussian_weights(kernel_size, sigma, image.device).to(image.dtype)
    planes = image.reshape(-1, 1, height, width)
    for axis, length, shape in ((-1, width, (1, 1, 1, kernel_size)), (-2, height, (1, 1, kernel_size, 1))):
        source = _reflected(torch.arange(-radius, length + radius, device=image.device), length)
        planes = torch.nn.functional.conv2d(planes.index_select(axis, source), weights.view(shape))
    return planes.reshape(image.shape)


def gaussian_blur(image: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Blur every channel with a separable Gaussian kernel and reflect padding.

    Matches ``torchvision.transforms.v2.functional.gaussian_blur`` for the same square kernel (to float
    rounding), at a fraction of its cost for long kernels. A NaN or infinite pixel spoils only the pixels
    whose kernel window covers it, as in torchvision.

    On a CPU the blur is a banded matrix product along each axis (several times faster than a
    convolution); a product spreads a non-finite pixel over its whole plane, so the planes that had one,
    which the product's corner value shows without another pass, are blurred again by convolution. On
    other devices, and under ``torch.compile``, the blur is two 1-D convolutions, without a host
    synchronisation.

    Args:
        image: ``(..., H, W)`` float tensor, e.g. ``(C, H, W)`` or ``(B, C, H, W)``.
        kernel_size: odd length of the kernel along each axis.
        sigma: standard deviation of the Gaussian, in pixels.

    Returns:
        The blurred image, same shape and dtype; the input is not modified.

    Example:
        >>> image = torch.rand(2, 3, 32, 32)
        >>> blurred = gaussian_blur(image, kernel_size=11, sigma=5.0)
        >>> bool(blurred.std() < image.std())
        True
    """
    check_kernel(kernel_size, sigma)
    check_tensor(image, "image")
    check_float_image(image, "the Gaussian blur")
    if image.ndim < 2:
        raise ValueError(f"image must be shaped (..., H, W), got shape {tuple(image.shape)}")
    compute_dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    source = image.to(compute_dtype)
    if image.device.type != "cpu" or torch.compiler.is_compiling() or image.numel() == 0:
        return _blur_by_convolution(source, kernel_size, sigma).to(image.dtype)
    blurred = _blur_by_matrices(source, kernel_size, sigma)
    # A non-finite pixel makes its row of the first product non-finite, and so every output of its plane,
    # the corner included: the corners name the planes to blur again, locally.
    spoiled = ~torch.isfinite(blurred[..., 0, 0]).reshape(-1)
    if bool(spoiled.any()):
        planes = blurred.view(-1, *blurred.shape[-2:])
        index = spoiled.nonzero().squeeze(1)
        planes[index] = _blur_by_convolution(source.reshape(planes.shape)[index], kernel_size, sigma)
    return blurred.to(image.dtype)


def high_pass(image: Tensor, kernel_size: int = HIGH_PASS_KERNEL_SIZE, sigma: float = HIGH_PASS_SIGMA) -> Tensor:
    """High-pass filter: the image minus its Gaussian blur.

    The filter that hides the parasitic edges of masking in the high-pass strategy. An encoder pretrained
    on high-passed views must see high-passed images downstream too.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)`` float tensor (normalised or not).
        kernel_size: odd length of the Gaussian kernel (11 by default).
        sigma: standard deviation of the Gaussian (5 by default).

    Returns:
        The filtered image, same shape and dtype.

    Example:
        >>> flat = torch.full((3, 16, 16), 0.7)
        >>> bool(high_pass(flat).abs().max() < 1e-6)
        True
    """
    check_image(image)
    check_float_image(image, "the high-pass filter")
    return image - gaussian_blur(image, kernel_size, sigma)
