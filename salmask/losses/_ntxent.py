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
from salmask.losses._infonce import _query_key_loss

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

    With ``memory_bank_size=(K, D)`` the loss is the MoCo form instead, as lightly's ``NTXentLoss`` with a
    memory bank is: each ``view_a[i]`` (the query) is contrasted with ``view_b[i]`` (its key), the K keys
    of the bank (no in-batch negatives) and its hard negatives; in a training step (``view_a`` carries
    gradient and the module is in training mode) the normalised ``view_b`` then enters the bank. This is
    :class:`HardNegativeInfoNCE` with a memory bank, under lightly's constructor, so a lightly MoCo loop
    changes its import only::

        from salmask.losses import NTXentLoss  # was: from lightly.loss import NTXentLoss
        criterion = NTXentLoss(temperature=0.5, memory_bank_size=(4096, 128))
        loss = criterion(query, key)  # the same value as lightly's, and the same bank updates
        loss = criterion(query, key, hard_negatives, hard_negative_valid)  # with the method's hard negatives

    The temperature is the one difference in defaults: salmask's is 0.2 (MoCo v2's and the paper's tau),
    lightly's 0.5 (SimCLR's). A call that leaves ``temperature`` out gets 0.2 here; pass
    ``temperature=0.5`` to keep a lightly run's objective unchanged.

    Args:
        temperature: tau, > 0; default 0.2, the paper's (lightly's ``NTXentLoss`` defaults to 0.5). SimCLR
            used 0.1 to 0.5 depending on batch size.
        hard_negative_weight: rho, > 0.
        normalize: L2-normalise the views and hard negatives along D first.
        reduction: ``"mean"`` (default, over the anchors), ``"sum"`` or ``"none"``.
        gather_distributed: use every rank's views as negatives; with a memory bank, gather every rank's
            keys before they enter it (lightly's meaning of the flag).
        symmetric_hard_negatives: also contrast ``view_b[i]`` with ``t_i`` (not with a memory bank, where
            ``view_b`` is not an anchor).
        check_finite: raise if any embedding holds NaN or Inf (one device-to-host sync per call;
            ``False`` skips it).
        memory_bank_size: lightly's ``(K, D)``: a bank of K keys of size D (a
            :class:`~salmask.ssl.MomentumQueue`, saved in ``state_dict``, moved to the embeddings' device)
            and the MoCo form described above; ``0`` or ``None`` (default): the SimCLR form.

    Example:
        >>> import torch
        >>> from salmask.losses import NTXentLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = NTXentLoss(temperature=0.2)
        >>> view_a, view_b, hard = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 2, 16)
        >>> out = criterion(view_a, view_b, hard, return_logits=True)
        >>> out.logits.shape  # 2B anchors: positive, 2B - 2 negatives, M hard negatives
        torch.Size([8, 9])
        >>> moco_form = NTXentLoss(memory_bank_size=(32, 16))
        >>> moco_form(view_a, view_b, hard, return_logits=True).logits.shape  # B anchors: positive, K, M
        torch.Size([4, 35])
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
        memory_bank_size: tuple[int, int] | int | None = None,
    ) -> None:
        gather_distributed = check_bool(gather_distributed, "gather_distributed")
        super().__init__(
            temperature,
            hard_negative_weight,
            normalize,
            reduction,
            check_finite,
            memory_bank_size,
            gather_distributed,
        )
        self.gather_distributed = gather_distributed
        self.symmetric_hard_negatives = check_bool(symmetric_hard_negatives, "symmetric_hard_negatives")
        if self.memory_bank is not None and self.symmetric_hard_negatives:
            raise ValueError(
                "symmetric_hard_negatives needs the SimCLR form: with a memory bank only view_a is an anchor"
            )

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
        if self.memory_bank is not None:
            negative_rows = self._memory_bank_rows(dim, view_a.device)
            hard, hard_valid = hard_negatives_as_batch(hard_negatives, hard_negative_valid, batch_size, dim)
            self._check_finite({"view_a": view_a, "view_b": view_b, "hard_negatives": hard})
            output, prepared_key = _query_key_loss(self, view_a, view_b, negative_rows, hard, hard_valid)
            self._update_memory_bank(prepared_key, view_a)
            return output if return_logits else output.loss
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
