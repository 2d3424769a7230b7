"""The GPU run: the CUDA tests, each fill against the device's copy bandwidth, the cost of masking in a MoCo v2
step, and a short pretraining whose steps are checked for host synchronisation, in one command.

    python benchmarks/gpu.py                                             # on a CUDA device, about 7 min
    python benchmarks/gpu.py --device cpu --quick --results /tmp/check   # the same sections on a CPU, ~1 min

Sections, in this order, each in a process of its own:

1. ``tests``: ``pytest -m cuda`` over the test files that hold CUDA-marked tests; each test's outcome.
2. ``fills``: each fill (mean, constant, noise, blur, high-pass with the release's mix of mask types, the
   high-pass hard negative) on a 256 x 3 x 224 x 224 batch in float32 and bfloat16, as a fraction of the
   bandwidth of a device-to-device copy of the same batch timed in the same rounds (target: mean, constant
   and noise at >= 50 %), with torchvision's ``RandomErasing`` and ``gaussian_blur`` beside them; kernels
   per batch counted by ``torch.profiler`` (CUPTI's device activity), ATen operators by a dispatch mode,
   and whether a call synchronises (``torch.cuda.set_sync_debug_mode("error")``).
3. ``moco_step``: one MoCo v2 ResNet-50 step (batch 128, AMP with its gradient scaler, channels_last, queue
   65 536, SGD), views moved from pinned host memory, with no masking, masking, masking with hard
   negatives, from the saliency cache (the cached maps moved with the views) and with SCDA at 112 and
   224 px; ratios to the step without masking timed beside it (targets: masking <= 1 % of the step, the
   recipe with cached or 112 px saliency <= +40 %; the paper reports +64 %).
4. ``pretrain``: ``examples/pretrain.py`` on its built-in synthetic data on the device for a few hundred
   steps, its training step under CUDA's sync debug mode (``benchmarks/step_sync.py``).

Each section writes ``<results>/gpu_<section>.md`` (``benchmarks/results`` unless ``--results`` or
``SALMASK_BENCHMARK_RESULTS`` names another folder) as soon as it has numbers, and again as they grow;
``gpu_summary.md`` names the machine (GPU, driver, CUDA, torch) and each section's status, and
``gpu_run.json`` holds every number. A section that fails or runs out of time is recorded as such and the
next one runs. ``--budget-s`` bounds the whole run: a section that no longer fits is recorded as skipped.
``python benchmarks/report.py`` puts the sections into ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS_DIR,
    OperatorCounter,
    machine_description,
    markdown_table,
    median_ratio,
    time_block,
    time_interleaved,
    write_report,
)

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent

SECTIONS = ("tests", "fills", "moco_step", "pretrain")
TITLES = {
    "summary": "GPU run: summary",
    "tests": "GPU run: the CUDA tests",
    "fills": "GPU run: fills against the copy bandwidth",
    "moco_step": "GPU run: one MoCo v2 step",
    "pretrain": "GPU run: pretraining with the step under sync debug mode",
}
# Seconds a section needs to be worth starting, and the most it may take, at full size (--quick: a quarter).
MINIMUM_S = {"tests": 45, "fills": 30, "moco_step": 60, "pretrain": 45}
LIMIT_S = {"tests": 180, "fills": 120, "moco_step": 180, "pretrain": 180}
# Kept back from the budget for the summary after the last section.
RESERVE_S = 5.0
# The fills of masking.py's configurations timed here, the first three against the >= 50 % target.
FILLS = ("mean", "constant", "noise", "blur", "high-pass (release mix)", "hard negative (high-pass)")
BANDWIDTH_TARGET = {"mean", "constant", "noise"}
PACKAGES = ("torch", "torchvision", "numpy", "timm", "PyYAML", "tqdm", "pytest", "hypothesis", "scipy")


def settings(device: torch.device, quick: bool) -> dict[str, Any]:
    """Sizes and repeats: the issue's sizes on a GPU, small ones for --quick and on a CPU (a check of the script)."""
    if device.type == "cuda":
        return {
            "fill_batch": 64 if quick else 256,
            "image_size": 224,
            "fill_rounds": 5 if quick else 15,
            "fill_inner": 3 if quick else 10,
            "moco_arch": "resnet50",
            "moco_batch": 32 if quick else 128,
            "moco_size": 224,
            "moco_queue": 65536,
            "moco_rounds": 2 if quick else 7,
            "moco_inner": 1 if quick else 3,
            "pretrain": {"train": 512, "val": 256, "batch": 64, "epochs": 2, "workers": 2}
            if quick
            else {"train": 4096, "val": 512, "batch": 64, "epochs": 5, "workers": 4},
        }
    return {
        "fill_batch": 4,
        "image_size": 64,
        "fill_rounds": 2 if quick else 5,
        "fill_inner": 1,
        "moco_arch": "resnet18",
        "moco_batch": 4,
        "moco_size": 64,
        "moco_queue": 256,
        "moco_rounds": 1 if quick else 3,
        "moco_inner": 1,
        "pretrain": {"train": 64, "val": 32, "batch": 16, "epochs": 1, "workers": 0},
    }


class Section:
    """What a section's process shares with its code: the settings, the time left, and its report so far."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.device = torch.device(args.device)
        self.quick = args.quick
        self.settings = settings(self.device, args.quick)
        self.deadline = args.deadline
        self.workdir = Path(args.workdir)
        self.command = args.command
        self.sync_debug_mode = args.sync_debug_mode
        self.parts: list[str] = []
        self.data: dict[str, Any] = {}
        self.headline = ""

    def time_left(self) -> float:
        return self.deadline - time.time()

    def write(self) -> None:
        write_report(f"gpu_{self.name}", TITLES[self.name], self.command, self.device, self.parts)

    def save_state(self, status: str, error: str | None = None) -> None:
        state = {"status": status, "headline": self.headline, "error": error, "data": self.data}
        (self.workdir / f"{self.name}.json").write_text(json.dumps(state, indent=1, default=str))


# --- 1. the CUDA tests -----------------------------------------------------------------------------------


# A test marked ``cuda`` by a decorator, or a module marked whole.
CUDA_MARK = re.compile(r"^\s*(@pytest\.mark\.cuda\b|pytestmark\s*=.*\bpytest\.mark\.cuda\b)", re.MULTILINE)


def cuda_test_files() -> list[str]:
    """The test files that hold CUDA-marked tests, relative to the repository root."""
    files = [path for path in sorted((ROOT / "tests").rglob("test_*.py")) if CUDA_MARK.search(path.read_text())]
    return [str(path.relative_to(ROOT)) for path in files]


def junit_outcomes(path: Path) -> list[dict[str, Any]]:
    """Each test case of a JUnit XML report: id, outcome, seconds, message."""
    outcomes = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (element.get("message") or element.text or "").strip().splitlines()[0:1]
                message = message[0][:200] if message else ""
                break
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcomes.append(
            {"test": test_id, "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message}
        )
    return outcomes


def section_tests(section: Section) -> None:
    files = cuda_test_files()
    report = section.workdir / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "--tb=short", "-p", "no:cacheprovider"]
    command.append(f"--junitxml={report}")
    command += files
    section.parts = [
        "## CUDA-marked tests\n\n"
        f"`python -m pytest -m cuda -p no:cacheprovider {' '.join(files)}`: the outcome of each test, from "
        "pytest's JUnit report."
    ]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    timeout = max(section.time_left(), 1.0)
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout, check=False
        )
        exit_code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        exit_code = None
        output = (error.stdout or b"").decode(errors="replace") if isinstance(error.stdout, bytes) else error.stdout
    print(output[-3000:] if output else "", flush=True)
    outcomes = junit_outcomes(report) if report.is_file() else []
    counts = collections.Counter(outcome["outcome"] for outcome in outcomes)
    section.data = {"exit_code": exit_code, "files": files, "counts": dict(counts), "tests": outcomes}
    summary = ", ".join(f"{counts[key]} {key}" for key in ("passed", "failed", "error", "skipped") if counts[key])
    section.headline = f"{summary or 'no test ran'} (pytest exit code {exit_code})"
    if exit_code is None:
        section.headline = f"timed out after {timeout:.0f} s; " + section.headline
    rows = [[o["test"], o["outcome"], f"{o['seconds']:.2f}", o["message"].replace("|", "/")] for o in outcomes]
    section.parts.append(f"{section.headline}.\n\n" + markdown_table(["test", "outcome", "s", "message"], rows))
    if not outcomes or exit_code not in (0, 5):
        # Enough of pytest's report to fix a failure without running it again.
        tail = "\n".join((output or "").splitlines()[-200:])
        section.parts.append(f"pytest's last lines:\n\n```\n{tail}\n```")
    section.write()
    if exit_code not in (0, 5) or not outcomes:
        raise RuntimeError(f"the CUDA tests did not all pass: {section.headline}")


# --- 2. fills against the copy bandwidth -----------------------------------------------------------------

# Runtime calls that make the host wait for the device, as the profiler names them.
SYNCHRONISING_CALLS = frozenset(
    {"cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D"}
)
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaGraphLaunch")


def _profiled_counts(function: Callable[[], object]) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        function()
        torch.cuda.synchronize()
    counts = {"kernels": 0, "copies": 0, "kernel_ms": 0.0, "launches": 0, "synchronising_calls": 0}
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            if event.name.startswith(("Memcpy", "Memset")):
                counts["copies"] += 1
            else:
                counts["kernels"] += 1
                counts["kernel_ms"] += event.time_range.elapsed_us() / 1e3
        elif event.name.startswith(LAUNCH_CALLS):
            counts["launches"] += 1
        elif event.name in SYNCHRONISING_CALLS:
            counts["synchronising_calls"] += 1
    return counts


def device_activity(function: Callable[[], object], device: torch.device) -> dict[str, Any]:
    """Per call: ATen operators (dispatch mode) and, on a GPU, kernels, copies, launches and synchronising
    runtime calls seen by ``torch.profiler``, less those of profiling an empty call."""
    with OperatorCounter() as counter:
        function()
    activity: dict[str, Any] = {"operators": counter.count}
    if device.type == "cuda":
        empty = _profiled_counts(lambda: None)
        counts = _profiled_counts(function)
        activity.update({key: counts[key] - (0 if key == "kernel_ms" else empty[key]) for key in counts})
    return activity


def synchronises(function: Callable[[], object], device: torch.device) -> str:
    """'no' when a call runs under ``torch.cuda.set_sync_debug_mode("error")``, else where it synchronised."""
    if device.type != "cuda":
        return "n/a"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        function()
    except RuntimeError as error:
        if "synchroniz" not in str(error):
            raise
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "salmask" in f.filename]
        place = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "in torch"
        return f"yes ({place})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "no"


def fill_calls(images: torch.Tensor, saliency: Any, patch_size: int) -> dict[str, Callable[[], object]]:
    """Each fill of ``FILLS`` as a call on the batch, then the references: torchvision's RandomErasing and
    gaussian_blur, and salmask's own blur and high-pass filter."""
    from masking import build, strategies
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    from salmask.functional import gaussian_blur, high_pass

    configurations = strategies()
    calls: dict[str, Callable[[], object]] = {}
    for name in FILLS:
        transform = build(configurations[name], check_values=False, patch_size=patch_size)
        calls[name] = lambda transform=transform: transform(images, saliency)
    erasing = v2.RandomErasing(p=1.0, value=0)
    calls["torchvision RandomErasing (one box per batch)"] = lambda: erasing(images)
    calls["torchvision gaussian_blur, kernel 31"] = lambda: TF.gaussian_blur(images, [31, 31], [10.0, 10.0])
    calls["salmask gaussian_blur, kernel 31"] = lambda: gaussian_blur(images, 31, 10.0)
    calls["torchvision gaussian_blur, kernel 11"] = lambda: TF.gaussian_blur(images, [11, 11], [5.0, 5.0])
    calls["salmask high_pass, kernel 11"] = lambda: high_pass(images, 11, 5.0)
    return calls


def fill_row(
    section: Section,
    label: str,
    call: Callable[[], object],
    copy: Callable[[], object],
    bytes_moved: int,
    results: dict[str, Any],
) -> list[object]:
    """One call's row of the fills table (its numbers also go to ``results``); an error fills the row instead."""
    device, config = section.device, section.settings
    if section.time_left() < 10:
        return [label, "skipped: time budget", *["-"] * 9]
    try:
        call()
        # Calls of a few ms and more (torchvision's 2-D blur kernels) are timed one at a time.
        inner = config["fill_inner"] if time_block(call, device) < 2.0 else 1
        samples = time_interleaved({"copy": copy, "call": call}, device, config["fill_rounds"], warmup=1, inner=inner)
    except Exception as error:  # one failing call must not cost the others their numbers
        results["calls"][label] = {"error": repr(error)}
        return [label, f"error: {type(error).__name__}: {str(error)[:120]}", *["-"] * 9]
    fraction = median_ratio(samples["copy"], samples["call"])
    call_ms = statistics.median(samples["call"])
    try:
        activity = device_activity(call, device)
    except Exception as error:
        activity = {"operators": "-", "activity_error": repr(error)}
    try:
        synced = synchronises(call, device)
    except Exception as error:
        synced = f"error: {type(error).__name__}"
    if "synchronising_calls" in activity:
        synced += f" ({activity['synchronising_calls']} sync calls)"
    target = "-"
    if label in BANDWIDTH_TARGET:
        target = "met" if fraction >= 0.5 else "missed"
    results["calls"][label] = {"ms": call_ms, "fraction_of_copy": fraction, **activity, "syncs": synced}
    return [
        label,
        f"{call_ms:.3f}",
        f"{fraction:.0%}",
        f"{bytes_moved / call_ms / 1e6:.0f}",
        activity.get("kernels", "-"),
        activity.get("launches", "-"),
        activity.get("copies", "-"),
        f"{activity['kernel_ms']:.3f}" if "kernel_ms" in activity else "-",
        activity["operators"],
        synced,
        target,
    ]


def section_fills(section: Section) -> None:
    from salmask import Saliency

    device, config = section.device, section.settings
    batch, size = config["fill_batch"], config["image_size"]
    section.parts = [
        f"## Fills on a batch of {batch} x 3 x {size} x {size}\n\n"
        "Each call is a whole out-of-place transform (drawing each image's masks on the device and filling "
        "them), saliency on the 7 x 7 grid, `check_values=False`. The floor is a device-to-device `copy_` of "
        "the same batch into a preallocated one; each call is timed in the same rounds as the floor "
        f"({config['fill_rounds']} rounds of {config['fill_inner']} back-to-back calls, order rotating, CUDA "
        "events on a GPU), and `of copy bandwidth` is the median per-round ratio copy time / call time: a "
        "call that reads the batch once and writes it once at the copy's speed scores 100 %. Target: mean, "
        "constant and noise >= 50 %. Per call: kernels and copies (memcpy/memset) run on the device, kernel "
        "launches, and the kernels' summed device time (`kernel ms`), from `torch.profiler` (CPU and CUDA "
        "activities), less what profiling an empty call shows; ATen operators from a dispatch mode; `syncs`: "
        '`no` when the call runs under `torch.cuda.set_sync_debug_mode("error")`, with the synchronising '
        "runtime calls the profiler saw."
    ]
    section.data = {"batch": batch, "size": size, "dtypes": {}}
    misses = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        images = torch.randn(batch, 3, size, size, device=device).to(dtype)
        saliency = Saliency(torch.rand(batch, 7, 7, device=device) < 0.45)
        destination = torch.empty_like(images)
        bytes_moved = 2 * images.numel() * images.element_size()

        def copy(destination=destination, images=images) -> object:
            return destination.copy_(images)

        floor = time_interleaved({"copy": copy}, device, config["fill_rounds"], warmup=2, inner=config["fill_inner"])
        copy_ms = statistics.median(floor["copy"])
        rows: list[list[object]] = []
        results: dict[str, Any] = {"copy_ms": copy_ms, "copy_gb_per_s": bytes_moved / copy_ms / 1e6, "calls": {}}
        section.data["dtypes"][name] = results
        heading = (
            f"### {name}\n\nFloor: `copy_` of the batch on the device, {copy_ms:.3f} ms, "
            f"{bytes_moved / copy_ms / 1e6:.0f} GB/s (bytes read + written)."
        )
        part = len(section.parts)
        section.parts.append(heading)
        header = ["call", "ms", "of copy bandwidth", "GB/s", "kernels", "launches", "copies", "kernel ms", "ATen ops"]
        for label, call in fill_calls(images, saliency, max(1, size // 7)).items():
            row = fill_row(section, label, call, copy, bytes_moved, results)
            if label in BANDWIDTH_TARGET and row[-1] == "missed":
                misses.append(f"{label} {name} {row[2]}")
            rows.append(row)
            print(f"{name}: " + " | ".join(map(str, row)), flush=True)
            table = markdown_table([*header, "syncs", "target >= 50 %"], rows)
            section.parts[part] = f"{heading}\n\n{table}"
            section.write()
        del images, destination
    counted = [
        call["fraction_of_copy"]
        for results in section.data["dtypes"].values()
        for label, call in results["calls"].items()
        if label in BANDWIDTH_TARGET and "fraction_of_copy" in call
    ]
    section.headline = (
        f"mean/constant/noise at {min(counted):.0%}-{max(counted):.0%} of the copy bandwidth"
        + (f"; missed: {', '.join(misses)}" if misses else "; target met")
        if counted
        else "no fill timed"
    )
    section.write()


# --- 3. one MoCo v2 step ---------------------------------------------------------------------------------


def moco_variants(config: dict[str, Any], device: torch.device) -> dict[str, tuple[Any, str]]:
    """Each variant's ``MaskedViews`` and where its saliency comes from: 'given' (the 7 x 7 grid already on the
    device), 'cache' (full-resolution maps moved from host memory with the views) or 'scda' (computed)."""
    from salmask.saliency import SCDA, build_backbone
    from salmask.ssl import MaskedViews

    size = config["moco_size"]
    patch = max(1, size // 7)
    variants: dict[str, tuple[Any, str]] = {"no masking": (MaskedViews("none"), "none")}
    for fill in ("high_pass", "blur", "mean"):
        variants[f"masking ({fill})"] = (MaskedViews(fill, hard_negatives=False, patch_size=patch), "given")
    variants["masking + hard negatives"] = (MaskedViews("high_pass", patch_size=patch), "given")
    variants["masking + hard negatives, saliency cache"] = (MaskedViews("high_pass", patch_size=patch), "cache")
    for input_size in (size // 2, size):
        scda = SCDA(build_backbone("resnet50", weights=None), input_size=input_size, output_size=7)
        masker = MaskedViews("high_pass", scda=scda, patch_size=patch).to(device)
        variants[f"masking + hard negatives, SCDA ResNet-50 at {input_size} px"] = (masker, "scda")
    return variants


def moco_target(name: str, added: float, share: float, size: int) -> str:
    if name.startswith("masking ("):
        return f"{'met' if share <= 0.01 else 'missed'} (masking <= 1 % of the step)"
    if name.endswith("saliency cache") or name.endswith(f"at {size // 2} px"):
        return f"{'met' if added <= 0.40 else 'missed'} (<= +40 %)"
    if "SCDA" in name:
        return f"paper: +64 % ({added / 0.64:.2f} of it)"
    return "-"


def section_moco_step(section: Section) -> None:
    from salmask.ssl import MoCo, build_encoder

    device, config = section.device, section.settings
    batch, size, inner = config["moco_batch"], config["moco_size"], config["moco_inner"]
    on_gpu = device.type == "cuda"
    amp = channels_last = on_gpu
    torch.manual_seed(0)
    model = MoCo(build_encoder(config["moco_arch"]), queue_size=config["moco_queue"]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.015, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    host_query, host_key = (torch.randn(batch, 3, size, size) for _ in range(2))
    grid = torch.rand(batch, 7, 7, device=device) < 0.45
    host_maps = [torch.rand(batch, size, size) < 0.45 for _ in range(2)]
    if on_gpu:
        host_query, host_key = host_query.pin_memory(), host_key.pin_memory()
        host_maps = [saliency.pin_memory() for saliency in host_maps]

    # The views a step starts from are in host memory; the masking call alone is timed on views already moved.
    device_query, device_key = host_query.to(device), host_key.to(device)

    def saliency_of(route: str) -> tuple[Any, Any]:
        if route == "given":
            return grid, grid
        if route == "cache":  # the cached maps travel with the views: their copy is the route's own cost
            query_map, key_map = (saliency.to(device, non_blocking=True) for saliency in host_maps)
            return query_map, key_map
        return None, None

    def make_views(masker: Any, route: str) -> Callable[[], Any]:
        def views() -> Any:
            with torch.no_grad():
                return masker(device_query, device_key, *saliency_of(route))

        return views

    def make_step(masker: Any, route: str) -> Callable[[], None]:
        def step() -> None:
            query, key = (view.to(device, non_blocking=True) for view in (host_query, host_key))
            with torch.no_grad():
                views = masker(query, key, *saliency_of(route))
            tensors = [views.query, views.key, views.hard_negatives]
            if channels_last:
                tensors = [x if x is None else x.contiguous(memory_format=torch.channels_last) for x in tensors]
            with torch.autocast(device.type, enabled=amp):
                output = model(*tensors, views.hard_negative_valid)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(output.loss).backward()
            scaler.step(optimizer)
            scaler.update()

        return step

    variants = moco_variants(config, device)
    baseline = make_step(*variants.pop("no masking"))
    steps = {name: make_step(*variant) for name, variant in variants.items()}
    views = {name: make_views(*variant) for name, variant in variants.items()}
    section.parts = [
        f"## MoCo v2 {config['moco_arch']}, batch {batch} x {size} px, queue {config['moco_queue']}\n\n"
        f"AMP ({'float16 autocast with its gradient scaler' if amp else 'off on the CPU'}), channels_last "
        f"{'on' if channels_last else 'off'}, SGD; every step moves its query and key views from "
        f"{'pinned ' if on_gpu else ''}host memory, masks them under `torch.no_grad` (`MaskedViews`, as "
        "`examples/pretrain.py` does), runs MoCo (query forward and backward, key forward, hard negatives "
        "through the key encoder when made) and the optimizer step. Saliency: given on the 7 x 7 grid on the "
        "device; from the cache: full-resolution boolean maps in host memory moved with the views; or SCDA "
        "(ResNet-50, random weights: the cost does not depend on them) on query and key views at the input "
        f"size named. In each round every variant's step is timed back to back with a step without masking "
        f"and with its `MaskedViews` call alone on views already on the {device.type} (the cached maps still "
        f"moved), {inner} back-to-back calls per sample, order alternating; "
        "`added` is the median per-round ratio to that step minus one, `share` the `MaskedViews` call over "
        "it. Targets: masking <= 1 % of the step; the recipe with cached or 112 px saliency <= +40 %."
    ]
    for call in [baseline, *steps.values(), *views.values()]:  # warm-up: cuDNN's choices, the allocator
        call()
        call()
    times: dict[str, dict[str, list[float]]] = {name: {"base": [], "step": [], "views": []} for name in steps}
    names = list(steps)
    rounds_done = 0
    for round_ in range(config["moco_rounds"]):
        if section.time_left() < 20:
            break
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            order = [("base", baseline), ("step", steps[name]), ("views", views[name])]
            for kind, call in order if round_ % 2 == 0 else order[::-1]:
                times[name][kind].append(time_block(call, device, inner))
        rounds_done += 1
        section.data = {"rounds": rounds_done, "variants": {}}
        rows = []
        base_ms = statistics.median(value for entry in times.values() for value in entry["base"])
        rows.append(["no masking", f"{base_ms:.1f}", "-", "-", "-"])
        for name, entry in times.items():
            added = median_ratio(entry["step"], entry["base"]) - 1.0
            share = median_ratio(entry["views"], entry["base"])
            view_ms = statistics.median(entry["views"])
            target = moco_target(name, added, share, size)
            section.data["variants"][name] = {
                "step_ms": statistics.median(entry["step"]), "added": added, "views_ms": view_ms, "share": share,
                "target": target,
            }  # fmt: skip
            rows.append(
                [
                    name,
                    f"{statistics.median(entry['step']):.1f}",
                    f"{added:+.1%}",
                    f"{view_ms:.2f} ({share:.1%})",
                    target,
                ]
            )
        section.data["baseline_ms"] = base_ms
        table = markdown_table(["step", "ms (median)", "added", "MaskedViews call alone: ms (share)", "target"], rows)
        section.parts[1:] = [f"{rounds_done} of {config['moco_rounds']} rounds.\n\n{table}"]
        section.write()
        print(f"round {rounds_done}:\n{table}", flush=True)
    if not rounds_done:
        raise RuntimeError("no round fitted in the time left")
    missed = [name for name, value in section.data["variants"].items() if value["target"].startswith("missed")]
    section.headline = f"step without masking {section.data['baseline_ms']:.1f} ms; " + (
        f"missed: {'; '.join(missed)}" if missed else "targets met"
    )


# --- 4. pretraining with the step under sync debug mode --------------------------------------------------


def pretraining_runs(section: Section) -> dict[str, tuple[list[str], int]]:
    """The runs of the section: pretrain.py as it trains on the device (AMP on with CUDA) and, on a GPU, once
    more without AMP, whose gradient scaler is then off: what the step costs the host apart from it."""
    epochs = section.settings["pretrain"]["epochs"]
    if section.device.type != "cuda":
        return {"as configured": ([], epochs)}
    return {"AMP (the default on CUDA)": ([], epochs), "without AMP (--no-amp)": (["--no-amp"], max(1, epochs // 2))}


def run_pretraining(section: Section, label: str, extra: list[str], epochs: int, index: int) -> dict[str, Any]:
    """One pretraining through step_sync.py; its table and sites appended to the section."""
    config = section.settings["pretrain"]
    output_dir = section.workdir / f"pretrain_{index}"
    report_path = section.workdir / f"step_sync_{index}.json"
    pretrain_argv = [
        "--device", section.device.type, "--output-dir", str(output_dir),
        "--train-images", str(config["train"]), "--val-images", str(config["val"]),
        # The masking step the ablation runs, with hard negatives: filter, noise fill, three mask types.
        "--strategy", "high_pass",
        "--batch-size", str(config["batch"]), "--epochs", str(epochs), "--warmup-epochs", str(min(1, epochs - 1)),
        "--workers", str(config["workers"]), "--log-every", "10", "--knn-every", "0", *extra,
    ]  # fmt: skip
    command = [sys.executable, str(BENCHMARKS / "step_sync.py"), "--mode", section.sync_debug_mode]
    command += ["--report", str(report_path), "--", *pretrain_argv]
    shown = shlex.join(["python", "benchmarks/step_sync.py", *command[2:]]).replace(str(section.workdir), "$WORK")
    section.parts.append(f"### {label}\n\n`{shown}`")
    section.write()
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.time()
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=max(section.time_left(), 1.0)
        )
        exit_code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        exit_code = None
        output = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
    seconds = time.time() - started
    print("\n".join(output.splitlines()[-25:]), flush=True)
    if not report_path.is_file():
        tail = "\n".join(output.splitlines()[-60:])
        section.parts.append(f"No report (exit code {exit_code}, {seconds:.0f} s). Last lines:\n\n```\n{tail}\n```")
        section.write()
        return {"label": label, "exit": exit_code, "error": "no report", "steps": 0}
    report = json.loads(report_path.read_text())
    speeds = []
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        speeds = [record["images_per_s"] for record in records if "images_per_s" in record]
    knn = next((line.split("; checkpoint")[0] for line in report["output"] if line.startswith("kNN top-1")), "-")
    steps, around = max(report["steps"], 1), report["around_step"]
    rows = [
        ["steps watched", report["steps"]],
        ["exit", report["exit"] if report["error"] is None else f"{report['exit']} ({report['error']})"],
        ["seconds (whole run)", report["seconds"]],
        ["images/s (last record)", f"{speeds[-1]:.0f}" if speeds else "-"],
        ["kNN monitor", knn],
        ["detector", report["detector"]],
        ["synchronising calls inside the steps", report["in_step"]],
        ["synchronising calls around them (per step)", f"{around} ({around / steps:.2f})"],
        ["step free of host synchronisation", "yes" if report["step_free_of_synchronisation"] else "no"],
    ]  # fmt: skip
    section.parts.append(markdown_table(["measure", "value"], rows))
    sites = [
        [site["in_step"], site["around_step"], site["loop"].replace("|", "\\|"), site["origin"].replace("|", "\\|")]
        for site in report["sites"]
    ]
    if sites:
        section.parts.append(
            "Where they came from:\n\n" + markdown_table(["in steps", "around", "pretrain.py", "made by"], sites)
        )
    if "traceback" in report:
        section.parts.append(f"The run stopped:\n\n```\n{report['traceback']}\n```")
    section.write()
    return {**report, "label": label, "knn": knn, "images_per_s": speeds[-1] if speeds else None}


def section_pretrain(section: Section) -> None:
    section.parts = [
        "## `examples/pretrain.py` on its synthetic data\n\n"
        "The step (from the training loader's hand-over of a batch to `GradScaler.update()`: moving the "
        "views, masking, forward, backward, optimizer step) runs under "
        f'`torch.cuda.set_sync_debug_mode("{section.sync_debug_mode}")`, the rest of the loop under '
        '`"warn"`; every synchronising call is recorded with the line of `pretrain.py` it came from and the '
        "innermost line that made it (`benchmarks/step_sync.py`). On a GPU the run is made twice: as "
        "`pretrain.py` trains there (float16 AMP, whose gradient scaler decides on the host whether to "
        "step), and without AMP. On a CPU a dispatch mode stands in for the sync debug mode and also records "
        "the CPU-only paths (the fills read their mask counts there): only a GPU run says whether the step "
        "synchronises."
    ]
    section.data = {"runs": []}
    for index, (label, (extra, epochs)) in enumerate(pretraining_runs(section).items()):
        if index and section.time_left() < 30:
            section.parts.append(f"### {label}\n\nSkipped: {section.time_left():.0f} s left.")
            continue
        run = run_pretraining(section, label, extra, epochs, index)
        section.data["runs"].append(run)
        section.save_state("running")
    described = [
        f"{run['label']}: {run['steps']} steps, {run.get('in_step', '?')} synchronising calls inside them"
        for run in section.data["runs"]
    ]
    first = section.data["runs"][0]
    section.headline = "; ".join(described) + f" ({first.get('detector', '-')}); {first.get('knn', '-')}"
    section.write()
    failed = [run["label"] for run in section.data["runs"] if run.get("exit") != 0 or not run.get("steps")]
    if failed:
        raise RuntimeError(f"the pretraining did not finish: {', '.join(failed)}")


SECTION_CODE: dict[str, Callable[[Section], None]] = {
    "tests": section_tests,
    "fills": section_fills,
    "moco_step": section_moco_step,
    "pretrain": section_pretrain,
}


def run_section(args: argparse.Namespace) -> int:
    """Child process: one section; its report and state are written however it ends."""
    section = Section(args.section, args)
    try:
        SECTION_CODE[args.section](section)
    except Exception as error:
        message = "".join(traceback.format_exception(error))[-3000:]
        section.parts.append(f"**Stopped by an error:**\n\n```\n{message}\n```")
        with contextlib.suppress(Exception):
            section.write()
        section.save_state("failed", f"{type(error).__name__}: {error}")
        print(message, file=sys.stderr, flush=True)
        return 1
    section.write()
    section.save_state("ok")
    return 0


# --- the run: sections in processes of their own, within the budget --------------------------------------


def _versions() -> str:
    found = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package} missing")
    import salmask

    return ", ".join(found) + f"; salmask from {Path(salmask.__file__).parent}"


def _stop(process: subprocess.Popen) -> None:
    """End a section's process group (its pytest or pretraining children too): SIGTERM, then SIGKILL."""
    for sent in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sent)
        try:
            process.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def spawn_section(
    name: str, args: argparse.Namespace, workdir: Path, timeout: float, command: str
) -> tuple[str, float]:
    """Run one section in a process of its own, its output passed through; (status, seconds)."""
    child = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--device", args.device]
    child += ["--deadline", str(time.time() + timeout - 5), "--workdir", str(workdir), "--command", command]
    child += ["--sync-debug-mode", args.sync_debug_mode] + (["--quick"] if args.quick else [])
    environment = {
        **os.environ,
        "SALMASK_BENCHMARK_RESULTS": str(args.results),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    started = time.time()
    process = subprocess.Popen(
        child, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def relay() -> None:
        for line in process.stdout:
            tail.append(line.rstrip())
            print(f"[{name}] {line}", end="", flush=True)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout)
        status = "ok" if code == 0 else f"failed (exit code {code})"
    except subprocess.TimeoutExpired:
        _stop(process)
        status = f"timed out after {timeout:.0f} s"
    reader.join(timeout=5)
    state_path = workdir / f"{name}.json"
    if status.startswith("timed out") or not state_path.is_file():
        # The section could not say how it ended: say it for it, keeping what it wrote.
        state = {"status": status, "headline": "", "error": "\n".join(tail), "data": {}}
        if state_path.is_file():
            state = {**json.loads(state_path.read_text()), "status": status}
        state_path.write_text(json.dumps(state, indent=1))
    report = args.results / f"gpu_{name}.md"
    if status != "ok" and (status.startswith("timed out") or not report.is_file()):
        note = f"\n**{status}**; the last lines it printed:\n\n```\n" + "\n".join(tail) + "\n```\n"
        if report.is_file():
            report.write_text(report.read_text() + note)
        else:
            write_report(f"gpu_{name}", TITLES[name], command, torch.device("cpu"), [note], args.results)
    return status, time.time() - started


def write_summary(args: argparse.Namespace, command: str, machine: str, statuses: dict[str, dict[str, Any]]) -> None:
    rows = [
        [
            name,
            entry["status"],
            f"{entry['seconds']:.0f}" if entry.get("seconds") is not None else "-",
            entry["headline"],
        ]
        for name, entry in statuses.items()
    ]
    body = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine}",
        "",
        f"Packages: {_versions()}",
        "",
        f"Budget {args.budget_s:.0f} s{', quick sizes' if args.quick else ''}. Sections, in the order run "
        "(each writes its own file, `gpu_<section>.md`):",
        "",
        markdown_table(["section", "status", "s", "result"], rows),
        "",
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "gpu_summary.md"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(f"# {TITLES['summary']}\n\n" + "\n".join(body))
    partial.replace(path)
    states = {name: entry for name, entry in statuses.items()}
    run = {"command": command, "machine": machine, "budget_s": args.budget_s, "quick": args.quick, "sections": states}
    (args.results / "gpu_run.json").write_text(json.dumps(run, indent=1, default=str))


def recorded_command(argv: list[str]) -> str:
    """The command as the reports show it: where the files went (``--results``) is not how they were made."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--results":
            skip = True
        elif not argument.startswith("--results="):
            kept.append(argument)
    return shlex.join(["python", "benchmarks/gpu.py", *kept])


def run_all(args: argparse.Namespace) -> int:
    started = time.time()
    deadline = started + args.budget_s
    device = torch.device(args.device)
    command = recorded_command(sys.argv[1:])
    if device.type == "cuda" and not torch.cuda.is_available():
        machine = machine_description(torch.device("cpu"))
        statuses = {name: {"status": "not run: torch sees no CUDA device", "headline": ""} for name in args.sections}
        write_summary(args, command, machine, statuses)
        print("torch sees no CUDA device; nothing was run", file=sys.stderr)
        return 2
    machine = machine_description(device)
    print(f"Machine: {machine}\nPackages: {_versions()}", flush=True)
    statuses: dict[str, dict[str, Any]] = {
        name: {"status": "waiting", "headline": "", "seconds": None} for name in args.sections
    }
    write_summary(args, command, machine, statuses)
    scale = 0.25 if args.quick or device.type != "cuda" else 1.0
    workdir = Path(tempfile.mkdtemp(prefix="salmask-gpu-"))
    try:
        for name in args.sections:
            left = deadline - time.time() - RESERVE_S
            if left < MINIMUM_S[name] * scale:
                statuses[name] = {"status": f"skipped: {max(left, 0):.0f} s of the budget left", "headline": ""}
            else:
                print(f"== {name} ({min(left, LIMIT_S[name]):.0f} s at most)", flush=True)
                status, seconds = spawn_section(name, args, workdir, min(left, LIMIT_S[name]), command)
                state_path = workdir / f"{name}.json"
                state = json.loads(state_path.read_text()) if state_path.is_file() else {}
                statuses[name] = {**state, "status": status, "seconds": seconds, "headline": state.get("headline", "")}
            write_summary(args, command, machine, statuses)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total = time.time() - started
    print(f"\nGPU run finished in {total:.0f} s of a {args.budget_s:.0f} s budget; results in {args.results}")
    for name, entry in statuses.items():
        print(f"  {name}: {entry['status']}; {entry['headline']}")
    return 0 if all(entry["status"] == "ok" for entry in statuses.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the script")
    parser.add_argument("--quick", action="store_true", help="small batches and few repeats")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds for the whole run; a section that no longer fits is skipped (default 420)",
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the gpu_*.md files")
    parser.add_argument(
        "--sync-debug-mode",
        choices=("warn", "error"),
        default="warn",
        help="the pretraining step's mode: warn records every synchronising call, error stops at the first",
    )
    # A section's own process (started by the run).
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--command", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    args.results = args.results.resolve()
    if args.section:
        return run_section(args)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
