"""Every public callable, given a bad argument, fails with a clear error that names the argument.

The walk covers everything in the ``__all__`` of ``salmask``, ``salmask.functional``, ``salmask.ssl``,
``salmask.data``, ``salmask.saliency`` and ``salmask.losses`` that can be called (classes are called to
construct them), and the ``forward`` of the modules a training step calls. Each starts from a valid call
(which must succeed); then one argument at a time is replaced by a value of a wrong type (always) and by a
wrong value of the right type where the annotation says what is right (NaN for a float, a fraction for an
int, an unknown name for a choice, a string for a bool). The call must raise ``TypeError`` (wrong type) or
``ValueError`` (wrong value), or a subclass, with the argument's name in the message. The few arguments
that take any object (a dataset, a callable transform checked when called) are listed with the reason.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import salmask
import salmask.data
import salmask.functional
import salmask.losses
import salmask.saliency
import salmask.ssl
from salmask.saliency._cache import SaliencyCache
from salmask.ssl._views import MaskedViews

MODULES = (salmask, salmask.functional, salmask.ssl, salmask.data, salmask.saliency, salmask.losses)


class _Bad:
    """A value of no type any salmask argument accepts."""

    def __repr__(self) -> str:
        return "<bad>"


BAD = _Bad()


class TinyEncoder(nn.Module):
    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def public_callables() -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}
    for module in MODULES:
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.ismodule(value) or not callable(value):
                continue
            if isinstance(value, type) and issubclass(value, BaseException):
                continue  # exception classes take a message
            if isinstance(value, type) and issubclass(value, tuple):
                continue  # NamedTuple outputs: constructed by salmask, holding what they are given
            found.setdefault(name, value)
    return found


CALLABLES = public_callables()
# The forward of the modules a training step calls, as "<Class>.forward".
FORWARDS = ("MaskedViews", "HardNegativeInfoNCE", "NTXentLoss", "MoCo", "SimCLR")


def parameters_of(function: Callable[..., Any]) -> list[inspect.Parameter]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p for p in inspect.signature(function).parameters.values() if p.kind in kinds and p.name != "self"]


def make_folder(root: Path) -> Path:
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(np.full((16, 16, 3), 60 * index + 30, dtype=np.uint8)).save(root / label / f"{index}.png")
    return root


def idx_file(path: Path) -> Path:
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    return path


class Environment:
    """Valid arguments of every public callable, made once for the module in a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = make_folder(root / "folder")
        self.scda = salmask.SCDA(nn.Conv2d(3, 4, 4, stride=4))
        self.cache_path = root / "cache.pt"
        self.cache = salmask.build_saliency_cache(
            self.folder, self.cache_path, self.scda, image_size=16, progress=False
        )
        self.checkpoint_path = salmask.ssl.save_checkpoint(
            {"model": {}, "epoch": 0, "step": 0, "config": {}}, root / "checkpoint.pt"
        )
        self.idx = idx_file(root / "labels-idx1-ubyte")
        self.counter = 0
        self.calls = self.valid_calls()

    def fresh(self, name: str) -> Path:
        self.counter += 1
        return self.root / f"{name}-{self.counter}"

    def valid_calls(self) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
        image = torch.rand(2, 3, 32, 32)
        saliency = torch.zeros(2, 4, 4, dtype=torch.bool)
        saliency[:, 1:3, 1:3] = True
        params = salmask.functional.draw_mask_params(image.shape, saliency, patch_size=8)
        mask = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
        embeddings = torch.randn(4, 8)
        moco = salmask.MoCo(TinyEncoder(), dim=8, queue_size=16)
        simclr = salmask.SimCLR(TinyEncoder(), dim=8)
        loader = DataLoader(TensorDataset(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])), batch_size=2)
        checkpoint = {"model": {"encoder.w": torch.ones(1)}, "epoch": 0, "step": 0, "config": {"arch": "resnet18"}}
        moco_checkpoint = {
            "model": {
                f"encoder.{key}": value for key, value in salmask.ssl.build_encoder("resnet18").state_dict().items()
            },
            "config": {"arch": "resnet18", "small_images": False},
        }
        views = torch.rand(2, 3, 16, 16)
        calls: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
            # salmask (transforms, tv_tensors, models, losses)
            "SaliencyMask": (salmask.SaliencyMask, {"fill": "mean", "mask_ratio": 0.25, "patch_size": 8}),
            "HighPassMask": (salmask.HighPassMask, {"mask_ratio": 0.25, "noise_std": 0.1}),
            "BlurMask": (salmask.BlurMask, {"mask_ratio": 0.25, "kernel_size": 5, "sigma": 1.0}),
            "MeanFillMask": (salmask.MeanFillMask, {"mask_ratio": 0.25}),
            "HardNegativeMask": (salmask.HardNegativeMask, {"fill": "mean", "mask_ratio": 0.5}),
            "HighPassFilter": (salmask.HighPassFilter, {"kernel_size": 5, "sigma": 1.0}),
            "Saliency": (salmask.Saliency, {"data": saliency, "dtype": None, "device": None, "requires_grad": None}),
            "SCDA": (salmask.SCDA, {"backbone": nn.Conv2d(3, 4, 4, stride=4), "threshold_std": 0.6, "input_size": 16}),
            "MaskedViews": (MaskedViews, {"strategy": "mean", "patch_size": 8}),
            "MoCo": (salmask.MoCo, {"encoder": TinyEncoder(), "dim": 8, "queue_size": 16}),
            "SimCLR": (salmask.SimCLR, {"encoder": TinyEncoder(), "dim": 8}),
            "MomentumQueue": (salmask.MomentumQueue, {"dim": 8, "size": 16}),
            "HardNegativeInfoNCE": (salmask.HardNegativeInfoNCE, {"temperature": 0.2}),
            "NTXentLoss": (salmask.NTXentLoss, {"temperature": 0.2}),
            "extend_moco_logits": (
                salmask.extend_moco_logits,
                {
                    "logits": torch.randn(4, 5),
                    "labels": torch.zeros(4, dtype=torch.long),
                    "query": embeddings,
                    "hard_negatives": torch.randn(4, 8),
                    "hard_negative_valid": torch.ones(4, dtype=torch.bool),
                    "temperature": 0.2,
                    "hard_negative_weight": 2.0,
                },
            ),
            "SaliencyCache": (
                SaliencyCache,
                {
                    "header": dict(self.cache.header),
                    "activation": self.cache.activation,
                    "done": self.cache.done,
                    "paths": self.cache.paths,
                },
            ),
            "SaliencyDataset": (
                salmask.SaliencyDataset,
                {"dataset": _folder_dataset(self.folder), "cache": self.cache, "threshold_std": 0.6},
            ),
            "SaliencyImageFolder": (
                salmask.SaliencyImageFolder,
                {"root": self.folder, "cache": self.cache_path, "transform": None, "return_target": True},
            ),
            "SyntheticShapes": (salmask.data.SyntheticShapes, {"split": "train", "num_images": 4, "image_size": 32}),
            "ThreeViews": (salmask.ssl.ThreeViews, {"pipeline": lambda *sample: sample, "masking": "mean"}),
            "TwoViews": (salmask.ssl.TwoViews, {"pipeline": lambda *sample: sample}),
            "build_backbone": (salmask.build_backbone, {"name": "resnet18", "weights": None}),
            "build_scda": (salmask.build_scda, {"name": "resnet18", "weights": None}),
            "compute_saliency_cache": (
                salmask.compute_saliency_cache,
                {
                    "dataset": [torch.zeros(3, 8, 8, dtype=torch.uint8)] * 3,
                    "scda": self.scda,
                    "image_size": 16,
                    "batch_size": 2,
                    "device": "cpu",
                    "progress": False,
                },
            ),
            "build_saliency_cache": (
                salmask.build_saliency_cache,
                {
                    "root": self.folder,
                    "out": self.fresh("cache") / "cache.pt",
                    "scda": self.scda,
                    "image_size": 16,
                    "batch_size": 2,
                    "num_workers": 0,
                    "device": "cpu",
                    "checkpoint_seconds": 60.0,
                    "progress": False,
                },
            ),
            "load_saliency_cache": (salmask.load_saliency_cache, {"path": self.cache_path, "allow_incomplete": False}),
            # salmask.functional
            "apply_fill": (
                salmask.functional.apply_fill,
                {"image": image, "mask": mask, "fill": "mean", "inplace": False},
            ),
            "apply_mask": (
                salmask.functional.apply_mask,
                {
                    "image": image,
                    "params": params,
                    "fill": "mean",
                    "patch_size": 8,
                    "hard_negative": False,
                    "generator": None,
                    "inplace": False,
                    "check_finite": True,
                },
            ),
            "draw_focal_windows": (
                salmask.functional.draw_focal_windows,
                {
                    "batch_size": 2,
                    "image_size": (32, 32),
                    "window_fraction": 0.5,
                    "device": "cpu",
                    "same_on_batch": False,
                },
            ),
            "draw_mask_params": (
                salmask.functional.draw_mask_params,
                {
                    "image_shape": image.shape,
                    "saliency": saliency,
                    "mask_ratio": 0.25,
                    "patch_size": 8,
                    "hard_negative": False,
                    "mask_type_probs": salmask.RELEASE_MASK_TYPE_PROBS,
                    "focal_keep_fraction": 0.9,
                    "focal_fill_fraction": 0.5,
                    "saliency_threshold": 0.5,
                    "p": 1.0,
                    "same_on_batch": False,
                    "device": "cpu",
                    "generator": torch.Generator().manual_seed(0),
                },
            ),
            "draw_mask_ratios": (
                salmask.functional.draw_mask_ratios,
                {"mask_ratio": (0.1, 0.2), "batch_size": 2, "device": "cpu", "same_on_batch": False},
            ),
            "draw_mask_types": (
                salmask.functional.draw_mask_types,
                {"probabilities": {"spatial": 1.0}, "batch_size": 2, "device": "cpu", "same_on_batch": False},
            ),
            "expand_patch_mask": (
                salmask.functional.expand_patch_mask,
                {"patch_mask": saliency, "image_size": (32, 32), "patch_size": 8},
            ),
            "fill_blur": (salmask.functional.fill_blur, {"image": image, "mask": mask, "kernel_size": 5, "sigma": 1.0}),
            "fill_constant": (salmask.functional.fill_constant, {"image": image, "mask": mask, "value": 0.5}),
            "fill_mean": (salmask.functional.fill_mean, {"image": image, "mask": mask, "inplace": False}),
            "fill_noise": (
                salmask.functional.fill_noise,
                {"image": image, "mask": mask, "std": 0.5, "mean": 0.0, "generator": None, "inplace": False},
            ),
            "focal_window_mask": (
                salmask.functional.focal_window_mask,
                {"window": torch.tensor([[1, 2, 3, 4]]), "image_size": (16, 16), "keep_window": True},
            ),
            "gaussian_blur": (salmask.functional.gaussian_blur, {"image": image, "kernel_size": 5, "sigma": 1.0}),
            "high_pass": (salmask.functional.high_pass, {"image": image, "kernel_size": 5, "sigma": 1.0}),
            "mask_images": (
                salmask.functional.mask_images,
                {"image": image, "saliency": saliency, "fill": "mean", "generator": None, "fill_options": None},
            ),
            "masked_patch_counts": (
                salmask.functional.masked_patch_counts,
                {"foreground": saliency.flatten(1), "mask_ratio": torch.tensor([0.25, 0.5]), "hard_negative": False},
            ),
            "patch_grid_size": (salmask.functional.patch_grid_size, {"image_size": (32, 32), "patch_size": 8}),
            "render_mask": (
                salmask.functional.render_mask,
                {"params": params, "image_size": (32, 32), "patch_size": 8, "hard_negative": False},
            ),
            "saliency_to_patch_grid": (
                salmask.functional.saliency_to_patch_grid,
                {"saliency": saliency, "image_size": (32, 32), "patch_size": 8, "threshold": 0.5},
            ),
            "sample_patch_mask": (
                salmask.functional.sample_patch_mask,
                {
                    "foreground": saliency.flatten(1),
                    "mask_ratio": torch.tensor([0.25, 0.5]),
                    "num_patches": None,
                    "hard_negative": False,
                    "num_sets": 1,
                    "generator": None,
                    "same_on_batch": False,
                },
            ),
            # salmask.ssl
            "ResumableSampler": (
                salmask.ssl.ResumableSampler,
                {"dataset": range(6), "shuffle": True, "seed": 0, "drop_last": False, "num_replicas": 1, "rank": 0},
            ),
            "SeededDataset": (salmask.ssl.SeededDataset, {"dataset": range(6), "seed": 0, "on_bad_image": "fail"}),
            "StopSignal": (salmask.ssl.StopSignal, {"signals": (15,)}),
            "batch_shuffle": (salmask.ssl.batch_shuffle, {"images": views}),
            "batch_unshuffle": (salmask.ssl.batch_unshuffle, {"outputs": views, "restore": None}),
            "build_encoder": (salmask.ssl.build_encoder, {"name": "resnet18", "small_images": True}),
            "scaled_release_filters": (salmask.ssl.scaled_release_filters, {"view_size": 32}),
            "check_queue_size": (
                salmask.ssl.check_queue_size,
                {"queue_size": 16, "num_images": 128, "batch_size": 8},
            ),
            "encoder_state_dict": (salmask.ssl.encoder_state_dict, {"checkpoint": checkpoint, "prefix": "encoder."}),
            "extract_features": (
                salmask.ssl.extract_features,
                {"encoder": nn.Flatten(), "loader": loader, "device": "cpu", "transform": None, "autocast": False},
            ),
            "feature_dim_of": (salmask.ssl.feature_dim_of, {"encoder": TinyEncoder(), "feature_dim": None}),
            "without_classifier": (salmask.ssl.without_classifier, {"model": TinyEncoder()}),
            "finite_or_raise": (salmask.ssl.finite_or_raise, {"value": 1.0, "what": "the loss", "where": "step 1"}),
            "get_rng_state": (salmask.ssl.get_rng_state, {}),
            "input_filter_of": (salmask.ssl.input_filter_of, {"config": {"strategy": "high_pass"}, "enabled": None}),
            "knn_predict": (
                salmask.ssl.knn_predict,
                {
                    "features": torch.eye(3),
                    "bank_features": torch.eye(3),
                    "bank_labels": torch.tensor([0, 1, 1]),
                    "num_classes": 2,
                    "k": 1,
                    "temperature": 0.1,
                    "chunk_size": 2,
                },
            ),
            "knn_top1": (
                salmask.ssl.knn_top1,
                {
                    "encoder": nn.Flatten(),
                    "train_loader": loader,
                    "val_loader": loader,
                    "num_classes": 2,
                    "k": 1,
                    "temperature": 0.1,
                    "chunk_size": 2,
                },
            ),
            "load_checkpoint": (salmask.ssl.load_checkpoint, {"path": self.checkpoint_path, "map_location": "cpu"}),
            "load_state_dict_checked": (
                salmask.ssl.load_state_dict_checked,
                {"module": nn.Linear(2, 2), "state_dict": nn.Linear(2, 2).state_dict(), "source": "test"},
            ),
            "pretrained_encoder": (salmask.ssl.pretrained_encoder, {"checkpoint": moco_checkpoint}),
            "projection_head": (
                salmask.ssl.projection_head,
                {"in_features": 6, "hidden_features": None, "out_features": 4, "batch_norm": False},
            ),
            "record_input_filter": (salmask.ssl.record_input_filter, {"input_filter": salmask.HighPassFilter()}),
            "restore_training_state": (
                salmask.ssl.restore_training_state,
                {
                    "checkpoint": salmask.ssl.training_state(model=nn.Linear(2, 2), config={}, epoch=1, step=0),
                    "model": nn.Linear(2, 2),
                    "optimizer": None,
                    "scheduler": None,
                    "scaler": None,
                    "restore_rng": False,
                },
            ),
            "save_checkpoint": (
                salmask.ssl.save_checkpoint,
                {"checkpoint": {"model": {}, "epoch": 0, "step": 0, "config": {}}, "path": self.fresh("ck") / "c.pt"},
            ),
            "set_rng_state": (salmask.ssl.set_rng_state, {"state": salmask.ssl.get_rng_state()}),
            "training_state": (
                salmask.ssl.training_state,
                {"model": nn.Linear(2, 2), "config": {}, "epoch": 0, "step": 0, "metrics": None},
            ),
            # salmask.data
            "FashionMNIST": None,  # needs the data set's files: its arguments are checked in tests/data
            "build_imagenet100": None,  # needs an ImageNet tree: checked in tests/data/test_imagenet100.py
            "read_idx": (salmask.data.read_idx, {"path": self.idx}),
            "read_val_labels": None,  # a path: checked in tests/data/test_imagenet100.py
            # salmask.saliency
            "activation_from_features": (
                salmask.saliency.activation_from_features,
                {"features": torch.rand(2, 4, 3, 3)},
            ),
            "largest_connected_component": (
                salmask.saliency.largest_connected_component,
                {"foreground": saliency, "connectivity": 8},
            ),
            "offline_weights_path": (salmask.saliency.offline_weights_path, {"name": "efficientnet_lite0"}),
            "scda_foreground": (
                salmask.saliency.scda_foreground,
                {
                    "activation": torch.rand(2, 4, 4),
                    "threshold_std": 0.6,
                    "largest_component": False,
                    "connectivity": 8,
                },
            ),
            # forwards
            "MaskedViews.forward": (
                MaskedViews("mean", patch_size=8),
                {"query": image, "key": image, "query_saliency": saliency, "key_saliency": saliency},
            ),
            "HardNegativeInfoNCE.forward": (
                salmask.HardNegativeInfoNCE(),
                {
                    "query": embeddings,
                    "key": embeddings,
                    "negatives": torch.randn(16, 8),
                    "hard_negatives": torch.randn(4, 8),
                    "hard_negative_valid": torch.ones(4, dtype=torch.bool),
                    "return_logits": False,
                },
            ),
            "NTXentLoss.forward": (
                salmask.NTXentLoss(),
                {
                    "view_a": embeddings,
                    "view_b": embeddings,
                    "hard_negatives": torch.randn(4, 8),
                    "hard_negative_valid": None,
                    "return_logits": False,
                },
            ),
            "MoCo.forward": (
                moco,
                {
                    "query": views,
                    "key": views,
                    "hard_negatives": views,
                    "hard_negative_valid": torch.ones(2, dtype=torch.bool),
                },
            ),
            "SimCLR.forward": (
                simclr,
                {"query": views, "key": views, "hard_negatives": None, "hard_negative_valid": None},
            ),
        }
        return calls


def _folder_dataset(root: Path) -> Any:
    from torchvision.datasets import ImageFolder

    return ImageFolder(root)


def wrong_values(parameter: inspect.Parameter) -> list[tuple[str, Any]]:
    """The bad values tried for a parameter: a wrong type, and a wrong value where the annotation tells."""
    annotation = str(parameter.annotation)
    values: list[tuple[str, Any]] = [("type", BAD)]
    if "float" in annotation:
        values.append(("nan", math.nan))
    elif annotation.startswith("int"):
        values.append(("fraction", 2.5))
    if annotation in ("bool", "bool | None"):
        values.append(("str for bool", "yes"))
    if annotation in ("str", "Reduction", "NegativesLayout", "BatchNormMode"):
        values.append(("unknown name", "no-such-name"))
    return values


def cases() -> list[tuple[str, str, str]]:
    found = []
    for name, function in CALLABLES.items():
        for parameter in parameters_of(function):
            found += [(name, parameter.name, kind) for kind, _ in wrong_values(parameter)]
    for name in FORWARDS:
        for parameter in parameters_of(CALLABLES[name].forward):
            found += [(f"{name}.forward", parameter.name, kind) for kind, _ in wrong_values(parameter)]
    return found


# Arguments that take any object, or whose wrong values have a defined meaning, with the reason.
ANY_VALUE: dict[tuple[str, ...], str] = {
    ("SeededDataset", "dataset"): "any map-style dataset; its items are read (and checked) by the loader",
    ("ResumableSampler", "dataset"): "anything with a length, as torch's samplers take",
    ("SaliencyDataset", "dataset"): "any map-style dataset of images; its length is checked against the cache",
    ("Saliency", "data"): "anything torch.as_tensor takes, as every tv_tensor",
    ("Saliency", "device"): "torch's own device argument, checked by torch.as_tensor",
    ("Saliency", "dtype"): "torch's own dtype argument, checked by torch.as_tensor",
    ("Saliency", "requires_grad"): "torch's own argument",
    ("restore_training_state", "scheduler"): "any scheduler with load_state_dict (torch's or timm's)",
    ("training_state", "scheduler"): "any scheduler with state_dict (torch's or timm's)",
    ("load_checkpoint", "map_location"): "torch.load's own argument (a device, a string, a dict or a function)",
    ("extract_features", "transform"): "any callable on a batch of images",
    ("finite_or_raise", "what"): "text for the message; any object prints",
    ("finite_or_raise", "where"): "text for the message; any object prints",
    ("load_state_dict_checked", "source"): "text for the message; any object prints",
    ("SCDA", "name"): "a label recorded in cache headers; any object prints",
    ("finite_or_raise", "value", "nan"): "a NaN is what it reports, with FloatingPointError",
    # Not run: torchvision reads any other weights object as its ImageNet weights, which it would download.
    ("build_encoder", "weights", "type"): "build_encoder passes weights to torchvision unchecked (not run: a download)",
}


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    return Environment(tmp_path_factory.mktemp("bad_arguments"))


def call(environment: Environment, name: str, replace: dict[str, Any] | None = None) -> Any:
    entry = environment.calls[name]
    if entry is None:
        pytest.skip(f"{name} needs files of its own; its arguments are checked in its own tests")
    function, arguments = entry
    if name.endswith(".forward"):
        function = function.forward
    return function(**{**arguments, **(replace or {})})


def test_every_public_callable_has_a_valid_call(environment):
    calls = environment.calls
    missing = sorted(set(CALLABLES) - set(calls))
    assert not missing, f"no valid call listed for {missing}"
    for name in [*CALLABLES, *(f"{name}.forward" for name in FORWARDS)]:
        if calls[name] is not None:
            call(environment, name)


@pytest.mark.parametrize(("name", "argument", "kind"), cases())
def test_a_bad_argument_is_named(environment, name, argument, kind):
    for key in ((name.removesuffix(".forward"), argument), (name.removesuffix(".forward"), argument, kind)):
        if key in ANY_VALUE:
            pytest.skip(ANY_VALUE[key])
    function = CALLABLES[name.removesuffix(".forward")]
    if name.endswith(".forward"):
        function = function.forward
    parameter = next(p for p in parameters_of(function) if p.name == argument)
    value = dict(wrong_values(parameter))[kind]
    with pytest.raises((TypeError, ValueError)) as raised:
        call(environment, name, {argument: value})
    message = str(raised.value)
    assert argument in message, f"{type(raised.value).__name__}: {message}"
    assert "Traceback" not in message
