"""A procedurally generated dataset of coloured shapes on cluttered backgrounds, with each object's true mask.

It needs no download and no disk, so a fresh machine can pretrain, evaluate with kNN and score saliency
maps against the truth. Every item is drawn from a random generator seeded by ``(seed, split, index)``:
item ``i`` is the same in every process, worker and run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from salmask._validation import check_bool, check_callable, check_choice, check_int
from salmask.tv_tensors import Saliency

__all__ = ["SHAPE_CLASSES", "SyntheticShapes"]

#: The class names of :class:`SyntheticShapes`, in target order.
SHAPE_CLASSES: tuple[str, ...] = (
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "star",
    "crescent",
    "heart",
    "bar",
    "ell",
)

_SPLITS = {"train": 0, "val": 1}
_DEFAULT_LENGTHS = {"train": 10_000, "val": 2_000}
_MIN_IMAGE_SIZE = 16

# Layout of the uniform draws that parametrise one item (one vector of draws per item keeps the stream
# position of every parameter fixed, whatever the class or the image size).
_NUM_BLOBS = 6
_NUM_STROKES = 3
_OBJECT = 9  # radius, centre x, centre y, angle, hue, saturation, value, shading angle, shading strength
_BACKGROUND = 3  # one muted colour (h, s, v)
_BLOB = 7  # x, y, sigma, opacity, colour (h, s, v)
_STROKE = 8  # angle, centre x, centre y, half length, half width, colour (h, s, v)
_HSV_OFFSETS = np.array([5.0, 3.0, 1.0], dtype=np.float32)
_NUM_DRAWS = _OBJECT + _BACKGROUND + _NUM_BLOBS * _BLOB + _NUM_STROKES * _STROKE


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``(B,)`` HSV in ``[0, 1]`` to ``(B, 3, 1, 1)`` RGB in ``[0, 1]``."""
    # Closed form: each channel is value * (1 - saturation * clip(min(k, 4 - k), 0, 1)).
    k = np.remainder(_HSV_OFFSETS + hue[:, None] * 6.0, 6.0)
    rgb = value[:, None] * (1.0 - saturation[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return rgb[:, :, None, None]


def _inside(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside shape ``label`` in its own frame, where every shape fits in the unit disc."""
    radius2 = u * u + v * v
    name = SHAPE_CLASSES[label]
    if name == "disc":
        return radius2 <= 0.85**2
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.66
    if name == "triangle":
        root3 = math.sqrt(3.0)
        return (v >= -0.47) & (root3 * u + v <= 0.94) & (-root3 * u + v <= 0.94)
    if name == "cross":
        return ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.92)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 0.92))
    if name == "ring":
        return (radius2 >= 0.5**2) & (radius2 <= 0.92**2)
    if name == "star":
        sector = 2.0 * math.pi / 5.0
        phase = np.remainder(np.arctan2(v, u) + math.pi / 2.0, sector) / sector
        # The radius limit runs linearly from a tip (0.95) down to a notch (0.4) and back within a sector.
        return np.sqrt(radius2) <= 0.4 + 0.55 * np.abs(2.0 * phase - 1.0)
    if name == "crescent":
        return (radius2 <= 0.92**2) & ((u - 0.38) ** 2 + v * v > 0.72**2)
    if name == "heart":
        # The quartic heart (x^2 + y^2 - 1)^3 <= x^2 y^3, scaled into the unit disc with its lobes up.
        x, y = u / 0.66, v / 0.66 + 0.12
        return (x * x + y * y - 1.0) ** 3 <= x * x * y**3
    if name == "bar":
        return (np.abs(u) <= 0.92) & (np.abs(v) <= 0.26)
    # ell: a vertical and a horizontal arm meeting at a corner
    vertical = (u >= -0.6) & (u <= -0.2) & (np.abs(v) <= 0.7)
    horizontal = (u >= -0.6) & (u <= 0.6) & (v >= -0.7) & (v <= -0.3)
    return vertical | horizontal


def _render(labels: Sequence[int], draws: np.ndarray, noise: np.ndarray, image_size: int) -> tuple[Tensor, Tensor]:
    """Images ``(B, 3, S, S)`` uint8 and object masks ``(B, S, S)`` bool from ``(B, _NUM_DRAWS)`` uniform
    draws and ``(B, 3, S, S)`` uniform noise."""
    columns = iter(draws.T)

    def take() -> np.ndarray:
        # (B, 1, 1): one parameter per item, ready to broadcast over (B, S, S)
        return next(columns)[:, None, None]

    def take_colour(saturation: float = 1.0, value_low: float = 0.0) -> np.ndarray:
        hue, sat, value = next(columns), next(columns), next(columns)
        return _hsv_to_rgb(hue, saturation * sat, value_low + (1.0 - value_low) * value)

    size = float(image_size)
    batch = len(labels)
    # Pixel centres relative to the image centre, in pixels: a row (1, 1, S) and a column (1, S, 1).
    centres = np.arange(image_size, dtype=np.float32) + 0.5 - size / 2
    xs, ys = centres.reshape(1, 1, -1), centres.reshape(1, -1, 1)

    # Every shape fits in the unit disc of its frame; a radius of 25-40% of the side and a centre at least
    # radius + 1 px from each edge keep the whole object inside the image, large enough to cover several
    # cells of a 7 x 7 patch grid and small enough to leave background on every side. The rotation is
    # free: it keeps raw pixels and random features from separating the classes by silhouette alone.
    radius = size * (0.25 + 0.15 * take())
    free = size / 2 - radius - 1.0
    centre_x, centre_y = free * (2.0 * take() - 1.0), free * (2.0 * take() - 1.0)
    angle = 2.0 * math.pi * take()
    # Saturated, bright objects with a linear shading; the class never depends on colour.
    hue, sat, value = next(columns), next(columns), next(columns)
    object_colour = _hsv_to_rgb(hue, 0.5 + 0.5 * sat, 0.55 + 0.45 * value)
    shading_angle, shading = 2.0 * math.pi * take(), 0.08 + 0.17 * take()

    # Background: a near-grey colour, so that its colour does not tell two images apart...
    hue, sat, value = next(columns), next(columns), next(columns)
    image = np.broadcast_to(_hsv_to_rgb(hue, 0.1 * sat, 0.4 + 0.2 * value), (batch, 3, image_size, image_size))
    # ...under small soft blobs, at times as saturated as the objects, so colour alone does not find them...
    for _ in range(_NUM_BLOBS):
        x, y = size * (take() - 0.5), size * (take() - 0.5)
        sigma, opacity = size * (0.03 + 0.06 * take()), 0.5 + 0.4 * take()
        blob_colour = take_colour(1.0, 0.2)
        # A separable Gaussian: two 1-D profiles instead of an exponential per pixel.
        weight = opacity * np.exp(-((xs - x) ** 2) / (2 * sigma**2)) * np.exp(-((ys - y) ** 2) / (2 * sigma**2))
        image = image + (blob_colour - image) * weight[:, None]
    # ...and short strokes with hard edges, so edges alone do not find them either. Every element is small
    # and local: two crops of one image share few of them, and images differ little in their background's
    # overall statistics, so the background is no shortcut to telling two images apart.
    for _ in range(_NUM_STROKES):
        stroke_angle, x, y = math.pi * take(), size * (take() - 0.5), size * (take() - 0.5)
        half_length, half_width = size * (0.1 + 0.2 * take()), 0.5 + 0.7 * take()
        stroke_colour = take_colour(1.0, 0.2)
        cos, sin = np.cos(stroke_angle), np.sin(stroke_angle)
        along, across = cos * (xs - x) + sin * (ys - y), cos * (ys - y) - sin * (xs - x)
        on_stroke = (np.abs(across) <= half_width) & (np.abs(along) <= half_length)
        image = np.where(on_stroke[:, None], stroke_colour, image)

    # The object, drawn opaque in its own rotated frame scaled to its radius.
    dx, dy = (xs - centre_x) / radius, (ys - centre_y) / radius
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, cos * dy - sin * dx
    label_array = np.asarray(labels)
    if batch == 1:
        masks = _inside(int(label_array[0]), u, v)
    else:
        masks = np.zeros((batch, image_size, image_size), dtype=bool)
        for label in np.unique(label_array).tolist():
            rows = np.flatnonzero(label_array == label)
            masks[rows] = _inside(label, u[rows], v[rows])
    shade = 1.0 + shading * (np.cos(shading_angle) * dx + np.sin(shading_angle) * dy)
    image = np.where(masks[:, None], object_colour * shade[:, None], image)

    # Sensor-like noise, uniform in +-0.04 (about 2.5% standard deviation).
    image = image + 0.08 * (noise - 0.5)
    pixels = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return torch.from_numpy(pixels), torch.from_numpy(masks)


class SyntheticShapes(Dataset):
    """Coloured shapes of ten classes on cluttered backgrounds, generated on the fly, with true masks.

    Each image holds one object whose class is its shape (:data:`SHAPE_CLASSES`: disc, square, triangle,
    cross, ring, star, crescent, heart, bar, ell); its colour, size, position, rotation and shading are
    random and independent of the class, so colour jitter leaves the class signal intact. The background
    mixes a colour gradient, oriented stripes, soft coloured blobs and thin hard-edged lines, so neither
    colour nor edges alone separate the object from it. The object always lies wholly inside the image.

    Item ``i`` has class ``i % num_classes`` (balanced for any prefix of the dataset) and is drawn from a
    generator seeded by ``(seed, split, i)``, so it is identical in every process and DataLoader worker;
    the ``"train"`` and ``"val"`` splits use disjoint seeds.

    Images are ``tv_tensors.Image`` uint8 ``(3, S, S)``, the type torchvision's v2 transforms produce from
    files, so they go straight into v2 pipelines (no PIL round trip) and are cropped together with the
    :class:`~salmask.Saliency` mask, a bool ``(S, S)`` map of the object's pixels.

    Items follow torchvision's datasets: ``(image, target)``, or ``((image, saliency), target)`` with
    ``return_saliency=True`` (the shape of a :class:`SaliencyDataset` item with ``return_target=True``).
    ``transform`` is called as ``transform(image)``, or ``transform(image, saliency)`` with
    ``return_saliency``; ``target_transform`` as ``target_transform(target)``.

    Args:
        split: ``"train"`` or ``"val"``.
        num_images: number of items; default 10,000 for ``"train"`` and 2,000 for ``"val"``.
        image_size: side ``S`` of the square images in pixels, at least 16.
        num_classes: use the first ``num_classes`` shapes of :data:`SHAPE_CLASSES` (2 to 10).
        seed: base seed; datasets with the same seed, split and size are identical.
        transform: applied to the image, or to ``(image, saliency)`` with ``return_saliency``.
        target_transform: applied to the class index.
        return_saliency: also return the object's mask as a :class:`~salmask.Saliency`.
        in_memory: render every item once at construction (about 12 kB per 64 px item) and serve copies,
            for many epochs over a small dataset; otherwise each access renders its item.

    Example:
        >>> from salmask.data import SyntheticShapes
        >>> dataset = SyntheticShapes("train", num_images=20, image_size=32, return_saliency=True)
        >>> (image, saliency), target = dataset[3]
        >>> tuple(image.shape), image.dtype, tuple(saliency.shape), dataset.classes[target]
        ((3, 32, 32), torch.uint8, (32, 32), 'cross')
        >>> bool(saliency.any()) and torch.equal(dataset[3][0][0], image)
        True
    """

    def __init__(
        self,
        split: str = "train",
        *,
        num_images: int | None = None,
        image_size: int = 64,
        num_classes: int = len(SHAPE_CLASSES),
        seed: int = 0,
        transform: Callable[..., Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        return_saliency: bool = False,
        in_memory: bool = False,
    ) -> None:
        check_choice(split, "split", tuple(_SPLITS))
        num_images = _DEFAULT_LENGTHS[split] if num_images is None else num_images
        check_int(num_images, "num_images", minimum=0)
        check_int(image_size, "image_size", minimum=_MIN_IMAGE_SIZE)
        check_int(num_classes, "num_classes", minimum=2)
        if num_classes > len(SHAPE_CLASSES):
            raise ValueError(f"num_classes must be at most {len(SHAPE_CLASSES)}, got {num_classes}")
        check_int(seed, "seed", minimum=0)
        check_callable(transform, "transform")
        check_callable(target_transform, "target_transform")
        check_bool(return_saliency, "return_saliency")
        check_bool(in_memory, "in_memory")
        self.split = split
        self.num_images = num_images
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.transform = transform
        self.target_transform = target_transform
        self.return_saliency = return_saliency
        self.classes: list[str] = list(SHAPE_CLASSES[:num_classes])
        self.class_to_idx: dict[str, int] = {name: index for index, name in enumerate(self.classes)}
        self._images: Tensor | None = None
        self._masks: Tensor | None = None
        if in_memory:
            self._images, self._masks = self.render(range(num_images))

    @property
    def targets(self) -> list[int]:
        """Class index of every item, in order (as torchvision's folder datasets have)."""
        return [index % self.num_classes for index in range(self.num_images)]

    def __len__(self) -> int:
        return self.num_images

    def render(self, indices: Sequence[int] | range, batch_size: int = 64) -> tuple[Tensor, Tensor]:
        """Render items together, much faster than one by one.

        Args:
            indices: item indices, each in ``[0, len(self))``.
            batch_size: items rendered per vectorised pass (bounds the temporary memory).

        Returns:
            Images ``(N, 3, S, S)`` uint8 and object masks ``(N, S, S)`` bool, plain tensors, equal to the
            items' ``image`` and ``saliency`` (before ``transform``).

        Example:
            >>> dataset = SyntheticShapes("val", num_images=8, image_size=16)
            >>> images, masks = dataset.render(range(8))
            >>> torch.equal(images[5], dataset[5][0])
            True
        """
        check_int(batch_size, "batch_size", minimum=1)
        indices = [self._check_index(index) for index in indices]
        size = self.image_size
        images = torch.empty(len(indices), 3, size, size, dtype=torch.uint8)
        masks = torch.empty(len(indices), size, size, dtype=torch.bool)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            if self._images is not None and self._masks is not None:
                images[start : start + len(chunk)] = self._images[chunk]
                masks[start : start + len(chunk)] = self._masks[chunk]
                continue
            draws = np.empty((len(chunk), _NUM_DRAWS), dtype=np.float32)
            noise = np.empty((len(chunk), 3, size, size), dtype=np.float32)
            for row, index in enumerate(chunk):
                generator = np.random.default_rng((self.seed, _SPLITS[self.split], index))
                draws[row] = generator.random(_NUM_DRAWS, dtype=np.float32)
                noise[row] = generator.random((3, size, size), dtype=np.float32)
            labels = [index % self.num_classes for index in chunk]
            images[start : start + len(chunk)], masks[start : start + len(chunk)] = _render(labels, draws, noise, size)
        return images, masks

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += self.num_images
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} is out of range for a dataset of {self.num_images} items")
        return index

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        index = self._check_index(index)
        images, masks = self.render([index])
        image, saliency = tv_tensors.Image(images[0]), Saliency(masks[0])
        target: Any = index % self.num_classes
        if self.target_transform is not None:
            target = self.target_transform(target)
        if self.return_saliency:
            sample = (image, saliency) if self.transform is None else self.transform(image, saliency)
        else:
            sample = image if self.transform is None else self.transform(image)
        return sample, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_images={self.num_images}, "
            f"image_size={self.image_size}, num_classes={self.num_classes}, seed={self.seed})"
        )
