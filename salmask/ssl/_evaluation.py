"""What evaluation takes from a pretraining checkpoint: the encoder, and the filter its inputs need.

The filter's record has one format, written by :func:`record_input_filter` into a run's configuration
and read back by :func:`input_filter_of`; the example scripts and checkpoints all go through these two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from salmask._validation import check_bool, check_mapping
from salmask.ssl._checkpoint import CheckpointError
from salmask.ssl._encoders import build_encoder
from salmask.ssl._training_state import load_state_dict_checked
from salmask.transforms import HighPassFilter

__all__ = ["encoder_state_dict", "input_filter_of", "pretrained_encoder", "record_input_filter"]


def _check_checkpoint(checkpoint: Any) -> None:
    check_mapping(checkpoint, "checkpoint")
    if not isinstance(checkpoint.get("model"), Mapping):
        raise CheckpointError(
            f"checkpoint {checkpoint.get('path', '')} holds no 'model' state dict; pass what load_checkpoint returns"
        )


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
    _check_checkpoint(checkpoint)
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    weights = {key.removeprefix(prefix): value for key, value in checkpoint["model"].items() if key.startswith(prefix)}
    if not weights:
        raise CheckpointError(
            f"checkpoint {checkpoint.get('path', '')} holds no weights under {prefix!r} (prefix); is it a MoCo or "
            "SimCLR pretraining checkpoint?"
        )
    return weights


def pretrained_encoder(checkpoint: Mapping[str, Any]) -> nn.Module:
    """The base encoder of a pretraining checkpoint, built as its recorded settings say and loaded.

    Reads ``arch``, ``small_images``, ``stem_stride`` and ``width`` from the checkpoint's ``config`` (as the
    example pretraining script records them) and loads the weights found under ``encoder.``.

    Args:
        checkpoint: from :func:`load_checkpoint`.

    Returns:
        The encoder (:func:`build_encoder`), on the CPU, in training mode.

    Raises:
        CheckpointError: the configuration does not name the architecture, or the weights do not fit it.
    """
    _check_checkpoint(checkpoint)
    config = checkpoint.get("config")
    source = f"checkpoint {checkpoint.get('path', '')}".rstrip()
    if not isinstance(config, Mapping) or "arch" not in config:
        raise CheckpointError(f"{source} does not record its architecture (config['arch'])")
    # Settings recorded by earlier versions lack the stem stride and width: torchvision's then.
    shape = {key: config[key] for key in ("small_images", "stem_stride", "width") if key in config}
    encoder = build_encoder(config["arch"], **shape)
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
    check_mapping(config, "config")
    check_bool(enabled, "enabled", optional=True)
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
