"""Checkpoints that survive pre-emption: atomic writes, complete training state, exact resumption.

A checkpoint is one ``torch.save`` file holding a dict: the model's ``state_dict`` (for MoCo this
includes the momentum encoder and the queue), the optimizer, scheduler and AMP scaler states, every
random generator (torch CPU and CUDA, NumPy, Python), the position in training (epoch and step within
the epoch) and the run's configuration, so that an evaluation script knows how the encoder was trained
(e.g. on high-pass filtered views). Only tensors and plain Python values are stored, so checkpoints load
with ``torch.load(weights_only=True)``: opening one never runs code from the file.

The data side of exact resumption is :class:`ResumableSampler` (starts an epoch part-way) and
:class:`SeededDataset` (draws each item's augmentation from a seed of ``(seed, epoch, index)``, so an
item gets the same views whichever worker loads it and whether or not the run was interrupted).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from salmask.distributed import get_rank, get_world_size, is_distributed
from salmask.ssl._encoders import build_encoder
from salmask.transforms import HighPassFilter

__all__ = [
    "BAD_IMAGE_POLICIES",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "BadImageError",
    "CheckpointError",
    "ResumableSampler",
    "SeededDataset",
    "StopSignal",
    "encoder_state_dict",
    "finite_or_raise",
    "get_rng_state",
    "input_filter_of",
    "load_checkpoint",
    "load_state_dict_checked",
    "pretrained_encoder",
    "record_input_filter",
    "restore_training_state",
    "save_checkpoint",
    "set_rng_state",
    "training_state",
]

logger = logging.getLogger(__name__)

#: Marker stored in every checkpoint, to tell it apart from other ``torch.save`` files.
CHECKPOINT_FORMAT = "salmask.ssl.checkpoint"
#: Version of the checkpoint layout.
CHECKPOINT_VERSION = 1
#: What :class:`SeededDataset` does with an image it cannot read.
BAD_IMAGE_POLICIES = ("fail", "skip")

_REQUIRED_KEYS = ("model", "epoch", "step", "config")
# Errors an image decoder raises for a broken file: PIL raises OSError (truncated, unidentified),
# SyntaxError (broken chunks) or ValueError; a decompression bomb has its own class.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)
_MAX_SKIPS = 100


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, of another format, or does not fit the model."""


class BadImageError(RuntimeError):
    """An image of the dataset cannot be read; the message names its path."""


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
            f"({type(error).__name__}: {_first_line(error)})"
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


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


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP (and torch.compile) wrap the module; checkpoints hold the bare module's names, so that they load
    # with or without the wrapper.
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


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
    for name, value in (("epoch", epoch), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
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
    source = f"checkpoint {checkpoint.get('path', '')}".rstrip()
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


def encoder_state_dict(checkpoint: Mapping[str, Any], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """The base encoder's weights from a pretraining checkpoint (MoCo's query encoder, SimCLR's encoder).

    Args:
        checkpoint: from :func:`load_checkpoint`.
        prefix: the encoder's name inside the model (``"encoder."`` for :class:`MoCo` and :class:`SimCLR`).

    Returns:
        The weights with ``prefix`` removed, ready for the module made by :func:`build_encoder`.

    Raises:
        CheckpointError: no weight carries ``prefix``.

    Example:
        >>> import torch
        >>> from salmask.ssl import encoder_state_dict
        >>> state = {"model": {"encoder.conv.weight": torch.ones(1), "projector.0.weight": torch.ones(1)}}
        >>> list(encoder_state_dict(state))
        ['conv.weight']
    """
    weights = {key.removeprefix(prefix): value for key, value in checkpoint["model"].items() if key.startswith(prefix)}
    if not weights:
        raise CheckpointError(
            f"checkpoint {checkpoint.get('path', '')} holds no weights under {prefix!r}; is it a MoCo or SimCLR "
            "pretraining checkpoint?"
        )
    return weights


def pretrained_encoder(checkpoint: Mapping[str, Any]) -> nn.Module:
    """The base encoder of a pretraining checkpoint, built as its recorded settings say and loaded.

    Reads ``arch`` and ``small_images`` from the checkpoint's ``config`` (as the example pretraining scripts
    record them) and loads the weights found under ``encoder.``.

    Args:
        checkpoint: from :func:`load_checkpoint`.

    Returns:
        The encoder (:func:`build_encoder`), on the CPU, in training mode.

    Raises:
        CheckpointError: the configuration does not name the architecture, or the weights do not fit it.
    """
    config = checkpoint["config"]
    source = f"checkpoint {checkpoint.get('path', '')}".rstrip()
    if "arch" not in config:
        raise CheckpointError(f"{source} does not record its architecture (config['arch'])")
    encoder = build_encoder(config["arch"], small_images=bool(config.get("small_images", False)))
    load_state_dict_checked(encoder, encoder_state_dict(checkpoint), f"{source} (encoder, {config['arch']})")
    return encoder


def record_input_filter(input_filter: HighPassFilter | None) -> dict[str, Any] | None:
    """The record of the filter every view went through, to store in a run's ``config["input_filter"]``.

    The one format of the record, read back by :func:`input_filter_of`: plain values, so that it survives
    ``torch.load(weights_only=True)`` and YAML.

    Args:
        input_filter: the filter, e.g. :attr:`MaskedViews.input_filter <salmask.ssl.MaskedViews>`, or ``None``.

    Example:
        >>> from salmask import HighPassFilter
        >>> from salmask.ssl import record_input_filter
        >>> record_input_filter(HighPassFilter(7, 2.0))
        {'name': 'high_pass', 'kernel_size': 7, 'sigma': 2.0}
    """
    if input_filter is None:
        return None
    if not isinstance(input_filter, HighPassFilter):
        raise TypeError(f"input_filter must be a HighPassFilter or None, got {type(input_filter).__name__}")
    return {"name": "high_pass", "kernel_size": input_filter.kernel_size, "sigma": input_filter.sigma}


def input_filter_of(config: Mapping[str, Any], *, enabled: bool | None = None) -> HighPassFilter | None:
    """The filter the encoder's inputs went through in pretraining, to apply to its inputs downstream.

    An encoder pretrained with the high-pass recipe (strategies ``"high_pass"`` and ``"mscn"``) has only
    seen high-pass filtered views; it must be evaluated on filtered images. The pretraining script records
    the filter with :func:`record_input_filter` as ``config["input_filter"]``; older configurations are
    read from their ``strategy``.

    Args:
        config: the checkpoint's ``config``.
        enabled: ``None`` for the recorded filter; ``True`` to filter in any case (with the recorded filter,
            else the release's); ``False`` for none.

    Returns:
        A :class:`~salmask.HighPassFilter`, or ``None`` for unfiltered inputs.

    Example:
        >>> from salmask.ssl import input_filter_of
        >>> input_filter_of({"input_filter": {"name": "high_pass", "kernel_size": 11, "sigma": 5.0}})
        HighPassFilter(kernel_size=11, sigma=5.0)
        >>> input_filter_of({"strategy": "blur", "input_filter": None}) is None
        True
        >>> input_filter_of({"strategy": "blur", "input_filter": None}, enabled=True)
        HighPassFilter(kernel_size=11, sigma=5.0)
    """
    if enabled is False:
        return None
    if "input_filter" in config:
        recorded = config["input_filter"]
        if recorded is not None and recorded.get("name") != "high_pass":
            raise CheckpointError(f"unknown input filter {recorded!r} recorded in the checkpoint")
        input_filter = None if recorded is None else HighPassFilter(recorded["kernel_size"], recorded["sigma"])
    else:
        input_filter = HighPassFilter() if config.get("strategy") in ("high_pass", "mscn") else None
    if enabled and input_filter is None:
        return HighPassFilter()
    return input_filter


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
        self.signals = signals
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


class ResumableSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` that can start an epoch part-way through.

    It works with or without a process group (one process is rank 0 of 1). The order of an epoch depends
    only on ``seed`` and the epoch, so after ``set_epoch(epoch, start=n)`` the sampler yields exactly the
    indices the uninterrupted epoch would have yielded from its ``n``-th on, without loading the skipped
    items.

    Args:
        dataset: the dataset to sample.
        shuffle: shuffle every epoch.
        seed: seed of the shuffle, the same on every rank.
        drop_last: drop the tail that does not divide among the ranks.
        num_replicas: number of ranks; default the process group's size (1 without one).
        rank: this rank; default the process group's rank (0 without one).

    Example:
        >>> from salmask.ssl import ResumableSampler
        >>> sampler = ResumableSampler(range(6), seed=1)
        >>> full = list(sampler)
        >>> sampler.set_epoch(0, start=4)
        >>> list(sampler) == full[4:], len(sampler)
        (True, 2)
    """

    def __init__(
        self,
        dataset: Any,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=get_world_size() if num_replicas is None else num_replicas,
            rank=get_rank() if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` indices (of this rank)."""
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be an int in [0, {self.num_samples}], got {start!r}")
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _item_path(dataset: Any, index: int) -> str:
    # Folder datasets (ImageFolder, and SaliencyDataset around one) list their files in `samples`.
    while dataset is not None:
        samples = getattr(dataset, "samples", None)
        if samples is not None:
            entry = samples[index]
            return str(entry[0] if isinstance(entry, tuple) else entry)
        dataset = getattr(dataset, "dataset", None)
    return f"item {index}"


class SeededDataset(Dataset):
    """Wrap a dataset so that each item's random augmentation is fixed by ``(seed, epoch, index)``.

    Each access seeds torch's generator for that item alone (the caller's generator state is put back
    afterwards), so an item gets the same views in any DataLoader worker, with any number of workers, and
    in a resumed run as in an uninterrupted one. Set the epoch with :meth:`set_epoch` before iterating
    (DataLoader workers receive a copy of the dataset when an epoch's iterator starts).

    An item whose image cannot be read is reported by path: ``on_bad_image="fail"`` raises a
    :class:`BadImageError` naming the file; ``"skip"`` logs a warning naming it and serves the next
    readable item instead, so batches keep their size.

    Args:
        dataset: map-style dataset whose items apply random transforms with torch's generator (torchvision).
        seed: base seed of the run.
        on_bad_image: ``"fail"`` or ``"skip"``.

    Example:
        >>> import torch
        >>> from torch.utils.data import Dataset
        >>> from salmask.ssl import SeededDataset
        >>> class Noise(Dataset):
        ...     def __len__(self): return 4
        ...     def __getitem__(self, index): return torch.rand(2)
        >>> data = SeededDataset(Noise(), seed=0)
        >>> torch.equal(data[1], data[1]), torch.equal(data[1], data[2])
        (True, False)
    """

    def __init__(self, dataset: Any, seed: int = 0, on_bad_image: str = "fail") -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.dataset = dataset
        self.seed = seed
        self.on_bad_image = on_bad_image
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _item_seed(self, index: int) -> int:
        entropy = np.random.SeedSequence((self.seed, self.epoch, index)).generate_state(2, dtype=np.uint32)
        return int(entropy[0]) << 31 | int(entropy[1]) >> 1

    def __getitem__(self, index: int) -> Any:
        size = len(self.dataset)
        for attempt in range(min(size, _MAX_SKIPS)):
            position = (index + attempt) % size
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self._item_seed(position))
                    return self.dataset[position]
            except _IMAGE_ERRORS as error:
                path = _item_path(self.dataset, position)
                message = f"cannot read image {path}: {type(error).__name__}: {_first_line(error)}"
                if self.on_bad_image == "fail":
                    raise BadImageError(f"{message} (pass --on-bad-image skip to leave it out)") from error
                logger.warning("%s; skipped", message)
        raise BadImageError(
            f"{min(size, _MAX_SKIPS)} images in a row from item {index} on cannot be read; check the dataset"
        )


def finite_or_raise(value: float, what: str, where: str = "") -> float:
    """Return ``value`` if finite, else raise ``FloatingPointError`` naming ``what`` (and ``where``).

    A diverged run should stop at the step that diverged, not train on NaNs until its end.

    Example:
        >>> from salmask.ssl import finite_or_raise
        >>> finite_or_raise(1.5, "loss")
        1.5
    """
    if not math.isfinite(value):
        location = f" at {where}" if where else ""
        raise FloatingPointError(f"{what} is {value}{location}; lower the learning rate or check the inputs")
    return value
