"""build_encoder, feature_dim_of and projection_head."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from salmask.ssl import RESNETS, build_encoder, feature_dim_of, projection_head


def test_small_image_stem_keeps_resolution_and_returns_features():
    encoder = build_encoder("resnet18", small_images=True)
    assert encoder.conv1.kernel_size == (3, 3) and encoder.conv1.stride == (1, 1)
    assert isinstance(encoder.maxpool, nn.Identity) and isinstance(encoder.fc, nn.Identity)
    assert encoder.num_features == 512
    features = {}
    encoder.layer1.register_forward_hook(lambda module, args, output: features.update(layer1=output))
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert features["layer1"].shape[-2:] == (32, 32)


def test_standard_stem_is_torchvision_s():
    encoder = build_encoder("resnet18")
    assert encoder.conv1.kernel_size == (7, 7) and encoder.conv1.stride == (2, 2)
    assert isinstance(encoder.maxpool, nn.MaxPool2d)
    assert build_encoder("resnet50").num_features == 2048


def test_checkpoint_loads_into_a_torchvision_resnet():
    encoder = build_encoder("resnet18")
    reference = torchvision.models.resnet18()
    result = reference.load_state_dict(encoder.state_dict(), strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys


def test_zero_init_residual_is_passed_on():
    encoder = build_encoder("resnet18", zero_init_residual=True)
    assert torch.equal(encoder.layer1[0].bn2.weight, torch.zeros(64))


def test_bad_encoder_names():
    assert {"resnet18", "resnet50"} <= set(RESNETS)
    with pytest.raises(ValueError, match="name must be one of"):
        build_encoder("vgg16")


def test_feature_dim_of():
    assert feature_dim_of(nn.Identity(), 7) == 7
    with pytest.raises(ValueError, match="num_features"):
        feature_dim_of(nn.Identity())
    with pytest.raises(ValueError, match="feature_dim must be a positive int"):
        feature_dim_of(nn.Identity(), 0)
    with pytest.raises(TypeError, match="encoder"):
        feature_dim_of("resnet18")


def test_projection_head():
    head = projection_head(16, 32, 8, batch_norm=True)
    assert isinstance(head[1], nn.BatchNorm1d) and head[0].bias is None
    assert head(torch.randn(4, 16)).shape == (4, 8)
    assert projection_head(16)[0].out_features == 16
    with pytest.raises(ValueError, match="out_features"):
        projection_head(16, 32, 0)
