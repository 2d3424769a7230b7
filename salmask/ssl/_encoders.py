"""Base encoders (torchvision ResNets without their classifier) and projection heads."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from salmask._defaults import EMBEDDING_DIM
from salmask._downloads import torchvision_state_dict
from salmask._validation import check_choice, check_int

__all__ = ["RESNETS", "build_encoder", "feature_dim_of", "projection_head"]

#: The torchvision ResNet family accepted by :func:`build_encoder`.
RESNETS = tuple(
    sorted(
        name
        for name in torchvision.models.list_models(module=torchvision.models)
        if name.startswith(("resnet", "resnext", "wide_resnet"))
    )
)


def build_encoder(
    name: str = "resnet50",
    *,
    small_images: bool = False,
    weights: Any = None,
    zero_init_residual: bool = False,
) -> torchvision.models.ResNet:
    """A torchvision ResNet whose ``fc`` is an identity, so that it returns pooled features.

    The model keeps torchvision's module names (a checkpoint of it loads into a torchvision ResNet with
    ``strict=False``, only ``fc`` missing) and carries its feature size as ``num_features`` (2048 for
    ResNet-50, 512 for ResNet-18), which :class:`MoCo` and :class:`SimCLR` read.

    Args:
        name: a torchvision ResNet, one of ``RESNETS``.
        small_images: replace the stem by a 3x3 stride-1 convolution and drop the max-pool, the usual
            stem for CIFAR-sized (32-64 px) images, which the 224 px stem would shrink to a few pixels.
            The new stem is freshly initialised even when ``weights`` are given.
        weights: torchvision weights (enum or name) to start from, e.g. for transfer; ``None`` for random
            initialisation, as in self-supervised pretraining. Weights that are not in torch's cache and
            whose host cannot be reached fail at once (:class:`~salmask.saliency.WeightsUnavailableError`,
            naming the file to put there).
        zero_init_residual: start every residual branch at zero (torchvision's option).

    Returns:
        The ResNet, mapping ``(B, 3, H, W)`` images to ``(B, num_features)`` features.

    Example:
        >>> import torch
        >>> from salmask.ssl import build_encoder
        >>> encoder = build_encoder("resnet18", small_images=True)
        >>> encoder.num_features, encoder(torch.randn(2, 3, 32, 32)).shape
        (512, torch.Size([2, 512]))
    """
    check_choice(name, "name", RESNETS)
    model = torchvision.models.get_model(name, weights=None, zero_init_residual=zero_init_residual)
    if weights is not None:
        weights = torchvision.models.get_model_weights(name).verify(weights)
        file_name = Path(urllib.parse.urlsplit(weights.url).path).name
        fix = (
            f"copy {file_name} ({weights.url}) into {Path(torch.hub.get_dir()) / 'checkpoints'}, or build with "
            "weights=None and load a state dict file into the encoder"
        )
        model.load_state_dict(torchvision_state_dict(weights, f"the {weights} weights of {name!r}", fix))
    if small_images:
        stem_channels = model.conv1.out_channels
        model.conv1 = nn.Conv2d(3, stem_channels, kernel_size=3, stride=1, padding=1, bias=False)
        # torchvision initialises its convolutions this way; keep the new stem consistent with the rest.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model


def feature_dim_of(encoder: nn.Module, feature_dim: int | None = None) -> int:
    """The feature size of ``encoder``: ``feature_dim`` if given, else its ``num_features`` attribute.

    Example:
        >>> from salmask.ssl import build_encoder, feature_dim_of
        >>> feature_dim_of(build_encoder("resnet18"))
        512
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    if feature_dim is None:
        feature_dim = getattr(encoder, "num_features", None)
        if feature_dim is None:
            raise ValueError(
                f"encoder ({type(encoder).__name__}) has no num_features attribute; pass feature_dim=, the size "
                "of the (B, feature_dim) features it returns"
            )
    return check_int(feature_dim, "feature_dim", minimum=1)


def projection_head(
    in_features: int, hidden_features: int | None = None, out_features: int = EMBEDDING_DIM, *, batch_norm: bool = False
) -> nn.Sequential:
    """The 2-layer MLP projection head of MoCo v2 and SimCLR: linear, (BN,) ReLU, linear.

    Args:
        in_features: the encoder's feature size.
        hidden_features: width of the hidden layer; default ``in_features`` (MoCo v2, SimCLR).
        out_features: embedding size (128 in both papers).
        batch_norm: batch norm after the hidden linear layer (SimCLR v2 style heads).

    Example:
        >>> from salmask.ssl import projection_head
        >>> projection_head(512)
        Sequential(
          (0): Linear(in_features=512, out_features=512, bias=True)
          (1): ReLU(inplace=True)
          (2): Linear(in_features=512, out_features=128, bias=True)
        )
    """
    hidden_features = in_features if hidden_features is None else hidden_features
    sizes = {"in_features": in_features, "hidden_features": hidden_features, "out_features": out_features}
    for name, value in sizes.items():
        check_int(value, name, minimum=1)
    layers: list[nn.Module] = [nn.Linear(in_features, hidden_features, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden_features))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_features, out_features)]
    return nn.Sequential(*layers)


def head_for(
    encoder: nn.Module, feature_dim: int | None, hidden_dim: int | None, dim: int, projector: nn.Module | None
) -> tuple[int, nn.Module]:
    """The encoder's feature size and the projection head on it: ``projector`` if given, else the MLP."""
    feature_dim = feature_dim_of(encoder, feature_dim)
    if projector is not None and not isinstance(projector, nn.Module):
        raise TypeError(f"projector must be an nn.Module or None, got {type(projector).__name__}")
    return feature_dim, projection_head(feature_dim, hidden_dim, dim) if projector is None else projector
