"""One test per defect of the paper's public release: salmask must be free of each."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from operator_log import OperatorLog

from salmask import HardNegativeMask, Saliency, SaliencyMask
from salmask.functional import draw_mask_params, fill_noise, masked_patch_counts, sample_patch_mask


def test_foreground_is_placed_on_the_object_not_in_the_rightmost_columns():
    # Defect 1: the release thresholded a row-sorted copy of the activation map and indexed it with the
    # unsorted positions, pushing the foreground to the right. Put the object on the left.
    saliency = torch.zeros(8, 7, 7, dtype=torch.bool)
    saliency[:, 1:6, 0:2] = True
    params = draw_mask_params((8, 3, 224, 224), saliency, mask_ratio=1.0, hard_negative=True)
    masked_columns = params["patch_mask"][:, 0].any(dim=1)
    assert masked_columns[:, :2].all() and not masked_columns[:, 2:].any()


def test_every_image_gets_its_own_hard_negative():
    # Defect 2 (engine side): each image's hard negative follows its own saliency, not sample 0's.
    saliency = torch.zeros(4, 7, 7, dtype=torch.bool)
    for index in range(4):
        saliency[index, index, :] = True  # image i's object fills row i
    transform = HardNegativeMask("mean", mask_ratio=1.0, mask_type_probs={"spatial": 1.0})
    transform(torch.rand(4, 3, 224, 224), Saliency(saliency))
    assert torch.equal(transform.last_params["patch_mask"][:, 0], saliency)


@settings(max_examples=300, deadline=None)
@given(num_foreground=st.integers(0, 49), ratio=st.floats(0, 1))
def test_background_count_is_never_negative_nor_everything(num_foreground, ratio):
    # Defect 3: int(N * alpha) - round(N * alpha * gamma) went negative and, used as a slice end, masked
    # nearly the whole background.
    foreground = torch.zeros(1, 49, dtype=torch.bool)
    foreground[:, :num_foreground] = True
    fg_count, bg_count = masked_patch_counts(foreground, torch.tensor([ratio], dtype=torch.float64))
    expected_background = ratio * (49 - num_foreground)
    assert 0 <= bg_count.item() <= round(expected_background) + 1
    assert fg_count.item() + bg_count.item() == int(ratio * 49 + 0.5)


def test_release_case_that_went_negative():
    # N * alpha = 1.9 and gamma = 1: the release computed 1 - 2 = -1 background patches.
    foreground = torch.ones(1, 49, dtype=torch.bool)
    foreground[:, -1] = False  # one background patch left to be wrongly taken
    fg_count, bg_count = masked_patch_counts(foreground, torch.tensor([1.9 / 49]))
    assert (fg_count.item(), bg_count.item()) == (2, 0)


def test_groups_of_one_patch_are_masked_like_any_other():
    # Defect 4: a foreground (or background) group of exactly one patch was skipped.
    foreground = torch.zeros(2, 49, dtype=torch.bool)
    foreground[0, 24] = True  # a single foreground patch
    foreground[1] = True
    foreground[1, 0] = False  # a single background patch
    hard = sample_patch_mask(foreground[:1], torch.tensor([0.5]), hard_negative=True)
    assert hard[0, 0, 24] and hard.sum() == 1
    positive = sample_patch_mask(foreground, torch.tensor([1.0, 1.0]))
    assert positive[0, 0, 24] and positive[1, 0, 0]


def test_noise_is_never_one_patch_reused():
    # Defect 5: one noise patch per batch was pasted into every masked patch of every image.
    transform = SaliencyMask("noise", mask_ratio=1.0, patch_size=32)
    out = transform(torch.zeros(4, 3, 64, 64))
    patches = out.unfold(2, 32, 32).unfold(3, 32, 32).permute(0, 2, 3, 1, 4, 5).reshape(16, -1)
    assert torch.unique(patches, dim=0).shape[0] == 16
    noise = fill_noise(torch.zeros(2, 3, 8, 8), torch.ones(2, 1, 8, 8, dtype=torch.bool))
    assert not torch.equal(noise[0], noise[1])


def test_no_per_image_loop_and_no_host_copy():
    # Defect 6: per-sample Python loops and a device-to-host copy of the map every step.
    counts = []
    for batch_size in (4, 64):
        saliency = torch.rand(batch_size, 7, 7) < 0.5
        with OperatorLog() as log:
            draw_mask_params((batch_size, 3, 224, 224), saliency, hard_negative=True)
        assert not log.host_syncs()
        counts.append(len(log.operators))
    assert counts[0] == counts[1]
