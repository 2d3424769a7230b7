"""Checkpoint files that survive pre-emption: atomic writes, and clear errors for any bad file.

A checkpoint is one ``torch.save`` file holding a dict (see :func:`~salmask.ssl.training_state`). Only
tensors and plain Python values are stored, so checkpoints load with ``torch.load(weights_only=True)``:
opening one never runs code from the file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "load_checkpoint", "save_checkpoint"]

#: Marker stored in every checkpoint, to tell it apart from other ``torch.save`` files.
CHECKPOINT_FORMAT = "salmask.ssl.checkpoint"
#: Version of the checkpoint layout.
CHECKPOINT_VERSION = 1

_REQUIRED_KEYS = ("model", "epoch", "step", "config")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, of another format, or does not fit the model."""


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically: the file is either the old one or the complete new one.

    The dict is written to a temporary file in the same directory, flushed and ``fsync``-ed, then renamed
    over ``path`` (an atomic operation within one file system), and the directory entry is synced. A run
    killed while writing leaves the previous checkpoint intact.

    Args:
        checkpoint: the dict to store, e.g. from :func:`training_state`; the format marker and version are
            added.
        path: destination file; its directory is created if needed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile, torch
        >>> from salmask.ssl import load_checkpoint, save_checkpoint
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 1, "step": 0, "config": {}},
        ...                            f"{folder}/checkpoint.pt")
        ...     load_checkpoint(path)["epoch"]
        1
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a mapping, got {type(checkpoint).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **checkpoint}
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory (Windows cannot).
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with a clear error for any bad file.

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded (``torch.load``'s argument).

    Returns:
        The checkpoint dict, with ``"path"`` set to the file it was read from.

    Raises:
        CheckpointError: the file does not exist, is truncated or corrupt, is not a salmask checkpoint, has
            a newer layout, or lacks one of the entries ``model``, ``epoch``, ``step``, ``config``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read; it is corrupt, truncated or not a torch.save file "
            f"({type(error).__name__}: {first_line(error)})"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not a salmask training checkpoint (expected format {CHECKPOINT_FORMAT!r}; found {found})"
        )
    version = checkpoint.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has layout version {version!r}; this salmask reads versions up to "
            f"{CHECKPOINT_VERSION}: upgrade salmask"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it was not written by a complete training run")
    checkpoint["path"] = str(path)
    return checkpoint


def first_line(error: BaseException) -> str:
    """The first line of an error's message, for a one-line report."""
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
