"""Weighted kNN: the exact rule's prediction at every temperature, never an overflow."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from salmask.ssl import knn_predict


def unit_rows(generator: torch.Generator, rows: int, dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1).float()


def exact_scores(queries: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, t: float):
    """exp(similarity / T) summed per class over the k nearest, in float64 (inf where it overflows)."""
    similarity = queries.double() @ bank.double().t()
    top, index = similarity.topk(min(k, bank.shape[0]), dim=1)
    scores = torch.zeros(queries.shape[0], num_classes, dtype=torch.float64)
    return scores.scatter_add_(1, labels[index], (top / t).exp())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 12),
    bank_size=st.integers(1, 40),
    num_classes=st.integers(1, 6),
    k=st.integers(1, 50),
    temperature=st.floats(1e-300, 1e300),
)
def test_the_prediction_is_the_exact_rules_wherever_it_is_finite(seed, rows, bank_size, num_classes, k, temperature):
    generator = torch.Generator().manual_seed(seed)
    queries, bank = unit_rows(generator, rows, 8), unit_rows(generator, bank_size, 8)
    labels = torch.randint(0, num_classes, (bank_size,), generator=generator)
    scores = knn_predict(queries, bank, labels, num_classes, k=k, temperature=temperature, chunk_size=5)
    assert scores.shape == (rows, num_classes) and torch.isfinite(scores).all()
    predicted = scores.argmax(1)
    exact = exact_scores(queries, bank, labels, num_classes, k, temperature)
    for row in range(rows):
        if torch.isfinite(exact[row]).all():
            # The predicted class scores the exact maximum, up to float32 rounding of near-ties.
            best = exact[row].max()
            assert exact[row, predicted[row]] >= best * (1 - 1e-4), (exact[row], scores[row])
        else:
            # Where the exact weights overflow, the nearest neighbours decide: the prediction is a class
            # among those of the most similar bank entries.
            similarity = queries[row] @ bank.t()
            nearest = similarity >= similarity.max() - 1e-6
            assert predicted[row] in labels[nearest].tolist()


def test_a_tiny_temperature_predicts_the_nearest_neighbours_class_not_class_zero():
    bank = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 3])
    queries = F.normalize(torch.tensor([[0.1, 0.2, 0.9, 0.1], [0.1, 0.1, 0.2, 0.95]]), dim=1)
    for temperature in (0.1, 0.01, 0.005, 1e-5, 1e-300, math.ulp(0.0)):
        scores = knn_predict(queries, bank, labels, 4, k=4, temperature=temperature)
        assert scores.argmax(1).tolist() == [2, 3], temperature
        assert torch.isfinite(scores).all()


def test_labels_outside_the_classes_are_refused():
    bank = torch.eye(3)
    with pytest.raises(ValueError, match=r"bank_labels must lie in \[0, 2\), got values from 0 to 2"):
        knn_predict(torch.eye(3), bank, torch.tensor([0, 1, 2]), 2, k=1)
    with pytest.raises(ValueError, match=r"bank_labels must lie in \[0, 3\), got values from -1"):
        knn_predict(torch.eye(3), bank, torch.tensor([0, -1, 2]), 3, k=1)
    with pytest.raises(TypeError, match="bank_labels must be an integer tensor"):
        knn_predict(torch.eye(3), bank, torch.tensor([0.0, 1.0, 2.0]), 3, k=1)


def test_a_k_larger_than_the_classes_of_the_bank_is_named_by_a_warning():
    bank = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    labels = torch.arange(40) % 4  # ten images per class
    with pytest.warns(UserWarning, match=r"k=20 neighbours, but the bank holds 10 images per class"):
        knn_predict(bank[:5], bank, labels, 4, k=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        knn_predict(bank[:5], bank, labels, 4, k=10)
