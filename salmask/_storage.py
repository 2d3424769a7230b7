"""The files salmask writes and reads back (checkpoints, saliency caches): atomic, private, verified.

``torch.load`` does not check the checksums of the zip archive it reads, so one flipped byte on disk can
load as a different weight, queue entry or setting. Every file written here carries a SHA-256 digest of
its content (every tensor's bytes and every plain value, in order), which :func:`load_verified` recomputes:
a file whose content changed fails to load, named. The digest costs one reading pass over the tensors,
0.08 s (SHA-256 alone) to 0.16 s (on a busy machine) per 100 MB on one core with SHA instructions, at
save and at load.

Writes are atomic (a temporary file in the same directory, ``fsync``, then a rename), the file is private
to its owner (mode 0600, whatever the umask: it holds the run's settings and paths), temporary files left
by a writer killed mid-write are removed by the next write, and a full disk is reported with the file and
the free space, before writing where the size is known.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import shutil
import socket
import struct
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["DIGEST_KEY", "content_digest", "load_verified", "save_verified", "storable"]

#: The entry that holds a file's digest, ``"sha256:<hex>"``.
DIGEST_KEY = "digest"

# Types torch.load(weights_only=True) reads back as they were written (exact types: subclasses are pickled
# by class and refused).
_LEAF_TYPES = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.dtype, torch.device)
_HASH_CHUNK = 64 * 2**20  # bytes of a device tensor copied to the host at a time
# A temporary file older than this is stale even if its writer cannot be checked (another host).
_STALE_SECONDS = 24 * 3600


def _describe(value: Any) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def storable(value: Any, where: str) -> Any:
    """``value`` in the types that ``torch.load(weights_only=True)`` reads back, converted without loss.

    NumPy scalars become Python numbers, NumPy arrays tensors, paths strings, other mappings dicts; any
    other type raises ``TypeError`` naming where it is (``where`` is the name of ``value`` itself, e.g.
    ``"checkpoint"``). Containers are rebuilt only when something inside them changes, so a state dict
    keeps its identity and its ``_metadata``.
    """
    if isinstance(value, Tensor):
        if value.layout != torch.strided or value.device.type == "meta":
            raise TypeError(f"{where} is a {value.layout} tensor on {value.device}; store dense tensors with data")
        return value
    if type(value) is bytes and not value:
        # Pickled as a call of bytes(), which weights-only loading refuses.
        raise ValueError(f"{where} is empty bytes, which torch.load(weights_only=True) cannot read back; store None")
    if type(value) in _LEAF_TYPES:
        return value
    if isinstance(value, np.generic) and not isinstance(value, (np.object_, np.void)):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        items = {key: storable(item, f"{where}[{key!r}]") for key, item in value.items()}
        for key in items:
            if type(key) not in (str, int, float, bool, type(None)):
                raise TypeError(f"{where} has a key of type {_describe(key)} ({key!r}); use str or int keys")
        if type(value) in (dict, OrderedDict) and all(items[key] is value[key] for key in items):
            return value
        rebuilt = OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
        if hasattr(value, "_metadata"):
            rebuilt._metadata = value._metadata  # type: ignore[attr-defined]
        return rebuilt
    if type(value) in (list, tuple, set, torch.Size):
        items = [storable(item, f"{where}[{index}]") for index, item in enumerate(value)]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return type(value)(items)
    raise TypeError(
        f"{where} holds a {_describe(value)}, which torch.load(weights_only=True) cannot read back; store "
        "tensors, numbers, strings, bools, None and lists, tuples or dicts of them"
    )


def _feed_tensor(digest: Any, tensor: Tensor) -> None:
    digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return
    if flat.device.type == "cpu":
        digest.update(flat.contiguous().view(torch.uint8).numpy().data)
        return
    per_chunk = max(1, _HASH_CHUNK // flat.element_size())
    for chunk in flat.split(per_chunk):
        digest.update(chunk.cpu().contiguous().view(torch.uint8).numpy().data)


def _feed(digest: Any, value: Any) -> None:
    # Every value is tagged and length-prefixed, so that no two different contents hash the same stream.
    if isinstance(value, Tensor):
        _feed_tensor(digest, value)
    elif isinstance(value, Mapping):
        digest.update(b"D%d;" % len(value))
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
        metadata = getattr(value, "_metadata", None)
        if metadata is not None:
            digest.update(b"M")
            _feed(digest, metadata)
    elif isinstance(value, set):
        digest.update(b"E%d;" % len(value))
        for member in sorted(content_digest(item) for item in value):
            digest.update(member.encode())
    elif isinstance(value, (list, tuple)):
        digest.update(b"%s%d;" % ({list: b"L", tuple: b"U", torch.Size: b"Z"}.get(type(value), b"U"), len(value)))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, str):
        encoded = value.encode("utf-8", "surrogatepass")
        digest.update(b"S%d;" % len(encoded) + encoded)
    elif isinstance(value, (bytes, bytearray)):
        digest.update(b"B%d;" % len(value) + bytes(value))
    elif isinstance(value, bool) or value is None:
        digest.update({True: b"b1", False: b"b0", None: b"n"}[value])
    elif isinstance(value, int):
        digest.update(b"I%d;" % value)
    elif isinstance(value, float):
        digest.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, complex):
        digest.update(b"C" + struct.pack("<dd", value.real, value.imag))
    elif isinstance(value, (torch.dtype, torch.device)):
        text = str(value).encode()
        digest.update(b"d%d;" % len(text) + text)
    else:
        raise TypeError(f"cannot take the digest of a {_describe(value)}")


def content_digest(value: Any) -> str:
    """SHA-256 of ``value``'s content: tensors' dtypes, shapes and bytes, and every plain value, in order."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return "sha256:" + digest.hexdigest()


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple, set)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def _megabytes(size: float) -> str:
    return f"{size / 2**20:,.1f} MB"


def free_bytes(folder: Path) -> int:
    """Free space for an unprivileged writer on the file system of ``folder``."""
    return shutil.disk_usage(folder).free


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def _temporary_pattern(path: Path) -> re.Pattern[str]:
    # .<name>.<host>-<pid>.<random>.tmp, as written by save_verified.
    return re.compile(re.escape(_temporary_prefix(path)) + r"(?P<host>.+)-(?P<pid>\d+)\.[^.]+\.tmp")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` whose writer died (killed while writing); return them.

    A temporary file is stale when its writer, named in its file name, is a process of this host that no
    longer runs, or when it has not been written to for a day (a writer on another host).
    """
    pattern, host, removed = _temporary_pattern(path), socket.gethostname(), []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match["pid"])
        try:
            age = time.time() - entry.lstat().st_mtime
        except OSError:
            continue
        own_host = match["host"] == host
        dead = own_host and pid != os.getpid() and not _process_exists(pid)
        if dead or age > _STALE_SECONDS:
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


class _RecordingWriter:
    """A file wrapper that keeps the ``OSError`` of a failed write: ``torch.save`` reports one only as
    "unexpected pos", without its cause."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _disk_full(path: Path, what: str, needed: int) -> OSError:
    free = free_bytes(path.parent)
    needs = f"; it needs about {_megabytes(needed)}" if needed else ""
    return OSError(
        errno.ENOSPC,
        f"cannot write {what} {path}: no room on its disk ({_megabytes(free)} free in {path.parent}{needs}); "
        "free some space or write elsewhere",
    )


def save_verified(payload: Mapping[str, Any], path: str | os.PathLike[str], *, what: str) -> Path:
    """Write ``payload`` with its digest under :data:`DIGEST_KEY`: atomically, mode 0600, checked for room.

    Args:
        payload: a dict of :func:`storable` values (already converted).
        path: destination; its directory is created if needed.
        what: how messages name the file (``"checkpoint"``, ``"saliency cache"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: ``ENOSPC`` naming the file and the free space when the disk cannot hold it (checked before
            writing from the tensors' size, and reported so if a write fails for lack of room).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    digest = content_digest(payload)
    stored = {**payload, DIGEST_KEY: digest}
    needed = _tensor_bytes(stored)
    if needed > free_bytes(path.parent):
        raise _disk_full(path, what, needed)
    handle, temporary = tempfile.mkstemp(
        prefix=f"{_temporary_prefix(path)}{socket.gethostname()}-{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    writer = None
    try:
        # mkstemp creates the file 0600 whatever the umask; fchmod says so for file systems that differ.
        os.fchmod(handle, 0o600)
        with os.fdopen(handle, "wb") as file:
            writer = _RecordingWriter(file)
            torch.save(stored, writer)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else error
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(path, what, needed) from error
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


def first_line(error: BaseException) -> str:
    """The first line of an error's message, for a one-line report."""
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_verified(
    path: str | os.PathLike[str],
    *,
    what: str,
    error: type[Exception],
    map_location: Any = "cpu",
    mmap: bool = False,
) -> tuple[Any, bool]:
    """Read a file written by :func:`save_verified` (or any ``torch.save`` file) and check its digest.

    Args:
        path: the file.
        what: how messages name the file.
        error: the exception class raised for a bad file (``CheckpointError``, ``SaliencyCacheError``).
        map_location: ``torch.load``'s argument.
        mmap: map the file's tensors instead of reading them (``torch.load``'s argument).

    Returns:
        ``(content, verified)``: the loaded object without its digest entry, and whether it had a digest
        (which then matched). A file without a digest loads unverified; the caller decides what that means.

    Raises:
        error: the file cannot be read (corrupt, truncated, not a ``torch.save`` file), holds a type that
            weights-only loading refuses (named), or its content does not match its digest.
    """
    path = Path(path)
    try:
        content = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as failure:
        refused = _REFUSED_GLOBAL.search(str(failure))
        if refused is None:
            raise _unreadable(path, what, error, failure) from failure
        raise error(
            f"{what} {path} holds a value of type {refused[1]}, which weights-only loading refuses (it runs no "
            "code from files); it was written by other code than salmask's save: convert such values to "
            "tensors or plain numbers and save it again"
        ) from failure
    except Exception as failure:
        raise _unreadable(path, what, error, failure) from failure
    if not isinstance(content, dict) or DIGEST_KEY not in content:
        return content, False
    stored = content.pop(DIGEST_KEY)
    try:
        actual = content_digest(content)
    except TypeError as failure:
        raise error(f"{what} {path} is corrupt: {failure}") from failure
    if actual != stored:
        raise error(
            f"{what} {path} is corrupt: its content does not match the digest stored with it (a byte changed on "
            "disk or in transfer); use another copy of it"
        )
    return content, True


def _unreadable(path: Path, what: str, error: type[Exception], failure: BaseException) -> Exception:
    return error(
        f"{what} {path} cannot be read; it is corrupt, truncated or not a torch.save file "
        f"({type(failure).__name__}: {first_line(failure)})"
    )
