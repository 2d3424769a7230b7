"""examples/lightning_moco.py: MaskedViews in a LightningModule's on_after_batch_transfer (needs lightning)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning", reason="lightning is not installed (pip install 'salmask[lightning]')")

from example_scripts import load_example  # noqa: E402

from salmask.ssl import MaskedViewsOutput  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_moco.py"
# Lightning's own use of a torch pytree API that newer torch deprecates; nothing the example can change.
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*")
BATCH, QUEUE = 8, 32


def example():
    return load_example("lightning_moco")


class Seen(L.Callback):
    """Keeps the batch each training step receives, after Lightning's transfer hooks."""

    def __init__(self) -> None:
        self.batches: list[object] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)


def test_training_steps_receive_views_masked_after_the_transfer():
    script = example()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset = script.SyntheticShapes(
            "train", num_images=2 * BATCH, image_size=32, transform=script.two_views(32), return_saliency=True
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, drop_last=True)
        module = script.MaskedMoCo("blur", queue_size=QUEUE, max_steps=2)
        before = module.model.encoder.conv1.weight.detach().clone()
        seen = Seen()
        trainer = L.Trainer(
            max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[seen],
        )  # fmt: skip
        trainer.fit(module, loader)
    finally:
        torch.set_num_threads(threads)
    assert len(seen.batches) == 2
    for views in seen.batches:
        assert isinstance(views, MaskedViewsOutput)
        assert views.query.shape == views.key.shape == views.hard_negatives.shape == (BATCH, 3, 32, 32)
        assert views.hard_negative_valid.shape == (BATCH,) and not torch.equal(views.query, views.key)
    assert int(module.model.queue.pointer) == 2 * BATCH
    assert torch.isfinite(trainer.callback_metrics["loss"])
    assert not torch.equal(module.model.encoder.conv1.weight, before), "the optimizer stepped"


def test_the_example_runs_from_its_command_line(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--max-steps", "2", "--synthetic-size", "16", "--batch-size", "8", "--queue-size", "16"]
        assert example().main([*argv, "--no-progress", "--accelerator", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "step 2: loss" in capsys.readouterr().out
