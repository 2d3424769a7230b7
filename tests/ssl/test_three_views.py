"""ThreeViews: the query, key and hard negative of one image, made in the data pipeline."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

import salmask
from salmask import SCDA, Saliency
from salmask.data import SaliencyImageFolder
from salmask.functional import high_pass
from salmask.saliency import build_saliency_cache
from salmask.ssl import MaskedViews, ThreeViews, ThreeViewsOutput

SIZE, PATCH = 32, 8  # a 4 x 4 patch grid
TO_FLOAT = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def object_image(top: int = 8, left: int = 8, side: int = 16) -> tuple[torch.Tensor, Saliency]:
    """A dark float image with a bright square (a whole number of patches) and its saliency."""
    image = torch.full((3, SIZE, SIZE), 0.1)
    image[:, top : top + side, left : left + side] = torch.rand(3, side, side) * 0.5 + 0.5
    saliency = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    saliency[top : top + side, left : left + side] = True
    return image, Saliency(saliency)


def masking(strategy: str = "mean", **kwargs) -> MaskedViews:
    return MaskedViews(strategy, patch_size=PATCH, **kwargs)


@pytest.mark.parametrize("strategy", ["mean", "blur", "high_pass"])
def test_the_key_is_unmasked_and_the_hard_negative_differs_from_it_only_on_the_object(strategy):
    torch.manual_seed(0)
    image, saliency = object_image()
    views = ThreeViews(v2.Identity(), masking(strategy))(image, saliency)
    assert isinstance(views, ThreeViewsOutput)
    expected_key = high_pass(image[None])[0] if strategy == "high_pass" else image
    torch.testing.assert_close(views.key, expected_key, rtol=0, atol=0)
    assert bool(views.hard_negative_valid) and views.hard_negative_valid.dtype == torch.bool
    changed = (views.hard_negative != views.key).any(dim=0)
    assert changed.any() and not changed[~saliency.as_subclass(torch.Tensor)].any()
    assert not torch.equal(views.query, views.key)


def test_an_image_without_foreground_has_an_invalid_hard_negative():
    image, _ = object_image()
    views = ThreeViews(v2.Identity(), masking())(image, Saliency(torch.zeros(SIZE, SIZE, dtype=torch.bool)))
    assert not bool(views.hard_negative_valid)
    assert torch.equal(views.hard_negative, views.key)


def test_each_view_is_augmented_afresh_with_its_own_cropped_saliency():
    torch.manual_seed(0)
    image = torch.arange(48 * 48, dtype=torch.float32).div(48 * 48).view(1, 48, 48).expand(3, -1, -1).clone()
    saliency = Saliency(image[0] > 0.5)  # the lower half is the object
    three = ThreeViews(v2.RandomCrop(SIZE), masking())
    views = three(image, saliency)
    # Crops without interpolation: each patch masked in the hard negative is object in the key's own crop
    # (at least half of its pixels, the patch rule), though the crop does not follow the patch grid.
    masked_patches = per_patch((views.hard_negative != views.key).any(dim=0).float()) > 0
    object_share = per_patch((views.key[0] > 0.5).float())
    assert masked_patches.any() and (object_share[masked_patches] >= 0.5).all()
    assert not torch.equal(views.query, views.key)


def per_patch(pixels: torch.Tensor) -> torch.Tensor:
    grid = SIZE // PATCH
    return pixels.view(grid, PATCH, grid, PATCH).mean(dim=(1, 3))


def make_folder(root: Path, count: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.full((40, 40, 3), 20, dtype=np.uint8)
        top, left = rng.integers(0, 16, size=2)
        pixels[top : top + 24, left : left + 24] = 230
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def test_cache_route_batches_into_views_validity_and_targets(tmp_path):
    root = make_folder(tmp_path / "train")
    cache = tmp_path / "saliency.pt"
    build_saliency_cache(root, cache, SCDA(nn.AvgPool2d(8), threshold_std=0.0), image_size=40, progress=False)
    augment = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(SIZE, scale=(0.5, 1.0)), v2.ToDtype(torch.float32, True)])
    dataset = SaliencyImageFolder(root, cache, transform=ThreeViews(augment, masking("blur")))
    views, targets = next(iter(DataLoader(dataset, batch_size=4)))
    assert isinstance(views, ThreeViewsOutput)
    assert views.query.shape == views.key.shape == views.hard_negative.shape == (4, 3, SIZE, SIZE)
    assert views.hard_negative_valid.shape == (4,) and views.hard_negative_valid.dtype == torch.bool
    assert bool(views.hard_negative_valid.all()) and targets.tolist() == [0, 0, 0, 0]
    # The moco patch's training loop unpacks the batch as it unpacks TwoCropsTransform's list.
    assert list(views) == [views.query, views.key, views.hard_negative, views.hard_negative_valid]


def test_scda_route_finds_the_object_in_each_augmented_view(tmp_path):
    torch.manual_seed(0)
    root = make_folder(tmp_path / "train")
    scda = SCDA(nn.AvgPool2d(PATCH), threshold_std=0.0)  # brightness per patch
    three = ThreeViews(v2.Compose([TO_FLOAT, v2.CenterCrop(SIZE)]), masking("mean", scda=scda))
    image, _ = ImageFolder(root)[0]
    views = three(image)
    masked_patches = per_patch((views.hard_negative != views.key).any(dim=0).float()) > 0
    brightness = per_patch(views.key.mean(dim=0))
    assert bool(views.hard_negative_valid) and masked_patches.any()
    # SCDA here is brightness per patch, foreground at or above the mean: only those patches are masked.
    assert (brightness[masked_patches] >= brightness.mean()).all()


def test_it_pickles_for_spawned_dataloader_workers():
    three = ThreeViews(v2.RandomCrop(SIZE), masking("high_pass"))
    copy = pickle.loads(pickle.dumps(three))
    image, saliency = object_image()
    assert copy(image, saliency).query.shape == (3, SIZE, SIZE)
    assert "ThreeViews(" in repr(copy)


def test_bad_input_is_named():
    image, saliency = object_image()
    with pytest.raises(TypeError, match="pipeline must be callable"):
        ThreeViews(None)
    with pytest.raises(TypeError, match="masking must be a MaskedViews"):
        ThreeViews(v2.Identity(), 3)
    for strategy in ("mscn", "none"):
        with pytest.raises(ValueError, match="must make hard negatives"):
            ThreeViews(v2.Identity(), MaskedViews(strategy, hard_negatives=False))
    with pytest.raises(ValueError, match="must make hard negatives"):
        ThreeViews(v2.Identity(), MaskedViews("blur", hard_negatives=False))
    with pytest.raises(ValueError, match="needs a saliency"):
        ThreeViews(v2.Identity(), masking())(image)
    with pytest.raises(TypeError, match="the query view is a Image"):
        ThreeViews(v2.RandomCrop(SIZE), masking())(v2.functional.to_pil_image(image), saliency)
    with pytest.raises(TypeError, match=r"torch\.uint8"):
        ThreeViews(v2.Identity(), masking())((image * 255).to(torch.uint8), saliency)


def test_a_strategy_name_builds_the_masking_and_the_transform_is_exported():
    three = salmask.ThreeViews(v2.Identity(), "blur")
    assert isinstance(three.masking, MaskedViews) and three.masking.strategy == "blur"
