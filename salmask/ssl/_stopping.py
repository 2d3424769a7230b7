"""Stopping a run cleanly: on a signal (pre-emption) at a step boundary, and at the step a loss diverges."""

from __future__ import annotations

import math
import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from salmask.distributed import is_distributed

__all__ = ["StopSignal", "finite_or_raise"]


class StopSignal:
    """Turn SIGTERM (cluster pre-emption, ``kill``) into a request the training loop polls.

    Inside ``with StopSignal() as stop:``, SIGTERM (and any other signal listed) only sets a flag; the loop
    checks :meth:`should_stop` after each step, writes a checkpoint and returns, so the process exits
    cleanly with the work of the interrupted epoch saved. Under ``torch.distributed`` :meth:`should_stop`
    agrees across ranks (one collective), so all ranks stop at the same step even if only one was
    signalled. The previous handlers are put back on exit. Signal handlers can only be installed from
    the main thread; elsewhere the object does nothing but still answers ``False``.

    Args:
        signals: the signals to catch (default SIGTERM).

    Example:
        >>> import os, signal
        >>> from salmask.ssl import StopSignal
        >>> with StopSignal() as stop:
        ...     os.kill(os.getpid(), signal.SIGTERM)
        ...     stop.should_stop()
        True
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        if not isinstance(signals, (tuple, list)) or not all(isinstance(signum, int) for signum in signals):
            raise TypeError(f"signals must be a tuple of signal numbers (signal.SIGTERM, ...), got {signals!r}")
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> StopSignal:
        try:
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:
            # Not the main thread: leave the process's handlers alone.
            self._restore()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def should_stop(self) -> bool:
        """Whether a caught signal asks the run to stop, agreed across ranks under ``torch.distributed``."""
        requested = self.received is not None
        if not is_distributed():
            return requested
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        flag = torch.tensor([1.0 if requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def finite_or_raise(value: float, what: str, where: str = "") -> float:
    """Return ``value`` if finite, else raise ``FloatingPointError`` naming ``what`` (and ``where``).

    A diverged run should stop at the step that diverged, not train on NaNs until its end.

    Example:
        >>> from salmask.ssl import finite_or_raise
        >>> finite_or_raise(1.5, "loss")
        1.5
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"value must be a number (the {what} to check), got {type(value).__name__}")
    if not math.isfinite(value):
        location = f" at {where}" if where else ""
        raise FloatingPointError(f"{what} is {value}{location}; lower the learning rate or check the inputs")
    return value
