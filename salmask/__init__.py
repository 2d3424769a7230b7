"""salmask: saliency-guided masking for contrastive self-supervised learning with ConvNets.

The public names are re-exported here; the kernels under the transforms are in
:mod:`salmask.functional`.
"""

from salmask import data, distributed, functional, saliency, ssl
from salmask.data import SaliencyDataset, SaliencyImageFolder, SyntheticShapes
from salmask.losses import HardNegativeInfoNCE, InfoNCEOutput, NTXentLoss, extend_moco_logits
from salmask.saliency import (
    SCDA,
    SaliencyCache,
    build_backbone,
    build_saliency_cache,
    build_scda,
    compute_saliency_cache,
    load_saliency_cache,
)
from salmask.ssl import MaskedViews, MoCo, MomentumQueue, SimCLR, ThreeViews
from salmask.transforms import (
    RELEASE_MASK_TYPE_PROBS,
    BlurMask,
    HardNegativeMask,
    HighPassFilter,
    HighPassMask,
    MeanFillMask,
    SaliencyMask,
)
from salmask.tv_tensors import Saliency

__version__ = "0.1.0.dev0"

__all__ = [
    "RELEASE_MASK_TYPE_PROBS",
    "SCDA",
    "BlurMask",
    "HardNegativeInfoNCE",
    "HardNegativeMask",
    "HighPassFilter",
    "HighPassMask",
    "InfoNCEOutput",
    "MaskedViews",
    "MeanFillMask",
    "MoCo",
    "MomentumQueue",
    "NTXentLoss",
    "Saliency",
    "SaliencyCache",
    "SaliencyDataset",
    "SaliencyImageFolder",
    "SaliencyMask",
    "SimCLR",
    "SyntheticShapes",
    "ThreeViews",
    "__version__",
    "build_backbone",
    "build_saliency_cache",
    "build_scda",
    "compute_saliency_cache",
    "data",
    "distributed",
    "extend_moco_logits",
    "functional",
    "load_saliency_cache",
    "saliency",
    "ssl",
]
