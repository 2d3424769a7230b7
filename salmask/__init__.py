"""salmask: saliency-guided masking for contrastive self-supervised learning with ConvNets.

The public names are re-exported here; the kernels under the transforms are in
:mod:`salmask.functional`.
"""

from salmask import distributed, functional
from salmask.losses import HardNegativeInfoNCE, InfoNCEOutput, MomentumQueue, NTXentLoss, extend_moco_logits
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
    "BlurMask",
    "HardNegativeInfoNCE",
    "HardNegativeMask",
    "HighPassFilter",
    "HighPassMask",
    "InfoNCEOutput",
    "MeanFillMask",
    "MomentumQueue",
    "NTXentLoss",
    "Saliency",
    "SaliencyMask",
    "__version__",
    "distributed",
    "extend_moco_logits",
    "functional",
]
