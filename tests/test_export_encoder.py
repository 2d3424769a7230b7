"""examples/export_encoder.py on a tiny pretraining checkpoint: the exported encoder computes what the
pretrained one computes, in torchvision, in timm and under detectron2's names."""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from example_scripts import load_example
from torch import nn

from salmask.ssl import CheckpointError, encoder_state_dict, load_checkpoint, pretrained_encoder, scaled_release_filters

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY = ["--train-images", "16", "--val-images", "8", "--batch-size", "8", "--epochs", "1"]
TINY += ["--warmup-epochs", "0", "--method", "moco", "--train-images", "32", "--queue-size", "16"]
TINY += ["--strategy", "high_pass", "--width", "64"]


load_script = load_example


def run(name: str, argv: list[str]) -> tuple[int, str]:
    """Run a script's main() in this process with one thread; return its exit code and log."""
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    log = io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(log):
            code = load_script(name).main(argv)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
    return code, log.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A one-epoch MoCo run of ResNet-18 with torchvision's 7x7 stem (high-pass recipe, 32 px shapes)."""
    output = tmp_path_factory.mktemp("pretrain")
    code, _ = run("pretrain", [*TINY, "--no-small-images", "--output-dir", str(output)])
    assert code == 0
    return output / "checkpoint.pt"


def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images)


def test_the_torchvision_file_loads_into_torchvision_and_timm_and_computes_the_same_features(checkpoint, tmp_path):
    out = tmp_path / "encoder.pth"
    code, log = run("export_encoder", [str(checkpoint), "--out", str(out)])
    assert code == 0 and "torchvision / timm names" in log
    assert "high-pass filtered" in log and repr(scaled_release_filters(32)[0]) in log
    state = torch.load(out, weights_only=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = features(pretrained_encoder(load_checkpoint(checkpoint)), images)

    resnet = torchvision.models.resnet18()
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    resnet.fc = nn.Identity()
    torch.testing.assert_close(features(resnet, images), expected)

    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay={"file": str(out)}, num_classes=0)
    torch.testing.assert_close(features(model, images), expected, rtol=1e-4, atol=1e-5)
    classifier = timm.create_model(
        "resnet18", pretrained=True, pretrained_cfg_overlay={"file": str(out)}, num_classes=7
    )
    assert classifier.fc.out_features == 7
    torch.testing.assert_close(classifier.conv1.weight, state["conv1.weight"])


def test_the_detectron2_file_renames_every_trunk_weight_as_detectron2_does(checkpoint, tmp_path):
    out = tmp_path / "encoder.pkl"
    code, log = run("export_encoder", [str(checkpoint), "--format", "detectron2", "--out", str(out)])
    assert code == 0 and "(detectron2)" in log
    with open(out, "rb") as stream:
        exported = pickle.load(stream)
    assert exported["matching_heuristics"] is True and exported["__author__"] == "salmask"
    model = exported["model"]
    source = encoder_state_dict(load_checkpoint(checkpoint))
    kept = {name: value for name, value in source.items() if not name.endswith("num_batches_tracked")}
    assert len(model) == len(kept)
    assert all(isinstance(value, np.ndarray) for value in model.values())
    assert all(
        re.fullmatch(r"stem\.conv1\.(norm\.)?\w+|res[2-5]\.\d+\.(conv\d|shortcut)(\.norm)?\.\w+", k) for k in model
    )
    # ResNet-18 names, written out: the stem, a block's convolution and norm, a projection shortcut.
    pairs = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_mean": "stem.conv1.norm.running_mean",
        "layer1.1.conv2.weight": "res2.1.conv2.weight",
        "layer3.0.bn1.weight": "res4.0.conv1.norm.weight",
        "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
        "layer4.0.downsample.1.running_var": "res5.0.shortcut.norm.running_var",
    }
    for name, target in pairs.items():
        np.testing.assert_array_equal(model[target], source[name].numpy())


def test_a_small_image_stem_is_refused_for_detectron2_and_named_for_torchvision(tmp_path):
    output = tmp_path / "pretrain"
    assert run("pretrain", [*TINY, "--output-dir", str(output)])[0] == 0  # the synthetic default: 3x3 stem
    with pytest.raises(CheckpointError, match="small-image stem"):
        run("export_encoder", [str(output / "checkpoint.pt"), "--format", "detectron2", "--out", str(tmp_path / "x")])
    code, log = run("export_encoder", [str(output / "checkpoint.pt"), "--out", str(tmp_path / "small.pth")])
    assert code == 0 and "small_images=True" in log


def test_detectron2_names_cover_the_resnet_family():
    names = load_script("export_encoder").detectron2_name
    for arch in ("resnet50", "resnext50_32x4d"):
        trunk = torchvision.models.get_model(arch).state_dict()
        renamed = {names(name) for name in trunk if not name.startswith("fc.")} - {None}
        assert len(renamed) == sum(not n.startswith("fc.") and not n.endswith("num_batches_tracked") for n in trunk)
        assert "res5.2.conv3.norm.weight" in renamed and "res2.0.shortcut.norm.bias" in renamed
    with pytest.raises(ValueError, match="not a weight of a torchvision ResNet"):
        names("projector.0.weight")
