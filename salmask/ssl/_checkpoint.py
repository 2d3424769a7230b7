"""Checkpoint files that survive pre-emption and bad disks: atomic writes, verified reads, clear errors.

A checkpoint is one ``torch.save`` file holding a dict (see :func:`~salmask.ssl.training_state`). Only
tensors and plain Python values are stored, so checkpoints load with ``torch.load(weights_only=True)``:
opening one never runs code from the file. A SHA-256 digest of the content is stored with it and checked
on load, so a file changed on disk (one flipped byte) fails to load instead of resuming a run on altered
weights.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from salmask._storage import DIGEST_KEY, load_verified, save_verified, storable

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "load_checkpoint", "save_checkpoint"]

#: Marker stored in every checkpoint, to tell it apart from other ``torch.save`` files.
CHECKPOINT_FORMAT = "salmask.ssl.checkpoint"
#: Version of the checkpoint layout: 2 adds the digest of the content (version 1 files load unverified).
CHECKPOINT_VERSION = 2

_REQUIRED_KEYS = ("model", "epoch", "step", "config")
# Added by load_checkpoint, or written by save_checkpoint itself: never taken from the caller's dict.
_ANNOTATIONS = ("format", "version", "path", DIGEST_KEY)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt, of another format, or does not fit the model."""


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically: the file is either the old one or the complete new one.

    The dict is written to a temporary file in the same directory, flushed and ``fsync``-ed, then renamed
    over ``path`` (an atomic operation within one file system), and the directory entry is synced. A run
    killed while writing leaves the previous checkpoint intact, and the temporary file it leaves is removed
    by the next save. The file is readable by its owner only (mode 0600) and holds a digest of its content,
    which :func:`load_checkpoint` verifies.

    Values are stored so that weights-only loading reads them back: NumPy scalars become Python numbers,
    NumPy arrays tensors, paths strings; any other type is refused here, by name, rather than written
    into a file that cannot be loaded.

    Args:
        checkpoint: the dict to store, e.g. from :func:`training_state`; the format marker, version and
            digest are added.
        path: destination file; its directory is created if needed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: ``checkpoint`` is not a mapping, or holds a value weights-only loading cannot read back
            (the message names where it is).
        OSError: the disk cannot hold the file (``ENOSPC``; the message names the file and the free space,
            checked before writing).

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
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    content = {key: value for key, value in checkpoint.items() if key not in _ANNOTATIONS}
    payload = storable({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **content}, "checkpoint")
    return save_verified(payload, path, what="checkpoint")


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with a clear error for any bad file.

    The content is checked against the digest stored with it (one reading pass over the tensors, 0.1 to
    0.2 s per 100 MB). A checkpoint written before digests were stored (layout version 1) loads with a
    warning; saving it again adds one.

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded (``torch.load``'s argument).

    Returns:
        The checkpoint dict, with ``"path"`` set to the file it was read from.

    Raises:
        CheckpointError: the file does not exist, is truncated or corrupt (its content does not match its
            digest), is not a salmask checkpoint, holds a value weights-only loading refuses (named), has a
            newer layout, or lacks one of the entries ``model``, ``epoch``, ``step``, ``config``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    checkpoint, verified = load_verified(path, what="checkpoint", error=CheckpointError, map_location=map_location)
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
    if version >= 2 and not verified:
        raise CheckpointError(
            f"checkpoint {path} lacks the digest of its content that layout version {version} stores; the file "
            "is corrupt or was altered"
        )
    if not verified:
        # Refusing them would strand every run and encoder trained before digests were stored.
        warnings.warn(
            f"checkpoint {path} was written before checkpoints stored a digest of their content (no digest): it "
            "loads unverified; save_checkpoint(load_checkpoint(path), path) adds one",
            UserWarning,
            stacklevel=2,
        )
    missing = [key for key in _REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it was not written by a complete training run")
    checkpoint["path"] = str(path)
    return checkpoint
