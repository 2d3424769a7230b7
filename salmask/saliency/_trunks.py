"""The part of a model that returns its last feature map, ``(B, D, U, V)``: what SCDA localizes with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "feature_map_backbone"]

#: Per-channel mean of ImageNet images (RGB, in [0, 1]): the normalisation the backbones expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: Per-channel standard deviation of ImageNet images (RGB, in [0, 1]).
IMAGENET_STD = (0.229, 0.224, 0.225)

_HOW = (
    "pass a module or a callable that returns the (B, D, U, V) feature map (e.g. a timm model's "
    "forward_features, or torchvision.models.feature_extraction.create_feature_extractor)"
)


class _FeatureExtractor(nn.Module):
    """A trunk that takes ImageNet-normalised images and returns its last feature map.

    Networks trained with another input normalisation (e.g. EfficientNet-Lite's ``(x - 0.5) / 0.5``) get
    an affine re-normalisation in front, so every built backbone accepts the views a training pipeline
    already produces.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        method: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        # Name of the model's method that returns the feature map (timm: forward_features); None = forward.
        self.method = method
        self.saliency_name = name
        self.renormalize = tuple(mean) != IMAGENET_MEAN or tuple(std) != IMAGENET_STD
        imagenet_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        imagenet_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        target_mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        target_std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", imagenet_std / target_std, persistent=False)
        self.register_buffer("shift", (imagenet_mean - target_mean) / target_std, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if self.renormalize:
            images = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        if self.method is None:
            return self.model(images)
        return getattr(self.model, self.method)(images)

    def extra_repr(self) -> str:
        return f"name={self.saliency_name!r}, renormalize={self.renormalize}"


class _CallableBackbone(nn.Module):
    """A function (or any callable) from images to a feature map, as a module SCDA can hold."""

    def __init__(self, function: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.function = function
        self.saliency_name = getattr(function, "__name__", type(function).__name__)

    def forward(self, images: Tensor) -> Any:
        return self.function(images)

    def extra_repr(self) -> str:
        return f"name={self.saliency_name!r}"


def _is_timm_model(model: nn.Module) -> bool:
    has_features = callable(getattr(model, "forward_features", None))
    return has_features and isinstance(getattr(model, "pretrained_cfg", None), dict)


def torchvision_trunk(model: nn.Module) -> nn.Module:
    """The layers of a torchvision classification model up to its global pooling (shared, not copied).

    Raises:
        ValueError: a model whose last feature map is not ``(B, D, U, V)`` (vision transformers).
    """
    import torchvision

    models = torchvision.models
    if isinstance(model, models.ResNet):
        layers = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3]
        return nn.Sequential(*layers, model.layer4)
    if isinstance(model, models.RegNet):
        return nn.Sequential(model.stem, model.trunk_output)
    if isinstance(model, models.SwinTransformer):
        # Swin's stages return channels-last maps.
        return nn.Sequential(model.features, torchvision.ops.Permute([0, 3, 1, 2]))
    if isinstance(getattr(model, "features", None), nn.Module) and not isinstance(model, models.VisionTransformer):
        return model.features  # VGG, AlexNet, SqueezeNet, DenseNet, MobileNet, EfficientNet, ConvNeXt
    raise ValueError(f"{type(model).__name__} has no convolutional feature map that salmask knows how to take; {_HOW}")


def feature_map_backbone(backbone: Any) -> nn.Module:
    """``backbone`` as a module that maps ImageNet-normalised images to its last feature map.

    - a torchvision classification model: its layers before global pooling (shared with it, not copied);
    - a timm model: its ``forward_features``, behind the input normalisation its weights expect;
    - any other module: itself (it must return a ``(B, D, U, V)`` map, or a list, tuple or dict of maps);
    - any other callable: wrapped in a module (parameters it closes over are not moved by ``.to()``).

    Raises:
        TypeError: ``backbone`` is not callable.
        ValueError: a torchvision model without a convolutional feature map.
    """
    if isinstance(backbone, nn.Module):
        if hasattr(backbone, "saliency_name"):
            return backbone
        if _is_timm_model(backbone):
            config = backbone.pretrained_cfg
            name = f"timm:{config.get('architecture', type(backbone).__name__)}"
            mean, std = tuple(config.get("mean", IMAGENET_MEAN)), tuple(config.get("std", IMAGENET_STD))
            return _FeatureExtractor(backbone, name, mean, std, method="forward_features")
        if type(backbone).__module__.startswith("torchvision.models."):
            return _FeatureExtractor(torchvision_trunk(backbone), f"torchvision:{type(backbone).__name__}")
        return backbone
    if callable(backbone):
        return _CallableBackbone(backbone)
    raise TypeError(
        "backbone must be an nn.Module or a callable returning a (B, D, U, V) feature map, got "
        f"{type(backbone).__name__}"
    )
