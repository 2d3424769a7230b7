import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from salmask import Saliency, SaliencyMask
from salmask.functional import draw_mask_params, expand_patch_mask, patch_grid_size, saliency_to_patch_grid
from salmask.ssl import MaskedViews


@pytest.mark.parametrize(
    ("image_size", "patch_size", "grid"),
    [((224, 224), 32, (7, 7)), ((225, 224), 32, (8, 7)), ((96, 160), (32, 16), (3, 10)), ((5, 5), 5, (1, 1))],
)
def test_patch_grid_size_is_a_ceil_grid(image_size, patch_size, grid):
    assert patch_grid_size(image_size, patch_size) == grid


def test_patch_larger_than_image_is_rejected():
    with pytest.raises(ValueError, match=r"patch_size .* larger than the image"):
        patch_grid_size((16, 64), 32)


@pytest.mark.parametrize("patch_size", [0, -3, (4, 0)])
def test_non_positive_patch_is_rejected(patch_size):
    with pytest.raises(ValueError, match="patch_size"):
        patch_grid_size((16, 16), patch_size)


@pytest.mark.parametrize("patch_size", [2.5, "32", (1, 2, 3), True])
def test_patch_of_wrong_type_is_rejected(patch_size):
    with pytest.raises(TypeError, match="patch_size"):
        patch_grid_size((16, 16), patch_size)


def test_last_row_and_column_patches_are_smaller():
    grid = torch.zeros(2, 2, dtype=torch.bool)
    grid[1, 1] = True
    pixels = expand_patch_mask(grid, (5, 7), 4)
    assert pixels.shape == (5, 7)
    assert pixels.sum() == 1 * 3  # the corner patch is 1 row by 3 columns
    assert pixels[4, 4:].all()


def test_expand_rejects_a_grid_of_the_wrong_size():
    with pytest.raises(ValueError, match="patch grid"):
        expand_patch_mask(torch.zeros(3, 3, dtype=torch.bool), (224, 224), 32)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    patch_height=st.integers(1, 20),
    patch_width=st.integers(1, 20),
    seed=st.integers(0, 2**31),
)
def test_full_resolution_saliency_lands_on_its_own_patches(height, width, patch_height, patch_width, seed):
    patch = (min(patch_height, height), min(patch_width, width))
    rows, cols = patch_grid_size((height, width), patch)
    grid = torch.rand(2, rows, cols, generator=torch.Generator().manual_seed(seed)) < 0.5
    pixels = expand_patch_mask(grid, (height, width), patch)
    assert torch.equal(saliency_to_patch_grid(pixels, (height, width), patch), grid)
    assert torch.equal(saliency_to_patch_grid(pixels.float(), (height, width), patch), grid)


def test_saliency_on_the_grid_is_only_thresholded():
    scores = torch.tensor([[[0.2, 0.5], [0.7, 0.49]]])
    grid = saliency_to_patch_grid(scores, (64, 64), 32)
    assert grid.tolist() == [[[False, True], [True, False]]]
    assert saliency_to_patch_grid(scores, (64, 64), 32, threshold=0.1).all()


def test_patch_is_foreground_when_half_of_it_is():
    saliency = torch.zeros(1, 64, 64, dtype=torch.bool)
    saliency[:, :16, :32] = True  # exactly half of the top-left patch
    saliency[:, 32:47, 32:] = True  # less than half of the bottom-right patch
    assert saliency_to_patch_grid(saliency, (64, 64), 32)[0].tolist() == [[True, False], [False, False]]


@pytest.mark.parametrize("size", [(14, 14), (56, 56), (448, 448), (100, 300)])
def test_saliency_of_another_size_is_resampled(size):
    # The object covers the central 3x3 block of a 7x7 grid at any resolution of the map.
    saliency = torch.zeros(1, *size)
    h, w = size
    saliency[:, round(h * 2 / 7) : round(h * 5 / 7), round(w * 2 / 7) : round(w * 5 / 7)] = 1.0
    grid = saliency_to_patch_grid(saliency, (224, 224), 32)[0]
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[2:5, 2:5] = True
    assert torch.equal(grid, expected)


def test_saliency_must_be_maps():
    with pytest.raises(ValueError, match="saliency must be shaped"):
        saliency_to_patch_grid(torch.zeros(7), (224, 224), 32)
    assert saliency_to_patch_grid(torch.ones(7, 7), (224, 224), 32).shape == (1, 7, 7)
    with pytest.raises(ValueError, match="saliency_threshold"):
        saliency_to_patch_grid(torch.zeros(1, 7, 7), (224, 224), 32, threshold=0.0)


@pytest.mark.parametrize(
    "scores", [torch.full((1, 7, 7), 200.0), torch.full((1, 7, 7), float("nan")), -torch.ones(1, 7, 7)]
)
def test_saliency_scores_outside_0_1_are_refused_even_with_value_checks_off(scores):
    # 0-255 floats would make every patch foreground and NaN none: scores are checked where they are used.

    with pytest.raises(ValueError, match=r"saliency scores must lie in \[0, 1\]"):
        saliency_to_patch_grid(scores, (224, 224), 32)
    with pytest.raises(ValueError, match=r"saliency scores must lie in \[0, 1\]"):
        draw_mask_params((1, 3, 224, 224), scores)
    with pytest.raises(ValueError, match=r"saliency scores must lie in \[0, 1\]"):
        SaliencyMask("mean", check_values=False)(torch.rand(1, 3, 224, 224), Saliency(scores))
    with pytest.raises(ValueError, match=r"saliency scores must lie in \[0, 1\]"):
        MaskedViews("mean")(torch.rand(1, 3, 224, 224), torch.rand(1, 3, 224, 224), scores, scores)
