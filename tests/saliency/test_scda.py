from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from salmask import Saliency
from salmask.saliency import SCDA, scda_foreground


class CountingBackbone(nn.Module):
    """Conv + BN + ReLU at stride 4 that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.relu(self.bn(self.conv(images)))


@pytest.fixture
def scda() -> SCDA:
    torch.manual_seed(0)
    return SCDA(CountingBackbone())


def test_returns_bool_saliency_and_activation(scda: SCDA) -> None:
    images = torch.randn(3, 3, 32, 32)
    saliency = scda(images)
    assert isinstance(saliency, Saliency)
    assert saliency.shape == (3, 8, 8) and saliency.dtype == torch.bool
    activation = scda.activation_map(images)
    assert activation.shape == (3, 8, 8) and activation.dtype == torch.float32
    assert torch.equal(saliency.as_subclass(torch.Tensor), scda_foreground(activation, 0.6))


def test_query_and_key_share_one_forward(scda: SCDA) -> None:
    query, key = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    query_saliency, key_saliency = scda(query, key)
    assert scda.backbone.calls == 1
    assert torch.equal(query_saliency, scda(query)) and torch.equal(key_saliency, scda(key))
    query_activation, key_activation = scda.activation_map(query, key)
    assert query_activation.shape == key_activation.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="share"):
        scda(query, torch.randn(2, 3, 16, 16))


def test_stays_frozen_inside_a_training_model(scda: SCDA) -> None:
    model = nn.ModuleDict({"encoder": nn.Linear(2, 2), "saliency": scda})
    model.train()
    assert model["encoder"].training
    assert not scda.training and not scda.backbone.training and not scda.backbone.bn.training
    assert not any(parameter.requires_grad for parameter in scda.parameters())
    statistics = copy.deepcopy(scda.backbone.bn.state_dict())
    images = torch.randn(4, 3, 32, 32, requires_grad=True)
    saliency = scda(images)
    activation = scda.activation_map(images)
    assert not activation.requires_grad and not saliency.requires_grad
    for name, value in scda.backbone.bn.state_dict().items():
        assert torch.equal(value, statistics[name]), name


def test_does_not_change_its_input(scda: SCDA) -> None:
    images = torch.randn(2, 3, 32, 32)
    copy_of_images = images.clone()
    scda(images)
    assert torch.equal(images, copy_of_images)


def test_list_and_dict_feature_outputs() -> None:
    class Pyramid(nn.Module):
        def __init__(self, as_dict: bool) -> None:
            super().__init__()
            self.as_dict = as_dict
            self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.deep = nn.Conv2d(4, 4, 3, stride=2, padding=1)

        def forward(self, images: torch.Tensor):
            shallow = self.stem(images)
            deep = self.deep(shallow)
            return {"shallow": shallow, "deep": deep} if self.as_dict else [shallow, deep]

    images = torch.randn(1, 3, 32, 32)
    assert SCDA(Pyramid(as_dict=False))(images).shape == (1, 8, 8)
    assert SCDA(Pyramid(as_dict=True))(images).shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, D, U, V\)"):
        SCDA(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))(images)


def test_reduced_input_resolution_resampled_to_the_patch_grid(scda: SCDA) -> None:
    cheap = SCDA(scda.backbone, input_size=16, output_size=8)
    images = torch.randn(2, 3, 32, 32)
    calls = scda.backbone.calls
    assert cheap.activation_map(images).shape == (2, 8, 8)
    assert cheap(images).shape == (2, 8, 8)
    assert scda.backbone.calls == calls + 2
    native = SCDA(scda.backbone, input_size=(16, 16))
    assert native(images).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="input_size"):
        SCDA(scda.backbone, input_size=0)


def test_largest_component_option(scda: SCDA) -> None:
    images = torch.randn(4, 3, 32, 32)
    plain = SCDA(scda.backbone, threshold_std=0.0)(images)
    largest = SCDA(scda.backbone, threshold_std=0.0, largest_component=True, connectivity=4)(images)
    assert (largest <= plain).all()
    assert (largest.flatten(1).sum(1) > 0).all()


def test_autocast_channels_last_and_dtype_moves(scda: SCDA) -> None:
    images = torch.randn(2, 3, 32, 32)
    reference = scda.activation_map(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        activation = scda.activation_map(images)
    assert activation.dtype == torch.float32
    torch.testing.assert_close(activation, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())
    scda_cl = copy.deepcopy(scda).to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        scda_cl.activation_map(images.contiguous(memory_format=torch.channels_last)),
        reference,
        rtol=1e-4,
        atol=1e-4,
    )
    double = copy.deepcopy(scda).to(torch.float64)
    assert double(images.double()).shape == (2, 8, 8)
    assert not double.training


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(scda: SCDA) -> None:
    scda = scda.to("cuda")
    images = torch.randn(2, 3, 32, 32, device="cuda")
    saliency = scda(images, images)[0]
    assert saliency.device.type == "cuda"
    reference = SCDA(copy.deepcopy(scda.backbone).cpu())(images.cpu())
    assert (saliency.cpu() == reference).float().mean() > 0.95


def test_invalid_arguments() -> None:
    with pytest.raises(TypeError, match=r"backbone must be an nn\.Module or a callable"):
        SCDA("resnet50")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold_std"):
        SCDA(nn.Identity(), threshold_std=float("nan"))
    with pytest.raises(ValueError, match="connectivity"):
        SCDA(nn.Identity(), connectivity=5)
    with pytest.raises(ValueError, match="images"):
        SCDA(nn.Identity())(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="at least one"):
        SCDA(nn.Identity())()
