"""The training-state bundle: everything a run needs to continue exactly where it stopped.

The bundle holds the model's ``state_dict`` (for MoCo this includes the momentum encoder and the queue),
the optimizer, scheduler and AMP scaler states, every rank's random generators, the position in training
(epoch and step within the epoch) and the run's configuration, so that an evaluation script knows how
the encoder was trained. :func:`~salmask.ssl.save_checkpoint` writes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from salmask._validation import check_bool, check_int, check_mapping, check_module
from salmask.distributed import get_rank, get_world_size, is_distributed
from salmask.ssl._checkpoint import CheckpointError
from salmask.ssl._rng import get_rng_state, set_rng_state

__all__ = ["load_state_dict_checked", "restore_training_state", "training_state"]

logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP (and torch.compile) wrap the module; checkpoints hold the bare module's names, so that they load
    # with or without the wrapper.
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _check_optional_states(optimizer: Any, scaler: Any) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")


def training_state(
    *,
    model: nn.Module,
    config: Mapping[str, Any],
    epoch: int,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Bundle everything a run needs to continue exactly where it is, for :func:`save_checkpoint`.

    Args:
        model: the trained module (DDP-wrapped or not); its ``state_dict`` includes buffers such as MoCo's
            key encoder and queue.
        config: the run's settings (plain values); evaluation scripts read it, e.g. the masking strategy.
        epoch: the epoch in progress (0-based).
        step: optimizer steps already done in that epoch: 0 at an epoch boundary.
        optimizer: its state (momentum buffers, learning rates).
        scheduler: a learning-rate scheduler with ``state_dict`` (timm or torch).
        scaler: the AMP gradient scaler.
        metrics: last metrics, recorded for information.

    Returns:
        The checkpoint dict, including the random generators' states (:func:`get_rng_state`) of every rank.
        Under ``torch.distributed`` this gathers them, so every rank must call it (rank 0 then saves).
    """
    check_module(model, "model")
    check_mapping(config, "config")
    check_mapping(metrics, "metrics", optional=True)
    for name, value in (("epoch", epoch), ("step", step)):
        check_int(value, name, minimum=0)
    _check_optional_states(optimizer, scaler)
    rng = get_rng_state()
    per_rank = [rng]
    if is_distributed():
        # Each rank draws its own masks; resuming every rank from rank 0's generators would make the
        # ranks draw identical masks from then on.
        per_rank = [None] * get_world_size()
        dist.all_gather_object(per_rank, rng)
    return {
        "model": _unwrap(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": per_rank,
        "epoch": epoch,
        "step": step,
        "config": dict(config),
        "metrics": dict(metrics or {}),
    }


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, Any], source: str = "checkpoint") -> None:
    """``module.load_state_dict`` with one readable error listing what does not fit.

    Args:
        module: the module to fill (DDP-wrapped or not).
        state_dict: the weights.
        source: how to name the weights' origin in the error (e.g. the checkpoint path).

    Raises:
        CheckpointError: keys missing from or unexpected in ``state_dict``, or tensors of another shape; the
            message lists a few of each, which usually shows a different architecture or option.

    Example:
        >>> from torch import nn
        >>> from salmask.ssl import load_state_dict_checked
        >>> try:
        ...     load_state_dict_checked(nn.Linear(2, 3), nn.Linear(2, 4).state_dict(), "demo")
        ... except ValueError as error:
        ...     print(str(error).split(": ", 1)[1])
        shapes differ: weight (4, 2) != (3, 2); bias (4,) != (3,)
    """
    check_module(module, "module")
    check_mapping(state_dict, "state_dict")
    module = _unwrap(module)
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and isinstance(state_dict[key], torch.Tensor) and state_dict[key].shape != value.shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shapes differ", mismatched)):
        if items:
            shown = "; ".join(items[:5]) + (f"; ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit the model (different architecture or options?): " + " | ".join(problems)
        )
    module.load_state_dict(state_dict)


def restore_training_state(
    checkpoint: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = True,
) -> tuple[int, int]:
    """Load a :func:`training_state` bundle back into the objects of a run.

    Args:
        checkpoint: from :func:`load_checkpoint`.
        model: the module to fill (DDP-wrapped or not).
        optimizer: filled when given (the checkpoint must hold its state).
        scheduler: filled when given.
        scaler: filled when given and the checkpoint holds a scaler state (a CPU run has none).
        restore_rng: also restore this rank's random generators. When the run had another number of ranks,
            the generators keep the seeds this run drew, and a warning says so.

    Returns:
        ``(epoch, step)``: the epoch to continue and the optimizer steps already done in it.

    Raises:
        CheckpointError: the model or optimizer state does not fit.
    """
    check_mapping(checkpoint, "checkpoint")
    check_module(model, "model")
    _check_optional_states(optimizer, scaler)
    check_bool(restore_rng, "restore_rng")
    source = f"checkpoint {checkpoint.get('path', '')}".rstrip()
    missing = [key for key in ("model", "epoch", "step") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{source} lacks {missing}; pass what load_checkpoint returns")
    load_state_dict_checked(model, checkpoint["model"], source)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if checkpoint.get(name) is None:
            raise CheckpointError(f"{source} holds no {name} state; it cannot resume training")
        try:
            target.load_state_dict(checkpoint[name])
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{source}: the {name} state does not fit this run ({error})") from error
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint.get("rng") or []
    if restore_rng and len(states) == get_world_size():
        set_rng_state(states[get_rank()])
    elif restore_rng:
        logger.warning(
            "%s was written by %d rank(s), this run has %d: the random generators are not restored",
            source,
            len(states),
            get_world_size(),
        )
    return int(checkpoint["epoch"]), int(checkpoint["step"])
