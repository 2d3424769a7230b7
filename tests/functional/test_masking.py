import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from operator_log import OperatorLog

from salmask import RELEASE_MASK_TYPE_PROBS
from salmask.functional import (
    FILLS,
    apply_fill,
    apply_mask,
    draw_mask_params,
    expand_patch_mask,
    high_pass,
    mask_images,
    masked_patch_counts,
    render_mask,
)

SPATIAL, CHANNEL, FOCAL = 0, 1, 2


def centred_saliency(batch_size, size=7):
    saliency = torch.zeros(batch_size, size, size, dtype=torch.bool)
    saliency[:, 2:5, 1:6] = True
    return saliency


@settings(max_examples=40, deadline=None)
@given(
    batch_size=st.integers(1, 5),
    height=st.integers(32, 100),
    width=st.integers(32, 100),
    patch_size=st.integers(4, 32),
    ratio=st.floats(0, 1),
    hard_negative=st.booleans(),
    channel_wise=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_params_follow_the_saliency_on_any_grid(
    batch_size, height, width, patch_size, ratio, hard_negative, channel_wise, seed
):
    gen = torch.Generator().manual_seed(seed)
    saliency = torch.rand(batch_size, height, width, generator=gen) < torch.rand(batch_size, 1, 1, generator=gen)
    params = draw_mask_params(
        (batch_size, 3, height, width),
        saliency,
        mask_ratio=ratio,
        patch_size=patch_size,
        hard_negative=hard_negative,
        mask_type_probs={"channel": 1.0} if channel_wise else None,
        generator=gen,
    )
    foreground = params["foreground"].flatten(1)
    patch_mask = params["patch_mask"].flatten(2)
    assert patch_mask.shape[1] == (3 if channel_wise else 1)
    fg_count, bg_count = masked_patch_counts(foreground, params["mask_ratio"], hard_negative=hard_negative)
    assert torch.equal((patch_mask & foreground[:, None]).sum(-1), fg_count[:, None].expand_as(patch_mask[..., 0]))
    assert torch.equal((patch_mask & ~foreground[:, None]).sum(-1), bg_count[:, None].expand_as(patch_mask[..., 0]))
    pixels = render_mask(params, (height, width), patch_size, hard_negative=hard_negative)
    assert torch.equal(pixels, expand_patch_mask(params["patch_mask"], (height, width), patch_size))
    expected_valid = foreground.any(1) if hard_negative else torch.ones(batch_size, dtype=torch.bool)
    assert torch.equal(params["valid"], expected_valid)


def test_mask_types_are_mixed_per_image_and_read_back():
    params = draw_mask_params(
        (256, 3, 224, 224),
        centred_saliency(256),
        mask_type_probs=RELEASE_MASK_TYPE_PROBS,
        generator=torch.Generator().manual_seed(0),
    )
    mask_type = params["mask_type"]
    assert set(mask_type.tolist()) == {SPATIAL, CHANNEL, FOCAL}
    pixels = render_mask(params, (224, 224))
    spatial, channel, focal = (pixels[mask_type == code] for code in (SPATIAL, CHANNEL, FOCAL))
    assert (spatial == spatial[:, :1]).all()  # one set for every channel
    assert (channel != channel[:, :1]).any()  # a set per channel
    assert not params["patch_mask"][mask_type == FOCAL].any()
    kept = 200 * 200
    assert (focal.flatten(2).sum(-1) == 224 * 224 - kept).all()


def test_focal_hard_negatives_fill_a_window_and_need_foreground_like_the_others():
    saliency = torch.zeros(4, 7, 7, dtype=torch.bool)
    saliency[:2, 3, 3] = True
    params = draw_mask_params((4, 3, 224, 224), saliency, hard_negative=True, mask_type_probs={"focal": 1.0})
    # The window ignores where the object is, as in the release; an image without any foreground gets no
    # window and no hard negative (the release would contrast the key with a copy of itself).
    pixels = render_mask(params, (224, 224), hard_negative=True)
    assert pixels.flatten(1).sum(1).tolist() == [130 * 130, 130 * 130, 0, 0]
    assert params["valid"].tolist() == [True, True, False, False]


def test_p_decides_which_images_are_masked():
    params = draw_mask_params(
        (400, 3, 64, 64),
        centred_saliency(400),
        mask_ratio=0.5,
        patch_size=8,
        p=0.3,
        hard_negative=True,
        generator=torch.Generator().manual_seed(0),
    )
    applied = params["applied"]
    assert 0.2 < applied.float().mean() < 0.4
    pixels = render_mask(params, (64, 64), 8, hard_negative=True)
    assert not pixels[~applied].any() and pixels[applied].flatten(1).any(1).all()
    assert torch.equal(params["valid"], applied)


def test_same_on_batch_shares_every_draw():
    params = draw_mask_params(
        (6, 3, 224, 224),
        mask_type_probs=RELEASE_MASK_TYPE_PROBS,
        same_on_batch=True,
        generator=torch.Generator().manual_seed(1),
    )
    for value in params.values():
        assert (value == value[:1]).all()


def test_one_image_without_batch_dimension():
    params = draw_mask_params((3, 224, 224), centred_saliency(1)[0], mask_ratio=0.25)
    assert render_mask(params, (224, 224)).shape == (1, 224, 224) and params["mask_ratio"].shape == ()
    masked, _ = mask_images(torch.rand(3, 224, 224), centred_saliency(1)[0], "mean", mask_ratio=0.25)
    assert masked.shape == (3, 224, 224)


def test_saliency_batch_must_match_the_images():
    with pytest.raises(ValueError, match="saliency holds 3 maps but the images are a batch of 2"):
        draw_mask_params((2, 3, 224, 224), centred_saliency(3))
    with pytest.raises(ValueError, match="saliency holds 2 maps but the images are one image"):
        draw_mask_params((3, 224, 224), centred_saliency(2))
    with pytest.raises(TypeError, match="saliency must be a bool map or float scores"):
        draw_mask_params((2, 3, 224, 224), centred_saliency(2).long())
    with pytest.raises(ValueError, match="needs a saliency map"):
        draw_mask_params((2, 3, 224, 224), hard_negative=True)


@pytest.mark.parametrize(
    ("mask_type_probs", "error"),
    [
        ({"spatial": 0.5}, "sum to 1"),
        ({"cutout": 1.0}, "unknown mask types"),
        ({"spatial": 1.5}, r"must be in \[0, 1\]"),
    ],
)
def test_bad_mask_type_probabilities_are_rejected(mask_type_probs, error):
    with pytest.raises(ValueError, match=error):
        draw_mask_params((2, 3, 64, 64), mask_type_probs=mask_type_probs)


@pytest.mark.parametrize("fill", ["blur", "mean", "constant", "noise"])
def test_batched_fill_equals_per_image_fill_for_the_same_params(fill):
    images = torch.rand(5, 3, 96, 80)
    params = draw_mask_params(
        images.shape, mask_ratio=(0.2, 0.6), mask_type_probs=RELEASE_MASK_TYPE_PROBS, patch_size=16
    )
    options = {"std": 0.0} if fill == "noise" else {}
    batched = apply_mask(images, params, fill, patch_size=16, **options)
    for index in range(5):
        single = apply_mask(images[index], {k: v[index] for k, v in params.items()}, fill, patch_size=16, **options)
        torch.testing.assert_close(batched[index], single, rtol=0, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    fill=st.sampled_from(["blur", "mean", "constant"]),
    mask_types=st.sampled_from([{"spatial": 1.0}, {"channel": 1.0}, RELEASE_MASK_TYPE_PROBS]),
    patch_size=st.sampled_from([8, (8, 16), 12]),
    uint8=st.booleans(),
    inplace=st.booleans(),
    channels_last=st.booleans(),
)
def test_patch_writes_equal_the_rendered_mask_fill(seed, fill, mask_types, patch_size, uint8, inplace, channels_last):
    # On a CPU the masked patches are written directly; the pixels must be those of the rendered mask.
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, 48, 64, generator=generator)
    if uint8:
        images = (images * 255).round().to(torch.uint8)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    params = draw_mask_params(images.shape, mask_ratio=(0.1, 0.6), patch_size=patch_size, mask_type_probs=mask_types)
    rendered = apply_fill(images, render_mask(params, (48, 64), patch_size), fill)
    target = images.clone()
    written = apply_mask(target, params, fill, patch_size=patch_size, inplace=inplace)
    assert torch.equal(written, rendered)
    assert (written.data_ptr() == target.data_ptr()) == inplace


def test_seeded_generator_makes_masks_and_fills_reproducible():
    images = torch.rand(4, 3, 64, 64)
    first, first_params = mask_images(images, fill="noise", generator=torch.Generator().manual_seed(9))
    second, second_params = mask_images(images, fill="noise", generator=torch.Generator().manual_seed(9))
    assert torch.equal(first, second)
    for name in first_params:
        assert torch.equal(first_params[name], second_params[name])


def test_unknown_fill_is_rejected():
    with pytest.raises(ValueError, match="fill must be one of"):
        apply_fill(torch.rand(3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), "cutout")


@pytest.mark.parametrize("fill", sorted(FILLS))
@pytest.mark.parametrize("hard_negative", [False, True])
@pytest.mark.parametrize("mask_types", [{"spatial": 0.5, "channel": 0.5}, {"focal": 1.0}], ids=["patches", "focal"])
def test_batched_path_is_loop_free(fill, hard_negative, mask_types):
    # A batch with focal masks renders its pixel mask, one without may write its patches: one path at a time.
    counts = []
    for batch_size in (2, 8, 32):
        images = torch.rand(batch_size, 3, 64, 64)
        saliency = torch.rand(batch_size, 7, 7) < 0.5
        with OperatorLog() as log:
            mask_images(
                images,
                saliency,
                fill,
                mask_ratio=(0.4, 0.7),
                hard_negative=hard_negative,
                mask_type_probs=mask_types,
                patch_size=8,
            )
        counts.append(len(log.operators))
    assert len(set(counts)) == 1, f"operator count grows with the batch: {counts}"


@pytest.mark.parametrize("fill", sorted(FILLS))
@pytest.mark.parametrize("hard_negative", [False, True])
def test_off_the_cpu_nothing_is_read_back_to_the_host(fill, hard_negative):
    # Meta tensors have shapes but no values: any read on the host (a synchronisation on a GPU) raises. On
    # the CPU the noise fills count the masked pixels, which is a memory read there, not a synchronisation.
    images = torch.rand(8, 3, 64, 64, device="meta")
    saliency = torch.rand(8, 7, 7, device="meta") < 0.5
    masked, params = mask_images(
        images,
        saliency,
        fill,
        mask_ratio=(0.4, 0.7),
        hard_negative=hard_negative,
        mask_type_probs=RELEASE_MASK_TYPE_PROBS,
    )
    assert masked.shape == images.shape and masked.device.type == "meta"
    assert all(value.device.type == "meta" for value in params.values())


@pytest.mark.slow
def test_compiles_as_one_graph():
    def step(images, saliency):
        return mask_images(high_pass(images), saliency, "noise", mask_type_probs=RELEASE_MASK_TYPE_PROBS)[0]

    compiled = torch.compile(step, fullgraph=True)
    images, saliency = torch.rand(4, 3, 64, 64), torch.rand(4, 7, 7) < 0.5
    out = compiled(images, saliency)
    assert out.shape == images.shape and torch.isfinite(out).all()


@pytest.mark.cuda
@pytest.mark.parametrize("fill", ["blur", "mean", "constant", "noise"])
def test_cuda_matches_cpu_for_the_same_params(fill):
    images = torch.rand(6, 3, 96, 96)
    params = draw_mask_params(images.shape, centred_saliency(6), mask_type_probs=RELEASE_MASK_TYPE_PROBS)
    options = {"std": 0.0} if fill == "noise" else {}
    cpu = apply_mask(images, params, fill, **options)
    cuda = apply_mask(images.cuda(), {name: value.cuda() for name, value in params.items()}, fill, **options)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-4)
    cuda_params = draw_mask_params(images.shape, centred_saliency(6).cuda(), mask_ratio=0.25)
    assert cuda_params["patch_mask"].device.type == "cuda"
    assert (cuda_params["patch_mask"].flatten(1).sum(1) == 12).all()
