"""HardNegativeInfoNCE, extend_moco_logits and NTXentLoss against plain references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from salmask.losses import (
    HardNegativeInfoNCE,
    InfoNCEOutput,
    NTXentLoss,
    extend_moco_logits,
)
from salmask.ssl import MomentumQueue

# ---------------------------------------------------------------------------------------------------
# Plain references: one row at a time, invalid hard negatives simply left out of the row.


def reference_infonce(query, key, negatives_kd, hard, valid, temperature, weight, normalize=True):
    """Per-query loss: concatenate logits, divide by tau, cross-entropy with target 0."""
    if normalize:
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
        negatives_kd = None if negatives_kd is None else F.normalize(negatives_kd, dim=1)
        hard = None if hard is None else F.normalize(hard, dim=-1)
    losses = []
    for i in range(query.shape[0]):
        row = [query[i] @ key[i]]
        if negatives_kd is not None:
            row.extend(negatives_kd @ query[i])
        if hard is not None:
            for m in range(hard.shape[1]):
                if valid is None or valid[i, m]:
                    row.append(weight * (query[i] @ hard[i, m]))
        logits = torch.stack(row) / temperature
        target = torch.zeros(1, dtype=torch.long)
        losses.append(F.cross_entropy(logits.unsqueeze(0), target))
    return torch.stack(losses)


def reference_ntxent(view_a, view_b, hard, valid, temperature, weight, symmetric=False):
    """Per-anchor NT-Xent over the 2B views, anchors ordered view_a then view_b."""
    view_a, view_b = F.normalize(view_a, dim=1), F.normalize(view_b, dim=1)
    hard = None if hard is None else F.normalize(hard, dim=-1)
    views = torch.cat([view_a, view_b])
    batch = view_a.shape[0]
    losses = []
    for anchor in range(2 * batch):
        image = anchor % batch
        partner = anchor + batch if anchor < batch else anchor - batch
        row = [views[anchor] @ views[partner]]
        row.extend(views[anchor] @ views[c] for c in range(2 * batch) if c not in (anchor, partner))
        if hard is not None and (anchor < batch or symmetric):
            for m in range(hard.shape[1]):
                if valid is None or valid[image, m]:
                    row.append(weight * (views[anchor] @ hard[image, m]))
        logits = torch.stack(row) / temperature
        losses.append(F.cross_entropy(logits.unsqueeze(0), torch.zeros(1, dtype=torch.long)))
    return torch.stack(losses)


def moco_v2_loss(query, key, queue_dk, temperature):
    """MoCo v2's criterion as its builder and main script compute it (q, k, queue already normalised)."""
    positive = torch.einsum("nc,nc->n", query, key).unsqueeze(-1)
    negative = torch.einsum("nc,ck->nk", query, queue_dk)
    logits = torch.cat([positive, negative], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    return torch.nn.CrossEntropyLoss()(logits, labels), logits, labels


def random_inputs(batch, dim, num_negatives, num_hard, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return {
        "query": torch.randn(batch, dim, generator=generator, dtype=dtype),
        "key": torch.randn(batch, dim, generator=generator, dtype=dtype),
        "negatives": torch.randn(num_negatives, dim, generator=generator, dtype=dtype),
        "hard": torch.randn(batch, num_hard, dim, generator=generator, dtype=dtype),
        "valid": torch.rand(batch, num_hard, generator=generator) < 0.6,
    }


# ---------------------------------------------------------------------------------------------------
# HardNegativeInfoNCE equals the reference


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 6),
    dim=st.integers(2, 9),
    num_negatives=st.integers(1, 12),
    num_hard=st.integers(1, 4),
    temperature=st.floats(0.05, 1.0),
    weight=st.floats(0.25, 4.0),
    layout=st.sampled_from(["KD", "DK"]),
    use_hard=st.booleans(),
    use_valid=st.booleans(),
    squeeze_single_hard=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_infonce_equals_reference(
    batch, dim, num_negatives, num_hard, temperature, weight, layout, use_hard, use_valid, squeeze_single_hard, seed
):
    inputs = random_inputs(batch, dim, num_negatives, num_hard, seed)
    hard = inputs["hard"] if use_hard else None
    valid = inputs["valid"] if use_hard and use_valid else None
    if hard is not None and num_hard == 1 and squeeze_single_hard:
        hard, valid = hard[:, 0], None if valid is None else valid[:, 0]
    negatives = inputs["negatives"] if layout == "KD" else inputs["negatives"].t()
    criterion = HardNegativeInfoNCE(temperature, weight, reduction="none", negatives_layout=layout)
    loss = criterion(inputs["query"], inputs["key"], negatives, hard, valid)
    expected = reference_infonce(
        inputs["query"],
        inputs["key"],
        inputs["negatives"],
        inputs["hard"] if use_hard else None,
        inputs["valid"] if use_hard and use_valid else None,
        temperature,
        weight,
    )
    torch.testing.assert_close(loss, expected)
    mean = HardNegativeInfoNCE(temperature, weight, negatives_layout=layout)(
        inputs["query"], inputs["key"], negatives, hard, valid
    )
    torch.testing.assert_close(mean, expected.mean())


def test_both_queue_layouts_give_the_same_loss_with_auto_detection():
    inputs = random_inputs(4, 8, 32, 2, seed=1)
    criterion = HardNegativeInfoNCE()
    rows = criterion(inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"])
    columns = criterion(inputs["query"], inputs["key"], inputs["negatives"].t(), inputs["hard"])
    torch.testing.assert_close(rows, columns)


def test_square_negatives_need_an_explicit_layout():
    inputs = random_inputs(3, 6, 6, 1, seed=2)
    with pytest.raises(ValueError, match="negatives_layout='KD' or 'DK'"):
        HardNegativeInfoNCE()(inputs["query"], inputs["key"], inputs["negatives"])
    expected = reference_infonce(inputs["query"], inputs["key"], inputs["negatives"], None, None, 0.2, 2.0)
    as_rows = HardNegativeInfoNCE(negatives_layout="KD", reduction="none")
    as_columns = HardNegativeInfoNCE(negatives_layout="DK", reduction="none")
    torch.testing.assert_close(as_rows(inputs["query"], inputs["key"], inputs["negatives"]), expected)
    torch.testing.assert_close(as_columns(inputs["query"], inputs["key"], inputs["negatives"].t()), expected)


def test_without_hard_negatives_equals_moco_v2():
    generator = torch.Generator().manual_seed(3)
    query = F.normalize(torch.randn(8, 16, generator=generator), dim=1)
    key = F.normalize(torch.randn(8, 16, generator=generator), dim=1)
    queue = F.normalize(torch.randn(16, 128, generator=generator), dim=0)
    expected, moco_logits, _ = moco_v2_loss(query, key, queue, temperature=0.2)
    out = HardNegativeInfoNCE(temperature=0.2)(query, key, queue, return_logits=True)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits, moco_logits)


def test_weight_one_and_one_hard_negative_equals_infonce_with_that_extra_negative():
    generator = torch.Generator().manual_seed(4)
    query, key, hard = (F.normalize(torch.randn(6, 10, generator=generator), dim=1) for _ in range(3))
    queue = F.normalize(torch.randn(10, 40, generator=generator), dim=0)
    positive = (query * key).sum(1, keepdim=True)
    extra = (query * hard).sum(1, keepdim=True)
    logits = torch.cat([positive, query @ queue, extra], dim=1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    loss = HardNegativeInfoNCE(temperature=0.2, hard_negative_weight=1.0)(query, key, queue, hard)
    torch.testing.assert_close(loss, expected)


def test_hard_negatives_only_without_queue():
    inputs = random_inputs(5, 7, 1, 3, seed=5)
    loss = HardNegativeInfoNCE(reduction="none")(inputs["query"], inputs["key"], hard_negatives=inputs["hard"])
    expected = reference_infonce(inputs["query"], inputs["key"], None, inputs["hard"], None, 0.2, 2.0)
    torch.testing.assert_close(loss, expected)


def test_normalize_false_uses_raw_dot_products():
    inputs = random_inputs(4, 5, 9, 2, seed=6)
    criterion = HardNegativeInfoNCE(0.5, 1.5, normalize=False, reduction="none")
    loss = criterion(inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"], inputs["valid"])
    expected = reference_infonce(
        inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"], inputs["valid"], 0.5, 1.5, False
    )
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------------------------------------------
# Per-sample hard negatives (METHOD.md §6 defect 2)


def test_each_query_is_contrasted_with_its_own_hard_negative():
    inputs = random_inputs(6, 8, 20, 1, seed=7)
    query, key, negatives, hard = inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"]
    criterion = HardNegativeInfoNCE(reduction="none")
    loss = criterion(query, key, negatives, hard)
    torch.testing.assert_close(loss, reference_infonce(query, key, negatives, hard, None, 0.2, 2.0))

    # The defect: every query paired with sample 0's hard negative. Its losses must differ from ours.
    sample_zero_for_all = hard[:1].expand_as(hard)
    defect = reference_infonce(query, key, negatives, sample_zero_for_all, None, 0.2, 2.0)
    assert not torch.allclose(loss[1:], defect[1:])

    # Shuffling the batch (queries with their keys and hard negatives) must shuffle the per-sample losses.
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = criterion(query[permutation], key[permutation], negatives, hard[permutation])
    torch.testing.assert_close(shuffled, loss[permutation])


def test_changing_one_hard_negative_only_affects_its_own_query():
    inputs = random_inputs(4, 8, 16, 1, seed=8)
    query, key, negatives = inputs["query"], inputs["key"], inputs["negatives"]
    hard = inputs["hard"].clone()
    criterion = HardNegativeInfoNCE(reduction="none")
    before = criterion(query, key, negatives, hard)
    hard[2, 0] = query[2]  # the hardest possible negative: its logit becomes rho / tau
    after = criterion(query, key, negatives, hard)
    changed = ~torch.isclose(before, after)
    assert changed.tolist() == [False, False, True, False]


# ---------------------------------------------------------------------------------------------------
# Validity masks


def test_invalid_hard_negatives_reduce_to_the_plain_loss_with_finite_gradients():
    inputs = random_inputs(4, 6, 10, 3, seed=9)
    query = inputs["query"].clone().requires_grad_(True)
    hard = inputs["hard"].clone().requires_grad_(True)
    valid = torch.ones(4, 3, dtype=torch.bool)
    valid[1] = False  # no foreground in image 1: all of its hard negatives dropped
    valid[3, 1] = False
    criterion = HardNegativeInfoNCE(reduction="none")
    loss = criterion(query, inputs["key"], inputs["negatives"], hard, valid)
    plain = criterion(inputs["query"], inputs["key"], inputs["negatives"])
    torch.testing.assert_close(loss[1], plain[1])
    loss.sum().backward()
    assert torch.isfinite(query.grad).all()
    assert torch.isfinite(hard.grad).all()
    assert torch.count_nonzero(hard.grad[1]) == 0
    assert torch.count_nonzero(hard.grad[3, 1]) == 0


def test_all_hard_negatives_invalid_and_no_queue_gives_zero_loss_not_nan():
    inputs = random_inputs(3, 4, 1, 2, seed=10)
    query = inputs["query"].clone().requires_grad_(True)
    valid = torch.zeros(3, 2, dtype=torch.bool)
    loss = HardNegativeInfoNCE()(query, inputs["key"], hard_negatives=inputs["hard"], hard_negative_valid=valid)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(query.grad).all()


def test_per_image_validity_applies_to_all_of_its_hard_negatives():
    inputs = random_inputs(4, 6, 10, 3, seed=11)
    per_image = torch.tensor([True, False, True, False])
    criterion = HardNegativeInfoNCE(reduction="none")
    broadcast = criterion(inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"], per_image)
    explicit = criterion(
        inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"], per_image[:, None].expand(4, 3)
    )
    torch.testing.assert_close(broadcast, explicit)


def test_invalid_columns_are_minus_infinity_in_the_returned_logits():
    inputs = random_inputs(3, 5, 7, 2, seed=12)
    valid = torch.tensor([[True, False], [True, True], [False, False]])
    out = HardNegativeInfoNCE()(
        inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"], valid, return_logits=True
    )
    assert torch.equal(torch.isinf(out.logits[:, -2:]), ~valid)
    assert torch.isfinite(out.logits[:, :-2]).all()


# ---------------------------------------------------------------------------------------------------
# Gradients


def test_gradcheck_infonce_with_hard_negatives_and_validity():
    inputs = random_inputs(3, 4, 5, 2, seed=13)
    valid = torch.tensor([[True, False], [False, False], [True, True]])
    criterion = HardNegativeInfoNCE(temperature=0.3, hard_negative_weight=1.7)
    tensors = [inputs[name].clone().requires_grad_(True) for name in ("query", "key", "negatives", "hard")]
    assert torch.autograd.gradcheck(lambda q, k, z, t: criterion(q, k, z, t, valid), tensors)


def test_gradcheck_infonce_queue_layout_unnormalised():
    inputs = random_inputs(3, 4, 6, 1, seed=14)
    criterion = HardNegativeInfoNCE(temperature=0.5, normalize=False, reduction="sum")
    tensors = [
        inputs["query"].clone().requires_grad_(True),
        inputs["key"].clone().requires_grad_(True),
        inputs["negatives"].t().clone().requires_grad_(True),
        inputs["hard"][:, 0].clone().requires_grad_(True),
    ]
    assert torch.autograd.gradcheck(lambda q, k, z, t: criterion(q, k, z, t), tensors)


def test_gradcheck_extend_moco_logits():
    inputs = random_inputs(3, 4, 5, 2, seed=15)
    valid = torch.tensor([True, False, True])
    labels = torch.zeros(3, dtype=torch.long)
    tensors = [
        torch.randn(3, 6, dtype=torch.float64, requires_grad=True),
        inputs["query"].clone().requires_grad_(True),
        inputs["hard"].clone().requires_grad_(True),
    ]

    def loss(logits, q, t):
        extended, targets = extend_moco_logits(logits, labels, q, t, valid, temperature=0.2)
        return F.cross_entropy(extended, targets)

    assert torch.autograd.gradcheck(loss, tensors)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_ntxent(symmetric):
    inputs = random_inputs(3, 4, 1, 2, seed=16)
    valid = torch.tensor([[True, False], [True, True], [False, False]])
    criterion = NTXentLoss(temperature=0.3, hard_negative_weight=1.5, symmetric_hard_negatives=symmetric)
    tensors = [inputs[name].clone().requires_grad_(True) for name in ("query", "key", "hard")]
    assert torch.autograd.gradcheck(lambda a, b, t: criterion(a, b, t, valid), tensors)


def test_loss_does_not_detach_what_the_caller_passes():
    inputs = random_inputs(3, 4, 5, 1, seed=17)
    tensors = {name: inputs[name].clone().requires_grad_(True) for name in ("query", "key", "negatives", "hard")}
    HardNegativeInfoNCE()(tensors["query"], tensors["key"], tensors["negatives"], tensors["hard"]).backward()
    for name, tensor in tensors.items():
        assert tensor.grad is not None and torch.count_nonzero(tensor.grad) > 0, name


# ---------------------------------------------------------------------------------------------------
# Numerics, outputs, reductions


def test_stable_at_low_temperature_with_large_logits():
    inputs = random_inputs(4, 8, 16, 2, seed=18, dtype=torch.float32)
    scaled = {name: inputs[name] * 1e3 for name in ("query", "key", "negatives", "hard")}
    query = scaled["query"].clone().requires_grad_(True)
    criterion = HardNegativeInfoNCE(temperature=0.05, hard_negative_weight=2.0, normalize=False)
    loss = criterion(query, scaled["key"], scaled["negatives"], scaled["hard"], inputs["valid"])
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(query.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_and_autocast_match_float32(dtype):
    inputs = random_inputs(8, 32, 64, 2, seed=19, dtype=torch.float32)
    criterion = HardNegativeInfoNCE(temperature=0.05)
    args = (inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"], inputs["valid"])
    expected = criterion(*args)
    half_args = tuple(arg.to(dtype) if arg.is_floating_point() else arg for arg in args)
    rounded = criterion(*(arg.float() if arg.is_floating_point() else arg for arg in half_args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = criterion(*args)
        from_half = criterion(*half_args)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected)
    # Half inputs are upcast, so the only difference from float32 is the rounding of the inputs.
    torch.testing.assert_close(from_half, rounded)
    assert torch.isfinite(from_half)


def test_return_logits_gives_logits_and_zero_targets():
    inputs = random_inputs(5, 6, 11, 3, seed=20)
    out = HardNegativeInfoNCE()(inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"], return_logits=True)
    assert isinstance(out, InfoNCEOutput)
    assert out.logits.shape == (5, 1 + 11 + 3)
    assert out.targets.dtype == torch.long and torch.equal(out.targets, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, out.targets))
    accuracy = (out.logits.argmax(dim=1) == out.targets).float().mean()
    assert 0.0 <= accuracy.item() <= 1.0


def test_reductions():
    inputs = random_inputs(5, 6, 11, 1, seed=21)
    args = (inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"])
    per_query = HardNegativeInfoNCE(reduction="none")(*args)
    assert per_query.shape == (5,)
    torch.testing.assert_close(HardNegativeInfoNCE(reduction="sum")(*args), per_query.sum())
    torch.testing.assert_close(HardNegativeInfoNCE(reduction="mean")(*args), per_query.mean())


def test_inputs_are_not_modified():
    inputs = random_inputs(4, 6, 9, 2, seed=22)
    originals = {name: tensor.clone() for name, tensor in inputs.items()}
    HardNegativeInfoNCE()(inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"], inputs["valid"])
    NTXentLoss()(inputs["query"], inputs["key"], inputs["hard"], inputs["valid"])
    logits = torch.randn(4, 10, dtype=torch.float64)
    logits_before = logits.clone()
    extend_moco_logits(logits, torch.zeros(4, dtype=torch.long), inputs["query"], inputs["hard"], temperature=0.2)
    assert torch.equal(logits, logits_before)
    for name, tensor in inputs.items():
        assert torch.equal(tensor, originals[name]), name


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("temperature", [0, 0.0, -0.1, float("nan"), float("inf")])
def test_temperature_must_be_positive_and_finite(temperature):
    for build in (
        lambda: HardNegativeInfoNCE(temperature=temperature),
        lambda: NTXentLoss(temperature=temperature),
    ):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            build()
    inputs = random_inputs(2, 3, 4, 1, seed=23)
    with pytest.raises(ValueError, match="temperature"):
        extend_moco_logits(
            torch.randn(2, 5),
            torch.zeros(2, dtype=torch.long),
            inputs["query"],
            inputs["hard"],
            temperature=temperature,
        )


def test_non_numeric_parameters_are_rejected():
    with pytest.raises(TypeError, match="temperature must be a real number"):
        HardNegativeInfoNCE(temperature="0.2")
    with pytest.raises(TypeError, match="hard_negative_weight must be a real number"):
        HardNegativeInfoNCE(hard_negative_weight=True)
    with pytest.raises(ValueError, match="hard_negative_weight must be a finite number > 0"):
        NTXentLoss(hard_negative_weight=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        HardNegativeInfoNCE(reduction="avg")
    with pytest.raises(ValueError, match="negatives_layout must be one of"):
        HardNegativeInfoNCE(negatives_layout="kd")


def test_mismatched_batch_and_embedding_sizes():
    criterion = HardNegativeInfoNCE()
    query, key = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"query and key must both be \(B, D\)"):
        criterion(query, torch.randn(3, 8), torch.randn(16, 8))
    with pytest.raises(ValueError, match=r"query and key must both be \(B, D\)"):
        criterion(query, torch.randn(4, 7), torch.randn(16, 8))
    with pytest.raises(ValueError, match="negatives must be"):
        criterion(query, key, torch.randn(16, 7))
    with pytest.raises(ValueError, match="negatives in layout 'DK'"):
        HardNegativeInfoNCE(negatives_layout="DK")(query, key, torch.randn(16, 8))
    with pytest.raises(ValueError, match=r"hard_negatives must be \(B, D\) or \(B, M, D\) with B=4"):
        criterion(query, key, torch.randn(16, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"hard_negatives must be \(B, D\) or \(B, M, D\) with B=4 and D=8"):
        criterion(query, key, torch.randn(16, 8), torch.randn(4, 2, 7))
    with pytest.raises(ValueError, match=r"hard_negative_valid must be \(B,\) or \(B, M\)"):
        criterion(query, key, torch.randn(16, 8), torch.randn(4, 2, 8), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="query must have 2 dimensions"):
        criterion(torch.randn(4, 8, 1), key, torch.randn(16, 8))
    with pytest.raises(ValueError, match=r"view_a and view_b must both be \(B, D\)"):
        NTXentLoss()(query, torch.randn(5, 8))


def test_wrong_types():
    criterion = HardNegativeInfoNCE()
    query, key = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"query must be a torch\.Tensor"):
        criterion(query.tolist(), key, torch.randn(16, 8))
    with pytest.raises(TypeError, match="key must be a floating-point tensor"):
        criterion(query, key.long(), torch.randn(16, 8))
    with pytest.raises(TypeError, match=r"hard_negative_valid must be a bool torch\.Tensor"):
        criterion(query, key, torch.randn(16, 8), torch.randn(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match="hard_negative_valid was given without hard_negatives"):
        criterion(query, key, torch.randn(16, 8), None, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pass negatives, hard_negatives or both"):
        criterion(query, key)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["query", "key", "negatives", "hard"])
def test_non_finite_embeddings_are_rejected(name, bad_value):
    inputs = random_inputs(3, 4, 5, 1, seed=24)
    inputs[name][0, 0] = bad_value
    expected_name = "hard_negatives" if name == "hard" else name
    with pytest.raises(ValueError, match=f"{expected_name} contains NaN or Inf"):
        HardNegativeInfoNCE()(inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"])
    # Opting out skips the check (and its host sync); the result is then simply not finite.
    unchecked = HardNegativeInfoNCE(check_finite=False)(
        inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"]
    )
    assert not torch.isfinite(unchecked)


def test_non_finite_views_are_rejected_by_ntxent():
    view_a, view_b = torch.randn(3, 4), torch.randn(3, 4)
    view_b[1, 2] = float("nan")
    with pytest.raises(ValueError, match="view_b contains NaN or Inf"):
        NTXentLoss()(view_a, view_b)


# ---------------------------------------------------------------------------------------------------
# MoCo drop-in


def test_extend_moco_logits_with_cross_entropy_equals_the_loss_module():
    generator = torch.Generator().manual_seed(25)
    query = F.normalize(torch.randn(6, 12, generator=generator), dim=1)
    key = F.normalize(torch.randn(6, 12, generator=generator), dim=1)
    queue = F.normalize(torch.randn(12, 50, generator=generator), dim=0)
    hard = torch.randn(6, 2, 12, generator=generator)
    valid = torch.tensor([[True, True], [True, False], [False, False], [True, True], [False, True], [True, True]])
    _, logits, labels = moco_v2_loss(query, key, queue, temperature=0.2)

    extended, new_labels = extend_moco_logits(
        logits, labels, query, hard, valid, temperature=0.2, hard_negative_weight=2.0
    )
    assert new_labels is labels
    assert extended.shape == (6, 1 + 50 + 2)
    torch.testing.assert_close(extended[:, :51], logits)
    loss = torch.nn.CrossEntropyLoss()(extended, new_labels)
    expected = HardNegativeInfoNCE(temperature=0.2, hard_negative_weight=2.0)(query, key, queue, hard, valid)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(
        loss, reference_infonce(query, key, queue.t(), F.normalize(hard, dim=-1), valid, 0.2, 2.0).mean()
    )


def test_extend_moco_logits_keeps_half_precision_logits_accurate():
    query = F.normalize(torch.randn(4, 8), dim=1)
    logits = torch.randn(4, 9).half()
    extended, _ = extend_moco_logits(
        logits, torch.zeros(4, dtype=torch.long), query, torch.randn(4, 8), temperature=0.2
    )
    assert extended.dtype == torch.float32


def test_extend_moco_logits_bad_input():
    query, hard = torch.randn(4, 8), torch.randn(4, 8)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits must be \(B, C\) and labels \(B,\) with B=4"):
        extend_moco_logits(torch.randn(3, 9), labels, query, hard, temperature=0.2)
    with pytest.raises(ValueError, match=r"logits must be \(B, C\) and labels \(B,\) with B=4"):
        extend_moco_logits(torch.randn(4, 9), labels[:3], query, hard, temperature=0.2)
    with pytest.raises(ValueError, match="hard_negatives must be"):
        extend_moco_logits(torch.randn(4, 9), labels, query, torch.randn(4, 7), temperature=0.2)
    with pytest.raises(TypeError, match=r"hard_negatives must be a torch\.Tensor"):
        extend_moco_logits(torch.randn(4, 9), labels, query, None, temperature=0.2)
    with pytest.raises(TypeError, match=r"labels must be a torch\.Tensor"):
        extend_moco_logits(torch.randn(4, 9), [0, 0, 0, 0], query, hard, temperature=0.2)


def _moco_training_step(encoder_q, encoder_k, bank, criterion, images, use_copy):
    """One MoCo-style step that enqueues before backward, as facebookresearch/moco's forward does."""
    query = F.normalize(encoder_q(images[0]), dim=1)
    with torch.no_grad():
        key = F.normalize(encoder_k(images[1]), dim=1)
        hard = F.normalize(encoder_k(images[2]), dim=1)
    negatives = bank.negatives() if use_copy else bank.keys
    loss = criterion(query, key, negatives, hard)
    bank.enqueue(key)
    loss.backward()
    return loss


@pytest.mark.parametrize("use_copy", [True, False])
def test_moco_style_step_can_enqueue_before_backward(use_copy):
    torch.manual_seed(26)
    encoder_q, encoder_k = torch.nn.Linear(10, 6), torch.nn.Linear(10, 6)
    bank = MomentumQueue(dim=6, size=20)
    images = torch.randn(3, 4, 10)
    loss = _moco_training_step(encoder_q, encoder_k, bank, HardNegativeInfoNCE(), images, use_copy)
    assert torch.isfinite(loss)
    assert encoder_q.weight.grad is not None
    assert encoder_k.weight.grad is None


# ---------------------------------------------------------------------------------------------------
# NT-Xent


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(2, 6),
    dim=st.integers(2, 8),
    num_hard=st.integers(1, 3),
    temperature=st.floats(0.05, 1.0),
    weight=st.floats(0.25, 4.0),
    use_hard=st.booleans(),
    use_valid=st.booleans(),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ntxent_equals_reference(batch, dim, num_hard, temperature, weight, use_hard, use_valid, symmetric, seed):
    inputs = random_inputs(batch, dim, 1, num_hard, seed)
    hard = inputs["hard"] if use_hard else None
    valid = inputs["valid"] if use_hard and use_valid else None
    criterion = NTXentLoss(temperature, weight, reduction="none", symmetric_hard_negatives=symmetric)
    loss = criterion(inputs["query"], inputs["key"], hard, valid)
    expected = reference_ntxent(inputs["query"], inputs["key"], hard, valid, temperature, weight, symmetric)
    torch.testing.assert_close(loss, expected)


def test_ntxent_without_hard_negatives_equals_the_usual_simclr_formulation():
    generator = torch.Generator().manual_seed(27)
    view_a, view_b = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    views = F.normalize(torch.cat([view_a, view_b]), dim=1)
    similarity = views @ views.t() / 0.5
    similarity = similarity.masked_fill(torch.eye(16, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(8, 16), torch.arange(8)])
    expected = F.cross_entropy(similarity, targets)
    out = NTXentLoss(temperature=0.5)(view_a, view_b, return_logits=True)
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape == (16, 1 + 14)


def test_ntxent_gather_in_one_process_equals_no_gather():
    inputs = random_inputs(4, 6, 1, 2, seed=28)
    args = (inputs["query"], inputs["key"], inputs["hard"], inputs["valid"])
    torch.testing.assert_close(NTXentLoss(gather_distributed=True)(*args), NTXentLoss()(*args))


def test_ntxent_needs_two_images_or_hard_negatives():
    with pytest.raises(ValueError, match="at least two images"):
        NTXentLoss()(torch.randn(1, 4), torch.randn(1, 4))
    loss = NTXentLoss()(torch.randn(1, 4), torch.randn(1, 4), torch.randn(1, 4))
    assert torch.isfinite(loss)


def test_reprs_name_the_settings():
    assert "hard_negative_weight=2.0" in repr(HardNegativeInfoNCE())
    assert "gather_distributed=False" in repr(NTXentLoss())
    assert math.isclose(HardNegativeInfoNCE(temperature=1).temperature, 1.0)


# ---------------------------------------------------------------------------------------------------
# Rules that hold for all inputs

SMALLEST_TEMPERATURE = 1 / torch.finfo(torch.float32).max


def test_a_temperature_float32_cannot_hold_is_refused_not_a_nan_loss():
    # 1e-300 is 0 in float32, the precision of the loss: every logit would be infinite and the loss NaN.
    for build in (lambda: HardNegativeInfoNCE(temperature=1e-300), lambda: NTXentLoss(temperature=1e-300)):
        with pytest.raises(ValueError, match=r"temperature must be at least 2\.94e-39"):
            build()
    with pytest.raises(ValueError, match="hard_negative_weight / temperature"):
        HardNegativeInfoNCE(temperature=1e-30, hard_negative_weight=1e10)
    inputs = random_inputs(2, 3, 4, 1, seed=3)
    with pytest.raises(ValueError, match="temperature must be at least"):
        extend_moco_logits(
            torch.randn(2, 5), torch.zeros(2, dtype=torch.long), inputs["query"], inputs["hard"], temperature=1e-300
        )


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 5),
    dim=st.integers(2, 8),
    num_hard=st.integers(1, 3),
    log_temperature=st.floats(math.log10(SMALLEST_TEMPERATURE) + 1e-6, 3.0),
    log_weight=st.floats(-3.0, 3.0),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_every_accepted_setting_gives_a_finite_non_negative_loss(
    batch, dim, num_hard, log_temperature, log_weight, scale, seed
):
    temperature, weight = 10.0**log_temperature, 10.0**log_weight
    if weight / temperature >= torch.finfo(torch.float32).max:
        weight = temperature  # outside the accepted settings, refused at construction
    inputs = random_inputs(batch, dim, 6, num_hard, seed)
    query, key, hard = (scale * inputs[name] for name in ("query", "key", "hard"))
    infonce = HardNegativeInfoNCE(temperature, weight, reduction="none", negatives_layout="KD")
    ntxent = NTXentLoss(temperature, weight, reduction="none", symmetric_hard_negatives=True)
    for loss in (infonce(query, key, inputs["negatives"], hard, inputs["valid"]), ntxent(query, key, hard)):
        assert torch.isfinite(loss).all() and (loss >= -1e-5 * loss.abs().max().clamp(min=1)).all(), loss
    # Normalised embeddings: the loss depends on their directions only.
    torch.testing.assert_close(
        infonce(query / scale, key / scale, inputs["negatives"], hard / scale, inputs["valid"]),
        infonce(query, key, inputs["negatives"], hard, inputs["valid"]),
        rtol=1e-4,
        atol=1e-4 * max(1.0, 1.0 / temperature),
    )


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(2, 5), dim=st.integers(2, 8), seed=st.integers(0, 2**16), temperature=st.floats(0.01, 2.0))
def test_nt_xent_without_hard_negatives_is_symmetric_in_its_two_views(batch, dim, seed, temperature):
    inputs = random_inputs(batch, dim, 1, 1, seed)
    criterion = NTXentLoss(temperature)
    torch.testing.assert_close(criterion(inputs["query"], inputs["key"]), criterion(inputs["key"], inputs["query"]))


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 5), dim=st.integers(2, 8), num_hard=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_hard_negatives_that_are_all_invalid_change_nothing(batch, dim, num_hard, seed):
    inputs = random_inputs(batch, dim, 6, num_hard, seed)
    criterion = HardNegativeInfoNCE(negatives_layout="KD")
    invalid = torch.zeros(batch, num_hard, dtype=torch.bool)
    torch.testing.assert_close(
        criterion(inputs["query"], inputs["key"], inputs["negatives"], inputs["hard"], invalid),
        criterion(inputs["query"], inputs["key"], inputs["negatives"]),
    )


# ---------------------------------------------------------------------------------------------------
# Memory bank inside the loss (MoCo's queue, lightly's memory_bank_size)


@pytest.mark.parametrize("form", ["infonce", "ntxent"])
def test_a_memory_bank_gives_the_loss_against_the_bank_then_enqueues_the_normalised_keys(form):
    inputs = random_inputs(4, 6, 1, 2, seed=29, dtype=torch.float32)
    query = inputs["query"].requires_grad_(True)
    key, hard, valid = inputs["key"], inputs["hard"], inputs["valid"]
    loss_class = HardNegativeInfoNCE if form == "infonce" else NTXentLoss
    criterion = loss_class(0.3, 1.5, reduction="none", memory_bank_size=(10, 6))
    bank_before = criterion.memory_bank.keys.clone()
    loss = criterion(query, key, hard_negatives=hard, hard_negative_valid=valid)
    expected = reference_infonce(query, key, bank_before.t(), hard, valid, 0.3, 1.5)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(criterion.memory_bank.keys[:, :4], F.normalize(key, dim=1).t())
    torch.testing.assert_close(criterion.memory_bank.keys[:, 4:], bank_before[:, 4:], rtol=0, atol=0)
    assert int(criterion.memory_bank.pointer) == 4
    loss.sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()


def test_the_memory_bank_stays_as_it_is_without_gradient_or_in_eval_mode():
    inputs = random_inputs(4, 6, 1, 1, seed=30, dtype=torch.float32)
    criterion = HardNegativeInfoNCE(memory_bank_size=(8, 6))
    bank = criterion.memory_bank.keys.clone()
    criterion(inputs["query"], inputs["key"])  # the query carries no gradient: a validation pass
    query = inputs["query"].clone().requires_grad_(True)
    with torch.no_grad():
        criterion(query, inputs["key"])
    criterion.eval()
    criterion(query, inputs["key"])
    assert torch.equal(criterion.memory_bank.keys, bank) and int(criterion.memory_bank.pointer) == 0


def test_the_memory_bank_is_saved_with_the_loss_and_never_holds_hard_negatives():
    inputs = random_inputs(2, 4, 1, 3, seed=31, dtype=torch.float32)
    criterion = NTXentLoss(memory_bank_size=(6, 4))
    criterion(inputs["query"].requires_grad_(True), inputs["key"], inputs["hard"])
    assert int(criterion.memory_bank.pointer) == 2, "two keys in, not the six hard negatives"
    restored = NTXentLoss(memory_bank_size=(6, 4))
    restored.load_state_dict(criterion.state_dict())
    assert torch.equal(restored.memory_bank.keys, criterion.memory_bank.keys)
    assert "memory_bank_size=(6, 4)" in repr(criterion)


def test_memory_bank_settings_are_checked():
    with pytest.raises(ValueError, match=r"memory_bank_size must be \(K, D\).*\(4096, 128\)"):
        NTXentLoss(memory_bank_size=4096)
    with pytest.raises(TypeError, match="memory_bank_size"):
        HardNegativeInfoNCE(memory_bank_size="4096")
    with pytest.raises(ValueError, match=r"memory_bank_size\[1\]"):
        HardNegativeInfoNCE(memory_bank_size=(16, 0))
    with pytest.raises(ValueError, match="symmetric_hard_negatives"):
        NTXentLoss(memory_bank_size=(16, 8), symmetric_hard_negatives=True)
    assert NTXentLoss(memory_bank_size=0).memory_bank is None
    criterion = HardNegativeInfoNCE(memory_bank_size=(16, 8))
    with pytest.raises(ValueError, match="do not pass negatives"):
        criterion(torch.randn(2, 8), torch.randn(2, 8), torch.randn(16, 8))
    with pytest.raises(ValueError, match=r"D=8.*size 5"):
        criterion(torch.randn(2, 5), torch.randn(2, 5))


def test_a_batch_of_one_has_the_bank_to_contrast_with():
    loss = NTXentLoss(memory_bank_size=(4, 3))(torch.randn(1, 3), torch.randn(1, 3))
    assert torch.isfinite(loss)


@pytest.mark.cuda
def test_the_memory_bank_follows_the_embeddings_to_the_gpu():
    criterion = NTXentLoss(memory_bank_size=(8, 4))  # built without .to(device), as lightly's loops build it
    query = torch.randn(2, 4, device="cuda", requires_grad=True)
    loss = criterion(query, torch.randn(2, 4, device="cuda"))
    assert loss.device.type == "cuda" and criterion.memory_bank.keys.device.type == "cuda"
    assert int(criterion.memory_bank.pointer) == 2
