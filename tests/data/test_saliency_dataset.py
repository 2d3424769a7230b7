"""The cache route end to end: ImageFolder -> saliency cache -> (image, Saliency) -> v2 crops and flips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from salmask import Saliency
from salmask.data import SaliencyDataset, SaliencyImageFolder
from salmask.saliency import SCDA, SaliencyCacheError, build_saliency_cache, load_saliency_cache

HEIGHT, WIDTH, GRID = 96, 128, 8


def make_image_folder(root: Path, count: int = 8) -> None:
    """Dark 96 x 128 photos with one bright rectangle on the 8 x 8 cell grid (12 x 16 px cells)."""
    cell_h, cell_w = HEIGHT // GRID, WIDTH // GRID
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        top, left = rng.integers(0, 5, size=2)
        rows, columns = rng.integers(2, 4, size=2)
        pixels = np.full((HEIGHT, WIDTH, 3), 15, dtype=np.uint8)
        pixels[top * cell_h : (top + rows) * cell_h, left * cell_w : (left + columns) * cell_w] = 240
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data") / "train"
    make_image_folder(root)
    cache = root.parent / "saliency.pt"
    # Cell brightness as the feature map: the cached foreground is exactly the bright rectangle.
    scda = SCDA(nn.AvgPool2d(8), threshold_std=0.0, name="brightness")
    build_saliency_cache(root, cache, scda, image_size=64, batch_size=4, progress=False)
    return root, cache


def bright(image: torch.Tensor) -> torch.Tensor:
    return image.float().mean(dim=0) > 127


def test_items_are_image_and_full_size_saliency_with_the_target_as_in_image_folder(
    dataset_root: tuple[Path, Path],
) -> None:
    root, cache = dataset_root
    dataset = SaliencyImageFolder(root, cache)
    assert len(dataset) == 8
    (image, saliency), target = dataset[3]
    assert target == ImageFolder(root)[3][1] == 0 and dataset[7][1] == 1
    assert isinstance(image, Image.Image)
    assert isinstance(saliency, Saliency) and saliency.shape == (HEIGHT, WIDTH) and saliency.dtype == torch.bool
    assert torch.equal(saliency.as_subclass(torch.Tensor), bright(v2.functional.pil_to_tensor(image)))


def test_random_resized_crop_and_flip_move_the_map_with_the_image(dataset_root: tuple[Path, Path]) -> None:
    root, cache = dataset_root
    augment = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(64, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.NEAREST),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
        ]
    )
    dataset = SaliencyImageFolder(root, cache, transform=augment)
    torch.manual_seed(0)
    for _ in range(3):
        for index in range(len(dataset)):
            (image, saliency), _ = dataset[index]
            assert isinstance(saliency, Saliency) and saliency.shape == (64, 64)
            # Nearest resampling on both sides: the crop of the map is the crop of the bright region.
            assert torch.equal(saliency.as_subclass(torch.Tensor), bright(image))


def test_two_views_batched_through_a_dataloader_into_the_masking_transform(
    dataset_root: tuple[Path, Path],
) -> None:
    transforms = pytest.importorskip("salmask.transforms")
    root, cache = dataset_root
    crop = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(64, scale=(0.3, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )

    def two_views(image, saliency):
        return crop(image, saliency), crop(image, saliency)

    dataset = SaliencyImageFolder(root, cache, transform=two_views)
    loader = DataLoader(dataset, batch_size=4, shuffle=False)
    (query, key), targets = next(iter(loader))
    query_images, query_saliency = query
    assert query_images.shape == (4, 3, 64, 64) and query_saliency.shape == (4, 64, 64)
    assert key[0].shape == (4, 3, 64, 64) and not torch.equal(key[0], query_images)
    assert targets.tolist() == [0, 0, 0, 0]
    masked, _ = transforms.SaliencyMask("mean", mask_ratio=0.25, patch_size=16)(
        query_images, Saliency(query_saliency.as_subclass(torch.Tensor))
    )
    assert masked.shape == query_images.shape


def test_wraps_any_dataset_and_checks_it_matches(dataset_root: tuple[Path, Path]) -> None:
    root, cache_path = dataset_root
    cache = load_saliency_cache(cache_path)
    folder = ImageFolder(root)
    dataset = SaliencyDataset(folder, cache, return_target=True)
    (image, saliency), target = dataset[5]
    assert target == folder[5][1] and saliency.shape == (HEIGHT, WIDTH)
    tensors = [v2.functional.pil_to_tensor(folder[i][0]) for i in range(len(folder))]
    plain = SaliencyDataset(tensors, cache)
    image, saliency = plain[2]
    assert torch.equal(saliency.as_subclass(torch.Tensor), bright(image))
    stricter = SaliencyDataset(tensors, cache, threshold_std=-0.5)
    assert stricter[2][1].sum() <= saliency.sum()
    with pytest.raises(SaliencyCacheError, match="7 images"):
        SaliencyDataset(tensors[:7], cache)
    shuffled = ImageFolder(root)
    shuffled.samples = shuffled.samples[::-1]
    with pytest.raises(SaliencyCacheError, match="entry 0"):
        SaliencyDataset(shuffled, cache)


def test_the_target_can_be_left_out(dataset_root: tuple[Path, Path]) -> None:
    root, cache = dataset_root
    image, saliency = SaliencyImageFolder(root, cache, return_target=False)[3]
    assert isinstance(image, Image.Image) and isinstance(saliency, Saliency)
    with pytest.raises(TypeError, match="return_target must be a bool"):
        SaliencyImageFolder(root, cache, return_target="yes")
