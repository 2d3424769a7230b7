"""Run ``examples/pretrain.py`` with its training step under CUDA's sync debug mode, and name every host
synchronisation: the ones inside the step and the ones around it.

    python benchmarks/step_sync.py --report sync.json -- --device cuda --epochs 2
    python benchmarks/step_sync.py --mode error -- --device cuda      # stop at the first one in the step

Everything after ``--`` goes to ``pretrain.py``. The step is what the training loop runs for one batch: from
the moment the training loader hands the batch over until ``GradScaler.update()`` returns (moving the views
to the device, masking, forward, backward, the optimizer step, the scaler's update). Inside it
``torch.cuda.set_sync_debug_mode(--mode)`` is on; around it (logging, checkpoints, the kNN monitor) the mode
is ``"warn"``, so that the loop's other synchronisations are named too, and not counted against the step.
With ``--mode warn`` (the default) every synchronising call is recorded with the line of ``pretrain.py`` it
came from and the innermost Python line that made it, and the run goes on: one run names all of them,
where ``"error"`` stops at the first (the check is the same: none may occur inside the step).

``pretrain.py`` is not modified: the step opens in a ``DataLoader`` subclass put in place of the one
``pretrain.py`` builds its training loader with, and closes when ``torch.amp.GradScaler.update`` returns
(or, at the latest, when the next batch is asked for). A run in which no step opened says so instead of
passing.

On a CPU there is no sync debug mode; the operators that make the host wait for a GPU (``.item()``,
``nonzero``, ``masked_select``, ``unique``) are recorded instead by a dispatch mode, a stand-in that lets
the check itself be tried without a GPU.

Exit status: 0 when the pretraining finished and no step synchronised, 1 when a step did, 2 when the
pretraining failed or no step was seen.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# What torch's sync debug mode says, as a warning or as the error's message.
CUDA_SYNC_MESSAGE = "synchronizing CUDA operation"
# Operators whose result on a GPU is a value or a size the host must read back: the CPU stand-in records these.
SYNCHRONISING_OPERATORS = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}
)
# Frames of the recording machinery, never the place a synchronisation comes from.
_MACHINERY = (
    str(Path(__file__).resolve()),
    "torch/utils/_python_dispatch.py",
    "torch/_ops.py",
    "torch/_dynamo/",
    "torch/_compile.py",
    "/warnings.py",
)


@dataclass
class Site:
    """One place that synchronised: the ``pretrain.py`` line it came from and the innermost Python line."""

    loop: str
    origin: str
    in_step: int = 0
    around_step: int = 0


def _short(filename: str) -> str:
    path = filename.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    root = str(ROOT).replace("\\", "/") + "/"
    return path[len(root) :] if path.startswith(root) else path


def _describe(frame: traceback.FrameSummary | None) -> str:
    if frame is None:
        return "-"
    return f"{_short(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"


def where(stack: list[traceback.FrameSummary]) -> tuple[str, str]:
    """(the innermost line of ``pretrain.py``, the innermost line of all) of a stack, machinery left out."""
    frames = [frame for frame in stack if not any(part in frame.filename for part in _MACHINERY)]
    loop = next((frame for frame in reversed(frames) if Path(frame.filename).name == "pretrain.py"), None)
    return _describe(loop), _describe(frames[-1] if frames else None)


class StepSyncRecorder:
    """Counts the synchronising calls of a run, each at its site, as inside a training step or around it."""

    def __init__(self, mode: str, cuda: bool) -> None:
        if mode not in ("warn", "error"):
            raise ValueError(f"mode must be 'warn' or 'error', got {mode!r}")
        self.mode = mode
        self.cuda = cuda
        self.in_step = False
        # While the training loader prepares a batch on the host: the CPU stand-in sees the data pipeline's
        # own reads there, which never touch a GPU.
        self.loading = False
        self.steps = 0
        self.sites: dict[tuple[str, str], Site] = {}

    def open_step(self) -> None:
        self.in_step = True
        self.steps += 1
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self.mode)

    def close_step(self) -> None:
        if self.in_step:
            self.in_step = False
            if self.cuda:
                torch.cuda.set_sync_debug_mode("warn")

    def record(self, stack: list[traceback.FrameSummary], in_step: bool | None = None) -> None:
        if self.loading:
            return
        if in_step is None:
            # Another thread (the loader's pin-memory thread) is not the step, whatever the main thread is doing.
            in_step = self.in_step and threading.current_thread() is threading.main_thread()
        loop, origin = where(stack)
        site = self.sites.setdefault((loop, origin), Site(loop, origin))
        if in_step:
            site.in_step += 1
        else:
            site.around_step += 1

    @property
    def in_step_count(self) -> int:
        return sum(site.in_step for site in self.sites.values())


class _SynchronisingOperators(TorchDispatchMode):
    """The CPU stand-in for sync debug mode: records the operators that would make the host wait for a GPU."""

    def __init__(self, recorder: StepSyncRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ in SYNCHRONISING_OPERATORS:
            self.recorder.record(traceback.extract_stack())
            if self.recorder.in_step and self.recorder.mode == "error":
                raise RuntimeError(f"called a synchronising operator ({func}) inside the training step")
        return func(*args, **(kwargs or {}))


def load_pretrain() -> ModuleType:
    """``examples/pretrain.py`` as a module, with its folder on ``sys.path`` as when it runs."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location("pretrain", EXAMPLES / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _device_flag(argv: list[str]) -> str:
    for index, argument in enumerate(argv):
        if argument == "--device" and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith("--device="):
            return argument.split("=", 1)[1]
    return "auto"


class _Tee(io.TextIOBase):
    """Passes writes on to a stream and keeps what was written."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def sync_warnings_recorded(recorder: StepSyncRecorder):
    """Every warning of CUDA's sync debug mode goes to ``recorder`` with the Python stack that raised it, each
    time (not once per place, as warnings are by default); other warnings are shown as usual."""
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=f".*{CUDA_SYNC_MESSAGE}")
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if CUDA_SYNC_MESSAGE in str(message):
                recorder.record(traceback.extract_stack())
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        yield


@contextlib.contextmanager
def step_window(module: ModuleType, recorder: StepSyncRecorder):
    """Open the step when ``module``'s training loader hands over a batch; close it after ``GradScaler.update``."""

    class StepWindowLoader(DataLoader):
        def __iter__(self):
            recorder.loading = True
            try:
                batches = super().__iter__()
            finally:
                recorder.loading = False
            while True:
                recorder.loading = True
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                finally:
                    recorder.loading = False
                recorder.open_step()
                yield batch
                recorder.close_step()

    original_loader, original_update = module.DataLoader, torch.amp.GradScaler.update

    def update(scaler: torch.amp.GradScaler, *args: Any, **kwargs: Any) -> None:
        try:
            return original_update(scaler, *args, **kwargs)
        finally:
            recorder.close_step()

    module.DataLoader, torch.amp.GradScaler.update = StepWindowLoader, update
    try:
        yield
    finally:
        module.DataLoader, torch.amp.GradScaler.update = original_loader, original_update
        recorder.close_step()


def run_pretraining(argv: list[str], mode: str = "warn") -> dict[str, Any]:
    """Run ``pretrain.main(argv)`` with its steps watched; the report as a JSON-ready dict."""
    device_flag = _device_flag(argv)
    cuda = torch.cuda.is_available() and (device_flag == "auto" or device_flag.startswith("cuda"))
    recorder = StepSyncRecorder(mode, cuda)
    module = load_pretrain()
    report: dict[str, Any] = {"argv": argv, "mode": mode, "device": "cuda" if cuda else "cpu"}
    report["detector"] = "torch.cuda.set_sync_debug_mode" if cuda else "dispatch-mode stand-in (CPU)"
    started = time.perf_counter()
    stdout = _Tee(sys.stdout)
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(stdout))
        if cuda:
            stack.enter_context(sync_warnings_recorded(recorder))
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, "default")
        else:
            stack.enter_context(_SynchronisingOperators(recorder))
        stack.enter_context(step_window(module, recorder))
        try:
            report["exit"] = module.main(argv)
            report["error"] = None
        except SystemExit as error:
            report["exit"], report["error"] = error.code, f"SystemExit: {error.code}"
        except Exception as error:  # the report names any failure of the run
            if recorder.in_step and ("synchroni" in str(error)):
                recorder.record(traceback.extract_tb(error.__traceback__), in_step=True)
            report["exit"] = 1
            report["error"] = "".join(traceback.format_exception_only(type(error), error)).strip()
            report["traceback"] = traceback.format_exc()[-4000:]
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["steps"] = recorder.steps
    report["in_step"] = recorder.in_step_count
    report["around_step"] = sum(site.around_step for site in recorder.sites.values())
    report["sites"] = [asdict(site) for site in sorted(recorder.sites.values(), key=lambda s: (-s.in_step, s.loop))]
    report["output"] = [line for line in stdout.kept.getvalue().splitlines() if line.strip()][-20:]
    report["step_free_of_synchronisation"] = report["exit"] == 0 and recorder.steps > 0 and report["in_step"] == 0
    return report


def summary(report: dict[str, Any]) -> str:
    lines = [
        f"{report['steps']} steps on {report['device']} ({report['detector']}, mode {report['mode']}), "
        f"{report['seconds']} s: {report['in_step']} synchronising calls inside the steps, "
        f"{report['around_step']} around them"
    ]
    if report["error"]:
        lines.append(f"the pretraining failed: {report['error']}")
    for site in report["sites"]:
        lines.append(f"  in steps {site['in_step']}, around {site['around_step']}: {site['loop']} <- {site['origin']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, pretrain_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--mode {warn,error}] [--report REPORT] -- [pretrain.py arguments]",
        description=__doc__.split("\n\n")[0],
        epilog="Everything after -- goes to examples/pretrain.py (e.g. -- --device cuda --epochs 2).",
    )
    parser.add_argument("--mode", choices=("warn", "error"), default="warn", help="sync debug mode inside the step")
    parser.add_argument("--report", type=Path, help="write the report as JSON here")
    args = parser.parse_args(own)
    report = run_pretraining(pretrain_argv, args.mode)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=1))
    print(summary(report), flush=True)
    if report["exit"] != 0 or report["steps"] == 0:
        return 2
    return 0 if report["in_step"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
