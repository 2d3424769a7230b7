"""The benchmark scripts' own files: quick runs never overwrite the committed results, and no script
unpickles code from a file."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# Stands in for each timing script: writes its section through the shared report writer, as the real ones do.
_FAKE_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import write_report
print("wrote", write_report(Path(__file__).stem, "Fresh numbers", "fake", torch.device("cpu"), ["quick numbers"]))
"""


def test_a_quick_run_writes_beside_the_committed_results_not_over_them(tmp_path):
    copy = tmp_path / "benchmarks"
    shutil.copytree(BENCHMARKS, copy, ignore=shutil.ignore_patterns("__pycache__", "quick"))
    scripts = {path.name for path in copy.glob("*.py")} - {"report.py", "_common.py"}
    for name in scripts:
        (copy / name).write_text(_FAKE_SCRIPT)
    committed = {path.relative_to(copy): path.read_bytes() for path in copy.rglob("*.md")}
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    environment.pop("SALMASK_BENCHMARK_RESULTS", None)
    result = subprocess.run(
        [sys.executable, str(copy / "report.py"), "--run", "--quick"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for relative, content in committed.items():
        assert (copy / relative).read_bytes() == content, f"{relative} was overwritten by a quick run"
    quick = copy / "quick"
    assert "quick numbers" in (quick / "masking.md").read_text()
    assert "quick numbers" in (quick / "RESULTS.md").read_text()
    assert f"wrote {quick / 'RESULTS.md'}" in result.stdout


def test_no_benchmark_or_example_unpickles_code_and_torch_loads_weights_only_by_default():
    # torch.load unpickles arbitrary objects unless weights_only=True; it is the default from torch 2.6 on.
    minimum = re.search(r'^\s*"torch>=(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert minimum and (int(minimum[1]), int(minimum[2])) >= (2, 6), "the package allows a torch that unpickles code"
    unsafe = []
    for path in [*BENCHMARKS.glob("*.py"), *(ROOT / "examples").glob("*.py"), *(ROOT / "salmask").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                options = {keyword.arg: keyword.value for keyword in node.keywords}
                weights_only = options.get("weights_only")
                if weights_only is not None and not (isinstance(weights_only, ast.Constant) and weights_only.value):
                    unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def _ablation_record(dataset: str, config: str, seed: int, knn: float, untrained: float = 16.0) -> dict:
    return {
        "dataset": dataset, "config": config, "seed": seed, "epochs": 30, "knn": knn, "knn_untrained": untrained,
        "knn_raw_pixels": 18.0, "linear": knn - 2, "pretrain_s": 240.0, "total_s": 300.0, "device": "cpu",
        "threads": 1, "commit": "abc1234", "machine": "CPU: test, 2 logical cores, torch threads 1; date: x",
        "finished": "2026-12-01 00:00:00",
    }  # fmt: skip


def test_the_ablation_report_takes_the_newest_record_of_each_run_and_each_run_s_own_references(tmp_path):
    records = [
        _ablation_record("synthetic", "none", 0, 10.0),
        _ablation_record("synthetic", "none", 0, 30.0),  # the same run again: the newest line counts
        _ablation_record("synthetic", "none", 1, 32.0),
        _ablation_record("synthetic", "high_pass", 0, 16.0, untrained=12.7),
    ]
    (tmp_path / "ablation_runs.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "SALMASK_BENCHMARK_RESULTS": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "ablation.py"), "--report-only"],
        env=environment, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / "ablation.md").read_text()
    assert "| `none` | 31.0 ± 1.4 | 29.0 ± 1.4 | 30.0, 32.0 | 16.0 ± 0.0 | 18.0 ± 0.0 | 2 | 4.0 | abc1234 |" in report
    assert "| `high_pass` | 16.0 | 14.0 | 16.0 | 12.7 | 18.0 | 1 |" in report
    assert "fashion-mnist" not in report, "a data set without records gets no section"
