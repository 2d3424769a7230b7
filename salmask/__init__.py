"""salmask: saliency-guided masking for contrastive self-supervised learning with ConvNets."""

from salmask.tv_tensors import Saliency

__version__ = "0.1.0.dev0"

__all__ = [
    "Saliency",
    "__version__",
]
