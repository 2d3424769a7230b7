"""The core both losses share: the logits of Eq. 2 and their cross-entropy, in float32 without autocast."""

from __future__ import annotations

import contextlib
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from salmask._validation import (
    check_bool,
    check_choice,
    check_memory_bank_size,
    check_positive,
    raise_if_not_finite,
)

__all__ = ["InfoNCEOutput", "check_logit_scale"]

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


def check_logit_scale(temperature: Any, hard_negative_weight: Any) -> tuple[float, float]:
    """tau and rho, positive and such that similarities in ``[-1, 1]`` give finite float32 logits.

    The loss is computed in float32: a temperature of 1e-300 is 0 there, and every logit would be
    infinite (the loss NaN).
    """
    temperature = check_positive(temperature, "temperature")
    hard_negative_weight = check_positive(hard_negative_weight, "hard_negative_weight")
    largest = torch.finfo(torch.float32).max
    if 1.0 / temperature >= largest:
        raise ValueError(
            f"temperature must be at least {1 / largest:.3g} (the loss is computed in float32, where 1 / "
            f"temperature must be finite), got {temperature}"
        )
    if hard_negative_weight / temperature >= largest:
        raise ValueError(
            f"hard_negative_weight / temperature must be finite in float32 (below {largest:.3g}), got "
            f"{hard_negative_weight} / {temperature}"
        )
    return temperature, hard_negative_weight


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


class _ContrastiveLoss(nn.Module):
    """What both forms share: tau, rho, normalisation, reduction, the finite check, the cross-entropy, and
    the optional memory bank of keys (a :class:`~salmask.ssl.MomentumQueue`)."""

    def __init__(
        self,
        temperature: float,
        hard_negative_weight: float,
        normalize: bool,
        reduction: str,
        check_finite: bool,
        memory_bank_size: Any = None,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        self.temperature, self.hard_negative_weight = check_logit_scale(temperature, hard_negative_weight)
        self.normalize = check_bool(normalize, "normalize")
        self.reduction = check_choice(reduction, "reduction", _REDUCTIONS)
        self.check_finite = check_bool(check_finite, "check_finite")
        gather_distributed = check_bool(gather_distributed, "gather_distributed")
        bank_size = check_memory_bank_size(memory_bank_size)
        self.memory_bank = None
        if bank_size is not None:
            # Imported here: salmask.ssl (where MoCo keeps its queue) imports the losses.
            from salmask.ssl._queue import MomentumQueue

            size, dim = bank_size
            self.memory_bank = MomentumQueue(dim, size, gather_distributed=gather_distributed)

    def extra_repr(self) -> str:
        bank = "" if self.memory_bank is None else f", memory_bank_size={(self.memory_bank.size, self.memory_bank.dim)}"
        return (
            f"temperature={self.temperature}, hard_negative_weight={self.hard_negative_weight}, "
            f"normalize={self.normalize}, reduction={self.reduction!r}{bank}"
        )

    def _memory_bank_rows(self, dim: int, device: torch.device) -> torch.Tensor:
        """The bank's keys as ``(K, D)`` negatives on ``device``, a copy that the update cannot touch."""
        bank = self.memory_bank
        if bank.dim != dim:
            raise ValueError(
                f"the memory bank holds embeddings of size D={bank.dim} (memory_bank_size=({bank.size}, {bank.dim}))"
                f", got embeddings of size {dim}"
            )
        if bank.keys.device != device:
            # A loss built without .to(device), as lightly's loops build theirs: the bank follows its inputs.
            bank.to(device)
        return bank.negatives().t()

    def _update_memory_bank(self, keys: torch.Tensor, anchors: torch.Tensor) -> None:
        # As lightly's memory bank: a step that trains (its anchors carry gradient) enqueues its keys; a
        # validation pass under torch.no_grad(), or a loss in eval mode, leaves the bank as it was.
        if self.memory_bank is not None and self.training and anchors.requires_grad and torch.is_grad_enabled():
            self.memory_bank.enqueue(keys)

    def _check_finite(self, named_tensors: dict[str, torch.Tensor | None]) -> None:
        if self.check_finite:
            given = {name: tensor for name, tensor in named_tensors.items() if tensor is not None}
            raise_if_not_finite(given, _FINITE_HINT)

    def _prepare(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _prepare(tensor, dtype, self.normalize)

    def _cross_entropy(
        self,
        positive: torch.Tensor,
        negatives: torch.Tensor | None,
        hard: torch.Tensor | None,
        hard_valid: torch.Tensor | None,
    ) -> InfoNCEOutput:
        return _hard_negative_cross_entropy(
            positive, negatives, hard, hard_valid, self.temperature, self.hard_negative_weight, self.reduction
        )
