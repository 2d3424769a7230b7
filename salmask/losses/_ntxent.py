"""The SimCLR form of the loss: NT-Xent over the 2B views, with hard negatives."""

from __future__ import annotations

import torch

from salmask._defaults import HARD_NEGATIVE_WEIGHT, TEMPERATURE
from salmask._validation import (
    check_bool,
    check_embedding_pair,
    hard_negatives_as_batch,
)
from salmask.distributed import all_gather_with_grad, get_rank, get_world_size
from salmask.losses._core import (
    InfoNCEOutput,
    Reduction,
    _autocast_disabled,
    _compute_dtype,
    _ContrastiveLoss,
)

__all__ = ["NTXentLoss"]


def _in_batch_negative_columns(num_local: int, world_size: int, rank: int, device: torch.device) -> torch.Tensor:
    """Column indices of each local anchor's negatives in the gathered similarity matrix.

    The gathered candidates are ``[view_a of all ranks, view_b of all ranks]`` (``2 * world_size *
    num_local`` rows); local anchors are ``[view_a, view_b]`` of this rank. Returns a tensor shaped
    ``(2 * num_local, 2 * world_size * num_local - 2)`` listing, in order, every candidate except the
    anchor itself and its positive.
    """
    global_batch = world_size * num_local
    local = torch.arange(num_local, device=device) + rank * num_local
    own = torch.cat([local, local + global_batch])
    positive = torch.cat([local + global_batch, local])
    low = torch.minimum(own, positive).unsqueeze(1)
    high = torch.maximum(own, positive).unsqueeze(1)
    # The j-th element of {0 .. n-1} without {low, high}: skip one index once j reaches low and another
    # once it reaches high - 1. Indices built this way need no boolean indexing (and so no host sync).
    slots = torch.arange(2 * global_batch - 2, device=device).unsqueeze(0)
    return slots + (slots >= low).long() + (slots >= high - 1).long()


class NTXentLoss(_ContrastiveLoss):
    """SimCLR's NT-Xent loss over the 2B views, with optional rho-weighted hard negatives.

    Every one of the 2B views is an anchor; its positive is the other view of the same image and its
    negatives are the other 2B - 2 views of the batch (of the global batch with ``gather_distributed``).
    Hard negatives ``t_i`` of image ``i`` are added, weighted by rho, to the anchor ``view_a[i]`` (the
    masked query view, as in Eq. 2), and also to ``view_b[i]`` with ``symmetric_hard_negatives``. The
    logits are laid out as in :class:`HardNegativeInfoNCE` (positive first, target 0) and go through the
    same core, so both forms share numerics and masking rules.

    With ``gather_distributed`` the views of all ranks are gathered with
    :func:`salmask.distributed.all_gather_with_grad`, so the local slice keeps its gradient and, under
    DDP's gradient averaging, training matches one process holding the whole global batch. Hard negatives
    are per image and are not gathered. Without an initialised process group the gather is a no-op.

    Args:
        temperature: tau, > 0 (SimCLR used 0.1 to 0.5 depending on batch size; 0.2 matches the MoCo path).
        hard_negative_weight: rho, > 0.
        normalize: L2-normalise the views and hard negatives along D first.
        reduction: ``"mean"`` (default, over the 2B anchors), ``"sum"`` or ``"none"``.
        gather_distributed: use every rank's views as negatives.
        symmetric_hard_negatives: also contrast ``view_b[i]`` with ``t_i``.
        check_finite: raise if any embedding holds NaN or Inf (one device-to-host sync per call;
            ``False`` skips it).

    Example:
        >>> import torch
        >>> from salmask.losses import NTXentLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = NTXentLoss(temperature=0.2)
        >>> view_a, view_b, hard = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 2, 16)
        >>> out = criterion(view_a, view_b, hard, return_logits=True)
        >>> out.logits.shape  # 2B anchors: positive, 2B - 2 negatives, M hard negatives
        torch.Size([8, 9])
    """

    def __init__(
        self,
        temperature: float = TEMPERATURE,
        hard_negative_weight: float = HARD_NEGATIVE_WEIGHT,
        *,
        normalize: bool = True,
        reduction: Reduction = "mean",
        gather_distributed: bool = False,
        symmetric_hard_negatives: bool = False,
        check_finite: bool = True,
    ) -> None:
        super().__init__(temperature, hard_negative_weight, normalize, reduction, check_finite)
        self.gather_distributed = check_bool(gather_distributed, "gather_distributed")
        self.symmetric_hard_negatives = check_bool(symmetric_hard_negatives, "symmetric_hard_negatives")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, gather_distributed={self.gather_distributed}, "
            f"symmetric_hard_negatives={self.symmetric_hard_negatives}"
        )

    def forward(
        self,
        view_a: torch.Tensor,
        view_b: torch.Tensor,
        hard_negatives: torch.Tensor | None = None,
        hard_negative_valid: torch.Tensor | None = None,
        *,
        return_logits: bool = False,
    ) -> torch.Tensor | InfoNCEOutput:
        """Compute the loss.

        Args:
            view_a: ``(B, D)`` embeddings of the first (masked query) views.
            view_b: ``(B, D)`` embeddings of the second (key) views; row ``i`` pairs with ``view_a[i]``.
            hard_negatives: optional ``(B, D)`` or ``(B, M, D)``; row ``i`` belongs to image ``i`` only.
            hard_negative_valid: optional ``(B,)`` or ``(B, M)`` bool; ``False`` drops that hard negative.
            return_logits: also return the logits (rows: ``view_a`` anchors then ``view_b`` anchors) and
                targets.

        Returns:
            The loss, or an :class:`InfoNCEOutput` with ``return_logits``.

        Raises:
            TypeError: a tensor argument is not a tensor of the right dtype.
            ValueError: mismatched shapes, an empty batch (B = 0), a batch of one image without other ranks
                to contrast with, or non-finite embeddings.
        """
        check_embedding_pair(view_a, view_b, ("view_a", "view_b"))
        check_bool(return_logits, "return_logits")
        batch_size, dim = view_a.shape
        world_size = get_world_size() if self.gather_distributed else 1
        rank = get_rank() if self.gather_distributed else 0
        if batch_size * world_size < 2 and hard_negatives is None:
            raise ValueError(
                "NT-Xent needs at least two images (view_a and view_b of shape (B, D) with B >= 2) "
                f"or hard negatives; got B={batch_size}"
            )
        hard, hard_valid = hard_negatives_as_batch(hard_negatives, hard_negative_valid, batch_size, dim)
        self._check_finite({"view_a": view_a, "view_b": view_b, "hard_negatives": hard})

        dtype = _compute_dtype(view_a, view_b, hard)
        with _autocast_disabled(view_a.device):
            view_a, view_b = self._prepare(view_a, dtype), self._prepare(view_b, dtype)
            if world_size > 1:
                candidates = torch.cat([all_gather_with_grad(view_a), all_gather_with_grad(view_b)])
            else:
                candidates = torch.cat([view_a, view_b])
            anchors = torch.cat([view_a, view_b])
            partners = torch.cat([view_b, view_a])
            positive = (anchors * partners).sum(dim=1)
            negative_columns = _in_batch_negative_columns(batch_size, world_size, rank, anchors.device)
            negative_logits = torch.gather(anchors @ candidates.t(), 1, negative_columns)

            hard_logits = None
            if hard is not None:
                hard = self._prepare(hard, dtype)
                hard_logits = torch.cat(
                    [
                        torch.einsum("bd,bmd->bm", view_a, hard),
                        torch.einsum("bd,bmd->bm", view_b, hard),
                    ]
                )
                if hard_valid is None:
                    hard_valid = torch.ones(hard.shape[:2], dtype=torch.bool, device=hard.device)
                second = hard_valid if self.symmetric_hard_negatives else torch.zeros_like(hard_valid)
                hard_valid = torch.cat([hard_valid, second])
            output = self._cross_entropy(positive, negative_logits, hard_logits, hard_valid)
        return output if return_logits else output.loss
