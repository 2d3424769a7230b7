"""Timing, operator counting and reporting shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import functools
import os
import platform
import shutil
import statistics
import subprocess
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


def time_block(function: Callable[[], object], device: torch.device, inner: int = 1) -> float:
    """Wall time in ms per call of ``inner`` calls of ``function`` run back to back, from an idle device.

    On a GPU the time runs between two CUDA events recorded around the calls after a synchronisation: it
    counts the host's dispatch of the first kernel and any gaps between launches, not the latency of the
    synchronisation that reads it. Elsewhere it is the host clock.
    """
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    started = time.perf_counter()
    for _ in range(inner):
        function()
    return (time.perf_counter() - started) * 1e3 / inner


def time_call(function: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``function`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    return statistics.median(time_block(function, device) for _ in range(repeats))


def time_interleaved(
    calls: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5, warmup: int = 1, inner: int = 1
) -> dict[str, list[float]]:
    """Wall times in ms of each call, ``repeats`` rounds, each round timing every call once.

    The order rotates from round to round, so a machine that slows down during the run (another job
    starting) affects every call alike; compare calls round by round (see :func:`median_ratio`). Each sample
    runs ``inner`` calls back to back (see :func:`time_block`): the steady rate of calls too short to time
    one by one.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    samples: dict[str, list[float]] = {name: [0.0] * repeats for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name][round_] = time_block(calls[name], device, inner)
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


@functools.lru_cache
def gpu_description(device: torch.device) -> str:
    """The GPU, its driver and the CUDA libraries torch uses, for a section's machine line (read once)."""
    properties = torch.cuda.get_device_properties(device)
    driver = None
    if shutil.which("nvidia-smi"):
        index = device.index if device.index is not None else torch.cuda.current_device()
        query = ["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"]
        try:
            driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            driver = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return (
        f"GPU: {properties.name} (compute capability {properties.major}.{properties.minor}, "
        f"{properties.multi_processor_count} multiprocessors, {properties.total_memory / 2**30:.0f} GiB), "
        f"driver {driver or 'unknown'}, CUDA {torch.version.cuda}, cuDNN {cudnn}"
    )


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
        try:
            parts.append(gpu_description(device))
        except (RuntimeError, AssertionError) as error:  # a report of a failed run must still be written
            parts.append(f"GPU {device} not readable: {error}")
    parts.append(f"date: {datetime.date.today().isoformat()}")
    return "; ".join(parts)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    name: str, title: str, command: str, device: torch.device, sections: list[str], results: Path | None = None
) -> Path:
    """Write ``<results>/<name>.md`` with the machine and the command that produced it; ``results`` defaults to
    ``benchmarks/results``, or the folder that ``SALMASK_BENCHMARK_RESULTS`` names."""
    folder = RESULTS_DIR if results is None else Path(results)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.md"
    body = [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine_description(device)}", ""]
    body += [section + "\n" for section in sections]
    # Written whole or not at all: a run stopped mid-write (a time limit) keeps the previous version.
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(body))
    partial.replace(path)
    return path
