"""Self-supervised training pieces: per-step masking of view pairs, MoCo v2, SimCLR and base encoders.

A training step with saliency-guided masking::

    views = masker(query, key, query_saliency, key_saliency)   # MaskedViews, on the device
    out = model(views.query, views.key, views.hard_negatives, views.hard_negative_valid)  # MoCo / SimCLR
    out.loss.backward()

Optimisers and schedules come from timm (``timm.optim.create_optimizer_v2(model, "lars", ...)``,
``timm.scheduler.CosineLRScheduler``); torch's SGD serves MoCo.
"""

from salmask.ssl._encoders import RESNETS, build_encoder, feature_dim_of, projection_head
from salmask.ssl._moco import BATCH_NORM_MODES, MoCo, batch_shuffle, batch_unshuffle
from salmask.ssl._simclr import SimCLR
from salmask.ssl._views import STRATEGIES, MaskedViews, MaskedViewsOutput

__all__ = [
    "BATCH_NORM_MODES",
    "RESNETS",
    "STRATEGIES",
    "MaskedViews",
    "MaskedViewsOutput",
    "MoCo",
    "SimCLR",
    "batch_shuffle",
    "batch_unshuffle",
    "build_encoder",
    "feature_dim_of",
    "projection_head",
]
