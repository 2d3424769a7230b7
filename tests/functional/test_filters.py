import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms.v2 import functional as TF

from salmask.functional import gaussian_blur, high_pass


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(8, 40),
    width=st.integers(8, 40),
    radius=st.integers(0, 3),
    sigma=st.floats(0.3, 12.0),
    seed=st.integers(0, 2**31),
)
def test_blur_matches_torchvision(height, width, radius, sigma, seed):
    kernel_size = 2 * radius + 1  # torchvision's reflect padding needs the radius below the image side
    image = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = TF.gaussian_blur(image, [kernel_size, kernel_size], [sigma, sigma])
    torch.testing.assert_close(gaussian_blur(image, kernel_size, sigma), expected)


def test_blur_kernel_longer_than_the_image_is_still_a_weighted_average():
    image = torch.rand(1, 3, 10, 12)
    blurred = gaussian_blur(image, 31, 10.0)
    assert blurred.shape == image.shape
    assert (blurred >= image.amin() - 1e-6).all() and (blurred <= image.amax() + 1e-6).all()
    constant = torch.full((3, 5, 5), 0.25)
    torch.testing.assert_close(gaussian_blur(constant, 31, 10.0), constant)


def test_blur_keeps_dtype_and_leaves_input_alone():
    image = torch.rand(3, 32, 32, dtype=torch.bfloat16)
    before = image.clone()
    out = gaussian_blur(image, 11, 5.0)
    assert out.dtype == torch.bfloat16 and torch.equal(image, before)


@pytest.mark.parametrize(("kernel_size", "sigma"), [(4, 1.0), (0, 1.0), (5, 0.0), (5, float("inf"))])
def test_bad_kernels_are_rejected(kernel_size, sigma):
    with pytest.raises(ValueError, match=r"kernel_size|sigma"):
        gaussian_blur(torch.rand(3, 16, 16), kernel_size, sigma)


def test_high_pass_removes_the_mean_and_keeps_edges():
    image = torch.zeros(1, 3, 32, 32)
    image[..., 16:] = 1.0
    filtered = high_pass(image)
    assert filtered[..., :4].abs().max() < 1e-3  # flat far from the edge
    assert filtered[..., 15:17].abs().max() > 0.2  # the edge survives
    torch.testing.assert_close(filtered, image - TF.gaussian_blur(image, [11, 11], [5.0, 5.0]))


def test_high_pass_needs_a_float_image():
    with pytest.raises(TypeError, match="float"):
        high_pass(torch.zeros(3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(("kernel_size", "sigma"), [(5, 1.0), (11, 5.0)])
def test_a_non_finite_pixel_spreads_as_far_as_the_kernel_reaches_as_in_torchvision(bad, kernel_size, sigma):
    image = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    image[1, 2, 20, 7] = bad
    image[0, 0, 0, 39] = bad  # at a corner, where reflection folds the kernel back
    expected = TF.gaussian_blur(image, [kernel_size, kernel_size], [sigma, sigma])
    blurred = gaussian_blur(image, kernel_size, sigma)
    assert torch.equal(blurred.isnan(), expected.isnan()) and torch.equal(blurred.isinf(), expected.isinf())
    if kernel_size == 5 and bad != bad:
        assert int(blurred[1, 2].isnan().sum()) == 25
    finite = expected.isfinite()
    torch.testing.assert_close(blurred[finite], expected[finite])
    # The other planes are untouched by the bad pixels.
    torch.testing.assert_close(blurred[1, :2], TF.gaussian_blur(image[1, :2], [kernel_size] * 2, [sigma] * 2))


def test_the_convolution_route_of_accelerators_and_compiled_graphs_matches_torchvision():
    from salmask.functional._filters import _blur_by_convolution

    image = torch.rand(2, 3, 24, 30, dtype=torch.float64)
    image[0, 1, 5, 5] = float("nan")
    for kernel_size, sigma in ((5, 1.0), (11, 5.0)):
        expected = TF.gaussian_blur(image, [kernel_size, kernel_size], [sigma, sigma])
        blurred = _blur_by_convolution(image, kernel_size, sigma)
        assert torch.equal(blurred.isnan(), expected.isnan())
        torch.testing.assert_close(blurred.nan_to_num(), expected.nan_to_num())
    # Kernels longer than the image reflect as often as needed, as the matrix route does.
    small = torch.rand(3, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(_blur_by_convolution(small, 31, 10.0), gaussian_blur(small, 31, 10.0))
