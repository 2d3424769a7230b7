"""Self-supervised training pieces: per-step masking of view pairs, MoCo v2, SimCLR and base encoders.

A training step with saliency-guided masking::

    views = masker(query, key, query_saliency, key_saliency)   # MaskedViews, on the device
    out = model(views.query, views.key, views.hard_negatives, views.hard_negative_valid)  # MoCo / SimCLR
    out.loss.backward()

Optimisers and schedules come from timm (``timm.optim.create_optimizer_v2(model, "lars", ...)``,
``timm.scheduler.CosineLRScheduler``); torch's SGD serves MoCo.
"""

from salmask.ssl._checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from salmask.ssl._encoders import RESNETS, build_encoder, feature_dim_of, projection_head, without_classifier
from salmask.ssl._evaluation import encoder_state_dict, input_filter_of, pretrained_encoder, record_input_filter
from salmask.ssl._knn import extract_features, knn_predict, knn_top1
from salmask.ssl._moco import BATCH_NORM_MODES, MoCo, batch_shuffle, batch_unshuffle
from salmask.ssl._queue import MomentumQueue, check_queue_size
from salmask.ssl._resumable_data import BAD_IMAGE_POLICIES, BadImageError, ResumableSampler, SeededDataset
from salmask.ssl._rng import get_rng_state, set_rng_state
from salmask.ssl._simclr import SimCLR
from salmask.ssl._stopping import StopSignal, finite_or_raise
from salmask.ssl._three_views import ThreeViews, ThreeViewsOutput
from salmask.ssl._training_state import load_state_dict_checked, restore_training_state, training_state
from salmask.ssl._views import STRATEGIES, MaskedViews, MaskedViewsOutput, TwoViews, scaled_release_filters

__all__ = [
    "BAD_IMAGE_POLICIES",
    "BATCH_NORM_MODES",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "RESNETS",
    "STRATEGIES",
    "BadImageError",
    "CheckpointError",
    "MaskedViews",
    "MaskedViewsOutput",
    "MoCo",
    "MomentumQueue",
    "ResumableSampler",
    "SeededDataset",
    "SimCLR",
    "StopSignal",
    "ThreeViews",
    "ThreeViewsOutput",
    "TwoViews",
    "batch_shuffle",
    "batch_unshuffle",
    "build_encoder",
    "check_queue_size",
    "encoder_state_dict",
    "extract_features",
    "feature_dim_of",
    "finite_or_raise",
    "get_rng_state",
    "input_filter_of",
    "knn_predict",
    "knn_top1",
    "load_checkpoint",
    "load_state_dict_checked",
    "pretrained_encoder",
    "projection_head",
    "record_input_filter",
    "restore_training_state",
    "save_checkpoint",
    "scaled_release_filters",
    "set_rng_state",
    "training_state",
    "without_classifier",
]
