"""MaskedViews: every strategy on tiny batches, saliency sources, validity, and bad input."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

from salmask import SCDA, HighPassFilter, Saliency
from salmask.functional import expand_patch_mask, high_pass, render_mask
from salmask.ssl import STRATEGIES, MaskedViews, MaskedViewsOutput, TwoViews

SIZE, PATCH, BATCH = 32, 8, 4  # a 4 x 4 patch grid
GRID = SIZE // PATCH
SALIENCY_STRATEGIES = ("high_pass", "blur", "mean")
FILTERING_STRATEGIES = ("high_pass", "mscn")


def views(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, BATCH, 3, SIZE, SIZE, generator=generator).unbind(0)


def object_saliency(empty: tuple[int, ...] = ()) -> Saliency:
    """A centred 2 x 2-patch object per image; images listed in ``empty`` have no foreground."""
    saliency = torch.zeros(BATCH, GRID, GRID, dtype=torch.bool)
    saliency[:, 1:3, 1:3] = True
    saliency[list(empty)] = False
    return Saliency(saliency)


def masker(strategy: str, **kwargs) -> MaskedViews:
    return MaskedViews(strategy, patch_size=PATCH, generator=torch.Generator().manual_seed(1), **kwargs)


def pixels(params: dict, hard_negative: bool = False) -> torch.Tensor:
    return render_mask(params, (SIZE, SIZE), PATCH, hard_negative=hard_negative)


def expected_key(strategy: str, key: torch.Tensor) -> torch.Tensor:
    return high_pass(key) if strategy in FILTERING_STRATEGIES else key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shapes_and_the_key_is_never_masked(strategy):
    query, key = views()
    saliency = object_saliency()
    out = masker(strategy)(query, key, saliency, saliency)
    assert isinstance(out, MaskedViewsOutput)
    assert out.query.shape == out.key.shape == query.shape
    assert out.query.dtype == query.dtype
    torch.testing.assert_close(out.key, expected_key(strategy, key), rtol=0, atol=0)
    if strategy in SALIENCY_STRATEGIES:
        assert out.hard_negatives.shape == key.shape
        assert out.hard_negative_valid.shape == (BATCH,) and out.hard_negative_valid.dtype == torch.bool
    else:
        assert out.hard_negatives is None and out.hard_negative_valid is None and out.hard_negative_params is None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inputs_are_never_changed_in_place(strategy):
    query, key = views()
    saliency = object_saliency(empty=(1,))
    copies = [t.clone() for t in (query, key, saliency)]
    masker(strategy)(query, key, saliency, saliency)
    for original, copy in zip((query, key, saliency), copies, strict=True):
        assert torch.equal(original, copy)


def test_none_returns_the_given_tensors_untouched():
    query, key = views()
    out = masker("none")(query, key)
    assert out.query is query and out.key is key
    assert out.query_params is None and out.hard_negatives is None


@pytest.mark.parametrize("strategy", ["blur", "mean"])
def test_query_changes_only_where_its_mask_says(strategy):
    query, key = views()
    saliency = object_saliency()
    out = masker(strategy, mask_ratio=0.25)(query, key, saliency, saliency)
    mask = pixels(out.query_params).expand_as(query)
    assert torch.equal(out.query[~mask], query[~mask])
    assert (out.query[mask] != query[mask]).all()
    # 4 of 16 patches per image: alpha * N with the foreground share (4 of 16) split as the saliency says.
    patches = out.query_params["patch_mask"][:, 0]
    assert patches.flatten(1).sum(1).tolist() == [4] * BATCH
    assert (patches & saliency).flatten(1).sum(1).tolist() == [1] * BATCH


def test_high_pass_query_is_the_filtered_view_outside_its_mask():
    query, key = views()
    saliency = object_saliency()
    out = masker("high_pass")(query, key, saliency, saliency)
    mask = pixels(out.query_params).expand_as(query)
    filtered = high_pass(query)
    assert torch.equal(out.query[~mask], filtered[~mask])
    assert mask.any()


@pytest.mark.parametrize("mask_type", ["spatial", "channel"])
@pytest.mark.parametrize("strategy", SALIENCY_STRATEGIES)
def test_hard_negatives_differ_from_the_key_only_in_foreground_patches(strategy, mask_type):
    query, key = views()
    saliency = object_saliency()
    out = masker(strategy, hard_negative_mask_type_probs={mask_type: 1.0})(query, key, saliency, saliency)
    params = out.hard_negative_params
    foreground_pixels = expand_patch_mask(saliency, (SIZE, SIZE), PATCH)[:, None].expand_as(key)
    changed = out.hard_negatives != out.key
    assert not (changed & ~foreground_pixels).any()
    assert torch.equal(changed, pixels(params, hard_negative=True).expand_as(key))
    # beta in [0.4, 0.7] of 4 foreground patches: 2 or 3 masked patches per image (per channel).
    masked_patches = params["patch_mask"].flatten(2).sum(2)
    assert ((masked_patches >= 2) & (masked_patches <= 3)).all()
    assert out.hard_negative_valid.all()


def test_release_mixture_hard_negatives_differ_from_the_key_only_inside_their_masks():
    # The release's high-pass hard negatives also draw channel-wise and focal masks (focal windows do not
    # follow saliency); whatever was drawn, the hard negative equals the filtered key outside it.
    query, key = views()
    saliency = object_saliency()
    out = masker("high_pass")(query, key, saliency, saliency)
    mask = pixels(out.hard_negative_params, hard_negative=True).expand_as(key)
    assert torch.equal(out.hard_negatives[~mask], out.key[~mask])
    assert (out.hard_negatives[mask] != out.key[mask]).all()


@pytest.mark.parametrize("strategy", SALIENCY_STRATEGIES)
def test_images_without_foreground_give_invalid_unmasked_hard_negatives(strategy):
    query, key = views()
    saliency = object_saliency(empty=(1, 3))
    out = masker(strategy, hard_negative_mask_type_probs={"spatial": 1.0})(query, key, saliency, saliency)
    assert out.hard_negative_valid.tolist() == [True, False, True, False]
    assert torch.equal(out.hard_negatives[[1, 3]], out.key[[1, 3]])
    assert not torch.equal(out.hard_negatives[[0, 2]], out.key[[0, 2]])


def test_hard_negatives_follow_the_key_saliency_and_the_query_its_own():
    query, key = views()
    query_saliency = object_saliency()
    key_saliency = object_saliency(empty=(0, 1, 2, 3))
    out = masker("mean")(query, key, query_saliency, key_saliency)
    assert not out.hard_negative_valid.any()
    assert torch.equal(out.query_params["foreground"], query_saliency.as_subclass(torch.Tensor))


def test_each_image_draws_its_own_masks():
    query, key = views()
    saliency = object_saliency()
    out = masker("mean", mask_ratio=0.5, hard_negative_mask_type_probs={"spatial": 1.0})(query, key, saliency, saliency)
    patches = out.query_params["patch_mask"][:, 0].flatten(1)
    assert len({tuple(row.tolist()) for row in patches}) > 1


def test_mscn_masks_uniformly_without_saliency_and_makes_no_hard_negatives():
    query, key = views()
    out = masker("mscn", mask_type_probs={"spatial": 1.0}, mask_ratio=0.5)(query, key)
    assert out.query_params["foreground"].all()
    assert out.query_params["patch_mask"].flatten(1).sum(1).tolist() == [8] * BATCH
    assert out.hard_negatives is None


def test_mscn_with_hard_negatives_needs_key_saliency():
    query, key = views()
    views_ = masker("mscn", hard_negatives=True)
    with pytest.raises(ValueError, match="key_saliency"):
        views_(query, key)
    out = views_(query, key, key_saliency=object_saliency(empty=(2,)))
    assert out.hard_negative_valid.tolist() == [True, True, False, True]


@pytest.mark.parametrize("strategy", SALIENCY_STRATEGIES)
def test_hard_negatives_can_be_turned_off(strategy):
    query, key = views()
    saliency = object_saliency()
    out = masker(strategy, hard_negatives=False)(query, key, query_saliency=saliency)
    assert out.hard_negatives is None and out.hard_negative_valid is None


class CountingBackbone(nn.Module):
    """A tiny feature extractor that records the batch sizes it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=PATCH, padding=1)
        self.calls: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.shape[0])
        return self.conv(images).relu()


def test_scda_computes_both_saliencies_in_one_forward_and_matches_passing_them():
    query, key = views()
    backbone = CountingBackbone()
    scda = SCDA(backbone)
    out = masker("mean", scda=scda)(query, key)
    assert backbone.calls == [2 * BATCH]
    query_saliency, key_saliency = scda(query, key)
    given = masker("mean")(query, key, query_saliency, key_saliency)
    for computed, passed in zip(out, given, strict=True):
        if isinstance(computed, torch.Tensor):
            assert torch.equal(computed, passed)


def test_scda_takes_a_backbone_model_or_a_callable_as_scda_does():
    query, key = views()
    backbone = CountingBackbone()
    expected = masker("mean", scda=SCDA(backbone))(query, key)
    for scda in (backbone, lambda images: backbone(images)):
        views_ = masker("mean", scda=scda)
        assert isinstance(views_.scda, SCDA)
        out = views_(query, key)
        assert torch.equal(out.query, expected.query) and torch.equal(out.hard_negatives, expected.hard_negatives)
    torchvision = pytest.importorskip("torchvision")
    views_ = masker("blur", scda=torchvision.models.resnet18())  # its layers before the pooling
    assert views_(query, key).hard_negative_valid.shape == (BATCH,)


def test_given_saliency_takes_precedence_over_scda():
    query, key = views()
    backbone = CountingBackbone()
    saliency = object_saliency()
    masker("blur", scda=SCDA(backbone))(query, key, saliency, saliency)
    assert backbone.calls == []
    masker("blur", scda=SCDA(backbone))(query, key, query_saliency=saliency)
    assert backbone.calls == [BATCH]


def test_plain_tensor_and_float_saliency_are_accepted():
    query, key = views()
    saliency = object_saliency()
    as_bool = masker("mean")(query, key, saliency.as_subclass(torch.Tensor), saliency.as_subclass(torch.Tensor))
    as_float = masker("mean")(query, key, saliency.float(), saliency.float())
    assert torch.equal(as_bool.query, as_float.query)
    assert torch.equal(as_bool.hard_negatives, as_float.hard_negatives)


@pytest.mark.parametrize("strategy", ["high_pass", "blur", "mean", "mscn"])
def test_a_seeded_generator_makes_the_step_reproducible(strategy):
    query, key = views()
    saliency = object_saliency()
    first = masker(strategy)(query, key, saliency, saliency)
    second = masker(strategy)(query, key, saliency, saliency)
    assert torch.equal(first.query, second.query)
    if first.hard_negatives is not None:
        assert torch.equal(first.hard_negatives, second.hard_negatives)


def test_fill_options_and_the_filter_reach_the_kernels():
    query, key = views()
    saliency = object_saliency()
    out = masker(
        "high_pass",
        input_filter=HighPassFilter(5, 1.0),
        hard_negative_fill_options={"std": 0.0},
        hard_negative_mask_type_probs={"spatial": 1.0},
    )(query, key, saliency, saliency)
    torch.testing.assert_close(out.key, high_pass(key, 5, 1.0), rtol=0, atol=0)
    mask = pixels(out.hard_negative_params, hard_negative=True).expand_as(key)
    assert (out.hard_negatives[mask] == 0).all()
    assert torch.equal(out.hard_negatives[~mask], out.key[~mask])
    # The filter is one view-wide step, not an option of the fill.
    with pytest.raises(ValueError, match=r"\['sigma'\] set the high-pass filter .* input_filter=HighPassFilter"):
        MaskedViews("high_pass", hard_negative_fill_options={"sigma": 2.0})
    with pytest.raises(ValueError, match=r"fill_options \['value'\] do not apply to fill 'noise'"):
        MaskedViews("high_pass", fill_options={"value": 2.0})
    with pytest.raises(ValueError, match="feeds unfiltered views"):
        MaskedViews("blur", input_filter=HighPassFilter())


def test_bad_arguments_name_what_is_wrong():
    query, key = views()
    with pytest.raises(ValueError, match="strategy must be one of"):
        MaskedViews("zero")
    with pytest.raises(ValueError, match="hard_negatives=False"):
        MaskedViews("none", hard_negatives=True)
    with pytest.raises(ValueError, match="fill_options"):
        MaskedViews("none", fill_options={"sigma": 1.0})
    with pytest.raises(TypeError, match="scda must be an SCDA, a model or callable"):
        MaskedViews("mean", scda="resnet50")
    with pytest.raises(TypeError, match="hard_negatives"):
        MaskedViews("mean", hard_negatives=1)
    with pytest.raises(ValueError, match="fill_options"):
        MaskedViews("mean", fill_options={"noise_std": 0.1})
    views_ = masker("mean")
    with pytest.raises(ValueError, match="query_saliency"):
        views_(query, key)
    with pytest.raises(TypeError, match=r"query must be a torch\.Tensor"):
        views_(query.numpy(), key)
    with pytest.raises(TypeError, match="key must be a float"):
        views_(query, key.to(torch.uint8))
    with pytest.raises(ValueError, match=r"query must be a \(B, C, H, W\)"):
        views_(query[0], key)
    with pytest.raises(ValueError, match="share one shape"):
        views_(query, key[:2])
    with pytest.raises(ValueError, match="key_saliency holds 2 maps but the images are a batch of 4"):
        views_(query, key, object_saliency(), object_saliency()[:2])
    with pytest.raises(TypeError, match="query_saliency must be a Saliency"):
        views_(query, key, [[True]], object_saliency())


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_host_synchronisation_on_cuda(strategy):
    query, key = (view.cuda() for view in views())
    saliency = object_saliency(empty=(1,)).cuda()
    views_ = MaskedViews(strategy, patch_size=PATCH)
    views_(query, key, saliency, saliency)  # warm-up: first calls may synchronise for allocation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = views_(query, key, saliency, saliency)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.query.is_cuda


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_input_filter_is_the_filter_only_for_strategies_that_filter_views(strategy):
    filters = strategy in FILTERING_STRATEGIES
    masker = MaskedViews(strategy, patch_size=8, input_filter=HighPassFilter(7, 2.0) if filters else None)
    if filters:
        assert (masker.input_filter.kernel_size, masker.input_filter.sigma) == (7, 2.0)
        assert isinstance(MaskedViews(strategy).input_filter, HighPassFilter)
    else:
        assert masker.input_filter is None


def test_two_views_draws_each_view_afresh_and_moves_saliency_with_its_image():
    from torchvision.transforms import v2

    torch.manual_seed(0)
    image = torch.arange(16 * 16, dtype=torch.float32).view(1, 16, 16).expand(3, -1, -1).clone()
    saliency = Saliency(image[0] > 100)
    two = TwoViews(v2.Compose([v2.RandomCrop(8), v2.RandomHorizontalFlip()]))  # no interpolation: exact checks
    query, query_saliency, key, key_saliency = two(image, saliency)
    assert not torch.equal(query, key)
    assert isinstance(query_saliency, Saliency) and isinstance(key_saliency, Saliency)
    assert torch.equal(query_saliency.as_subclass(torch.Tensor), query[0] > 100)
    assert torch.equal(key_saliency.as_subclass(torch.Tensor), key[0] > 100)
    assert len(two(image)) == 2
    with pytest.raises(TypeError, match="pipeline"):
        TwoViews(None)


@pytest.mark.parametrize(("strategy", "blurs"), [("high_pass", 2), ("mscn", 2), ("blur", 2), ("mean", 0), ("none", 0)])
def test_a_step_blurs_each_view_once_at_most(strategy, blurs):
    # The high-pass filter is a view-wide step: once on the query, once on the key, which the hard negatives
    # are made from. The strong blur fills each view it masks from one blurred copy.
    import salmask.functional._fill as fill_module
    import salmask.functional._filters as filters_module

    query, key = views()
    saliency = object_saliency()
    blur = filters_module.gaussian_blur
    with (
        mock.patch.object(filters_module, "gaussian_blur", wraps=blur) as in_filter,
        mock.patch.object(fill_module, "gaussian_blur", wraps=blur) as in_fill,
    ):
        masker(strategy)(query, key, saliency, saliency)
    assert in_filter.call_count + in_fill.call_count == blurs


@pytest.mark.slow
def test_a_high_pass_step_compiles_as_one_graph():
    torch._dynamo.reset()
    query, key = views()
    saliency = object_saliency().as_subclass(torch.Tensor)
    out = torch.compile(MaskedViews("high_pass", patch_size=PATCH), fullgraph=True)(query, key, saliency, saliency)
    assert out.query.shape == query.shape and torch.isfinite(out.hard_negatives).all()
    torch.testing.assert_close(out.key, high_pass(key), rtol=1e-5, atol=1e-5)
