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

from __future__ import annotations

import contextlib
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from salmask._defaults import HARD_NEGATIVE_WEIGHT, TEMPERATURE
from salmask._validation import (
    check_choice,
    check_embedding_pair,
    check_positive,
    check_tensor,
    hard_negatives_as_batch,
    negatives_as_rows,
    raise_if_not_finite,
)
from salmask.distributed import all_gather_with_grad, get_rank, get_world_size

__all__ = [
    "HardNegativeInfoNCE",
    "InfoNCEOutput",
    "NTXentLoss",
    "extend_moco_logits",
]

Reduction = Literal["mean", "sum", "none"]
NegativesLayout = Literal["auto", "KD", "DK"]

_REDUCTIONS = ("mean", "sum", "none")
_FINITE_HINT = "check the encoder output (pass check_finite=False to skip this check)"
_LAYOUTS = ("auto", "KD", "DK")


class InfoNCEOutput(NamedTuple):
    """Loss together with the logits and targets it was computed from.

    Attributes:
        loss: the reduced loss (a scalar) or, with ``reduction="none"``, one value per anchor.
        logits: ``(N, C)`` logits already divided by the temperature, the positive in column 0, hard
            negatives in the last columns; columns of invalid hard negatives hold ``-inf``.
        targets: ``(N,)`` long zeros, the positive's column, for ``(logits.argmax(1) == targets)``
            accuracy monitoring.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    # Half-precision logits lose the small differences that matter at low temperature, so the loss is
    # computed in float32 at least; float64 inputs (gradcheck) stay float64.
    if any(tensor is not None and tensor.dtype == torch.float64 for tensor in tensors):
        return torch.float64
    return torch.float32


def _autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # Under autocast a float32 matmul would be run in fp16/bf16 again; turn it off for the loss.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _prepare(tensor: torch.Tensor, dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    tensor = tensor.to(dtype)
    return F.normalize(tensor, dim=-1) if normalize else tensor


# ---------------------------------------------------------------------------------------------------
# Shared core


def _hard_negative_cross_entropy(
    positive: torch.Tensor,
    negatives: torch.Tensor | None,
    hard: torch.Tensor | None,
    hard_valid: torch.Tensor | None,
    temperature: float,
    hard_negative_weight: float,
    reduction: str,
) -> InfoNCEOutput:
    """Cross-entropy with target 0 over ``[positive, negatives, rho * hard] / tau``.

    Args:
        positive: ``(N,)`` anchor-positive similarities.
        negatives: ``(N, K)`` anchor-negative similarities, or ``None``.
        hard: ``(N, M)`` anchor-hard-negative similarities (not yet weighted), or ``None``.
        hard_valid: ``(N, M)`` bool, ``False`` where the hard negative does not exist, or ``None``.
        temperature: tau.
        hard_negative_weight: rho.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    columns = [positive.unsqueeze(1)]
    if negatives is not None:
        columns.append(negatives)
    if hard is not None:
        hard = hard * hard_negative_weight
        if hard_valid is not None:
            # -inf drops the column from the softmax; the positive column is always finite, so a row
            # whose hard negatives are all invalid reduces to the plain loss with finite gradients.
            hard = hard.masked_fill(~hard_valid, float("-inf"))
        columns.append(hard)
    logits = torch.cat(columns, dim=1) / temperature
    per_anchor = torch.logsumexp(logits, dim=1) - logits[:, 0]
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    if reduction == "mean":
        loss = per_anchor.mean()
    elif reduction == "sum":
        loss = per_anchor.sum()
    else:
        loss = per_anchor
    return InfoNCEOutput(loss, logits, targets)


# ---------------------------------------------------------------------------------------------------
# MoCo form


class HardNegativeInfoNCE(nn.Module):
    """InfoNCE of a (masked) query against its key, other negatives and rho-weighted hard negatives.

    For each of the B queries, with tau the temperature and rho the hard-negative weight::

        logits = [q.k+, q.z_1 ... q.z_K, rho * q.t_1 ... rho * q.t_M] / tau,   loss = CE(logits, 0)

    which is the paper's Eq. 2 with the positive kept in the denominator, as in InfoNCE. Query ``i`` is
    contrasted with its own hard negatives ``hard_negatives[i]`` only. With no hard negatives this is the
    MoCo v2 loss; with ``rho = 1`` a hard negative is one more ordinary negative.

    Hard negatives are normally the key view with its foreground masked, encoded by the key (momentum)
    encoder without gradient and never enqueued. This module detaches nothing: gradient flows into every
    tensor passed that requires it, so encode keys and hard negatives under ``torch.no_grad()`` when
    they must not be trained (as in MoCo).

    The loss is computed in float32 (float64 for float64 inputs) with autocast disabled, through
    log-sum-exp, so it stays accurate at small temperatures and under fp16/bf16 autocast.

    Args:
        temperature: tau, > 0. MoCo v2 and the paper's release use 0.2.
        hard_negative_weight: rho, > 0, multiplying the hard-negative similarities before the division
            by tau. The release uses 2.0.
        normalize: L2-normalise query, key, negatives and hard negatives along D first. Normalising
            already normalised embeddings (MoCo's) changes nothing but rounding.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (one loss per query).
        negatives_layout: ``"KD"`` for ``(K, D)`` negatives, ``"DK"`` for MoCo's ``(D, K)`` queue (the
            layout of :attr:`salmask.ssl.MomentumQueue.keys`), or ``"auto"`` (default) to tell them apart by
            which dimension equals D; ``"auto"`` rejects a square ``(D, D)`` tensor as ambiguous.
        check_finite: raise if any embedding holds NaN or Inf. This costs one device-to-host sync per
            call; pass ``False`` to skip it in a tuned training loop.

    Example:
        >>> import torch
        >>> from salmask.losses import HardNegativeInfoNCE
        >>> _ = torch.manual_seed(0)
        >>> criterion = HardNegativeInfoNCE(temperature=0.2, hard_negative_weight=2.0)
        >>> query, key, hard = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 16)
        >>> queue = torch.randn(16, 64)  # MoCo layout (D, K)
        >>> valid = torch.tensor([True, True, False, True])  # image 2 had no foreground to mask
        >>> out = criterion(query, key, queue, hard, valid, return_logits=True)
        >>> out.logits.shape, out.loss.ndim
        (torch.Size([4, 66]), 0)
        >>> bool(out.logits[2, -1] == float("-inf"))
        True
    """

    def __init__(
        self,
        temperature: float = TEMPERATURE,
        hard_negative_weight: float = HARD_NEGATIVE_WEIGHT,
        *,
        normalize: bool = True,
        reduction: Reduction = "mean",
        negatives_layout: NegativesLayout = "auto",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")
        self.hard_negative_weight = check_positive(hard_negative_weight, "hard_negative_weight")
        self.normalize = bool(normalize)
        self.reduction = check_choice(reduction, "reduction", _REDUCTIONS)
        self.negatives_layout = check_choice(negatives_layout, "negatives_layout", _LAYOUTS)
        self.check_finite = bool(check_finite)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, hard_negative_weight={self.hard_negative_weight}, "
            f"normalize={self.normalize}, reduction={self.reduction!r}, "
            f"negatives_layout={self.negatives_layout!r}"
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        negatives: torch.Tensor | None = None,
        hard_negatives: torch.Tensor | None = None,
        hard_negative_valid: torch.Tensor | None = None,
        *,
        return_logits: bool = False,
    ) -> torch.Tensor | InfoNCEOutput:
        """Compute the loss.

        Args:
            query: ``(B, D)`` query embeddings (from the masked view).
            key: ``(B, D)`` positive key embeddings, row ``i`` the positive of query ``i``.
            negatives: ``(K, D)`` negatives, or MoCo's ``(D, K)`` queue (see ``negatives_layout``).
            hard_negatives: ``(B, D)``, or ``(B, M)`` groups as ``(B, M, D)``; row ``i`` belongs to query
                ``i`` only.
            hard_negative_valid: ``(B,)`` or ``(B, M)`` bool; ``False`` drops that hard negative (for an
                image with no foreground to mask), a ``(B,)`` mask applying to all M of the row.
            return_logits: also return the logits and targets.

        Returns:
            The loss, or an :class:`InfoNCEOutput` ``(loss, logits, targets)`` with ``return_logits``.

        Raises:
            TypeError: a tensor argument is not a tensor of the right dtype.
            ValueError: mismatched shapes, neither negatives nor hard negatives, an ambiguous square
                ``negatives`` with ``negatives_layout="auto"``, or non-finite embeddings.
        """
        check_embedding_pair(query, key, ("query", "key"))
        batch_size, dim = query.shape
        if negatives is None and hard_negatives is None:
            raise ValueError("pass negatives, hard_negatives or both: with neither there is nothing to contrast")
        negative_rows = None if negatives is None else negatives_as_rows(negatives, dim, self.negatives_layout)
        hard, hard_valid = hard_negatives_as_batch(hard_negatives, hard_negative_valid, batch_size, dim)
        if self.check_finite:
            named = {"query": query, "key": key}
            if negative_rows is not None:
                named["negatives"] = negative_rows
            if hard is not None:
                named["hard_negatives"] = hard
            raise_if_not_finite(named, _FINITE_HINT)

        dtype = _compute_dtype(query, key, negative_rows, hard)
        with _autocast_disabled(query.device):
            query = _prepare(query, dtype, self.normalize)
            key = _prepare(key, dtype, self.normalize)
            positive = (query * key).sum(dim=1)
            negative_logits = None
            if negative_rows is not None:
                negative_logits = query @ _prepare(negative_rows, dtype, self.normalize).t()
            hard_logits = None
            if hard is not None:
                hard_logits = torch.einsum("bd,bmd->bm", query, _prepare(hard, dtype, self.normalize))
            output = _hard_negative_cross_entropy(
                positive,
                negative_logits,
                hard_logits,
                hard_valid,
                self.temperature,
                self.hard_negative_weight,
                self.reduction,
            )
        return output if return_logits else output.loss


def extend_moco_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    hard_negatives: torch.Tensor,
    hard_negative_valid: torch.Tensor | None = None,
    *,
    temperature: float,
    hard_negative_weight: float = HARD_NEGATIVE_WEIGHT,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append rho-weighted hard-negative columns to MoCo's ``(logits, labels)``.

    facebookresearch/moco's ``MoCo.forward`` returns ``logits = [q.k+, q.queue] / T`` shaped
    ``(B, 1 + K)`` with ``labels`` all zero, and ``main_moco.py`` feeds them to ``nn.CrossEntropyLoss``.
    This function returns ``[logits, rho * q.t / T]`` and the same labels, so the criterion and the rest
    of the training loop stay as they are and compute :class:`HardNegativeInfoNCE`'s loss. Invalid hard
    negatives get ``-inf`` logits, which ``nn.CrossEntropyLoss`` handles (without label smoothing).

    The patch to facebookresearch/moco is three lines in ``MoCo.forward`` (``moco/builder.py``, which
    also needs ``from salmask import extend_moco_logits``); ``main_moco.py`` then calls
    ``model(im_q=images[0], im_k=images[1], im_hard=images[2])`` and keeps its criterion::

        def forward(self, im_q, im_k, im_hard):  # 1. was (self, im_q, im_k)
            ...
            # 2. inside the existing `with torch.no_grad():` block, next to the keys:
            t = nn.functional.normalize(self.encoder_k(im_hard), dim=1)
            ...
            # 3. just before `return logits, labels`:
            logits, labels = extend_moco_logits(logits, labels, q, t, temperature=self.T)

    ``_dequeue_and_enqueue(k)`` stays as it is: hard negatives are never enqueued. Under shuffling BN,
    shuffle ``im_hard`` like ``im_k`` (``_batch_shuffle_ddp``/``_batch_unshuffle_ddp``).

    Args:
        logits: MoCo's ``(B, C)`` logits, already divided by the temperature.
        labels: MoCo's ``(B,)`` targets; returned unchanged (appended columns never move the positive).
        query: ``(B, D)`` query embeddings ``q``.
        hard_negatives: ``(B, D)`` or ``(B, M, D)`` hard-negative embeddings, row ``i`` for query ``i``.
        hard_negative_valid: optional ``(B,)`` or ``(B, M)`` bool; ``False`` drops that column.
        temperature: the temperature MoCo divided its logits by (``self.T``; 0.2 for MoCo v2).
        hard_negative_weight: rho, > 0 (2.0 in the paper's release).
        normalize: L2-normalise ``query`` and ``hard_negatives`` first (no-op for MoCo's normalised q).

    Returns:
        ``(extended_logits, labels)``, the logits shaped ``(B, C + M)`` in at least float32.

    Raises:
        TypeError: a tensor argument has the wrong type or dtype.
        ValueError: mismatched shapes or a temperature or weight that is not > 0.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from salmask.losses import extend_moco_logits
        >>> _ = torch.manual_seed(0)
        >>> q, k = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
        >>> queue = F.normalize(torch.randn(8, 32), dim=0)
        >>> logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / 0.2
        >>> labels = torch.zeros(4, dtype=torch.long)
        >>> hard = torch.randn(4, 8)
        >>> logits, labels = extend_moco_logits(logits, labels, q, hard, temperature=0.2)
        >>> logits.shape
        torch.Size([4, 34])
        >>> loss = torch.nn.CrossEntropyLoss()(logits, labels)
    """
    temperature = check_positive(temperature, "temperature")
    hard_negative_weight = check_positive(hard_negative_weight, "hard_negative_weight")
    check_tensor(logits, "logits", ndim=2, floating=True)
    check_tensor(query, "query", ndim=2, floating=True)
    check_tensor(labels, "labels")
    batch_size, dim = query.shape
    if logits.shape[0] != batch_size or labels.shape != (batch_size,):
        raise ValueError(
            f"logits must be (B, C) and labels (B,) with B={batch_size} (query's batch size), got "
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if hard_negatives is None:
        raise TypeError("hard_negatives must be a torch.Tensor shaped (B, D) or (B, M, D), got None")
    hard, hard_valid = hard_negatives_as_batch(hard_negatives, hard_negative_valid, batch_size, dim)

    dtype = _compute_dtype(logits, query, hard)
    with _autocast_disabled(query.device):
        query = _prepare(query, dtype, normalize)
        hard_logits = torch.einsum("bd,bmd->bm", query, _prepare(hard, dtype, normalize))
        hard_logits = hard_logits * hard_negative_weight
        if hard_valid is not None:
            hard_logits = hard_logits.masked_fill(~hard_valid, float("-inf"))
        extended = torch.cat([logits.to(dtype), hard_logits / temperature], dim=1)
    return extended, labels


# ---------------------------------------------------------------------------------------------------
# SimCLR form


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


class NTXentLoss(nn.Module):
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
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")
        self.hard_negative_weight = check_positive(hard_negative_weight, "hard_negative_weight")
        self.normalize = bool(normalize)
        self.reduction = check_choice(reduction, "reduction", _REDUCTIONS)
        self.gather_distributed = bool(gather_distributed)
        self.symmetric_hard_negatives = bool(symmetric_hard_negatives)
        self.check_finite = bool(check_finite)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, hard_negative_weight={self.hard_negative_weight}, "
            f"normalize={self.normalize}, reduction={self.reduction!r}, "
            f"gather_distributed={self.gather_distributed}, "
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
            ValueError: mismatched shapes, a batch of one image without other ranks to contrast with, or
                non-finite embeddings.
        """
        check_embedding_pair(view_a, view_b, ("view_a", "view_b"))
        batch_size, dim = view_a.shape
        world_size = get_world_size() if self.gather_distributed else 1
        rank = get_rank() if self.gather_distributed else 0
        if batch_size * world_size < 2 and hard_negatives is None:
            raise ValueError(
                "NT-Xent needs at least two images (view_a and view_b of shape (B, D) with B >= 2) "
                "or hard negatives; got B=1"
            )
        hard, hard_valid = hard_negatives_as_batch(hard_negatives, hard_negative_valid, batch_size, dim)
        if self.check_finite:
            named = {"view_a": view_a, "view_b": view_b}
            if hard is not None:
                named["hard_negatives"] = hard
            raise_if_not_finite(named, _FINITE_HINT)

        dtype = _compute_dtype(view_a, view_b, hard)
        with _autocast_disabled(view_a.device):
            view_a = _prepare(view_a, dtype, self.normalize)
            view_b = _prepare(view_b, dtype, self.normalize)
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
                hard = _prepare(hard, dtype, self.normalize)
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
            output = _hard_negative_cross_entropy(
                positive,
                negative_logits,
                hard_logits,
                hard_valid,
                self.temperature,
                self.hard_negative_weight,
                self.reduction,
            )
        return output if return_logits else output.loss
