"""The built-in synthetic dataset: determinism, true masks, v2 composition, argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors
from torchvision.transforms import v2

from salmask import Saliency
from salmask.data import SHAPE_CLASSES, SyntheticShapes


@pytest.fixture(scope="module")
def small() -> SyntheticShapes:
    return SyntheticShapes("train", num_images=60, image_size=32, return_saliency=True)


def test_item_types_and_shapes(small: SyntheticShapes) -> None:
    (image, saliency), target = small[7]
    assert type(image) is tv_tensors.Image and image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert type(saliency) is Saliency and saliency.dtype == torch.bool and saliency.shape == (32, 32)
    assert target == 7 % 10 and small.classes[target] == SHAPE_CLASSES[7]
    image, target = SyntheticShapes("val", num_images=3, image_size=16)[2]
    assert type(image) is tv_tensors.Image and target == 2


def test_defaults_and_metadata() -> None:
    assert len(SyntheticShapes()) == 10_000 and len(SyntheticShapes("val")) == 2_000
    dataset = SyntheticShapes(num_images=25, num_classes=4)
    assert dataset.classes == ["disc", "square", "triangle", "cross"]
    assert dataset.class_to_idx["cross"] == 3
    assert dataset.targets == [index % 4 for index in range(25)]
    assert "num_images=25" in repr(dataset)


@settings(max_examples=25, deadline=None)
@given(
    index=st.integers(0, 999),
    seed=st.integers(0, 2**32),
    image_size=st.integers(16, 72),
    split=st.sampled_from(["train", "val"]),
)
def test_every_item_is_reproducible_and_its_object_lies_inside(
    index: int, seed: int, image_size: int, split: str
) -> None:
    first = SyntheticShapes(split, num_images=1000, image_size=image_size, seed=seed, return_saliency=True)
    second = SyntheticShapes(split, num_images=1000, image_size=image_size, seed=seed, return_saliency=True)
    (image, saliency), _ = first[index]
    (again, saliency_again), _ = second[index]
    assert torch.equal(image, again) and torch.equal(saliency, saliency_again)
    assert saliency.any()
    # The whole object is inside the image with a margin: no mask pixel on the border.
    assert not (saliency[0].any() or saliency[-1].any() or saliency[:, 0].any() or saliency[:, -1].any())
    # Neither everything nor a speck: the object leaves background on every side.
    assert 0.01 < saliency.float().mean().item() < 0.5


def test_batch_render_equals_items_in_any_order(small: SyntheticShapes) -> None:
    order = [41, 3, 3, 17, 59, 0]
    images, masks = small.render(order, batch_size=4)
    for row, index in enumerate(order):
        (image, saliency), _ = small[index]
        assert torch.equal(images[row], image) and torch.equal(masks[row], saliency)


def test_in_memory_serves_the_same_items() -> None:
    lazy = SyntheticShapes("val", num_images=12, image_size=24, return_saliency=True)
    cached = SyntheticShapes("val", num_images=12, image_size=24, return_saliency=True, in_memory=True)
    for index in (0, 5, 11, -1):
        (image, saliency), target = lazy[index]
        (image_cached, saliency_cached), target_cached = cached[index]
        assert torch.equal(image, image_cached) and torch.equal(saliency, saliency_cached)
        assert target == target_cached
    # A transform that writes into its input must not change what the cache serves next time.
    (image, _), _ = cached[1]
    image.zero_()
    assert cached[1][0][0].any()


def test_splits_and_seeds_differ() -> None:
    train = SyntheticShapes("train", num_images=5, image_size=16)
    val = SyntheticShapes("val", num_images=5, image_size=16)
    other = SyntheticShapes("train", num_images=5, image_size=16, seed=1)
    for index in range(5):
        assert not torch.equal(train[index][0], val[index][0])
        assert not torch.equal(train[index][0], other[index][0])


def test_colour_does_not_give_the_class_away() -> None:
    # Mean object colour per class: every class spans a wide range of hues, so the class means are close.
    dataset = SyntheticShapes(num_images=400, image_size=32)
    images, masks = dataset.render(range(400))
    colours = (images.float() * masks[:, None]).sum((2, 3)) / masks[:, None].sum((2, 3))
    targets = torch.tensor(dataset.targets)
    means = torch.stack([colours[targets == label].mean(0) for label in range(10)])
    spread_within = torch.stack([colours[targets == label].std(0) for label in range(10)]).mean()
    assert (means.amax(0) - means.amin(0)).max() < spread_within


def test_v2_crop_moves_image_and_saliency_together() -> None:
    # One v2 call on both inputs draws one crop window; a call per input would draw two different ones.
    augment = v2.Compose([v2.RandomResizedCrop(40, scale=(0.2, 0.5)), v2.RandomHorizontalFlip()])
    dataset = SyntheticShapes(num_images=10, image_size=48, return_saliency=True, transform=augment)
    reference = SyntheticShapes(num_images=10, image_size=48, return_saliency=True)
    for index in range(10):
        torch.manual_seed(index)
        (image, saliency), _ = dataset[index]
        assert image.shape == (3, 40, 40) and saliency.shape == (40, 40) and type(saliency) is Saliency
        torch.manual_seed(index)
        expected_image, expected_saliency = augment(*reference[index][0])
        assert torch.equal(image, expected_image) and torch.equal(saliency, expected_saliency)


def test_transforms_receive_what_the_docs_say() -> None:
    seen: list[tuple[type, ...]] = []

    def record(*inputs: object) -> str:
        seen.append(tuple(type(value) for value in inputs))
        return "sample"

    sample, target = SyntheticShapes(num_images=3, image_size=16, transform=record, target_transform=str)[1]
    assert (sample, target) == ("sample", "1") and seen[-1] == (tv_tensors.Image,)
    SyntheticShapes(num_images=3, image_size=16, transform=record, return_saliency=True)[1]
    assert seen[-1] == (tv_tensors.Image, Saliency)


@pytest.mark.parametrize(
    ("options", "error", "name"),
    [
        ({"split": "test"}, ValueError, "split"),
        ({"num_images": -1}, ValueError, "num_images"),
        ({"num_images": 2.5}, TypeError, "num_images"),
        ({"image_size": 8}, ValueError, "image_size"),
        ({"image_size": True}, TypeError, "image_size"),
        ({"num_classes": 1}, ValueError, "num_classes"),
        ({"num_classes": 11}, ValueError, "num_classes"),
        ({"seed": -3}, ValueError, "seed"),
    ],
)
def test_bad_arguments_are_named(options: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        SyntheticShapes(**options)


def test_bad_indices() -> None:
    dataset = SyntheticShapes(num_images=4, image_size=16)
    with pytest.raises(IndexError, match="out of range"):
        dataset[4]
    with pytest.raises(IndexError, match="out of range"):
        dataset[-5]
    with pytest.raises(TypeError, match="index"):
        dataset["0"]  # type: ignore[index]
    with pytest.raises(ValueError, match="batch_size"):
        dataset.render([0], batch_size=0)
    assert torch.equal(dataset[np.int64(2)][0], dataset[-2][0])


def test_items_do_not_depend_on_dataloader_workers() -> None:
    from torch.utils.data import DataLoader

    dataset = SyntheticShapes(num_images=16, image_size=16, return_saliency=True)
    batches = [list(DataLoader(dataset, batch_size=4, num_workers=workers, shuffle=False)) for workers in (0, 2)]
    for ((images, masks), targets), ((images_w, masks_w), targets_w) in zip(*batches, strict=True):
        assert torch.equal(images, images_w) and torch.equal(masks, masks_w) and torch.equal(targets, targets_w)
