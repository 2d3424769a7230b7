"""MomentumQueue: MoCo's FIFO of keys, its wrap-around, and its state across save and resume."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from salmask.ssl import MomentumQueue


def keys_with_codes(codes, dim=3):
    return torch.tensor(codes, dtype=torch.float32).unsqueeze(1).expand(len(codes), dim).clone()


def test_queue_starts_as_unit_columns_in_moco_layout():
    bank = MomentumQueue(dim=8, size=32)
    assert bank.keys.shape == (8, 32)
    torch.testing.assert_close(bank.keys.norm(dim=0), torch.ones(32))
    assert bank.pointer.dtype == torch.long and bank.pointer.shape == (1,)
    assert int(bank.pointer) == 0


def test_queue_is_fifo_and_wraps_around():
    bank = MomentumQueue(dim=3, size=7)
    bank.enqueue(keys_with_codes([1, 2, 3]))
    bank.enqueue(keys_with_codes([4, 5, 6]))
    assert bank.keys[0, :6].tolist() == [1, 2, 3, 4, 5, 6]
    assert int(bank.pointer) == 6
    bank.enqueue(keys_with_codes([7, 8, 9]))  # 3 does not divide 7: one column at the end, two at the start
    assert bank.keys[0].tolist() == [8, 9, 3, 4, 5, 6, 7]
    assert int(bank.pointer) == 2
    assert torch.equal(bank.keys[0], bank.keys[2])


def test_queue_keeps_only_the_newest_keys_of_an_oversized_batch():
    bank = MomentumQueue(dim=3, size=4)
    bank.enqueue(keys_with_codes([1]))
    bank.enqueue(keys_with_codes([2, 3, 4, 5, 6, 7]))
    # Six keys from column 1 of a four-slot ring: only the newest four (4..7) survive, in FIFO positions.
    assert sorted(bank.keys[0].tolist()) == [4, 5, 6, 7]
    assert bank.keys[0].tolist() == [5, 6, 7, 4]
    assert int(bank.pointer) == (1 + 6) % 4


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 12),
    batches=st.lists(st.integers(0, 15), min_size=1, max_size=6),
)
def test_queue_holds_the_newest_keys_in_order(size, batches):
    bank = MomentumQueue(dim=2, size=size)
    stream = []
    for batch in batches:
        codes = list(range(len(stream) + 1, len(stream) + 1 + batch))
        stream.extend(codes)
        bank.enqueue(keys_with_codes(codes, dim=2))
    newest = stream[-size:]
    pointer = int(bank.pointer)
    assert pointer == len(stream) % size
    # Reading from the pointer (the oldest slot) around the ring gives the keys oldest first.
    ring = torch.roll(bank.keys[0], -pointer).tolist()
    assert ring[size - len(newest) :] == newest


def test_queue_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    bank = MomentumQueue(dim=4, size=10)
    bank.enqueue(torch.randn(3, 4))
    bank.enqueue(torch.randn(3, 4))
    assert set(bank.state_dict()) == {"keys", "pointer"}

    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)  # a different random initial queue
    resumed = MomentumQueue(dim=4, size=10)
    assert not torch.equal(resumed.keys, bank.keys)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(resumed.keys, bank.keys)
    assert torch.equal(resumed.pointer, bank.pointer)

    more = torch.randn(5, 4)
    bank.enqueue(more)
    resumed.enqueue(more)
    assert torch.equal(resumed.keys, bank.keys)
    assert torch.equal(resumed.pointer, bank.pointer)


def test_queue_inside_a_model_is_saved_with_it():
    model = torch.nn.Module()
    model.encoder = torch.nn.Linear(3, 4)
    model.bank = MomentumQueue(dim=4, size=6)
    assert {"bank.keys", "bank.pointer"} <= set(model.state_dict())


def test_queue_moves_with_to_and_casts_incoming_keys():
    bank = MomentumQueue(dim=3, size=5).to(torch.float64)
    assert bank.keys.dtype == torch.float64 and bank.pointer.dtype == torch.long
    keys = torch.randn(2, 3, requires_grad=True)
    bank.enqueue(keys)
    assert bank.keys.dtype == torch.float64
    assert not bank.keys.requires_grad
    torch.testing.assert_close(bank.keys[:, :2], keys.detach().double().t())


def test_queue_negatives_is_a_detached_copy():
    bank = MomentumQueue(dim=3, size=5)
    negatives = bank.negatives()
    before = negatives.clone()
    bank.enqueue(torch.ones(2, 3))
    assert torch.equal(negatives, before)
    assert negatives.data_ptr() != bank.keys.data_ptr()


def test_queue_bad_input():
    with pytest.raises(ValueError, match="size must be a positive int"):
        MomentumQueue(dim=4, size=0)
    with pytest.raises(TypeError, match="dim must be an int"):
        MomentumQueue(dim=4.0, size=8)
    bank = MomentumQueue(dim=4, size=8)
    with pytest.raises(ValueError, match=r"keys must be \(B, D\) with D=4"):
        bank.enqueue(torch.randn(2, 5))
    with pytest.raises(ValueError, match="keys must have 2 dimensions"):
        bank.enqueue(torch.randn(4))
    with pytest.raises(TypeError, match="keys must be a floating-point tensor"):
        bank.enqueue(torch.ones(2, 4, dtype=torch.long))


def test_queue_ignores_an_empty_batch():
    bank = MomentumQueue(dim=2, size=4)
    before = bank.keys.clone()
    bank.enqueue(torch.empty(0, 2))
    assert torch.equal(bank.keys, before)
    assert int(bank.pointer) == 0


def test_repr_names_the_settings():
    assert "size=8" in repr(MomentumQueue(dim=4, size=8))
