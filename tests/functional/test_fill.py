import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from salmask.functional import (
    fill_blur,
    fill_constant,
    fill_mean,
    fill_noise,
    gaussian_blur,
    high_pass,
)

DETERMINISTIC_FILLS = {
    "constant": lambda image, mask, **kw: fill_constant(image, mask, 0.5, **kw),
    "mean": fill_mean,
    "blur": fill_blur,
}


def random_case(seed, batch_size=3, channels=3, size=(40, 48), per_channel=False):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(batch_size, channels, *size, generator=gen)
    mask = torch.rand(batch_size, channels if per_channel else 1, *size, generator=gen) < 0.3
    return image, mask


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), name=st.sampled_from(sorted(DETERMINISTIC_FILLS)), per_channel=st.booleans())
def test_unmasked_pixels_are_bit_identical(seed, name, per_channel):
    image, mask = random_case(seed, per_channel=per_channel)
    out = DETERMINISTIC_FILLS[name](image, mask)
    keep = ~mask.expand_as(image)
    assert torch.equal(out[keep], image[keep])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    broadcast=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    inplace=st.booleans(),
)
def test_noise_lands_on_exactly_the_masked_elements_for_any_broadcast(seed, broadcast, inplace):
    # On a CPU the noise is drawn for the masked elements only and scattered: the count must follow the
    # mask's broadcasting over batch, channel, row and column alike.
    gen = torch.Generator().manual_seed(seed)
    image = torch.zeros(3, 3, 9, 10)
    mask_shape = [1 if squeezed else size for squeezed, size in zip(broadcast, image.shape, strict=True)]
    mask = torch.rand(mask_shape, generator=gen) < 0.4
    original = image.clone()
    out = fill_noise(image, mask, std=1.0, mean=5.0, generator=gen, inplace=inplace)
    full = mask.expand_as(image)
    assert torch.equal(out[~full], original[~full])
    assert (out[full] != 0).all() and (full.sum() < 20 or out[full].std() > 0.5)
    assert (out is image) == inplace and (inplace or torch.equal(image, original))


def test_on_the_cpu_noise_is_drawn_for_the_masked_elements_only():
    # The CPU generator is serial: a sample per pixel would cost twenty copies of the batch.
    image, mask = random_case(0)
    drawn = []

    class RecordDraws(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.normal_.default:
                drawn.append(args[0].numel())
            return func(*args, **(kwargs or {}))

    with RecordDraws():
        fill_noise(image, mask)
    assert drawn == [int(mask.expand_as(image).sum())]


def test_fills_put_the_right_values_in_masked_pixels():
    image, mask = random_case(0)
    full = mask.expand_as(image)
    assert (fill_constant(image, mask, 0.5)[full] == 0.5).all()
    mean = image.mean(dim=(-2, -1), keepdim=True).expand_as(image)
    assert torch.equal(fill_mean(image, mask)[full], mean[full])
    blurred = gaussian_blur(image, 31, 10.0)
    assert torch.equal(fill_blur(image, mask)[full], blurred[full])


def test_the_high_pass_recipe_is_the_filter_then_the_noise_fill():
    image, mask = random_case(1, batch_size=8, size=(64, 64))
    out = fill_noise(high_pass(image), mask, std=0.18, generator=torch.Generator().manual_seed(0))
    full = mask.expand_as(image)
    assert torch.equal(out[~full], high_pass(image)[~full])
    noise = out[full]
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.18) < 0.01


def test_noise_is_fresh_for_every_pixel_channel_and_image():
    image = torch.zeros(4, 3, 64, 64)
    mask = torch.ones(4, 1, 64, 64, dtype=torch.bool)
    out = fill_noise(image, mask, std=1.0, generator=torch.Generator().manual_seed(0))
    patches = out.unfold(2, 32, 32).unfold(3, 32, 32).reshape(-1, 32 * 32)
    assert torch.unique(patches, dim=0).shape[0] == patches.shape[0]
    correlation = torch.corrcoef(patches)
    off_diagonal = correlation[~torch.eye(len(patches), dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.2


def test_same_generator_seed_gives_the_same_noise():
    image, mask = random_case(2)
    first = fill_noise(image, mask, generator=torch.Generator().manual_seed(3))
    second = fill_noise(image, mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


@pytest.mark.parametrize("fill", [fill_mean, fill_blur, fill_noise])
def test_inputs_are_left_alone_unless_inplace(fill):
    image, mask = random_case(4)
    before = image.clone()
    out = fill(image, mask)
    assert torch.equal(image, before)
    inplace = fill(image, mask, inplace=True)
    assert inplace.data_ptr() == image.data_ptr()
    if fill in (fill_mean, fill_blur):
        assert torch.equal(inplace, out)


@pytest.mark.parametrize("fill", [fill_mean, fill_blur, lambda image, mask: fill_constant(image, mask, 7)])
def test_uint8_images_are_filled_where_it_makes_sense(fill):
    image, mask = random_case(5)
    image_u8 = (image * 255).round().to(torch.uint8)
    out = fill(image_u8, mask)
    assert out.dtype == torch.uint8
    keep = ~mask.expand_as(image)
    assert torch.equal(out[keep], image_u8[keep])


def test_uint8_images_are_rejected_by_the_noise_fill():
    image, mask = random_case(6)
    with pytest.raises(TypeError, match="float image"):
        fill_noise((image * 255).to(torch.uint8), mask)


def test_bad_masks_and_images_are_rejected():
    image, mask = random_case(7)
    with pytest.raises(TypeError, match="mask must be a bool"):
        fill_mean(image, mask.float())
    with pytest.raises(ValueError, match="does not broadcast"):
        fill_mean(image, mask[:, :, :10])
    with pytest.raises(ValueError, match=r"image must be shaped"):
        fill_mean(image[0, 0], mask[0, 0])
    with pytest.raises(TypeError, match="float or uint8"):
        fill_mean(image.to(torch.int32), mask)
    with pytest.raises(ValueError, match="value must be in"):
        fill_constant((image * 255).to(torch.uint8), mask, 300)
