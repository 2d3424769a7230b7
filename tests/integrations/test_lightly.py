"""salmask in lightly loops (needs lightly): the loss swapped in by its import, with equal values, and
examples/lightly_moco.py, salmask's masking and hard negatives inside a lightly MoCo training loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightly", reason="lightly is not installed (pip install 'salmask[lightly]')")

import lightly.loss
from example_scripts import load_example

from salmask.functional import high_pass
from salmask.losses import HardNegativeInfoNCE, NTXentLoss
from salmask.ssl import MaskedViews, build_encoder

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightly_moco.py"
BATCH, BANK = 8, 32


def example():
    return load_example("lightly_moco")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_with_a_memory_bank_the_loss_and_the_bank_equal_lightlys_step_after_step():
    generator = torch.Generator().manual_seed(0)
    theirs = lightly.loss.NTXentLoss(temperature=0.5, memory_bank_size=(BANK, 16))
    ours = NTXentLoss(temperature=0.5, memory_bank_size=(BANK, 16))
    ours.memory_bank.keys.copy_(theirs.memory_bank.bank.t())  # both banks start as random unit keys
    for step in range(6):  # six batches of 8 wrap the bank of 32 around once
        query = torch.randn(BATCH, 16, generator=generator, requires_grad=True)
        key = torch.randn(BATCH, 16, generator=generator)
        expected, loss = theirs(query, key), ours(query, key)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6, msg=f"step {step}")
        with torch.no_grad():  # a validation pass changes neither bank
            torch.testing.assert_close(ours(query.detach(), key), theirs(query.detach(), key), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.memory_bank.keys, theirs.memory_bank.bank.t(), rtol=0, atol=0)
    assert int(ours.memory_bank.pointer) == int(theirs.memory_bank.bank_ptr)


def test_without_a_memory_bank_the_loss_equals_lightlys_simclr_loss():
    generator = torch.Generator().manual_seed(1)
    view_a, view_b = torch.randn(2, BATCH, 16, generator=generator).unbind(0)
    expected = lightly.loss.NTXentLoss(temperature=0.5)(view_a, view_b)
    torch.testing.assert_close(NTXentLoss(temperature=0.5)(view_a, view_b), expected, rtol=0, atol=1e-6)


def test_the_temperature_defaults_differ_and_hard_negatives_add_to_lightlys_loss():
    assert NTXentLoss().temperature == 0.2 and lightly.loss.NTXentLoss().temperature == 0.5
    generator = torch.Generator().manual_seed(2)
    query, key, hard = torch.randn(3, BATCH, 16, generator=generator).unbind(0)
    theirs = lightly.loss.NTXentLoss(temperature=0.2, memory_bank_size=(BANK, 16))
    ours = HardNegativeInfoNCE(memory_bank_size=(BANK, 16))
    ours.memory_bank.keys.copy_(theirs.memory_bank.bank.t())
    expected = theirs(query, key)
    # Hard negatives that are all invalid leave lightly's loss; valid ones raise it (they only add terms).
    none_valid = torch.zeros(BATCH, dtype=torch.bool)
    torch.testing.assert_close(ours(query, key, hard_negatives=hard, hard_negative_valid=none_valid), expected)
    assert ours(query, key, hard_negatives=hard) > expected


def test_the_loop_masks_the_query_and_fills_the_memory_bank_with_keys_only(one_thread):
    script = example()
    torch.manual_seed(0)
    dataset = script.SyntheticShapes(
        "train", num_images=2 * BATCH, image_size=32, transform=script.two_views(32), return_saliency=True
    )
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=BATCH))
    backbone = build_encoder("resnet18", small_images=True)
    model = script.MoCoModel(backbone, backbone.num_features)
    masker = MaskedViews("high_pass", patch_size=4)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(BANK, 128))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9)
    before = model.backbone.conv1.weight.detach().clone()
    for batch in batches:
        loss, views = script.training_step(model, masker, criterion, batch, 0.99, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        (_, _, key, _), _ = batch
        # The key is the filtered, unmasked view; the query differs from its own filtered view where masked.
        torch.testing.assert_close(views.key, high_pass(key), rtol=0, atol=0)
        assert views.hard_negatives.shape == key.shape and views.query_params["patch_mask"].any()
        assert torch.isfinite(loss)
    assert int(criterion.memory_bank.pointer) == 2 * BATCH, "one batch of keys enqueued per step, no hard negative"
    assert not torch.equal(model.backbone.conv1.weight, before)
    assert all(not p.requires_grad for p in model.backbone_momentum.parameters())


def test_the_example_runs_from_its_command_line(one_thread, capsys):
    argv = ["--epochs", "1", "--synthetic-size", "16", "--batch-size", "8", "--queue-size", "16", "--device", "cpu"]
    assert example().main([*argv, "--strategy", "blur"]) == 0
    assert "epoch 0: loss" in capsys.readouterr().out
