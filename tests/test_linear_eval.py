"""examples/linear_eval.py: a probe that converges whatever the scale of the features, a guard that stops a
diverging one, the classifier it exports, and fine-tuning, on tiny synthetic data."""

from __future__ import annotations

import contextlib
import io
import logging
import math

import pytest
import torch
from example_scripts import load_example
from torch import nn

from salmask.ssl import build_encoder, input_filter_of, load_checkpoint, pretrained_encoder

TINY = ["--train-images", "16", "--val-images", "8", "--batch-size", "8", "--epochs", "1"]
EVAL = ["--batch-size", "8", "--epochs", "1", "--workers", "0"]


def linear_eval():
    return load_example("linear_eval")


@contextlib.contextmanager
def one_thread_and_quiet():
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
            yield out, err
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    """A one-epoch MoCo run (high-pass recipe, 32 px shapes, the small-image ResNet-18)."""
    output = tmp_path_factory.mktemp("pretrain")
    with one_thread_and_quiet():
        moco = ["--method", "moco", "--strategy", "high_pass", "--train-images", "32", "--queue-size", "16"]
        code = load_example("pretrain").main([*TINY, "--warmup-epochs", "0", *moco, "--output-dir", str(output)])
    assert code == 0
    return output / "checkpoint.pt"


def run(argv: list[str]) -> tuple[int, str]:
    with one_thread_and_quiet() as (out, _):
        code = linear_eval().main(argv)
    return code, out.getvalue()


class LargeFeatures(nn.Module):
    """A frozen encoder whose features are of the order of 1e4 (a scale no probe learning rate was set for)."""

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(16, self.num_features)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return 1e4 * torch.relu(self.project(inputs))


def clusters(generator: torch.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes of 16-dimensional points around their own centres."""
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 2
    labels = torch.randint(0, 4, (count,), generator=generator)
    return centres[labels] + 0.5 * torch.randn(count, 16, generator=generator), labels


@pytest.mark.parametrize("recipe", ["moco", "simclr"])
def test_a_probe_on_features_of_very_large_scale_converges_at_the_recipes_learning_rate(recipe):
    torch.manual_seed(0)
    script = linear_eval()
    model = script.LinearClassifier(LargeFeatures(), 4, None)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    # The rate the script sets for a batch of 64 (the recipe's is per 256 images).
    optimizer = torch.optim.SGD(trainable, lr=script.RECIPES[recipe]["lr"] * 64 / 256, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    model.train()
    losses = []
    for _ in range(150):
        inputs, labels = clusters(generator, 64)
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses), "the loss must stay finite"
    assert max(losses) < 2 * math.log(4), f"the loss must not run away: {max(losses):.4g}"
    assert sum(losses[-10:]) / 10 < 0.2
    model.eval()
    inputs, labels = clusters(torch.Generator().manual_seed(2), 256)
    with torch.no_grad():
        assert (model(inputs).argmax(1) == labels).float().mean() > 0.95


def test_a_diverging_loss_stops_the_run_naming_the_learning_rate():
    script = linear_eval()
    assert script.checked_loss(2.0, 10, 0.1, "epoch 1, step 1") == 2.0
    for loss in (float("nan"), float("inf"), 5207.0):
        with pytest.raises(SystemExit, match=r"--lr: the classifier diverged at epoch 2, step 5.*now --lr 30"):
            script.checked_loss(loss, 10, 30.0, "epoch 2, step 5")


def test_a_learning_rate_that_sends_the_probe_off_stops_the_script(pretraining, tmp_path):
    with pytest.raises(
        SystemExit, match=r"--lr: the classifier diverged .* lower the learning rate \(now --lr 1e\+06\)"
    ):
        run([str(pretraining), *EVAL, "--lr", "1e6", "--output-dir", str(tmp_path)])


def test_the_checkpoint_holds_the_probe_as_one_linear_layer_on_the_encoders_features(pretraining, tmp_path):
    code, out = run([str(pretraining), *EVAL, "--epochs", "2", "--output-dir", str(tmp_path)])
    assert code == 0 and "linear top-1:" in out
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["config"]["lr"] == 0.1 * 8 / 256 and not checkpoint["config"]["finetune"]
    assert "encoder" not in checkpoint, "a linear probe leaves the encoder as pretrained"
    pretrained = load_checkpoint(pretraining)
    encoder, input_filter = pretrained_encoder(pretrained).eval(), input_filter_of(pretrained["config"])
    classifier = nn.Linear(encoder.num_features, 10)
    classifier.load_state_dict(checkpoint["model"])  # as a probe's checkpoint always loaded
    probe = linear_eval().LinearClassifier(encoder, 10, input_filter)
    probe.head.load_state_dict(checkpoint["head"])
    probe.eval()
    assert probe.head.norm.running_var.mean() != 1.0, "the norm's statistics were learnt"
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(classifier(encoder(input_filter(images))), probe(images), rtol=1e-4, atol=1e-4)


def test_fine_tuning_trains_the_encoder_at_a_tenth_of_the_learning_rate_and_exports_a_resnet(pretraining, tmp_path):
    code, out = run([str(pretraining), *EVAL, "--finetune", "--output-dir", str(tmp_path)])
    assert code == 0 and "fine-tuning top-1:" in out
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    lr = 0.1 * 8 / 256  # the recipe's rate for a batch of 8
    assert [group["initial_lr"] for group in checkpoint["optimizer"]["param_groups"]] == [lr, pytest.approx(lr / 10)]
    pretrained = load_checkpoint(pretraining)
    before = pretrained_encoder(pretrained).state_dict()
    changed = [name for name, value in checkpoint["encoder"].items() if not torch.equal(value, before[name])]
    assert "conv1.weight" in changed and "layer4.1.bn2.running_mean" in changed
    # The fine-tuned classifier is a torchvision ResNet: the encoder's weights and the linear layer as fc.
    config = pretrained["config"]
    resnet = build_encoder("resnet18", small_images=True, stem_stride=config["stem_stride"], width=config["width"])
    resnet.fc = nn.Linear(resnet.num_features, 10)
    resnet.load_state_dict({**checkpoint["encoder"], **{f"fc.{k}": v for k, v in checkpoint["model"].items()}})
    classifier = linear_eval().LinearClassifier(pretrained_encoder(pretrained), 10, None, finetune=True)
    classifier.encoder.load_state_dict(checkpoint["encoder"])
    classifier.head.load_state_dict(checkpoint["head"])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(resnet.eval()(images), classifier.eval()(images), rtol=1e-4, atol=1e-4)

    code, out = run(["--resume", str(tmp_path / "checkpoint.pt"), "--epochs", "2"])
    assert code == 0 and "fine-tuning top-1:" in out
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["epoch"] == 2
    assert not torch.equal(resumed["encoder"]["conv1.weight"], checkpoint["encoder"]["conv1.weight"])


def test_settings_the_classifier_cannot_train_with_are_refused(pretraining, tmp_path):
    with pytest.raises(SystemExit, match="--backbone-lr: applies with --finetune only"):
        run([str(pretraining), *EVAL, "--backbone-lr", "0.01"])
    with pytest.raises(SystemExit, match=r"--batch-size: .* at least 2 images"):
        run([str(pretraining), *EVAL, "--batch-size", "1"])
    with pytest.raises(SystemExit, match="--batch-size: 64 images per rank, more than the 32"):
        run([str(pretraining), *EVAL, "--batch-size", "64", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--lr: must be a positive number"):
        run([str(pretraining), *EVAL, "--lr", "-1"])
