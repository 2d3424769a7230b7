"""Base encoders (torchvision ResNets, or any torchvision or timm classifier without its classifier) and
projection heads."""

from __future__ import annotations

import copy
import urllib.parse
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from salmask._defaults import EMBEDDING_DIM
from salmask._downloads import torchvision_state_dict
from salmask._validation import check_bool, check_choice, check_int

__all__ = ["RESNETS", "build_encoder", "feature_dim_of", "projection_head", "without_classifier"]

# Where torchvision's classification models keep their classifier.
_TORCHVISION_HEADS = ("fc", "classifier", "heads", "head")

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
    stem_stride: int = 1,
    width: int = 64,
    weights: Any = None,
    zero_init_residual: bool = False,
) -> torchvision.models.ResNet:
    """A torchvision ResNet whose ``fc`` is an identity, so that it returns pooled features.

    The model keeps torchvision's module names (a checkpoint of it loads into a torchvision ResNet with
    ``strict=False``, only ``fc`` missing) and carries its feature size as ``num_features`` (2048 for
    ResNet-50, 512 for ResNet-18), which :class:`MoCo` and :class:`SimCLR` read.

    Args:
        name: a torchvision ResNet, one of ``RESNETS``.
        small_images: replace the stem by a 3x3 convolution and drop the max-pool, the usual stem for
            CIFAR-sized (32-64 px) images, which the 224 px stem would shrink to a few pixels. The new stem
            is freshly initialised even when ``weights`` are given.
        stem_stride: stride of the small-image stem: 1 (CIFAR's), or 2, which costs every later layer
            four times less (a CPU budget at 32 px).
        width: channels of the first stage, doubled at each later one (64 is torchvision's; 16 makes a
            ResNet-18 about sixteen times cheaper). Module names stay torchvision's.
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
        >>> narrow = build_encoder("resnet18", small_images=True, stem_stride=2, width=16)
        >>> narrow.num_features, narrow(torch.randn(2, 3, 32, 32)).shape
        (128, torch.Size([2, 128]))
    """
    check_choice(name, "name", RESNETS)
    check_bool(small_images, "small_images")
    check_bool(zero_init_residual, "zero_init_residual")
    check_choice(check_int(stem_stride, "stem_stride"), "stem_stride", (1, 2))
    check_int(width, "width", minimum=1)
    if stem_stride != 1 and not small_images:
        raise ValueError("stem_stride sets the small-image stem's stride; pass small_images=True with it")
    if width != 64 and weights is not None:
        raise ValueError(f"weights exist for torchvision's widths only (width=64), got width={width}")
    model = torchvision.models.get_model(name, weights=None, zero_init_residual=zero_init_residual)
    if width != 64:
        _set_width(model, width, zero_init_residual)
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
        model.conv1 = nn.Conv2d(3, stem_channels, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        # torchvision initialises its convolutions this way; keep the new stem consistent with the rest.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    _drop_torchvision_classifier(model)
    return model


def _set_width(model: torchvision.models.ResNet, width: int, zero_init_residual: bool) -> None:
    """Rebuild a torchvision ResNet's stem and stages at ``width`` channels (doubling per stage), in place,
    with its own block type, depths, groups and initialisation."""
    block = type(model.layer1[0])
    depths = [len(getattr(model, f"layer{stage}")) for stage in range(1, 5)]
    norm_layer = model._norm_layer
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = norm_layer(width)
    for stage, depth in enumerate(depths):
        layer = model._make_layer(block, width * 2**stage, depth, stride=1 if stage == 0 else 2)
        setattr(model, f"layer{stage + 1}", layer)
    model.fc = nn.Linear(width * 8 * block.expansion, model.fc.out_features)
    # torchvision's initialisation of a new ResNet, for the rebuilt layers.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, torchvision.models.resnet.Bottleneck):
                nn.init.zeros_(module.bn3.weight)
            elif isinstance(module, torchvision.models.resnet.BasicBlock):
                nn.init.zeros_(module.bn2.weight)


def _is_timm_classifier(model: nn.Module) -> bool:
    return callable(getattr(model, "reset_classifier", None)) and isinstance(getattr(model, "num_classes", None), int)


def _drop_torchvision_classifier(model: nn.Module) -> bool:
    """Replace the last ``nn.Linear`` of a torchvision model's classifier by an identity, in place.

    Sets ``num_features`` to that layer's input size; returns whether there was one to replace.
    """
    for attribute in _TORCHVISION_HEADS:
        head = getattr(model, attribute, None)
        if not isinstance(head, nn.Module):
            continue
        if isinstance(head, nn.Linear):
            model.num_features = head.in_features
            setattr(model, attribute, nn.Identity())
            return True
        linears = [(name, module) for name, module in head.named_modules() if isinstance(module, nn.Linear)]
        if linears:
            name, last = linears[-1]
            model.num_features = last.in_features
            head.set_submodule(name, nn.Identity())
            return True
    return False


def without_classifier(model: nn.Module) -> nn.Module:
    """A torchvision or timm classification model as an encoder: a copy whose classifier is dropped.

    The copy returns the pooled features the classifier took and carries their size as ``num_features``,
    which :class:`MoCo` and :class:`SimCLR` read. torchvision models lose the last ``nn.Linear`` of their
    ``fc``, ``classifier``, ``heads`` or ``head``; timm models get ``reset_classifier(0)``. The model given
    is left as it is. A model without a classifier (``num_classes=0`` in timm, :func:`build_encoder`'s, or
    any other module) is returned itself.

    Args:
        model: a classification model, or an encoder.

    Returns:
        The encoder.

    Example:
        >>> import torch, torchvision
        >>> from salmask.ssl import without_classifier
        >>> model = torchvision.models.mobilenet_v3_small(num_classes=10)
        >>> encoder = without_classifier(model)
        >>> encoder.num_features, encoder(torch.randn(2, 3, 64, 64)).shape, model.classifier[-1].out_features
        (1024, torch.Size([2, 1024]), 10)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if _is_timm_classifier(model):
        if model.num_classes == 0:
            return model
        encoder = copy.deepcopy(model)
        encoder.reset_classifier(0)
        return encoder
    if type(model).__module__.startswith("torchvision.models."):
        encoder = copy.deepcopy(model)
        if _drop_torchvision_classifier(encoder):
            return encoder
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
        # timm models whose pooled features go through one more layer before the classifier (MobileNetV3)
        # return that layer's output, of size head_hidden_size.
        feature_dim = getattr(encoder, "head_hidden_size", None) or getattr(encoder, "num_features", None)
        if feature_dim is None:
            raise ValueError(
                f"encoder ({type(encoder).__name__}) has no num_features attribute; pass an encoder that returns "
                "pooled (B, F) features with feature_dim=F (the classifier of torchvision and timm models, a final "
                "nn.Linear, is dropped for you)"
            )
    return check_int(feature_dim, "feature_dim", minimum=1)


def checked_features(features: Any, feature_dim: int) -> torch.Tensor:
    """``features`` if they are ``(B, feature_dim)``, else a ``ValueError`` that says what the encoder gave."""
    if isinstance(features, torch.Tensor) and features.ndim == 2 and features.shape[1] == feature_dim:
        return features
    got = f"shape {tuple(features.shape)}" if isinstance(features, torch.Tensor) else type(features).__name__
    raise ValueError(
        f"the encoder must return (B, {feature_dim}) features (feature_dim={feature_dim}), got {got}: give an "
        "encoder that pools, or its feature size as feature_dim (a classification model's logits are not features)"
    )


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
    check_bool(batch_norm, "batch_norm")
    hidden_features = in_features if hidden_features is None else hidden_features
    sizes = {"in_features": in_features, "hidden_features": hidden_features, "out_features": out_features}
    for name, value in sizes.items():
        check_int(value, name, minimum=1)
    layers: list[nn.Module] = [nn.Linear(in_features, hidden_features, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden_features))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_features, out_features)]
    return nn.Sequential(*layers)


def encoder_and_head(
    encoder: nn.Module, feature_dim: int | None, hidden_dim: int | None, dim: int, projector: nn.Module | None
) -> tuple[nn.Module, int, nn.Module]:
    """The encoder (a classification model without its classifier), its feature size and the projection head
    on it: ``projector`` if given, else the MLP."""
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    check_int(dim, "dim", minimum=1)
    if hidden_dim is not None:
        check_int(hidden_dim, "hidden_dim", minimum=1)
    encoder = without_classifier(encoder)
    feature_dim = feature_dim_of(encoder, feature_dim)
    if projector is not None and not isinstance(projector, nn.Module):
        raise TypeError(f"projector must be an nn.Module or None, got {type(projector).__name__}")
    return encoder, feature_dim, projection_head(feature_dim, hidden_dim, dim) if projector is None else projector
