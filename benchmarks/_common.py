"""Timing, operator counting and reporting shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The committed results; report.py --quick points the scripts elsewhere through this variable.
RESULTS_DIR = Path(os.environ.get("SALMASK_BENCHMARK_RESULTS") or Path(__file__).resolve().parent / "results")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``function`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_interleaved(
    calls: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times in ms of each call, ``repeats`` rounds, each round timing every call once.

    The order rotates from round to round, so a machine that slows down during the run (another job
    starting) affects every call alike; compare calls round by round (see :func:`median_ratio`).
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    samples: dict[str, list[float]] = {name: [0.0] * repeats for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            samples[name][round_] = (time.perf_counter() - start) * 1e3
    return samples


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round ratio of two interleaved timings."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the ``with`` block: one per kernel launch on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"Python {sys.version.split()[0]}, torch {torch.__version__}",
    ]
    if device.type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(device)}")
    parts.append(f"date: {datetime.date.today().isoformat()}")
    return "; ".join(parts)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(name: str, title: str, command: str, device: torch.device, sections: list[str]) -> Path:
    """Write ``<results>/<name>.md`` (``benchmarks/results`` unless ``SALMASK_BENCHMARK_RESULTS`` names another
    folder) with the machine and the command that produced it."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    body = [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine_description(device)}", ""]
    body += [section + "\n" for section in sections]
    path.write_text("\n".join(body))
    return path
