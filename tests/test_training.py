"""The training examples and the package pieces they stand on: checkpoints, resumption, kNN, presets.

Scripts run on tiny data (32 px synthetic shapes or a tiny ImageFolder, ResNet-18 with the small-image
stem, batches of 8, a few steps). Most run in this process; torchrun, SIGTERM and the README command run
as subprocesses with one thread each, so that two processes share two cores without oversubscription.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from example_scripts import load_example
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from salmask import HighPassFilter
from salmask.ssl import (
    BadImageError,
    CheckpointError,
    ResumableSampler,
    SeededDataset,
    StopSignal,
    build_encoder,
    encoder_state_dict,
    extract_features,
    get_rng_state,
    input_filter_of,
    knn_predict,
    load_checkpoint,
    pretrained_encoder,
    save_checkpoint,
    scaled_release_filters,
    set_rng_state,
    training_state,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--train-images", "16", "--val-images", "8", "--batch-size", "8", "--epochs", "1"]
TINY += ["--warmup-epochs", "0"]
# MoCo with the high-pass recipe: 32 images, so that a queue of 16 keys holds no batch's own earlier keys.
MOCO_TINY = [*TINY, "--method", "moco", "--strategy", "high_pass", "--train-images", "32", "--queue-size", "16"]
KNN_LINE = re.compile(r"kNN top-1: (\d+\.\d+)%")

script = load_example


@pytest.fixture
def run_main(capsys):
    """Run a script's main() in this process; return (exit code, stdout, stderr with its log)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    threads = torch.get_num_threads()

    def run(name: str, argv: list[str]) -> tuple[int, str, str]:
        # The scripts configure the root logger for their own process; give the test's back afterwards.
        # One thread, as in the subprocesses: predictable on a shared machine.
        torch.set_num_threads(1)
        try:
            code = script(name).main(argv)
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            torch.set_num_threads(threads)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def run_subprocess(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="module")
def moco_checkpoint(tmp_path_factory):
    """A tiny high-pass MoCo pretraining run: (checkpoint path, kNN top-1 it printed)."""
    output = tmp_path_factory.mktemp("moco")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    threads = torch.get_num_threads()
    out = io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = script("pretrain").main([*MOCO_TINY, "--output-dir", str(output)])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
    assert code == 0
    match = KNN_LINE.search(out.getvalue())
    assert match, out.getvalue()
    return output / "checkpoint.pt", float(match.group(1))


def make_image_folder(root: Path, broken: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    if broken:
        (root / "train" / "a" / "broken.png").write_bytes(b"this is not a PNG file")
    return root


# --- the example scripts ----------------------------------------------------------------------------


def test_moco_checkpoint_holds_the_whole_training_state(moco_checkpoint):
    path, knn = moco_checkpoint
    checkpoint = load_checkpoint(path)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 0)
    assert 0.0 <= knn <= 100.0
    config = checkpoint["config"]
    assert config["method"] == "moco" and config["strategy"] == "high_pass" and config["saliency"] == "truth"
    # The release's 11 px / sigma 5 filter is made for 224 px views; at 32 px it is scaled by 32 / 224.
    assert config["input_filter"] == {"name": "high_pass", "kernel_size": 3, "sigma": pytest.approx(5.0 * 32 / 224)}
    model = checkpoint["model"]
    assert model["queue.keys"].shape == (128, 16)
    assert any(key.startswith("momentum_encoder.") for key in model)
    assert checkpoint["optimizer"]["state"], "SGD momentum buffers are part of the checkpoint"
    assert checkpoint["scheduler"] is not None and len(checkpoint["rng"]) == 1
    records = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(record["loss"]) for record in records)
    assert yaml.safe_load((path.parent / "config.yaml").read_text())["arch"] == "resnet18"


def test_simclr_trains_with_lars(tmp_path, run_main):
    code, out, err = run_main(
        "pretrain",
        ["--method", "simclr", *TINY, "--output-dir", str(tmp_path), "--strategy", "blur", "--optimizer", "lars"],
    )
    assert code == 0, err
    assert KNN_LINE.search(out), out
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["config"]["method"] == "simclr" and checkpoint["config"]["input_filter"] is None
    assert all("trust_coeff" in group for group in checkpoint["optimizer"]["param_groups"]), "LARS from timm"
    assert not any(key.startswith("momentum_encoder.") for key in checkpoint["model"])


def test_moco_on_an_image_folder_skips_a_broken_image_and_names_it(tmp_path, run_main):
    data = make_image_folder(tmp_path / "data", broken=True)
    args = ["--data", str(data), "--image-size", "32", "--arch", "resnet18", "--small-images", "--batch-size", "8"]
    args += ["--epochs", "1", "--warmup-epochs", "0", "--queue-size", "4", "--workers", "0"]
    args += ["--scda-backbone", "efficientnet_lite0", "--output-dir", str(tmp_path / "out"), "--on-bad-image", "skip"]
    code, out, err = run_main("pretrain", args)
    assert code == 0
    assert f"cannot read image {data / 'train' / 'a' / 'broken.png'}" in err
    assert "skipped" in err and KNN_LINE.search(out)
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pt")["config"]["saliency"] == "scda"


def test_a_broken_image_fails_fast_with_its_path_by_default(tmp_path, run_main):
    data = make_image_folder(tmp_path / "data", broken=True)
    args = ["--data", str(data), "--image-size", "32", "--arch", "resnet18", "--small-images", "--batch-size", "8"]
    args += [
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--strategy",
        "none",
        "--saliency",
        "none",
        "--workers",
        "0",
        "--queue-size",
        "4",
    ]
    with pytest.raises(BadImageError, match=re.escape(str(data / "train" / "a" / "broken.png"))):
        run_main("pretrain", [*args, "--output-dir", str(tmp_path / "out")])


def test_a_finished_run_resumed_with_more_epochs_trains_them(moco_checkpoint, tmp_path, run_main):
    path, _ = moco_checkpoint
    code, out, err = run_main("pretrain", ["--resume", str(path), "--epochs", "2", "--output-dir", str(tmp_path)])
    assert code == 0
    assert "resumed from" in err and "in epoch 2 after step 0" in err, "epochs are counted from 1 in the log"
    assert "schedule is recomputed for 2 epochs" in err
    extended = load_checkpoint(tmp_path / "checkpoint.pt")
    assert extended["epoch"] == 2 and extended["config"]["epochs"] == 2
    assert extended["config"]["strategy"] == "high_pass", "the other settings come from the checkpoint"
    assert KNN_LINE.search(out)


@pytest.mark.cuda
def test_moco_with_amp_and_channels_last_on_cuda(tmp_path, run_main):
    code, out, err = run_main("pretrain", [*MOCO_TINY, "--device", "cuda", "--output-dir", str(tmp_path)])
    assert code == 0, err
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["scaler"], "AMP is on by default on CUDA and its scaler is saved"
    assert checkpoint["rng"][0]["cuda"], "CUDA generators are saved"
    assert KNN_LINE.search(out)


def test_flags_override_a_preset(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()  # the kNN monitor's queries: checked with the other settings
    config, _ = script("pretrain").resolve_config(
        ["--preset", "in100_moco_blur", "--data", str(tmp_path), "--lr", "0.1"]
    )
    assert config["strategy"] == "blur" and config["arch"] == "resnet50" and config["queue_size"] == 65536
    assert config["lr"] == 0.1
    config, _ = script("pretrain").resolve_config(["--preset", "in100_simclr_blur", "--data", str(tmp_path)])
    assert config["method"] == "simclr" and config["lr"] == 0.3 and "queue_size" not in config
    with pytest.raises(SystemExit, match="--method moco: preset 'in100_simclr_blur' is a simclr run"):
        script("pretrain").resolve_config(
            ["--method", "moco", "--preset", "in100_simclr_blur", "--data", str(tmp_path)]
        )
    with pytest.raises(SystemExit, match="--warmup-epochs"):
        script("pretrain").resolve_config(["--epochs", "2", "--warmup-epochs", "2"])


def test_each_method_takes_its_own_defaults_and_refuses_the_other_methods_settings(moco_checkpoint):
    moco, _ = script("pretrain").resolve_config(["--method", "moco"])
    simclr, _ = script("pretrain").resolve_config([])
    assert moco["method"] == "moco" and moco["queue_size"] == 512 and moco["output_dir"].endswith("moco_synthetic")
    assert simclr["method"] == "simclr" and simclr["sync_batch_norm"] and "moco_momentum" not in simclr
    assert simclr["output_dir"].endswith("simclr_synthetic")
    with pytest.raises(SystemExit, match="--queue-size: not a setting of --method simclr"):
        script("pretrain").resolve_config(["--method", "simclr", "--queue-size", "16"])
    with pytest.raises(SystemExit, match="--sync-batch-norm: not a setting of --method moco"):
        script("pretrain").resolve_config(["--method", "moco", "--sync-batch-norm"])
    path, _ = moco_checkpoint
    with pytest.raises(SystemExit, match="--method simclr: the checkpoint continues a moco run"):
        script("pretrain").resolve_config(["--resume", str(path), "--method", "simclr"])


@pytest.mark.parametrize("method", ["moco", "simclr"])
@pytest.mark.parametrize("strategy", ["high_pass", "blur", "mean", "mscn", "none"])
def test_every_preset_of_the_paper_exists_with_its_expected_result(method, strategy):
    path = EXAMPLES / "presets" / f"in100_{method}_{strategy}.yaml"
    text = path.read_text()
    preset = yaml.safe_load(text)
    assert preset["method"] == method and preset["strategy"] == strategy and preset["epochs"] == 200
    assert set(preset) <= set(script("pretrain").defaults_for(method, "imagefolder"))
    expected = re.search(r"linear evaluation top-1 on ImageNet-100\): (\d+\.\d+)%", text)
    assert expected, "the expected result is written in the preset"
    assert 60.0 < float(expected.group(1)) < 80.0
    if method == "moco":
        assert (preset["batch_size"], preset["lr"], preset["queue_size"], preset["moco_momentum"]) == (
            128,
            0.015,
            65536,
            0.999,
        )
    else:
        assert (preset["batch_size"], preset["lr"]) == (256, 0.3)


def test_linear_eval_applies_the_high_pass_filter_of_a_high_pass_checkpoint(moco_checkpoint, tmp_path, run_main):
    path, _ = moco_checkpoint
    args = [str(path), "--epochs", "1", "--batch-size", "8", "--output-dir", str(tmp_path)]
    code, out, err = run_main("linear_eval", args)
    assert code == 0
    assert re.search(r'epoch 1: \{"epoch": 1, ', err), "epochs are counted from 1 in the log"
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    assert f"applying {scaled_release_filters(32)[0]!r} to every input" in err
    assert "input filter: high-pass" in out and "linear top-1:" in out
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["config"]["recipe"] == "moco" and resumed["config"]["lr"] == 0.1 * 8 / 256
    assert set(resumed["model"]) == {"weight", "bias"}, "only the linear layer trains"
    code, out, err = run_main("linear_eval", ["--resume", str(tmp_path / "checkpoint.pt"), "--epochs", "2"])
    assert code == 0
    assert "in epoch 2 after step 0" in err and "applying HighPassFilter" in err and "2 epochs" in out
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2


def test_linear_eval_leaves_inputs_of_other_strategies_alone(tmp_path, run_main):
    code, _, err = run_main("pretrain", [*MOCO_TINY, "--strategy", "mean", "--output-dir", str(tmp_path / "p")])
    assert code == 0, err
    args = [str(tmp_path / "p" / "checkpoint.pt"), "--epochs", "1", "--recipe", "simclr", "--batch-size", "8"]
    code, out, err = run_main("linear_eval", [*args, "--output-dir", str(tmp_path / "l")])
    assert code == 0
    assert "HighPassFilter" not in err and "input filter: none" in out and "simclr recipe" in out


def test_knn_eval_reproduces_the_monitor_of_pretraining(moco_checkpoint, run_main):
    path, knn = moco_checkpoint
    code, out, err = run_main("knn_eval", [str(path)])
    assert code == 0
    assert "applying HighPassFilter" in err
    assert re.search(r"features: 100%.* 1/1 ", err), "a progress bar for each pass over the images"
    assert float(KNN_LINE.search(out).group(1)) == pytest.approx(knn, abs=1e-6)


def test_resuming_a_corrupt_checkpoint_is_a_clear_error(tmp_path, run_main, moco_checkpoint):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pt cannot be read; it is corrupt"):
        run_main("pretrain", ["--resume", str(garbage)])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(moco_checkpoint[0].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(truncated)
    result = run_subprocess([str(EXAMPLES / "knn_eval.py"), str(garbage)])
    assert result.returncode != 0
    assert result.stderr.startswith("error: checkpoint") and "garbage.pt" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_processes_under_torchrun(tmp_path, free_port):
    port = free_port()
    args = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}"]
    args += [str(EXAMPLES / "pretrain.py"), *MOCO_TINY, "--output-dir", str(tmp_path)]
    result = run_subprocess(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 rank(s)" in result.stderr
    assert len(KNN_LINE.findall(result.stdout)) == 1, "only rank 0 prints"
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert len(checkpoint["rng"]) == 2, "each rank's generators are saved"
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    # 16 images, a global batch of 8 split over 2 ranks: 2 steps, each enqueueing the 8 gathered keys.
    assert int(checkpoint["model"]["queue.pointer"]) == 0


def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = [str(EXAMPLES / "pretrain.py"), "--train-images", "32", "--val-images", "8"]
    args += ["--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--queue-size", "16", "--log-every", "1"]
    args += ["--method", "moco", "--strategy", "high_pass"]
    uninterrupted = run_subprocess([*args, "--output-dir", str(tmp_path / "a")])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    interrupted_dir = tmp_path / "b"
    process = subprocess.Popen(
        [sys.executable, *args, "--output-dir", str(interrupted_dir)],
        env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    metrics = interrupted_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= 1 for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    stopped = load_checkpoint(interrupted_dir / "checkpoint.pt")
    assert "stopped by signal" in stderr
    assert stopped["epoch"] == 0 and 1 <= stopped["step"] < 4, "stopped mid-epoch"

    resumed = run_subprocess([str(EXAMPLES / "pretrain.py"), "--resume", str(interrupted_dir / "checkpoint.pt")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {interrupted_dir / 'checkpoint.pt'} in epoch 1 after step {stopped['step']}" in resumed.stderr
    expected = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    finished = load_checkpoint(interrupted_dir / "checkpoint.pt")
    assert (finished["epoch"], finished["step"]) == (1, 0)
    for key, value in expected["model"].items():
        torch.testing.assert_close(finished["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert KNN_LINE.search(resumed.stdout).group(1) == KNN_LINE.search(uninterrupted.stdout).group(1)


@pytest.mark.slow
def test_readme_main_job_prints_its_knn_beside_the_untrained_encoder_and_raw_pixels(tmp_path):
    # The README's command on fewer images and epochs: the full default takes about four minutes on two cores.
    args = [str(EXAMPLES / "pretrain.py"), "--epochs", "4", "--train-images", "256", "--val-images", "100"]
    args += ["--batch-size", "32", "--log-every", "1", "--output-dir", str(tmp_path)]
    result = run_subprocess(args, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "img/s" in result.stderr, "tqdm reports throughput"
    lines = result.stdout.strip().splitlines()[-3:]
    scores = json.loads((tmp_path / "knn.json").read_text())
    assert KNN_LINE.search(lines[0]).group(1) == f"{scores['trained']:.2f}" and "100 held-out images" in lines[0]
    assert f"the same encoder untrained {scores['untrained']:.2f}%" in lines[1]
    assert f"raw pixels {scores['raw_pixels']:.2f}%" in lines[1] and "chance 10.0%" in lines[1]
    assert lines[2].startswith("Pretraining "), "one line says what the numbers mean"
    config = load_checkpoint(tmp_path / "checkpoint.pt")["config"]
    assert (config["method"], config["dataset"], config["width"], config["optimizer"]) == (
        "simclr",
        "synthetic",
        16,
        "adamw",
    )
    # A tiny run moves the loss: its last steps below its first.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if "step" in record]
    assert len(losses) == 32 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses


@pytest.mark.parametrize(
    ("trained", "untrained", "raw", "meaning"),
    [
        (33.0, 15.0, 18.0, "Pretraining learned: its features sort unseen images by class 18.0 points better"),
        (17.0, 15.0, 18.0, "Pretraining helped little: 2.0 points over the random initialisation, -1.0 against"),
        (24.0, 15.0, 26.0, "Pretraining helped little: 9.0 points over the random initialisation, -2.0 against"),
        (14.0, 15.0, 18.0, "Pretraining did not learn: 14.00% against 15.00% for the random initialisation"),
    ],
)
def test_the_last_line_says_what_the_scores_mean(trained, untrained, raw, meaning):
    config = {"knn_k": 200, "knn_temperature": 0.1, "epochs": 50}
    scores = {"trained": trained, "untrained": untrained, "raw_pixels": raw}
    summary = script("pretrain").knn_summary(scores, config, 1000, 10, Path("c.pt"))
    assert summary.splitlines()[-1].startswith(meaning), summary
    alone = script("pretrain").knn_summary({"trained": trained}, config, 1000, 10, Path("c.pt"))
    assert alone.count("\n") == 0 and KNN_LINE.search(alone).group(1) == f"{trained:.2f}"


def test_a_moco_queue_holding_a_batch_s_own_keys_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match=r"--queue-size: queue_size=1024 .* the 1024 training images"):
        script("pretrain").main(
            ["--method", "moco", "--train-images", "1024", "--queue-size", "1024", "--output-dir", str(tmp_path)]
        )
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_warm_up_that_covers_the_whole_run_is_refused():
    with pytest.raises(SystemExit, match=r"--warmup-epochs: must be in \[0, epochs=3\), got 3"):
        script("pretrain").resolve_config(["--epochs", "3", "--warmup-epochs", "3"])


def test_views_of_data_held_in_memory_refuse_a_blur_and_a_hue_jitter_out_of_range():
    with pytest.raises(SystemExit, match=r"--blur-probability: must be 0 for the data sets held in memory"):
        script("pretrain").resolve_config(["--blur-probability", "0.5"])
    with pytest.raises(SystemExit, match=r"--hue-jitter: must be a finite number in \[0, 0.5\], got 0.7"):
        script("pretrain").resolve_config(["--hue-jitter", "0.7"])


# --- checkpoints --------------------------------------------------------------------------------------


def test_save_checkpoint_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = save_checkpoint({"model": {"w": torch.zeros(2)}, "epoch": 1, "step": 0, "config": {}}, tmp_path / "c.pt")

    def failing_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {}, "epoch": 2, "step": 0, "config": {}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"], "no temporary file is left behind"


def test_load_checkpoint_rejects_other_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a salmask training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    save_checkpoint({"model": {}, "epoch": 0, "config": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"lacks \['step'\]"):
        load_checkpoint(tmp_path / "partial.pt")


def test_a_checkpoint_of_another_architecture_is_named_as_such(moco_checkpoint):
    checkpoint = load_checkpoint(moco_checkpoint[0])
    checkpoint["config"] = {**checkpoint["config"], "arch": "resnet34"}
    with pytest.raises(CheckpointError, match=r"resnet34\) does not fit the model .*missing: layer1\.2"):
        pretrained_encoder(checkpoint)
    with pytest.raises(CheckpointError, match=r"holds no weights under 'encoder\.'"):
        encoder_state_dict({"model": {"fc.weight": torch.zeros(1)}})


def test_training_state_restores_rng_and_position(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    np.random.seed(3)  # noqa: NPY002
    state = training_state(model=model, config={"arch": "x"}, epoch=2, step=5, optimizer=optimizer)
    save_checkpoint(state, tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(2))  # noqa: NPY002
    fresh_model = nn.Linear(3, 2)
    fresh_optimizer = torch.optim.SGD(fresh_model.parameters(), lr=0.1, momentum=0.9)
    from salmask.ssl import restore_training_state

    position = restore_training_state(load_checkpoint(tmp_path / "c.pt"), model=fresh_model, optimizer=fresh_optimizer)
    assert position == (2, 5)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(2), expected[1])  # noqa: NPY002
    assert torch.equal(fresh_model.weight, model.weight)
    assert fresh_optimizer.state_dict()["state"][0]["momentum_buffer"] is not None


def test_rng_state_survives_weights_only_loading(tmp_path):
    import random

    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    values = (torch.rand(1).item(), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (torch.rand(1).item(), random.random()) == values


def test_stop_signal_turns_sigterm_into_a_request_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop()
    assert signal.getsignal(signal.SIGTERM) is previous


# --- data for exact resumption ----------------------------------------------------------------------


def test_resumable_sampler_continues_the_epoch_order():
    sampler = ResumableSampler(range(10), seed=4, num_replicas=2, rank=1)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=2)
    assert list(sampler) == full[2:] and len(sampler) == 3
    sampler.set_epoch(4)
    assert list(sampler) != full
    with pytest.raises(ValueError, match="start"):
        sampler.set_epoch(0, start=6)


class _RandomItems(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.rand(3)


def test_seeded_items_do_not_depend_on_workers_or_on_earlier_draws():
    dataset = SeededDataset(_RandomItems(), seed=1)
    dataset.set_epoch(2)
    in_process = torch.cat(list(DataLoader(dataset, batch_size=4)))
    torch.rand(100)  # the caller's generator moves on; the items must not
    in_workers = torch.cat(list(DataLoader(dataset, batch_size=4, num_workers=2)))
    assert torch.equal(in_process, in_workers)
    dataset.set_epoch(3)
    assert not torch.equal(dataset[0], in_process[0])


class _Unreadable(Dataset):
    samples = (("/data/a.jpg", 0), ("/data/b.jpg", 0), ("/data/c.jpg", 1))

    def __len__(self):
        return 3

    def __getitem__(self, index):
        if index == 1:
            raise OSError("image file is truncated")
        return index


def test_seeded_dataset_names_an_unreadable_image(caplog):
    with pytest.raises(BadImageError, match=r"/data/b\.jpg: OSError: image file is truncated"):
        SeededDataset(_Unreadable())[1]
    with caplog.at_level(logging.WARNING):
        assert SeededDataset(_Unreadable(), on_bad_image="skip")[1] == 2
    assert "/data/b.jpg" in caplog.text
    with pytest.raises(ValueError, match="on_bad_image"):
        SeededDataset(_Unreadable(), on_bad_image="ignore")


# --- kNN ----------------------------------------------------------------------------------------------


def test_knn_predict_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    bank = nn.functional.normalize(torch.randn(50, 8, generator=generator), dim=1)
    labels = torch.randint(0, 4, (50,), generator=generator)
    queries = nn.functional.normalize(torch.randn(7, 8, generator=generator), dim=1)
    scores = knn_predict(queries, bank, labels, 4, k=10, temperature=0.1, chunk_size=3)
    for row, query in enumerate(queries):
        similarity = bank @ query
        nearest = similarity.argsort(descending=True)[:10]
        expected = torch.zeros(4)
        for index in nearest:
            expected[labels[index]] += torch.exp(similarity[index] / 0.1)
        # Relative to the nearest neighbour's weight, which leaves the ranking of the classes as it is.
        torch.testing.assert_close(scores[row], expected / torch.exp(similarity.max() / 0.1))
    torch.testing.assert_close(knn_predict(queries, bank, labels, 4, k=10, chunk_size=1000), scores)


def test_extract_features_is_unit_norm_in_eval_mode_and_restores_training_mode():
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6))
    encoder.train()
    loader = DataLoader(TensorDataset(torch.randn(10, 3, 2, 2), torch.arange(10)), batch_size=4)
    before = encoder[2].running_mean.clone()
    features, labels = extract_features(encoder, loader, transform=HighPassFilter(3, 1.0))
    assert encoder.training and torch.equal(encoder[2].running_mean, before), "BN statistics untouched"
    torch.testing.assert_close(features.norm(dim=1), torch.ones(10))
    assert labels.tolist() == list(range(10))


def test_input_filter_of_reads_the_recorded_filter():
    assert input_filter_of({"input_filter": {"name": "high_pass", "kernel_size": 7, "sigma": 2.0}}).kernel_size == 7
    assert input_filter_of({"input_filter": None, "strategy": "high_pass"}) is None
    assert isinstance(input_filter_of({"strategy": "mscn"}), HighPassFilter)
    assert input_filter_of({"strategy": "blur"}) is None


def test_pretrained_encoder_loads_the_query_encoder(moco_checkpoint):
    checkpoint = load_checkpoint(moco_checkpoint[0])
    encoder = pretrained_encoder(checkpoint)
    reference = build_encoder("resnet18", small_images=True)
    assert encoder.conv1.kernel_size == reference.conv1.kernel_size == (3, 3)
    torch.testing.assert_close(encoder.conv1.weight, checkpoint["model"]["encoder.conv1.weight"])


def test_every_script_evaluates_on_the_same_three_channel_images():
    # One evaluation transform for the pretraining kNN monitor and both evaluation scripts: a grayscale
    # file of an ImageFolder gives the three channels the encoder expects (the monitor once lacked v2.RGB).
    scripts = [script(name) for name in ("pretrain", "knn_eval", "linear_eval")]
    shared = sys.modules["_common"].evaluation_transform
    assert all(module.evaluation_transform is shared for module in scripts)
    gray = Image.new("L", (40, 30), color=128)
    for resize in (False, True):
        image = shared(32, resize)(gray)
        assert image.shape[0] == 3 and (not resize or image.shape[1:] == (32, 32))
    train, test = script("linear_eval").transforms(32, resize=True)
    assert train(gray).shape == test(gray).shape == (3, 32, 32)


# --- ImageFolder classes ---------------------------------------------------------------------------


def make_split_folders(root: Path, train_classes: list[str], val_classes: list[str]) -> Path:
    """train/ and val/ of random 40 px images; val's image i of a class is train's image i of that class."""
    rng = np.random.default_rng(1)
    pixels = {name: [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)] for name in train_classes}
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for index, image in enumerate(pixels.get(name) or pixels[train_classes[0]]):
                Image.fromarray(image).save(root / split / name / f"{index}.png")
    return root


def test_evaluation_labels_val_images_by_class_name_when_val_lacks_a_class(moco_checkpoint, tmp_path, run_main):
    # val/ lacks class "a": numbered on its own, "b" would be 0 and "c" 1, against train's 1 and 2.
    root = make_split_folders(tmp_path, ["a", "b", "c"], ["b", "c"])
    code, out, err = run_main("knn_eval", [str(moco_checkpoint[0]), "--data", str(root), "--k", "1"])
    assert code == 0 and "kNN top-1: 100.00%" in out, out
    assert "no folder for 1 of the 3 classes of train/ (a)" in err
    _, bank, queries, num_classes = script("pretrain").build_datasets(
        {**script("pretrain").defaults_for("moco", "imagefolder"), "data": str(root), "saliency": "none"}, "cpu"
    )
    assert num_classes == 3 and queries.targets == [1, 1, 1, 2, 2, 2] and queries.classes == bank.classes
    config = {"dataset": "imagefolder", "data": str(root), "image_size": 32}
    _, test, num_classes = script("linear_eval").build_datasets(config)
    assert num_classes == 3 and test.targets == [1, 1, 1, 2, 2, 2]


def test_a_val_class_that_train_lacks_ends_the_run_with_both_lists(moco_checkpoint, tmp_path, run_main):
    root = make_split_folders(tmp_path, ["a", "b"], ["a", "b", "z"])
    message = r"val has classes that .*train lacks: \['z'\]; the classes of train/ are \['a', 'b'\], those of val/ "
    with pytest.raises(SystemExit, match=message + r"\['a', 'b', 'z'\]"):
        run_main("knn_eval", [str(moco_checkpoint[0]), "--data", str(root)])
    with pytest.raises(SystemExit, match=message):
        script("linear_eval").build_datasets({"dataset": "imagefolder", "data": str(root), "image_size": 32})


# --- settings checked before any work, saves before evaluations, where a run writes ------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--knn-k", "0"], "--knn-k"),
        (["--knn-temperature", "0"], "--knn-temperature"),
        (["--knn-temperature", "nan"], "--knn-temperature"),
        (["--patch-size", "0"], "--patch-size"),
        (["--patch-size", "64"], "--patch-size"),
        (["--lr", "-0.1"], "--lr"),
        (["--temperature", "1e-300"], "--temperature"),
        (["--hard-negative-weight", "0"], "--hard-negative-weight"),
        (["--momentum", "1.5"], "--momentum"),
        (["--moco-momentum", "2"], "--moco-momentum"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--mask-ratio", "0.5", "0.2"], "--mask-ratio"),
        (["--hard-negative-ratio", "0.4", "1.7"], "--hard-negative-ratio"),
        (["--scda-threshold", "inf"], "--scda-threshold"),
        (["--log-every", "0"], "--log-every"),
        (["--seed", "-1"], "--seed"),
        (["--val-images", "0"], "--val-images"),
        (["--strategy", "none", "--hard-negatives"], "--hard-negatives"),
        (["--device", "quantum"], "--device"),
    ],
)
def test_a_bad_setting_stops_the_run_before_any_work(tmp_path, flags, named):
    output = tmp_path / "run"
    started = time.perf_counter()
    with pytest.raises(SystemExit, match=re.escape(named)):
        script("pretrain").main([*MOCO_TINY, "--output-dir", str(output), *flags])
    assert not output.exists(), "nothing was written before the check"
    assert time.perf_counter() - started < 5, "no data was built nor model trained"


def test_an_unwritable_output_directory_stops_the_run_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"--output-dir: .*cannot be written"):
        script("pretrain").main([*MOCO_TINY, "--output-dir", str(blocker / "run")])


def test_the_last_epoch_is_saved_before_its_evaluation(tmp_path, run_main, monkeypatch):
    def failing_monitor(*args, **kwargs):
        raise RuntimeError("the evaluation failed")

    monkeypatch.setattr(script("pretrain"), "knn_top1", failing_monitor)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        run_main("pretrain", [*MOCO_TINY, "--output-dir", str(tmp_path)])
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (saved["epoch"], saved["step"]) == (1, 0), "the trained epoch is kept"


def test_epochs_are_counted_from_one_in_the_log_and_the_metrics(tmp_path, run_main):
    code, _, err = run_main("pretrain", [*MOCO_TINY, "--output-dir", str(tmp_path), "--log-every", "1"])
    assert code == 0
    assert re.search(r'epoch 1: \{"epoch": 1, ', err), err[-2000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {record["epoch"] for record in records} == {1}


def test_a_resumed_run_writes_beside_its_checkpoint(moco_checkpoint, tmp_path, monkeypatch, run_main):
    # A checkpoint moved elsewhere, whose recorded output directory is relative (another working directory)
    # or was altered to point anywhere: the resumed run writes beside the checkpoint.
    elsewhere = tmp_path / "elsewhere"
    for recorded in ("outputs/relative_run", str(elsewhere)):
        folder = tmp_path / f"moved-{len(recorded)}"
        checkpoint = load_checkpoint(moco_checkpoint[0])
        checkpoint["config"]["output_dir"] = recorded
        save_checkpoint(checkpoint, folder / "checkpoint.pt")
        monkeypatch.chdir(tmp_path)
        code, _, _ = run_main("pretrain", ["--resume", f"{folder.name}/checkpoint.pt", "--epochs", "2"])
        assert code == 0
        resumed = load_checkpoint(folder / "checkpoint.pt")
        assert resumed["epoch"] == 2 and (folder / "config.yaml").exists() and (folder / "metrics.jsonl").exists()
        assert resumed["config"]["output_dir"] == str(folder.resolve()), "recorded as an absolute path"
    assert not elsewhere.exists() and not (tmp_path / "outputs").exists()


def test_new_runs_record_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, _ = script("pretrain").resolve_config([*MOCO_TINY, "--output-dir", "runs/a"])
    assert config["output_dir"] == str(tmp_path / "runs" / "a")


def test_a_disk_without_room_for_a_checkpoint_stops_the_run_before_training(tmp_path, run_main, monkeypatch):
    usage = type("Usage", (), {"total": 10**9, "used": 10**9 - 2**20, "free": 2**20})
    monkeypatch.setattr("shutil.disk_usage", lambda folder: usage)
    with pytest.raises(SystemExit, match=r"--output-dir: .* has 1\.0 MB free; a checkpoint of this run takes about"):
        run_main("pretrain", [*MOCO_TINY, "--output-dir", str(tmp_path)])
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "metrics.jsonl").exists()
