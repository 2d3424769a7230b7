"""Contrastive views of a batch of images held in memory, drawn per image in a few tensor operations.

The per-image torchvision v2 pipeline of ``pretrain.augmentation`` costs about 1.5 ms per 32 px view on a
CPU, almost all of it per-call overhead: more than a training step of the narrow ResNet-18 it feeds. For
data sets held in memory as tensors (the synthetic shapes, Fashion-MNIST), :class:`BatchViews` draws the
same augmentations for a whole batch at once, each image with its own parameters (kornia's approach):
a random resized crop and a horizontal flip as one affine resampling that moves the saliency map with
its image, colour jitter with per-image factors, random grayscale, and the normalisation. Its draws come
from the generator it is given, so a run resumed at a step draws the same views.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601 luma weights (torchvision's rgb_to_grayscale uses 0.2989 for red: within 1e-4 of these).
_LUMA = (0.299, 0.587, 0.114)


def _uniform(
    low: float, high: float, shape: tuple[int, ...], generator: torch.Generator, device: torch.device
) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def _grayscale(images: Tensor) -> Tensor:
    weights = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _rgb_to_hsv(images: Tensor) -> Tensor:
    red, green, blue = images.unbind(1)
    value, largest = images.max(1)
    chroma = value - images.amin(1)
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.stack([(green - blue) / safe, 2 + (blue - red) / safe, 4 + (red - green) / safe], 1)
    hue = hue.gather(1, largest.unsqueeze(1)).squeeze(1)
    hue = torch.where(chroma > 0, (hue / 6) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], 1)


def _hsv_to_rgb(images: Tensor) -> Tensor:
    hue, saturation, value = images.unbind(1)
    sector = torch.floor(hue * 6)
    fraction = hue * 6 - sector
    sector = sector.long() % 6
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    # (red, green, blue) of each of the six sectors of the hue circle.
    choices = torch.stack(
        [
            torch.stack([value, q, p, p, t, value], 1),
            torch.stack([t, value, value, q, p, p], 1),
            torch.stack([p, p, t, value, value, q], 1),
        ],
        1,
    )
    index = sector.unsqueeze(1).unsqueeze(1).expand(-1, 3, 1, -1, -1)
    return choices.gather(2, index).squeeze(2)


class BatchViews:
    """One random view of every image of a batch, the image's saliency map cropped and flipped with it.

    The augmentations of ``pretrain.augmentation`` (without its optional Gaussian blur), drawn per image:
    a resized crop of ``crop_scale`` of the area and an aspect ratio in [3/4, 4/3] (up to ten draws, the
    whole image if none fits, as torchvision), colour jitter with probability 0.8 (brightness, contrast,
    saturation and hue factors per image, in one random order per batch), grayscale with probability 0.2,
    a horizontal flip with probability 0.5, then the normalisation.

    Args:
        size: side of the square views in pixels.
        crop_scale: ``(low, high)`` fraction of the image area a crop covers.
        color_jitter: strength ``s`` of the brightness, contrast and saturation jitter (factors in
            ``[1 - s, 1 + s]``).
        hue_jitter: the hue shift's range ``[-h, h]`` (in turns of the hue circle).
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.

    Example:
        >>> views = BatchViews(32, (0.5, 1.0), 0.4, 0.1, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        >>> images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> saliency = torch.zeros(4, 1, 32, 32, dtype=torch.bool)
        >>> view, view_saliency = views(images, saliency, torch.Generator().manual_seed(0))
        >>> view.shape, view_saliency.dtype
        (torch.Size([4, 3, 32, 32]), torch.bool)
    """

    def __init__(
        self,
        size: int,
        crop_scale: tuple[float, float],
        color_jitter: float,
        hue_jitter: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be 0 < low <= high <= 1, got {crop_scale}")
        if not 0 <= hue_jitter <= 0.5:
            raise ValueError(f"hue_jitter must be in [0, 0.5], got {hue_jitter}")
        self.size, self.crop_scale = size, tuple(crop_scale)
        self.color_jitter, self.hue_jitter = color_jitter, hue_jitter
        self.mean, self.std = tuple(mean), tuple(std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, crop_scale={self.crop_scale}, "
            f"color_jitter={self.color_jitter}, hue_jitter={self.hue_jitter})"
        )

    def _crop_and_flip(self, batch: int, height: int, width: int, generator: torch.Generator, device) -> Tensor:
        """``(B, 2, 3)`` affine matrices of ``F.affine_grid`` that crop, resize and flip each image."""
        tries = 10
        area = _uniform(*self.crop_scale, (batch, tries), generator, device)
        log_ratio = _uniform(math.log(3 / 4), math.log(4 / 3), (batch, tries), generator, device)
        ratio = log_ratio.exp()
        # Crop sides as fractions of the image's: w * h = area * H * W and w / h = ratio (in pixels).
        crop_w = torch.sqrt(area * ratio * height / width)
        crop_h = torch.sqrt(area / ratio * width / height)
        fits = (crop_w <= 1) & (crop_h <= 1)
        first = fits.float().argmax(1, keepdim=True)
        any_fits = fits.any(1)
        crop_w = torch.where(any_fits, crop_w.gather(1, first).squeeze(1), torch.ones(batch, device=device))
        crop_h = torch.where(any_fits, crop_h.gather(1, first).squeeze(1), torch.ones(batch, device=device))
        # Centres in the normalised coordinates of affine_grid, [-1, 1] across the image.
        centre_x = (1 - crop_w) * (2 * torch.rand(batch, generator=generator, device=device) - 1)
        centre_y = (1 - crop_h) * (2 * torch.rand(batch, generator=generator, device=device) - 1)
        flip = torch.rand(batch, generator=generator, device=device) < 0.5
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0] = torch.where(flip, -crop_w, crop_w)
        theta[:, 0, 2] = centre_x
        theta[:, 1, 1] = crop_h
        theta[:, 1, 2] = centre_y
        return theta

    def _jitter(self, images: Tensor, generator: torch.Generator) -> Tensor:
        batch, device, strength = images.shape[0], images.device, self.color_jitter
        applied = torch.rand(batch, generator=generator, device=device) < 0.8

        def factors(low: float, high: float, identity: float) -> Tensor:
            drawn = _uniform(low, high, (batch,), generator, device)
            return torch.where(applied, drawn, torch.full_like(drawn, identity)).view(batch, 1, 1, 1)

        brightness = factors(max(0.0, 1 - strength), 1 + strength, 1.0)
        contrast = factors(max(0.0, 1 - strength), 1 + strength, 1.0)
        saturation = factors(max(0.0, 1 - strength), 1 + strength, 1.0)
        hue = factors(-self.hue_jitter, self.hue_jitter, 0.0)
        order = torch.randperm(4, generator=generator, device=device).tolist()
        for operation in order:
            if operation == 0 and strength > 0:
                images = (images * brightness).clamp(0, 1)
            elif operation == 1 and strength > 0:
                mean = _grayscale(images).mean((2, 3), keepdim=True)
                images = (contrast * images + (1 - contrast) * mean).clamp(0, 1)
            elif operation == 2 and strength > 0:
                images = (saturation * images + (1 - saturation) * _grayscale(images)).clamp(0, 1)
            elif operation == 3 and self.hue_jitter > 0:
                hsv = _rgb_to_hsv(images)
                hsv = torch.cat([(hsv[:, :1] + hue) % 1.0, hsv[:, 1:]], 1)
                images = _hsv_to_rgb(hsv).clamp(0, 1)
        gray = torch.rand(batch, generator=generator, device=device) < 0.2
        return torch.where(gray.view(batch, 1, 1, 1), _grayscale(images).expand_as(images), images)

    def __call__(
        self, images: Tensor, saliency: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """Views of ``images`` (``(B, 3, H, W)`` uint8) and ``saliency`` (``(B, 1, H, W)`` bool, or None).

        Returns:
            ``(views, saliency)``: ``(B, 3, size, size)`` normalised float32 views and their
            ``(B, 1, size, size)`` bool saliency (None without saliency).
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (B, 3, H, W) uint8 batch, got {images.dtype} {tuple(images.shape)}")
        batch, _, height, width = images.shape
        theta = self._crop_and_flip(batch, height, width, generator, images.device)
        grid = F.affine_grid(theta, [batch, 3, self.size, self.size], align_corners=False)
        views = F.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if saliency is not None:
            saliency = F.grid_sample(saliency.float(), grid, mode="nearest", align_corners=False) > 0.5
        views = self._jitter(views.clamp(0, 1), generator)
        mean = views.new_tensor(self.mean).view(1, 3, 1, 1)
        std = views.new_tensor(self.std).view(1, 3, 1, 1)
        return (views - mean) / std, saliency
