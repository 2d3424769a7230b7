"""A user's ``torch.Generator`` inside DataLoader workers: its own stream per worker, and pickling for spawn.

A transform that holds a seeded generator is copied into every DataLoader worker: by ``fork`` with the
generator's state as it was in the parent, so without care every worker would draw the same masks (and
every epoch would repeat them, the parent's generator never moving). :func:`generator_in_process` re-seeds
the worker's copy once, from its state and the worker's seed, which the DataLoader draws afresh for each
worker and epoch from its own generator (or torch's global one): the streams differ between workers and
epochs and repeat whenever the DataLoader is seeded the same way.

Under ``spawn`` the transforms are pickled; a ``torch.Generator`` pickles its state as a tensor that
torch's multiprocessing sends through shared memory, and that a worker could not rebuild. Objects that
hold a generator pickle it as plain bytes instead (:func:`picklable_state`), and one generator shared by
several transforms stays one generator on the other side.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch
from torch.utils.data import get_worker_info

__all__ = ["generator_in_process", "picklable_state"]

# The worker seed each generator was last re-seeded for, in this process.
_reseeded: weakref.WeakKeyDictionary[torch.Generator, int] = weakref.WeakKeyDictionary()
# One pickling handle per live generator, so that pickle's memo keeps a shared generator shared.
_handles: weakref.WeakValueDictionary[int, _GeneratorHandle] = weakref.WeakValueDictionary()


def generator_in_process(generator: torch.Generator | None) -> torch.Generator | None:
    """``generator``, re-seeded once per DataLoader worker (and worker seed); unchanged outside workers."""
    if generator is None:
        return None
    worker = get_worker_info()
    if worker is None or _reseeded.get(generator) == worker.seed:
        return generator
    state = generator.get_state().numpy().tobytes()
    digest = hashlib.sha256(state + worker.seed.to_bytes(16, "little", signed=True)).digest()
    generator.manual_seed(int.from_bytes(digest[:8], "little"))
    _reseeded[generator] = worker.seed
    return generator


def _rebuild_generator(device: str, state: bytes) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator


class _GeneratorHandle:
    """Stands for a generator in a pickle: its device and its state as bytes, read when pickled."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __reduce__(self) -> tuple[Any, tuple[str, bytes]]:
        state = self.generator.get_state().numpy().tobytes()
        return _rebuild_generator, (str(self.generator.device), state)


def picklable_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of an object's ``__dict__`` whose ``torch.Generator`` values pickle as plain bytes."""
    state = dict(state)
    for name, value in state.items():
        if isinstance(value, torch.Generator):
            handle = _handles.get(id(value))
            if handle is None:
                handle = _handles[id(value)] = _GeneratorHandle(value)
            state[name] = handle
    return state
