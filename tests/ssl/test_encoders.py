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


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_a_narrow_encoder_doubles_its_width_per_stage_and_keeps_torchvision_names(name):
    narrow = build_encoder(name, small_images=True, stem_stride=2, width=16)
    expansion = type(narrow.layer1[0]).expansion
    assert [getattr(narrow, f"layer{stage}")[0].conv1.in_channels for stage in (2, 3, 4)] == [
        16 * expansion,
        32 * expansion,
        64 * expansion,
    ]
    assert narrow.num_features == 128 * expansion
    assert narrow.conv1.stride == (2, 2) and narrow.conv1.out_channels == 16
    reference = torchvision.models.get_model(name)
    assert [key for key in narrow.state_dict()] == [key for key in reference.state_dict() if not key.startswith("fc.")]
    features = {}
    narrow.layer1.register_forward_hook(lambda module, args, output: features.update(layer1=output))
    assert narrow(torch.randn(2, 3, 32, 32)).shape == (2, 128 * expansion)
    assert features["layer1"].shape[-2:] == (16, 16), "a stride-2 stem halves the 32 px view once"
    residual = build_encoder(name, width=16, zero_init_residual=True)
    last_norms = [block.bn3 if hasattr(block, "bn3") else block.bn2 for block in residual.layer1]
    assert all(torch.equal(norm.weight, torch.zeros_like(norm.weight)) for norm in last_norms)


def test_width_and_stem_stride_are_checked():
    with pytest.raises(ValueError, match="stem_stride"):
        build_encoder("resnet18", stem_stride=2)
    with pytest.raises(ValueError, match="stem_stride"):
        build_encoder("resnet18", small_images=True, stem_stride=4)
    with pytest.raises(ValueError, match="width"):
        build_encoder("resnet18", width=0)
    with pytest.raises(ValueError, match="width=64"):
        build_encoder("resnet18", width=16, weights="IMAGENET1K_V1")


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


# ---------------------------------------------------------------------------------------------------
# Classification models as encoders


@pytest.mark.parametrize("method", ["moco", "simclr"])
@pytest.mark.parametrize(
    "make_model",
    [
        lambda: torchvision.models.resnet18(num_classes=10),
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),  # classifier: Linear, act, drop, Linear
        lambda: pytest.importorskip("timm").create_model("resnet18", num_classes=10),
        lambda: pytest.importorskip("timm").create_model("mobilenetv3_small_050", num_classes=10),
    ],
    ids=["torchvision-resnet18", "torchvision-mobilenet_v3", "timm-resnet18", "timm-mobilenetv3"],
)
def test_moco_and_simclr_take_a_classification_model_and_train_it_without_its_classifier(method, make_model):
    from salmask.ssl import MoCo, SimCLR

    torch.manual_seed(0)
    model = make_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    contrastive = MoCo(model, queue_size=16) if method == "moco" else SimCLR(model)
    query, key, hard = torch.randn(3, 4, 3, 32, 32).unbind(0)
    out = contrastive(query, key, hard)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    features = contrastive.encoder(query)
    assert features.shape == (4, contrastive.feature_dim) and contrastive.feature_dim != 10
    assert contrastive.encoder is not model, "a copy trains: the model given keeps its classifier"
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert model(query).shape == (4, 10)


def test_without_classifier_leaves_encoders_alone_and_drops_only_the_last_linear_layer():
    from salmask.ssl import without_classifier

    encoder = build_encoder("resnet18")
    assert without_classifier(encoder) is encoder
    identity = nn.Identity()
    assert without_classifier(identity) is identity
    vgg = torchvision.models.vgg11(num_classes=5)
    headless = without_classifier(vgg)
    assert headless.num_features == 4096 and isinstance(headless.classifier[-1], nn.Identity)
    assert isinstance(headless.classifier[0], nn.Linear) and isinstance(vgg.classifier[-1], nn.Linear)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        without_classifier("resnet18")


def test_an_encoder_that_does_not_return_its_features_is_named_at_the_first_step():
    from salmask.ssl import MoCo, SimCLR

    logits_model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))  # not a torchvision or timm model
    images = torch.randn(2, 3, 8, 8)
    for model in (MoCo(logits_model, feature_dim=64, queue_size=8), SimCLR(logits_model, feature_dim=64)):
        with pytest.raises(ValueError, match=r"must return \(B, 64\) features .* got shape \(\d, 10\)"):
            model(images, images)
    with pytest.raises(ValueError, match="pass an encoder that returns pooled"):
        MoCo(torchvision.models.squeezenet1_0(), queue_size=8)  # its classifier is a convolution
