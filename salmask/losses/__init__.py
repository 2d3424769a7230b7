"""Contrastive objectives with saliency-masked hard negatives.

The objective (paper Eq. 2) contrasts a masked query ``q`` with its unmasked key ``k+`` against ordinary
negatives ``z`` (a MoCo queue or the rest of a SimCLR batch) and per-image hard negatives ``t`` (the key
view with its foreground masked)::

    logits = [q.k+, q.z_1 ... q.z_K, rho * q.t_1 ... rho * q.t_M] / tau,   cross-entropy with target 0

:class:`HardNegativeInfoNCE` is the MoCo form, :class:`NTXentLoss` the SimCLR form; both go through the
same logits-and-cross-entropy core. :func:`extend_moco_logits` appends the hard-negative columns to the
``(logits, labels)`` pair that facebookresearch/moco's model returns, so its ``nn.CrossEntropyLoss`` stays
as it is.
"""

from salmask.losses._core import InfoNCEOutput
from salmask.losses._infonce import HardNegativeInfoNCE, extend_moco_logits
from salmask.losses._ntxent import NTXentLoss

__all__ = [
    "HardNegativeInfoNCE",
    "InfoNCEOutput",
    "NTXentLoss",
    "extend_moco_logits",
]
