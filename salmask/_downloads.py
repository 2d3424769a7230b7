"""Downloadable weights that fail at once offline: a local copy first, else one connection attempt.

torchvision reads its weights from a cache folder before downloading them, timm from the Hugging Face hub,
whose client retries a host it cannot reach for about a minute before giving up. Here a request for such
weights first looks for the file on disk; without one, it tries a single connection to the host (through
the configured proxy, if any) and, when that fails, raises :class:`WeightsUnavailableError` at once with
the way to get weights offline.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["WeightsUnavailableError", "timm_pretrained", "torchvision_state_dict"]

# How long one connection attempt may take before the host counts as unreachable.
_CONNECT_TIMEOUT_S = 5.0
# The files timm looks for in a model's Hugging Face repository, in its order.
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be had: no network, or the package that ships them is not installed."""


def _unreachable(url: str) -> str | None:
    """Why the host of ``url`` (or the proxy that serves it) cannot be reached, or ``None`` if it can."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 80
    try:
        socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"{host}:{port} cannot be reached ({type(error).__name__}: {error})"
    return None


def _require_reachable(url: str, what: str, fix: str) -> None:
    reason = _unreachable(url)
    if reason is not None:
        raise WeightsUnavailableError(f"cannot download {what}: {reason}; {fix}")


def torchvision_state_dict(weights: Any, what: str, fix: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision ``weights`` (an enum member), from torch's cache or downloaded.

    Raises:
        WeightsUnavailableError: the file is not cached and cannot be downloaded; the message ends with
            ``fix``.
    """
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(weights.url).path).name
    if not cached.is_file():
        _require_reachable(weights.url, what, fix)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as error:  # URLError, HTTPError, SSL and hash errors all mean "cannot have them"
        raise WeightsUnavailableError(f"could not download {what} ({type(error).__name__}: {error}); {fix}") from error


def _hf_cached_file(hub_id: str, filename: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = hub_id.partition("@")
    for name in (filename,) if filename else _HF_WEIGHT_FILES:
        path = try_to_load_from_cache(repo, name, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


def timm_pretrained(model_name: str, fix: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, pretrained=True, **kwargs)``, failing at once when offline.

    Weights already in the Hugging Face or torch cache load from there without a connection.

    Raises:
        WeightsUnavailableError: the weights are neither cached nor downloadable; the message ends with
            ``fix``.
    """
    import timm

    config = timm.models.get_pretrained_cfg(model_name)
    config = {} if config is None else config.to_dict()
    what = f"the pretrained weights of timm model {model_name!r}"
    if not (config.get("file") or config.get("state_dict")):
        hub_id, url = config.get("hf_hub_id"), config.get("url")
        if hub_id:
            cached = _hf_cached_file(hub_id, config.get("hf_hub_filename"))
            if cached is not None:
                kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": cached}
            else:
                _require_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), what, fix)
        elif url:
            cached_url = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(url).path).name
            if not cached_url.is_file():
                _require_reachable(url, what, fix)
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except Exception as error:  # hub and URL errors: no network or no published weights
        raise WeightsUnavailableError(f"could not fetch {what} ({type(error).__name__}: {error}); {fix}") from error
