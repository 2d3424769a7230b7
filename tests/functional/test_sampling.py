import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from salmask.functional import (
    draw_focal_windows,
    draw_mask_ratios,
    draw_mask_types,
    focal_window_mask,
    masked_patch_counts,
    sample_patch_mask,
)


def random_foreground(batch_size, num_patches, seed, fraction=None):
    gen = torch.Generator().manual_seed(seed)
    if fraction is None:
        fraction = torch.rand(batch_size, 1, generator=gen)
    return torch.rand(batch_size, num_patches, generator=gen) < fraction


def round_half_up(value):
    return math.floor(value + 0.5)


foregrounds = st.builds(
    random_foreground,
    batch_size=st.integers(1, 6),
    num_patches=st.integers(1, 80),
    seed=st.integers(0, 2**31),
)


@settings(max_examples=200, deadline=None)
@given(foreground=foregrounds, ratio=st.floats(0.0, 1.0))
def test_positive_counts_split_in_proportion_and_sum_to_the_requested_total(foreground, ratio):
    ratios = torch.full((foreground.shape[0],), ratio)
    fg_count, bg_count = masked_patch_counts(foreground, ratios)
    num_patches = foreground.shape[1]
    n_fg = foreground.sum(1)
    n_bg = num_patches - n_fg
    assert (fg_count >= 0).all() and (bg_count >= 0).all()
    assert (fg_count <= n_fg).all() and (bg_count <= n_bg).all()
    # Both groups together always hold round(ratio * N) patches when ratio <= 1.
    total = round_half_up(float(ratios[0]) * num_patches)
    assert ((fg_count + bg_count) == total).all()
    # The split follows gamma = n_fg / N within rounding.
    assert ((fg_count - ratios * n_fg).abs() <= 1.0 + 1e-6).all()
    assert ((bg_count - ratios * n_bg).abs() <= 1.0 + 1e-6).all()


@settings(max_examples=200, deadline=None)
@given(foreground=foregrounds, ratio=st.floats(0.0, 1.0))
def test_hard_negative_counts_cover_foreground_only_and_at_least_one(foreground, ratio):
    ratios = torch.full((foreground.shape[0],), ratio)
    fg_count, bg_count = masked_patch_counts(foreground, ratios, hard_negative=True)
    n_fg = foreground.sum(1)
    assert (bg_count == 0).all()
    expected = [min(max(round_half_up(float(ratios[0]) * n), 1), n) for n in n_fg.tolist()]
    assert fg_count.tolist() == expected
    assert ((fg_count > 0) == (n_fg > 0)).all()


@settings(max_examples=100, deadline=None)
@given(
    foreground=foregrounds,
    ratio=st.floats(0.0, 1.0),
    num_sets=st.integers(1, 3),
    hard_negative=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_sampled_masks_hold_exactly_the_counted_patches_of_each_group(foreground, ratio, num_sets, hard_negative, seed):
    ratios = torch.full((foreground.shape[0],), ratio)
    mask = sample_patch_mask(
        foreground,
        ratios,
        hard_negative=hard_negative,
        num_sets=num_sets,
        generator=torch.Generator().manual_seed(seed),
    )
    assert mask.shape == (foreground.shape[0], num_sets, foreground.shape[1])
    fg_count, bg_count = masked_patch_counts(foreground, ratios, hard_negative=hard_negative)
    assert torch.equal((mask & foreground[:, None]).sum(-1), fg_count[:, None].expand(-1, num_sets))
    assert torch.equal((mask & ~foreground[:, None]).sum(-1), bg_count[:, None].expand(-1, num_sets))
    if hard_negative:
        assert not (mask & ~foreground[:, None]).any()


def test_patches_are_drawn_uniformly_inside_their_group():
    foreground = torch.zeros(1, 10, dtype=torch.bool)
    foreground[:, :4] = True
    ratios = torch.full((4000,), 0.5)
    mask = sample_patch_mask(foreground.expand(4000, -1), ratios, generator=torch.Generator().manual_seed(1))[:, 0]
    frequency = mask.float().mean(0)
    # 2 of 4 foreground patches and 3 of 6 background patches: every patch is picked half the time.
    assert torch.allclose(frequency, torch.full((10,), 0.5), atol=0.04)


def test_images_of_a_batch_draw_independent_masks_unless_same_on_batch():
    foreground = torch.ones(64, 49, dtype=torch.bool)
    ratios = torch.full((64,), 0.25)
    mask = sample_patch_mask(foreground, ratios, generator=torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in mask[:, 0]}) == 64
    shared = sample_patch_mask(foreground, ratios, generator=torch.Generator().manual_seed(0), same_on_batch=True)
    assert (shared == shared[:1]).all()


def test_channel_sets_are_independent_with_equal_counts():
    foreground = torch.ones(8, 49, dtype=torch.bool)
    mask = sample_patch_mask(foreground, torch.full((8,), 0.25), num_sets=3, generator=torch.Generator().manual_seed(0))
    assert (mask.sum(-1) == 12).all()
    assert not (mask[:, 0] == mask[:, 1]).all(dim=-1).any()


def test_uniform_masking_without_saliency():
    mask = sample_patch_mask(None, torch.tensor([0.25, 0.5]), num_patches=49)
    assert mask.sum(-1).flatten().tolist() == [12, 25]
    with pytest.raises(ValueError, match="num_patches"):
        sample_patch_mask(None, torch.tensor([0.25]))
    with pytest.raises(ValueError, match="saliency"):
        sample_patch_mask(None, torch.tensor([0.25]), num_patches=49, hard_negative=True)


def test_same_seed_same_masks():
    foreground = random_foreground(4, 49, seed=3)
    ratios = draw_mask_ratios((0.05, 0.25), 4, generator=torch.Generator().manual_seed(5))
    first = sample_patch_mask(foreground, ratios, generator=torch.Generator().manual_seed(7))
    second = sample_patch_mask(foreground, ratios, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


@settings(max_examples=50, deadline=None)
@given(low=st.floats(0, 1), width=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_ratios_stay_in_their_range(low, width, seed):
    high = min(1.0, low + width)
    ratios = draw_mask_ratios((low, high), 32, generator=torch.Generator().manual_seed(seed))
    assert ((ratios >= low) & (ratios <= high)).all()


@pytest.mark.parametrize("ratio", [(-0.1, 0.2), (0.2, 1.5), float("nan"), 2.0])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="ratio must lie in"):
        draw_mask_ratios(ratio, 2)


def test_reversed_ratio_range_is_rejected():
    with pytest.raises(ValueError, match="reversed"):
        draw_mask_ratios((0.3, 0.1), 2)


def test_mask_types_follow_their_probabilities():
    types = draw_mask_types(
        {"spatial": 0.24, "channel": 0.56, "focal": 0.2}, 20000, generator=torch.Generator().manual_seed(0)
    )
    frequency = torch.bincount(types, minlength=3).float() / types.numel()
    assert torch.allclose(frequency, torch.tensor([0.24, 0.56, 0.2]), atol=0.015)
    assert draw_mask_types({"channel": 1.0}, 5).tolist() == [1] * 5


@pytest.mark.parametrize(("fraction", "keep"), [(200 / 224, True), (130 / 224, False)])
@pytest.mark.parametrize("image_size", [(224, 224), (96, 128), (7, 9)])
def test_focal_windows_scale_with_the_view_and_stay_inside_it(fraction, keep, image_size):
    window = draw_focal_windows(50, image_size, fraction, generator=torch.Generator().manual_seed(0))
    mask = focal_window_mask(window, image_size, keep_window=keep)
    height, width = image_size
    window_area = round(height * fraction) * round(width * fraction)
    masked = mask.flatten(1).sum(1)
    expected = height * width - window_area if keep else window_area
    assert (masked == expected).all()
    top, left, h, w = window.unbind(1)
    assert (top >= 0).all() and (top + h <= height).all() and (left >= 0).all() and (left + w <= width).all()
    assert len({tuple(row) for row in window.tolist()}) > 1 or (height, width) == (7, 9)
