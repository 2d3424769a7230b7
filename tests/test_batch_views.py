"""examples/_batch_views.py: the views of data held in memory, drawn a batch at a time with per-image draws."""

from __future__ import annotations

import doctest

import pytest
import torch
from example_scripts import load_example
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms.v2 import functional as TF

views_module = load_example("_batch_views")
BatchViews = views_module.BatchViews
IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def batch(size: int = 16, side: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (size, 3, side, side), dtype=torch.uint8, generator=generator)
    saliency = torch.rand(size, 1, side, side, generator=generator) > 0.5
    return images, saliency


def test_the_docstring_example_runs():
    assert doctest.testmod(views_module).failed == 0


def test_whole_image_crops_without_jitter_give_the_image_or_its_mirror_and_the_saliency_moves_with_it():
    images, saliency = batch(64)
    views = BatchViews(12, (1.0, 1.0), 0.0, 0.0, **IDENTITY)
    out, out_saliency = views(images, saliency, torch.Generator().manual_seed(0))
    expected = images.float() / 255
    gray = (expected * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(expected)
    flipped = [bool(torch.equal(out_saliency[i], saliency[i].flip(-1))) for i in range(64)]
    for i in range(64):
        assert flipped[i] or torch.equal(out_saliency[i], saliency[i])
        target = expected[i].flip(-1) if flipped[i] else expected[i]
        target_gray = gray[i].flip(-1) if flipped[i] else gray[i]
        assert torch.allclose(out[i], target, atol=1e-5) or torch.allclose(out[i], target_gray, atol=1e-5)
    # Flips and grayscale are drawn per image, at their rates (0.5 and 0.2) over many images.
    assert 16 < sum(flipped) < 48


def test_each_image_of_a_batch_draws_its_own_crop_and_colour():
    image = batch(1)[0].expand(32, -1, -1, -1).contiguous()
    out, _ = BatchViews(12, (0.3, 1.0), 0.4, 0.1, **IDENTITY)(image, None, torch.Generator().manual_seed(0))
    distinct = {tuple(view.flatten()[:40].tolist()) for view in out}
    assert len(distinct) == 32


def test_the_same_generator_state_draws_the_same_views_and_another_seed_other_views():
    images, saliency = batch()
    views = BatchViews(10, (0.5, 1.0), 0.4, 0.1, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    first = views(images, saliency, torch.Generator().manual_seed(3))
    again = views(images, saliency, torch.Generator().manual_seed(3))
    other = views(images, saliency, torch.Generator().manual_seed(4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == (16, 3, 10, 10) and first[1].shape == (16, 1, 10, 10)


def test_crops_cover_the_drawn_fraction_of_the_image():
    # A saliency map that is all foreground in the left half: a crop of the right quarter sees none of it.
    images = torch.zeros(400, 3, 32, 32, dtype=torch.uint8)
    saliency = torch.zeros(400, 1, 32, 32, dtype=torch.bool)
    saliency[..., :16] = True
    _, out = BatchViews(32, (0.25, 0.25), 0.0, 0.0, **IDENTITY)(images, saliency, torch.Generator().manual_seed(0))
    fraction = out.float().mean((1, 2, 3))
    # Crops of a quarter of the area show between none and all of the half, never the whole image's half.
    assert (fraction == 0).any() and (fraction == 1).any()
    assert ((fraction > 0) & (fraction < 1)).any()


@settings(max_examples=50, deadline=None)
@given(
    low=st.floats(0.05, 1.0), width=st.floats(0.0, 1.0), height=st.integers(8, 64), aspect=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_every_crop_has_a_drawn_area_and_aspect_ratio_and_lies_inside_the_image(low, width, height, aspect, seed):
    high = low + (1 - low) * width
    side = max(1, round(height * aspect))
    views = BatchViews(8, (low, high), 0.0, 0.0, **IDENTITY)
    theta = views._crop_and_flip(64, height, side, torch.Generator().manual_seed(seed), torch.device("cpu"))
    crop_w, crop_h = theta[:, 0, 0].abs(), theta[:, 1, 1]  # fractions of the image's width and height
    assert torch.all(theta[:, 0, 1] == 0) and torch.all(theta[:, 1, 0] == 0)
    whole = (crop_w == 1) & (crop_h == 1)  # torchvision's fallback when ten draws do not fit
    area, ratio = crop_w * crop_h, (crop_w * side) / (crop_h * height)
    tolerance = 1e-5
    assert torch.all(whole | ((area >= low - tolerance) & (area <= high + tolerance)))
    assert torch.all(whole | ((ratio >= 3 / 4 - tolerance) & (ratio <= 4 / 3 + tolerance)))
    assert torch.all(theta[:, 0, 2].abs() <= 1 - crop_w + tolerance)
    assert torch.all(theta[:, 1, 2].abs() <= 1 - crop_h + tolerance)


def test_brightness_is_drawn_per_image_in_its_range_and_applied_to_four_in_five():
    # On a uniform grey image only the brightness changes anything: contrast, saturation and grayscale
    # leave grey as it is, so each view is the grey times the image's brightness factor.
    grey = torch.full((400, 3, 8, 8), 128, dtype=torch.uint8)
    out, _ = BatchViews(8, (1.0, 1.0), 0.4, 0.0, **IDENTITY)(grey, None, torch.Generator().manual_seed(0))
    factor = out / (128 / 255)
    per_image = factor.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-5)
    factor = per_image[:, 0]
    assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5
    assert factor.min() < 0.7 and factor.max() > 1.3
    unchanged = int(((factor - 1).abs() < 1e-5).sum())
    assert 40 < unchanged < 120, f"{unchanged} of 400 views without jitter; expected about 80 (p = 0.2)"


@settings(max_examples=25, deadline=None)
@given(hue=st.floats(-0.5, 0.5), seed=st.integers(0, 2**16))
def test_the_hue_shift_is_torchvisions(hue, seed):
    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    hsv = views_module._rgb_to_hsv(images)
    hsv = torch.cat([(hsv[:, :1] + hue) % 1.0, hsv[:, 1:]], 1)
    assert torch.allclose(views_module._hsv_to_rgb(hsv), TF.adjust_hue(images, hue), atol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="crop_scale"):
        BatchViews(8, (0.0, 1.0), 0.4, 0.1, **IDENTITY)
    with pytest.raises(ValueError, match="hue_jitter"):
        BatchViews(8, (0.5, 1.0), 0.4, 0.6, **IDENTITY)
    with pytest.raises(ValueError, match="uint8"):
        BatchViews(8, (0.5, 1.0), 0.4, 0.1, **IDENTITY)(torch.rand(2, 3, 8, 8), None, torch.Generator())
