"""Transforms with a user's seeded generator in DataLoader workers, under fork and spawn.

Each worker must draw its own masks (a forked worker starts from the parent's generator state), every
epoch anew, reproducibly for a seeded DataLoader; under spawn the transforms must pickle.
"""

from __future__ import annotations

import copy
import multiprocessing
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from salmask import MaskedViews, Saliency, SaliencyMask, ThreeViews
from salmask.data import SyntheticShapes

FILL = -1.0  # a value no image pixel takes: masked pixels are where the output equals it
SIZE, PATCH = 16, 4

needs_fork = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="the fork start method is not available"
)


def masking(seed: int = 0) -> SaliencyMask:
    """Uniformly random masks (no saliency in the sample): what a worker draws shows in its output alone."""
    return SaliencyMask(
        "constant",
        mask_ratio=0.5,
        patch_size=PATCH,
        fill_options={"value": FILL},
        generator=torch.Generator().manual_seed(seed),
    )


def shapes(transform) -> SyntheticShapes:
    pipeline = v2.Compose([v2.ToDtype(torch.float32, scale=True), transform])
    return SyntheticShapes("train", num_images=4, image_size=SIZE, transform=pipeline)


def masks_of(dataset, context: str, loader_seed: int = 1, epochs: int = 1) -> list[torch.Tensor]:
    """The masks of every item, in dataset order, served one per batch by two workers."""
    loader = DataLoader(
        dataset,
        batch_size=1,
        num_workers=2,
        multiprocessing_context=context,
        generator=torch.Generator().manual_seed(loader_seed),
    )
    return [(images[0] == FILL).all(0) for _ in range(epochs) for images, _ in loader]


@needs_fork
def test_forked_workers_draw_their_own_masks_each_epoch_reproducibly():
    first, second = masks_of(shapes(masking()), "fork", epochs=2)[:2], masks_of(shapes(masking()), "fork")
    assert first[0].any() and first[1].any()
    # Items 0 and 1 are the first draws of workers 0 and 1, from copies of one generator state.
    assert not torch.equal(first[0], first[1]), "the two workers drew the same masks"
    again = masks_of(shapes(masking()), "fork")
    assert all(torch.equal(a, b) for a, b in zip(second, again, strict=True)), "a seeded DataLoader repeats"
    epochs = masks_of(shapes(masking()), "fork", epochs=2)
    assert not torch.equal(epochs[0], epochs[4]), "the second epoch drew the first epoch's masks again"


def test_spawned_workers_unpickle_the_transform_and_draw_their_own_masks():
    masks = masks_of(shapes(masking()), "spawn")
    assert len(masks) == 4 and all(mask.any() for mask in masks)
    assert not torch.equal(masks[0], masks[1]), "the two workers drew the same masks"


class SameImage(Dataset):
    """Four copies of one image and its saliency: the masks alone tell the items apart."""

    def __init__(self, transform) -> None:
        self.transform = transform
        self.saliency = Saliency(torch.zeros(SIZE, SIZE, dtype=torch.bool))
        self.saliency[4:12, 4:12] = True

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        return self.transform(image, self.saliency), 0


@needs_fork
def test_forked_workers_make_their_own_three_views_with_a_seeded_masked_views():
    three = ThreeViews(v2.Identity(), MaskedViews("mean", patch_size=PATCH, generator=torch.Generator().manual_seed(0)))
    loader = DataLoader(
        SameImage(three), batch_size=1, num_workers=2, multiprocessing_context="fork",
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    hard_negatives = [views.hard_negative[0] for views, _ in loader]
    assert not torch.equal(hard_negatives[0], SameImage(v2.Identity())[0][0][0]), "the hard negative is masked"
    assert not torch.equal(hard_negatives[0], hard_negatives[1]), "the two workers drew the same hard negatives"


def test_a_generator_shared_by_transforms_stays_shared_through_pickling_and_copies():
    generator = torch.Generator().manual_seed(3)
    query_mask, hard_mask = masking(), masking()
    query_mask.generator = hard_mask.generator = generator
    views = MaskedViews("blur", patch_size=PATCH, generator=generator)
    for restored in (
        pickle.loads(pickle.dumps((query_mask, hard_mask, views))),
        copy.deepcopy((query_mask, hard_mask, views)),
    ):
        assert restored[0].generator is restored[1].generator is restored[2].generator
        assert restored[0].generator is not generator
        assert torch.equal(restored[0].generator.get_state(), generator.get_state())
    image = torch.rand(2, 3, SIZE, SIZE)
    restored = pickle.loads(pickle.dumps(query_mask))
    torch.testing.assert_close(restored(image), query_mask(image), rtol=0, atol=0)
