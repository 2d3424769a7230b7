"""examples/lightly_moco.py: salmask's masking inside a lightly MoCo training loop (needs lightly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightly", reason="lightly is not installed (pip install 'salmask[lightly]')")

from example_scripts import load_example
from lightly.loss import NTXentLoss

from salmask.functional import high_pass
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


def test_the_loop_masks_the_query_and_fills_lightlys_memory_bank_with_keys(one_thread):
    script = example()
    torch.manual_seed(0)
    dataset = script.SyntheticShapes(
        "train", num_images=2 * BATCH, image_size=32, transform=script.two_views(32), return_saliency=True
    )
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=BATCH))
    backbone = build_encoder("resnet18", small_images=True)
    model = script.MoCoModel(backbone, backbone.num_features)
    masker = MaskedViews("high_pass", patch_size=4, hard_negatives=False)
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
        assert views.hard_negatives is None and views.query_params["patch_mask"].any()
        assert torch.isfinite(loss)
    assert int(criterion.memory_bank.bank_ptr) == 2 * BATCH, "one batch of keys enqueued per step"
    assert not torch.equal(model.backbone.conv1.weight, before)
    assert all(not p.requires_grad for p in model.backbone_momentum.parameters())


def test_the_example_runs_from_its_command_line(one_thread, capsys):
    argv = ["--epochs", "1", "--synthetic-size", "16", "--batch-size", "8", "--queue-size", "16", "--device", "cpu"]
    assert example().main([*argv, "--strategy", "blur"]) == 0
    assert "epoch 0: loss" in capsys.readouterr().out
