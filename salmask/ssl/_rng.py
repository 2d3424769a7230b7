"""The state of every random generator a training step draws from, saved and restored with a checkpoint."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state"]


def get_rng_state() -> dict[str, Any]:
    """The state of every random generator a training step draws from, as tensors and plain values.

    Covers torch's CPU generator, every CUDA device's generator (when CUDA is initialised), NumPy's
    global generator and Python's ``random``. The result survives ``torch.load(weights_only=True)``.

    Example:
        >>> import torch
        >>> from salmask.ssl import get_rng_state, set_rng_state
        >>> state = get_rng_state()
        >>> first = torch.rand(3)
        >>> set_rng_state(state)
        >>> torch.equal(torch.rand(3), first)
        True
    """
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002 (user code draws from it)
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss_next},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators saved by :func:`get_rng_state`.

    CUDA states are restored for as many devices as both the saved state and this machine have, so a
    checkpoint written on a GPU machine still resumes on the CPU.
    """
    if not isinstance(state, Mapping) or not {"torch", "numpy", "python"} <= set(state):
        raise TypeError(f"state must be the dict get_rng_state returns, got {type(state).__name__}")
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = list(state.get("cuda", []))
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss"]))
