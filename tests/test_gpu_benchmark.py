"""benchmarks/gpu.py, the one-command GPU run, tried on the CPU: every section runs and writes its file beside
(never over) the committed results, a section that fails, outlasts its time or no longer fits the budget is
recorded as such while the run goes on, and benchmarks/step_sync.py tells the training step apart from the
loop around it.

The scripts run in subprocesses: benchmarks/ and examples/ each have a ``_common`` module of their own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SECTIONS = ("tests", "fills", "moco_step", "pretrain")
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENVIRONMENT.pop("SALMASK_BENCHMARK_RESULTS", None)


def run_python(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=ENVIRONMENT, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def load_step_sync() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("salmask_benchmark_step_sync", BENCHMARKS / "step_sync.py")
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclass looks its module up by name
        spec.loader.exec_module(module)
    return module


def committed_results() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in (BENCHMARKS / "results").iterdir() if path.is_file()}


@pytest.mark.slow
def test_a_quick_cpu_run_writes_every_section_beside_the_committed_results(tmp_path):
    committed = committed_results()
    result = run_python(["benchmarks/gpu.py", "--device", "cpu", "--quick", "--results", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert committed_results() == committed, "a run with --results elsewhere touched benchmarks/results"
    assert {path.name for path in tmp_path.iterdir()} == {
        *(f"gpu_{name}.md" for name in ("summary", *SECTIONS)),
        "gpu_run.json",
    }
    run = json.loads((tmp_path / "gpu_run.json").read_text())
    assert {name: entry["status"] for name, entry in run["sections"].items()} == dict.fromkeys(SECTIONS, "ok")
    assert "--results" not in run["command"], "the reports name how numbers were made, not where they went"

    tests = run["sections"]["tests"]["data"]["tests"]
    marked = [path for path in (ROOT / "tests").rglob("test_*.py") if "\n@pytest.mark.cuda\n" in path.read_text()]
    assert {test["test"].split("::")[0].rsplit(".", 1)[-1] for test in tests} == {path.stem for path in marked}
    assert all(test["outcome"] == "skipped" for test in tests), "CUDA tests must skip cleanly without a GPU"

    fills = run["sections"]["fills"]["data"]["dtypes"]
    assert set(fills) == {"float32", "bfloat16"}
    for results in fills.values():
        assert results["copy_ms"] > 0
        timed = {label: call for label, call in results["calls"].items() if "ms" in call}
        assert {"mean", "constant", "noise", "blur", "high-pass (release mix)", "hard negative (high-pass)"} <= set(
            timed
        )
        assert any(label.startswith("torchvision RandomErasing") for label in timed)
        assert all(call["ms"] > 0 and call["fraction_of_copy"] > 0 and call["operators"] > 0 for call in timed.values())

    moco = run["sections"]["moco_step"]["data"]
    assert moco["baseline_ms"] > 0 and moco["rounds"] == 1
    assert any("saliency cache" in name for name in moco["variants"])
    assert sum("SCDA" in name for name in moco["variants"]) == 2

    (pretraining,) = run["sections"]["pretrain"]["data"]["runs"]  # on a CPU, AMP is off: one run
    assert pretraining["exit"] == 0 and pretraining["steps"] == 4  # 64 synthetic images in batches of 16
    # pretrain.py's own reads of the device (its per-step log) come after GradScaler.update(): around the steps.
    from_the_loop = [site for site in pretraining["sites"] if site["origin"].startswith("examples/pretrain.py")]
    assert all(site["in_step"] == 0 for site in from_the_loop), from_the_loop
    assert pretraining["around_step"] > 0

    assembled = run_python(["benchmarks/report.py", "--results", str(tmp_path)], timeout=60)
    assert assembled.returncode == 0, assembled.stderr
    text = (tmp_path / "RESULTS.md").read_text()
    for title in ("GPU run: summary", "the CUDA tests", "fills against the copy bandwidth", "one MoCo v2 step"):
        assert f"## {title}" in text or f"## GPU run: {title}" in text


@pytest.mark.slow
def test_sections_that_no_longer_fit_the_budget_are_recorded_as_skipped(tmp_path):
    result = run_python(["benchmarks/gpu.py", "--device", "cpu", "--budget-s", "1", "--results", str(tmp_path)])
    assert result.returncode == 1
    run = json.loads((tmp_path / "gpu_run.json").read_text())
    assert all(entry["status"].startswith("skipped") for entry in run["sections"].values())
    summary = (tmp_path / "gpu_summary.md").read_text()
    assert summary.count("| skipped:") == len(SECTIONS)


_DRIVER = """
import argparse, json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import gpu

results, work = Path(sys.argv[1]), Path(sys.argv[2])
args = argparse.Namespace(
    device="cpu", quick=True, budget_s=300.0, sections=list(gpu.SECTIONS), results=results, sync_debug_mode="warn"
)
"""


@pytest.mark.slow
def test_a_section_that_fails_or_outlasts_its_time_is_recorded_with_its_last_lines(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    driver = _DRIVER + textwrap.dedent(
        """
        statuses = {}
        args.device = "cuda:99"  # no such device, here or on a one-GPU machine: the section's process fails
        statuses["fills"] = gpu.spawn_section("fills", args, work, 120, "python benchmarks/gpu.py")[0]
        args.device = "cpu"  # building the models alone takes longer than this
        statuses["moco_step"] = gpu.spawn_section("moco_step", args, work, 2, "python benchmarks/gpu.py")[0]
        print(json.dumps(statuses))
        """
    )
    result = run_python(["-c", driver, str(tmp_path), str(work)], timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = json.loads(result.stdout.strip().splitlines()[-1])
    assert statuses == {"fills": "failed (exit code 1)", "moco_step": "timed out after 2 s"}
    failed = (tmp_path / "gpu_fills.md").read_text()
    assert "Stopped by an error" in failed and "cuda" in failed.lower()
    assert json.loads((work / "fills.json").read_text())["status"] == "failed"
    timed_out = (tmp_path / "gpu_moco_step.md").read_text()
    assert "timed out after 2 s" in timed_out
    assert json.loads((work / "moco_step.json").read_text())["status"] == "timed out after 2 s"


@pytest.mark.slow
def test_the_run_goes_on_after_a_failed_section_and_the_summary_says_which(tmp_path):
    driver = _DRIVER + textwrap.dedent(
        """
        tried = []
        def spawn(name, args, workdir, timeout, command):
            tried.append(name)
            return ("failed (exit code 1)" if name == "fills" else "ok"), 0.5
        gpu.spawn_section = spawn
        code = gpu.run_all(args)
        print(json.dumps({"code": code, "tried": tried}))
        """
    )
    result = run_python(["-c", driver, str(tmp_path), str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"code": 1, "tried": list(SECTIONS)}
    run = json.loads((tmp_path / "gpu_run.json").read_text())
    assert run["sections"]["fills"]["status"] == "failed (exit code 1)"
    assert [run["sections"][name]["status"] for name in ("tests", "moco_step", "pretrain")] == ["ok"] * 3
    assert "| fills | failed (exit code 1) |" in (tmp_path / "gpu_summary.md").read_text()


def test_the_step_window_opens_with_each_batch_and_closes_after_the_scaler_update():
    step_sync = load_step_sync()
    recorder = step_sync.StepSyncRecorder("warn", cuda=False)
    training = types.SimpleNamespace(DataLoader=DataLoader)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with step_sync.step_window(training, recorder), step_sync._SynchronisingOperators(recorder):
        loader = training.DataLoader(TensorDataset(torch.arange(6.0)), batch_size=2)
        for (batch,) in loader:
            batch.sum().item()  # inside the step
            scaler.update()
            batch.max().item()  # the log, after the step
    assert training.DataLoader is DataLoader, "the training module gets its own loader class back"
    assert recorder.steps == 3
    counts = {site.origin.split("`")[1]: (site.in_step, site.around_step) for site in recorder.sites.values()}
    # The loader's own reads while it prepares a batch (its seed) are the data pipeline's, not counted.
    assert counts == {
        "batch.sum().item()  # inside the step": (3, 0),
        "batch.max().item()  # the log, after the step": (0, 3),
    }


def test_each_warning_of_the_sync_debug_mode_is_recorded_at_its_place_in_or_around_the_step():
    # On a GPU, torch.cuda.set_sync_debug_mode("warn") raises these warnings from the synchronising call.
    step_sync = load_step_sync()
    recorder = step_sync.StepSyncRecorder("warn", cuda=False)
    training = types.SimpleNamespace(DataLoader=DataLoader)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def synchronising_call() -> None:
        warnings.warn("called a synchronizing CUDA operation (Triggered internally)", UserWarning, stacklevel=1)

    with step_sync.step_window(training, recorder), step_sync.sync_warnings_recorded(recorder):
        for _ in training.DataLoader(TensorDataset(torch.arange(4.0)), batch_size=2):
            synchronising_call()
            scaler.update()
            synchronising_call()
        with pytest.warns(UserWarning, match="another warning"):
            warnings.warn("another warning", UserWarning, stacklevel=1)
    (site,) = recorder.sites.values()  # one place: the warn call inside synchronising_call
    assert (site.in_step, site.around_step) == (2, 2)
    assert site.origin.endswith(
        '`warnings.warn("called a synchronizing CUDA operation (Triggered internally)", UserWarning, stacklevel=1)`'
    )


def test_in_error_mode_the_first_synchronisation_inside_a_step_stops_the_run():
    step_sync = load_step_sync()
    recorder = step_sync.StepSyncRecorder("error", cuda=False)
    training = types.SimpleNamespace(DataLoader=DataLoader)
    with step_sync.step_window(training, recorder), step_sync._SynchronisingOperators(recorder):
        torch.ones(2).sum().item()  # before any step: recorded, allowed
        with pytest.raises(RuntimeError, match="inside the training step"):
            for (batch,) in training.DataLoader(TensorDataset(torch.arange(4.0)), batch_size=2):
                batch.sum().item()
    assert recorder.in_step_count == 1 and recorder.steps == 1
    with pytest.raises(ValueError, match="mode must be 'warn' or 'error'"):
        step_sync.StepSyncRecorder("default", cuda=False)


def test_each_site_is_named_by_its_line_in_the_training_script_and_the_line_that_read_the_device():
    step_sync = load_step_sync()
    frames = [
        step_sync.traceback.FrameSummary(str(ROOT / "examples" / "pretrain.py"), 700, "main", line="scaler.step(opt)"),
        step_sync.traceback.FrameSummary(
            "/venv/lib/python3.12/site-packages/torch/amp/grad_scaler.py", 371, "_maybe_opt_step", line="v.item()"
        ),
        step_sync.traceback.FrameSummary("/venv/lib/python3.12/site-packages/torch/_ops.py", 10, "f", line="x"),
    ]
    assert step_sync.where(frames) == (
        "examples/pretrain.py:700 `scaler.step(opt)`",
        "torch/amp/grad_scaler.py:371 `v.item()`",
    )
    assert step_sync.where(frames[1:2]) == ("-", "torch/amp/grad_scaler.py:371 `v.item()`")
