"""An empty batch (B = 0), as the last batch of a filtered or split dataset can be: every masking entry
point returns an empty result of the right shape; losses and models, which have no mean over nothing,
refuse it by name. Never a NaN, never a reshape error."""

from __future__ import annotations

import pytest
import torch

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
from salmask.functional import (
    FILLS,
    apply_fill,
    apply_mask,
    draw_mask_params,
    expand_patch_mask,
    gaussian_blur,
    high_pass,
    mask_images,
    render_mask,
    saliency_to_patch_grid,
)
from salmask.losses import HardNegativeInfoNCE, NTXentLoss, extend_moco_logits
from salmask.ssl import STRATEGIES, MaskedViews, MoCo, SimCLR, build_encoder

EMPTY = torch.zeros(0, 3, 32, 32)
EMPTY_SALIENCY = torch.zeros(0, 4, 4, dtype=torch.bool)
MIXTURE = {"mask_type_probs": RELEASE_MASK_TYPE_PROBS, "patch_size": 8}


def assert_empty_image(output: torch.Tensor) -> None:
    assert isinstance(output, torch.Tensor) and output.shape == EMPTY.shape and output.dtype == EMPTY.dtype


@pytest.mark.parametrize("hard_negative", [False, True])
def test_the_kernels_draw_render_and_fill_nothing(hard_negative):
    params = draw_mask_params(EMPTY.shape, EMPTY_SALIENCY, hard_negative=hard_negative, **MIXTURE)
    assert all(value.shape[0] == 0 for value in params.values())
    assert render_mask(params, (32, 32), 8, hard_negative=hard_negative).shape == (0, 3, 32, 32)
    for fill in FILLS:
        assert_empty_image(
            apply_mask(EMPTY, params, fill, patch_size=8, hard_negative=hard_negative, check_finite=True)
        )
        assert_empty_image(mask_images(EMPTY, EMPTY_SALIENCY, fill, hard_negative=hard_negative, **MIXTURE)[0])
        assert_empty_image(apply_fill(EMPTY, torch.zeros(0, 1, 32, 32, dtype=torch.bool), fill))
    assert expand_patch_mask(torch.zeros(0, 4, 4, dtype=torch.bool), (32, 32), 8).shape == (0, 32, 32)
    assert saliency_to_patch_grid(torch.zeros(0, 32, 32), (32, 32), 8).shape == (0, 4, 4)
    assert_empty_image(gaussian_blur(EMPTY, 31, 10.0))
    assert_empty_image(high_pass(EMPTY))


@pytest.mark.parametrize(
    "transform",
    [
        SaliencyMask("noise", **MIXTURE),
        SaliencyMask("blur", patch_size=8),
        HighPassMask(patch_size=8),
        HighPassMask(hard_negative=True, patch_size=8),
        BlurMask(patch_size=8),
        MeanFillMask(patch_size=8),
        HardNegativeMask("noise", **MIXTURE),
        HighPassFilter(),
    ],
    ids=lambda transform: type(transform).__name__,
)
def test_the_transforms_return_an_empty_batch(transform):
    image, saliency = transform(EMPTY, Saliency(EMPTY_SALIENCY))
    assert_empty_image(image)
    assert saliency.shape == EMPTY_SALIENCY.shape


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_masked_views_of_an_empty_batch_are_empty(strategy):
    masker = MaskedViews(strategy, patch_size=8, hard_negatives=None if strategy != "none" else False)
    views = masker(EMPTY, EMPTY, EMPTY_SALIENCY, EMPTY_SALIENCY)
    assert_empty_image(views.query)
    assert_empty_image(views.key)
    if views.hard_negatives is not None:
        assert_empty_image(views.hard_negatives)
        assert views.hard_negative_valid.shape == (0,)


def test_the_losses_refuse_an_empty_batch_by_name():
    empty, queue = torch.zeros(0, 8), torch.randn(16, 8)
    for reduction in ("mean", "sum", "none"):
        with pytest.raises(ValueError, match=r"query and key hold no embeddings \(B=0\)"):
            HardNegativeInfoNCE(reduction=reduction)(empty, empty, queue)
        with pytest.raises(ValueError, match=r"view_a and view_b hold no embeddings \(B=0\)"):
            NTXentLoss(reduction=reduction)(empty, empty, torch.zeros(0, 8))
    # Logits are rows per image: an empty batch has an empty set of them, and its labels.
    logits, labels = extend_moco_logits(
        torch.zeros(0, 17), torch.zeros(0, dtype=torch.long), empty, empty, temperature=0.2
    )
    assert logits.shape == (0, 18) and labels.shape == (0,)


def test_nt_xent_names_the_batch_size_it_got():
    with pytest.raises(ValueError, match=r"got B=1\b"):
        NTXentLoss()(torch.randn(1, 8), torch.randn(1, 8))


@pytest.mark.parametrize("method", [MoCo, SimCLR])
def test_a_training_step_refuses_an_empty_batch_and_changes_nothing(method):
    options = {"queue_size": 16} if method is MoCo else {}
    model = method(build_encoder("resnet18", small_images=True), dim=8, **options)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"query holds no images \(B=0\)"):
        model(EMPTY, EMPTY)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
