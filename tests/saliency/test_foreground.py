from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from salmask.saliency import activation_from_features, largest_connected_component, scda_foreground

finite_floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)
activation_maps = arrays(
    np.float32, st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 8)), elements=finite_floats
)


@settings(max_examples=60, deadline=None)
@given(activation=activation_maps, threshold_std=st.floats(0.0, 2.0))
def test_rule_is_mean_minus_k_std_per_map(activation: np.ndarray, threshold_std: float) -> None:
    foreground = scda_foreground(torch.from_numpy(activation), threshold_std).numpy()
    for values, result in zip(activation, foreground, strict=True):
        values64 = values.astype(np.float64)
        spread = values64.max() - values64.min()
        if spread <= 1e-6 * np.abs(values64).max():
            assert result.all(), "a constant map is all foreground"
            continue
        threshold = values64.mean() - threshold_std * values64.std()
        # Cells within float32 rounding of the threshold may go either way.
        decided = np.abs(values64 - threshold) > 1e-4 * (np.abs(values64).max() + 1)
        np.testing.assert_array_equal(result[decided], (values64 >= threshold)[decided])


@settings(max_examples=60, deadline=None)
@given(activation=activation_maps, seed=st.integers(0, 2**31 - 1), largest=st.booleans())
def test_permuting_cells_permutes_foreground(activation: np.ndarray, seed: int, largest: bool) -> None:
    # Release defect 1 placed the foreground by sorted rank instead of by cell; here the foreground
    # must follow the activation cells wherever they are moved (largest component aside: it is spatial).
    activation = torch.from_numpy(activation)
    batch, height, width = activation.shape
    permutation = torch.randperm(height * width, generator=torch.Generator().manual_seed(seed))
    shuffled = activation.flatten(1)[:, permutation].view(batch, height, width)
    expected = scda_foreground(activation, 0.6).flatten(1)[:, permutation].view(batch, height, width)
    assert torch.equal(scda_foreground(shuffled, 0.6), expected)
    if largest:
        transposed = scda_foreground(activation.transpose(1, 2).contiguous(), 0.6, largest_component=True)
        assert transposed.sum() == scda_foreground(activation, 0.6, largest_component=True).sum()


@settings(max_examples=40, deadline=None)
@given(activation=activation_maps, scale=st.floats(0.01, 100.0), shift=st.floats(-100.0, 100.0))
def test_rule_is_invariant_to_positive_affine_maps(activation: np.ndarray, scale: float, shift: float) -> None:
    activation = torch.from_numpy(activation).double()
    base = scda_foreground(activation, 0.6)
    moved = scda_foreground(activation * scale + shift, 0.6)
    values = activation.flatten(1)
    threshold = values.mean(1, keepdim=True) - 0.6 * values.std(1, keepdim=True, correction=0)
    decided = ((values - threshold).abs() > 1e-3 * (values.abs().amax(1, keepdim=True) + 1)).view_as(base)
    assert torch.equal(base[decided], moved[decided])


def test_batched_equals_one_map_at_a_time() -> None:
    activation = torch.randn(5, 7, 7, generator=torch.Generator().manual_seed(0))
    batched = scda_foreground(activation, 0.6, largest_component=True)
    singles = torch.stack([scda_foreground(a, 0.6, largest_component=True) for a in activation])
    assert torch.equal(batched, singles)
    assert scda_foreground(activation[0]).shape == (7, 7)


def test_threshold_std_zero_is_the_mean_rule_and_larger_k_grows_the_foreground() -> None:
    activation = torch.randn(8, 7, 7, generator=torch.Generator().manual_seed(1))
    mean_rule = scda_foreground(activation, 0.0)
    assert torch.equal(mean_rule, activation >= activation.mean(dim=(1, 2), keepdim=True))
    sizes = [int(scda_foreground(activation, k).sum()) for k in (-0.5, 0.0, 0.6, 1.5)]
    assert sizes == sorted(sizes)


def test_constant_blank_and_nan_maps() -> None:
    constant = torch.full((2, 7, 7), 3.25)
    assert scda_foreground(constant).all()
    assert scda_foreground(torch.zeros(7, 7)).all()
    nan = torch.full((7, 7), float("nan"))
    assert not scda_foreground(nan).any()
    assert not scda_foreground(nan, largest_component=True).any()
    strict = scda_foreground(torch.randn(7, 7), threshold_std=-100.0)
    assert not strict.any(), "a very strict rule gives an all-background map, not an error"


def test_largest_component_matches_scipy_label() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    generator = torch.Generator().manual_seed(2)
    maps = torch.rand(64, 9, 11, generator=generator) < 0.45
    for connectivity, structure in ((4, ndimage.generate_binary_structure(2, 1)), (8, np.ones((3, 3)))):
        result = largest_connected_component(maps, connectivity=connectivity)
        for single, kept in zip(maps.numpy(), result.numpy(), strict=True):
            labels, count = ndimage.label(single, structure=structure)
            if count == 0:
                assert not kept.any()
                continue
            sizes = np.bincount(labels.ravel())[1:]
            assert kept.sum() == sizes.max()
            kept_labels = np.unique(labels[kept])
            assert len(kept_labels) == 1 and sizes[kept_labels[0] - 1] == sizes.max()


def test_largest_component_examples() -> None:
    diagonal = torch.eye(4, dtype=torch.bool)
    assert largest_connected_component(diagonal, connectivity=8).sum() == 4
    assert largest_connected_component(diagonal, connectivity=4).sum() == 1
    snake = torch.tensor(
        [[1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(largest_connected_component(snake, connectivity=4), snake)
    assert not largest_connected_component(torch.zeros(2, 3, 3, dtype=torch.bool)).any()
    original = torch.tensor([[1, 0, 1]], dtype=torch.bool).repeat(3, 1)
    copy = original.clone()
    largest_connected_component(original)
    assert torch.equal(original, copy)


def test_activation_sums_channels_in_float32() -> None:
    features = torch.full((1, 4096, 2, 2), 30.0, dtype=torch.float16)
    activation = activation_from_features(features)
    assert activation.dtype == torch.float32
    assert torch.isfinite(activation).all() and activation[0, 0, 0] == 4096 * 30


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: scda_foreground(torch.zeros(7)), ValueError),
        (lambda: scda_foreground(torch.zeros(7, 7, dtype=torch.long)), TypeError),
        (lambda: scda_foreground(torch.zeros(7, 7), threshold_std=float("inf")), ValueError),
        (lambda: scda_foreground(torch.zeros(7, 7), threshold_std="0.6"), TypeError),
        (lambda: scda_foreground(torch.zeros(7, 7), connectivity=6), ValueError),
        (lambda: largest_connected_component(torch.zeros(3, 3)), TypeError),
        (lambda: activation_from_features(torch.zeros(2, 3, 4)), ValueError),
    ],
)
def test_invalid_arguments(call, error) -> None:
    with pytest.raises(error):
        call()
