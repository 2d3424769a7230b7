"""The MoCo form of the loss: a query against its key, a queue and its own hard negatives."""

from __future__ import annotations

import torch

from salmask._defaults import HARD_NEGATIVE_WEIGHT, TEMPERATURE
from salmask._validation import (
    check_bool,
    check_choice,
    check_embedding_pair,
    check_tensor,
    hard_negatives_as_batch,
    negatives_as_rows,
)
from salmask.losses._core import (
    _LAYOUTS,
    InfoNCEOutput,
    NegativesLayout,
    Reduction,
    _autocast_disabled,
    _compute_dtype,
    _ContrastiveLoss,
    _prepare,
    check_logit_scale,
)

__all__ = ["HardNegativeInfoNCE", "extend_moco_logits"]


class HardNegativeInfoNCE(_ContrastiveLoss):
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
        memory_bank_size: ``(K, D)`` to keep a memory bank of K keys of size D inside the loss (a
            :class:`~salmask.ssl.MomentumQueue`, as MoCo's queue): ``forward`` then takes no ``negatives``,
            contrasts each query with the bank and, in a training step (the queries carry gradient and the
            module is in training mode), enqueues the normalised keys afterwards. Hard negatives never
            enter it. The bank is a buffer (saved in ``state_dict``) and moves to the embeddings' device.
            ``None`` (default) or ``0``: negatives are passed to ``forward``.
        gather_distributed: under ``torch.distributed``, gather every rank's keys before they enter the
            memory bank, so all ranks hold the same bank (as MoCo's queue does).

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

        With a memory bank of 64 keys, the loss holds the negatives itself:

        >>> criterion = HardNegativeInfoNCE(memory_bank_size=(64, 16))
        >>> query = torch.randn(4, 16, requires_grad=True)
        >>> criterion(query, key, hard_negatives=hard, return_logits=True).logits.shape
        torch.Size([4, 66])
        >>> int(criterion.memory_bank.pointer)  # this step's 4 keys are in the bank
        4
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
        memory_bank_size: tuple[int, int] | None = None,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__(
            temperature, hard_negative_weight, normalize, reduction, check_finite, memory_bank_size, gather_distributed
        )
        self.negatives_layout = check_choice(negatives_layout, "negatives_layout", _LAYOUTS)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, negatives_layout={self.negatives_layout!r}"

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
            negatives: ``(K, D)`` negatives, or MoCo's ``(D, K)`` queue (see ``negatives_layout``); with a
                memory bank, leave it out: the bank's keys are the negatives.
            hard_negatives: ``(B, D)``, or ``(B, M)`` groups as ``(B, M, D)``; row ``i`` belongs to query
                ``i`` only.
            hard_negative_valid: ``(B,)`` or ``(B, M)`` bool; ``False`` drops that hard negative (for an
                image with no foreground to mask), a ``(B,)`` mask applying to all M of the row.
            return_logits: also return the logits and targets.

        Returns:
            The loss, or an :class:`InfoNCEOutput` ``(loss, logits, targets)`` with ``return_logits``.

        Raises:
            TypeError: a tensor argument is not a tensor of the right dtype.
            ValueError: mismatched shapes, an empty batch (B = 0), neither negatives nor hard negatives,
                negatives as well as a memory bank, an ambiguous square ``negatives`` with
                ``negatives_layout="auto"``, or non-finite embeddings.
        """
        check_embedding_pair(query, key, ("query", "key"))
        check_bool(return_logits, "return_logits")
        batch_size, dim = query.shape
        if self.memory_bank is not None:
            if negatives is not None:
                raise ValueError("this loss holds a memory bank of negatives (memory_bank_size); do not pass negatives")
            negative_rows = self._memory_bank_rows(dim, query.device)
        elif negatives is None and hard_negatives is None:
            raise ValueError("pass negatives, hard_negatives or both: with neither there is nothing to contrast")
        else:
            negative_rows = None if negatives is None else negatives_as_rows(negatives, dim, self.negatives_layout)
        hard, hard_valid = hard_negatives_as_batch(hard_negatives, hard_negative_valid, batch_size, dim)
        self._check_finite({"query": query, "key": key, "negatives": negative_rows, "hard_negatives": hard})
        output, prepared_key = _query_key_loss(self, query, key, negative_rows, hard, hard_valid)
        self._update_memory_bank(prepared_key, query)
        return output if return_logits else output.loss


def _query_key_loss(
    loss: _ContrastiveLoss,
    query: torch.Tensor,
    key: torch.Tensor,
    negative_rows: torch.Tensor | None,
    hard: torch.Tensor | None,
    hard_valid: torch.Tensor | None,
) -> tuple[InfoNCEOutput, torch.Tensor]:
    """The MoCo form's loss of checked inputs, and the key as compared (normalised), for a memory bank."""
    dtype = _compute_dtype(query, key, negative_rows, hard)
    with _autocast_disabled(query.device):
        query, key = loss._prepare(query, dtype), loss._prepare(key, dtype)
        positive = (query * key).sum(dim=1)
        negative_logits = None if negative_rows is None else query @ loss._prepare(negative_rows, dtype).t()
        hard_logits = None
        if hard is not None:
            hard_logits = torch.einsum("bd,bmd->bm", query, loss._prepare(hard, dtype))
        return loss._cross_entropy(positive, negative_logits, hard_logits, hard_valid), key


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
    temperature, hard_negative_weight = check_logit_scale(temperature, hard_negative_weight)
    check_bool(normalize, "normalize")
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
