import pytest
import torch
from PIL import Image as PILImage
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import tv_tensors
from torchvision.transforms import v2

from salmask import (
    RELEASE_MASK_TYPE_PROBS,
    BlurMask,
    HardNegativeMask,
    HighPassFilter,
    HighPassMask,
    MeanFillMask,
    Saliency,
    SaliencyMask,
)
from salmask.functional import gaussian_blur, high_pass
from salmask.ssl import MaskedViews


def object_saliency(*batch, size=224):
    saliency = torch.zeros(*batch, size, size, dtype=torch.bool)
    lo, hi = size * 2 // 7, size * 5 // 7
    saliency[..., lo:hi, lo:hi] = True
    return Saliency(saliency)


@pytest.mark.parametrize(
    "transform",
    [SaliencyMask(), HighPassMask(), BlurMask(), MeanFillMask(), HardNegativeMask(), SaliencyMask("constant")],
    ids=lambda t: type(t).__name__,
)
def test_returns_the_structure_it_gets(transform):
    image = tv_tensors.Image(torch.rand(3, 224, 224))
    saliency = object_saliency()
    masked, out_saliency = transform(image, saliency)
    assert isinstance(masked, tv_tensors.Image) and masked.shape == image.shape
    assert out_saliency is saliency
    sample = transform({"image": image, "saliency": saliency, "label": 3})
    assert set(sample) == {"image", "saliency", "label"} and sample["label"] == 3
    assert isinstance(sample["image"], tv_tensors.Image)
    if not transform.hard_negative:
        plain = transform(torch.rand(3, 224, 224))
        assert type(plain) is torch.Tensor


def test_works_inside_compose_after_geometric_transforms():
    pipeline = v2.Compose(
        [
            v2.RandomResizedCrop(96, scale=(0.3, 1.0)),
            v2.RandomHorizontalFlip(),
            BlurMask(mask_ratio=0.25, patch_size=16),
        ]
    )
    image = tv_tensors.Image(torch.rand(3, 300, 400))
    saliency = object_saliency(size=300)
    saliency = Saliency(torch.nn.functional.pad(saliency, (50, 50)))
    masked, cropped = pipeline(image, saliency)
    assert masked.shape == (3, 96, 96) and cropped.shape == (96, 96)
    params = pipeline.transforms[-1].last_params
    # The mask saw the cropped saliency: its foreground grid is the crop's, patch by patch.
    from salmask.functional import saliency_to_patch_grid

    assert torch.equal(params["foreground"], saliency_to_patch_grid(cropped[None], (96, 96), 16)[0])


def test_each_image_of_a_batch_gets_its_own_mask():
    transform = SaliencyMask("mean", mask_ratio=0.25)
    transform(torch.rand(16, 3, 224, 224), object_saliency(16))
    patch_mask = transform.last_params["patch_mask"]
    assert patch_mask.shape == (16, 1, 7, 7)
    assert len({tuple(m.flatten().tolist()) for m in patch_mask}) == 16


def test_params_can_be_read_back_and_replayed():
    transform = MeanFillMask(mask_ratio=(0.1, 0.5))
    images = torch.rand(4, 3, 224, 224)
    saliency = object_saliency(4)
    first = transform(images, saliency)[0]
    params = transform.last_params
    assert set(params) == {"patch_mask", "mask_ratio", "mask_type", "applied", "valid", "foreground"}
    replayed = transform.transform(images, params)
    assert torch.equal(first, replayed)


def test_seeded_generator_makes_the_transform_deterministic():
    images, saliency = torch.rand(4, 3, 224, 224), object_saliency(4)
    outputs = [HighPassMask(generator=torch.Generator().manual_seed(0))(images, saliency)[0] for _ in range(2)]
    assert torch.equal(*outputs)


def test_strategies_fill_as_named():
    image = torch.rand(3, 224, 224)
    saliency = object_saliency()
    for transform, expected in [
        (BlurMask(mask_ratio=0.5), gaussian_blur(image, 31, 10.0)),
        (MeanFillMask(mask_ratio=0.5), image.mean(dim=(1, 2), keepdim=True).expand_as(image)),
        (SaliencyMask("constant", 0.5, fill_options={"value": -1.0}), torch.full_like(image, -1.0)),
    ]:
        out = transform(image, saliency)[0]
        mask = transform.pixel_mask(transform.last_params, (224, 224)).expand_as(image)
        assert torch.equal(out[mask], expected[mask]) and torch.equal(out[~mask], image[~mask])


def test_high_pass_mask_defaults_follow_the_release():
    positive, negative = HighPassMask(), HighPassMask(hard_negative=True)
    assert positive.mask_type_probs == RELEASE_MASK_TYPE_PROBS and positive.fill_options["std"] == 0.18
    assert negative.fill_options["std"] == 0.14 and negative.mask_ratio == (0.4, 0.7)
    assert HardNegativeMask().mask_ratio == (0.4, 0.7)
    assert (positive.input_filter.kernel_size, positive.input_filter.sigma) == (11, 5.0)
    assert BlurMask().mask_type_probs == {"spatial": 1.0}
    assert SaliencyMask().mask_ratio == (0.05, 0.25)


def test_hard_negative_masks_only_the_object_and_reports_images_without_one():
    saliency = object_saliency(3)
    saliency[2] = False
    transform = HardNegativeMask("mean", mask_type_probs={"spatial": 1.0})
    images = torch.rand(3, 3, 224, 224)
    out = transform(images, saliency)[0]
    params = transform.last_params
    assert torch.equal(params["valid"], torch.tensor([True, True, False]))
    assert not (params["patch_mask"][:, 0] & ~params["foreground"]).any()
    assert torch.equal(out[2], images[2])


def test_hard_negative_needs_saliency():
    with pytest.raises(ValueError, match="needs a saliency map"):
        HardNegativeMask()(torch.rand(3, 64, 64))


def test_without_saliency_masks_are_uniform():
    transform = SaliencyMask("mean", mask_ratio=0.25)
    transform(torch.rand(3, 224, 224))
    assert transform.last_params["foreground"].all() and transform.last_params["patch_mask"].sum() == 12


def test_float_saliency_scores_are_accepted():
    scores = Saliency(object_saliency().float() * 0.9)
    transform = HardNegativeMask("mean", mask_ratio=1.0, mask_type_probs={"spatial": 1.0})
    transform(torch.rand(3, 224, 224), scores)
    assert transform.last_params["patch_mask"].sum() == 9


def test_uint8_images_where_the_fill_allows_it():
    image = tv_tensors.Image(torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8))
    assert MeanFillMask()(image).dtype == torch.uint8
    assert BlurMask()(image).dtype == torch.uint8
    with pytest.raises(TypeError, match="the high-pass filter needs a float image"):
        HighPassMask()(image)


def test_inplace_only_when_asked():
    image = torch.rand(2, 3, 64, 64)
    before = image.clone()
    MeanFillMask(mask_ratio=0.5, patch_size=16)(image)
    assert torch.equal(image, before)
    out = MeanFillMask(mask_ratio=0.5, patch_size=16, inplace=True)(image)
    assert out.data_ptr() == image.data_ptr() and not torch.equal(image, before)


def test_p_zero_leaves_images_untouched():
    images = torch.rand(4, 3, 64, 64)
    assert torch.equal(MeanFillMask(mask_ratio=0.5, patch_size=16, p=0.0)(images), images)


def test_high_pass_filter_transform():
    image = tv_tensors.Image(torch.rand(2, 3, 64, 64))
    saliency = object_saliency(2, size=64)
    out, same = HighPassFilter()(image, saliency)
    assert isinstance(out, tv_tensors.Image) and same is saliency
    torch.testing.assert_close(out.as_subclass(torch.Tensor), high_pass(image.as_subclass(torch.Tensor)))


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: SaliencyMask("cutout"), ValueError, "fill must be one of"),
        (lambda: SaliencyMask("high_pass"), ValueError, "a recipe, not a fill"),
        (lambda: SaliencyMask(mask_ratio=(0.5, 0.2)), ValueError, "reversed"),
        (lambda: SaliencyMask(mask_ratio=1.2), ValueError, "ratio must lie in"),
        (lambda: SaliencyMask(p=2.0), ValueError, r"p must be in \[0, 1\]"),
        (lambda: BlurMask(kernel_size=30), ValueError, "kernel_size must be a positive odd int"),
        (lambda: MeanFillMask(fill_options={"sigma": 3.0}), ValueError, "do not apply to fill"),
        (lambda: SaliencyMask(saliency_threshold=0.0), ValueError, "saliency_threshold"),
        (lambda: HighPassFilter(sigma=-1.0), ValueError, "sigma"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_inputs_are_rejected_with_the_argument_named():
    transform = SaliencyMask("mean")
    with pytest.raises(ValueError, match=r"image must be shaped \(C, H, W\) or \(B, C, H, W\)"):
        transform(torch.rand(224, 224))
    with pytest.raises(ValueError, match="saliency holds 3 maps but the images are a batch of 2"):
        transform(torch.rand(2, 3, 224, 224), object_saliency(3))
    with pytest.raises(ValueError, match=r"patch_size .* larger than the image"):
        SaliencyMask(patch_size=64)(torch.rand(3, 32, 32))
    bad = torch.rand(3, 64, 64)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        transform(bad)
    with pytest.raises(ValueError, match=r"saliency scores must lie in \[0, 1\]"):
        transform(torch.rand(3, 64, 64), Saliency(torch.full((64, 64), 3.0)))
    with pytest.raises(TypeError, match="ToImage"):
        transform(PILImage.new("RGB", (64, 64)))
    with pytest.raises(TypeError, match="Saliency must be a bool map or float scores"):
        Saliency(torch.zeros(7, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="at most one Saliency"):
        transform(torch.rand(3, 64, 64), object_saliency(size=64), object_saliency(size=64))


def test_extra_repr_names_the_fill():
    assert "fill=blur" in repr(BlurMask())


ALL_TRANSFORMS = [SaliencyMask, HighPassMask, BlurMask, MeanFillMask, HardNegativeMask, HighPassFilter]


@pytest.mark.parametrize("make", ALL_TRANSFORMS, ids=lambda make: make.__name__)
def test_transforms_run_on_meta_tensors_with_their_defaults(make):
    # Meta tensors have shapes and no values: the value check is skipped and nothing is read on the host.
    images = torch.empty(16, 3, 224, 224, device="meta")
    saliency = Saliency(torch.empty(16, 7, 7, dtype=torch.bool, device="meta"))
    masked, _ = make()(images, saliency)
    assert masked.device.type == "meta" and masked.shape == images.shape


def test_the_draws_kept_are_small_tensors_not_pixel_masks():
    transform = HighPassMask()  # channel-wise sets and focal windows: the largest draws
    transform(torch.empty(256, 3, 224, 224, device="meta"), Saliency(torch.empty(256, 7, 7, device="meta")))
    params = transform.last_params
    assert sum(value.nbytes for value in params.values()) <= 2**20
    assert all(value.shape[-2:] != (224, 224) for value in params.values())
    pixels = transform.pixel_mask(params, (224, 224))
    assert pixels.shape == (256, 3, 224, 224) and pixels.dtype == torch.bool


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [SaliencyMask, HighPassMask, BlurMask, MeanFillMask, lambda: SaliencyMask("constant", 0.5), HighPassFilter],
    ids=["SaliencyMask", "HighPassMask", "BlurMask", "MeanFillMask", "constant", "HighPassFilter"],
)
def test_transforms_compile_as_one_graph_on_a_batch(make):
    torch._dynamo.reset()
    transform = make()
    compiled = torch.compile(transform, fullgraph=True)
    images = torch.rand(4, 3, 64, 64)
    out = compiled(images)
    assert out.shape == images.shape and torch.isfinite(out).all()
    if isinstance(transform, SaliencyMask):
        assert transform.last_params["patch_mask"].shape[:2] in ((4, 1), (4, 3))


class FullImagePasses(TorchDispatchMode):
    """Counts the operators that read a tensor with as many elements as the image (a pass over it)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.count += any(t.numel() == self.numel for t in tensors)
        return func(*args, **(kwargs or {}))


def passes(transform, images):
    with FullImagePasses(images.numel()) as counter:
        transform(images)
    return counter.count


def test_the_default_value_check_is_one_cheap_pass():
    images = torch.rand(4, 3, 64, 64)
    generator = torch.Generator()
    # One more pass than without the check; none for the mean fill, which reuses the check's sums.
    blur = passes(BlurMask(generator=generator), images) - passes(
        BlurMask(generator=generator, check_values=False), images
    )
    mean = passes(MeanFillMask(), images) - passes(MeanFillMask(check_values=False), images)
    assert (blur, mean) == (1, 0)


def test_the_value_check_rejects_nan_and_inf_and_nothing_else():
    huge = torch.full((2, 3, 64, 64), 3e38)  # finite, but its sum overflows
    assert MeanFillMask()(huge).shape == huge.shape
    for bad in (float("nan"), float("inf"), -float("inf")):
        images = torch.rand(2, 3, 64, 64)
        images[1, 2, 3, 4] = bad
        with pytest.raises(ValueError, match="non-finite"):
            BlurMask()(images)
        assert MeanFillMask(check_values=False)(images).shape == images.shape


@pytest.mark.parametrize(
    "construct",
    [
        lambda: SaliencyMask(patch_size=0),
        lambda: SaliencyMask(patch_size=(8, 0)),
        lambda: HighPassMask(noise_std=-1),
        lambda: SaliencyMask("noise", fill_options={"std": float("nan")}),
        lambda: SaliencyMask("constant", fill_options={"value": "0"}),
        lambda: SaliencyMask(saliency_threshold="0.5"),
        lambda: SaliencyMask(same_on_batch="no"),
        lambda: MaskedViews("mean", patch_size=0),
        lambda: MaskedViews("high_pass", fill_options={"std": -1.0}),
        lambda: MaskedViews("mean", saliency_threshold=2.0),
        lambda: MaskedViews("mean", generator=0),
    ],
)
def test_construction_arguments_are_checked_at_construction_not_at_the_first_call(construct):
    with pytest.raises((TypeError, ValueError)):
        construct()
