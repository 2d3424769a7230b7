"""MoCo v2 with saliency-masked hard negatives, and the batch shuffle that keeps its BN honest."""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from salmask._defaults import EMBEDDING_DIM, HARD_NEGATIVE_WEIGHT, KEY_ENCODER_MOMENTUM, QUEUE_SIZE, TEMPERATURE
from salmask._validation import check_choice, check_int, check_probability, check_step_views, check_tensor
from salmask.distributed import all_gather, get_rank, get_world_size
from salmask.losses import HardNegativeInfoNCE, InfoNCEOutput
from salmask.ssl._encoders import checked_features, encoder_and_head
from salmask.ssl._queue import MomentumQueue

__all__ = ["BATCH_NORM_MODES", "MoCo", "batch_shuffle", "batch_unshuffle"]

BatchNormMode = Literal["shuffle", "sync", "local"]
#: How :class:`MoCo` keeps batch norm from leaking which key belongs to which query.
BATCH_NORM_MODES = ("shuffle", "sync", "local")


def batch_shuffle(images: Tensor) -> tuple[Tensor, Tensor | None]:
    """Deal a batch out to the ranks in a random order shared by all of them (MoCo's shuffle-BN).

    Every rank gathers the global batch, rank 0's random permutation is broadcast, and each rank keeps its
    slice of the permuted batch, so the batch-norm statistics a key sees come from other images than its
    query's. Every rank must pass the same number of images. Without a process group (or with one
    process) the batch is returned as is: a permutation inside one batch changes no batch statistic.

    Args:
        images: ``(B, ...)`` local batch.

    Returns:
        ``(shuffled, restore)``: this rank's ``(B, ...)`` slice of the shuffled global batch, and the
        ``(world_size * B,)`` inverse permutation for :func:`batch_unshuffle` (``None`` in one process).

    Example:
        >>> import torch
        >>> from salmask.ssl import batch_shuffle, batch_unshuffle
        >>> images = torch.randn(4, 3, 8, 8)
        >>> shuffled, restore = batch_shuffle(images)
        >>> torch.equal(batch_unshuffle(shuffled, restore), images)
        True
    """
    check_tensor(images, "images")
    if images.ndim == 0:
        raise ValueError("images must be a (B, ...) batch, got a scalar")
    world_size = get_world_size()
    if world_size == 1:
        return images, None
    gathered = all_gather(images)
    permutation = torch.randperm(gathered.shape[0], device=images.device)
    dist.broadcast(permutation, src=0)
    restore = torch.argsort(permutation)
    return gathered[permutation.view(world_size, -1)[get_rank()]], restore


def batch_unshuffle(outputs: Tensor, restore: Tensor | None) -> Tensor:
    """Undo :func:`batch_shuffle`: gather the outputs of all ranks and keep this rank's own images.

    Args:
        outputs: ``(B, ...)`` outputs computed on the shuffled slice.
        restore: the inverse permutation returned by :func:`batch_shuffle`.

    Returns:
        ``(B, ...)`` outputs in the order of this rank's original batch (detached in a process group:
        shuffling is meant for the key encoder, which takes no gradient).
    """
    check_tensor(outputs, "outputs")
    if restore is not None:
        check_tensor(restore, "restore", ndim=1)
    if restore is None:
        return outputs
    return all_gather(outputs)[restore.view(get_world_size(), -1)[get_rank()]]


class MoCo(nn.Module):
    """MoCo v2 with per-image hard negatives: query encoder, momentum key encoder, queue and loss.

    The query branch is ``encoder`` followed by a projection head; the key branch is a copy of both
    taken at construction, updated only as an exponential moving average (``momentum``) and never by
    gradient. Embeddings are L2-normalised. The loss is :class:`~salmask.HardNegativeInfoNCE` of the query
    against its key, the :class:`~salmask.ssl.MomentumQueue` and the rho-weighted hard negatives, which the key
    encoder embeds without gradient and which never enter the queue.

    In training mode, ``forward`` first moves the key encoder towards the query encoder, then after the
    loss enqueues the keys (gathered over ranks). In eval mode it changes nothing, so a validation pass
    leaves the state untouched. The key encoder, the queue and its pointer are part of ``state_dict``, so
    a resumed run continues exactly.

    Batch norm would let a query find its key through the statistics of the batch they share; MoCo's
    remedy is ``batch_norm="shuffle"``: under ``torch.distributed``, keys (and hard negatives) are
    dealt to the ranks in a random order before the key encoder and put back afterwards (see
    :func:`batch_shuffle`). In one process there is nothing to shuffle across (a permutation of one batch
    changes none of its statistics), so the step runs as plain BN. ``"sync"`` converts every BN layer of
    both encoders to :class:`~torch.nn.SyncBatchNorm` (global statistics; plain BN in one process);
    ``"local"`` uses the encoders as they are.

    Wrap the module in :class:`~torch.nn.parallel.DistributedDataParallel` as usual; the key encoder has
    no trainable parameters, so DDP ignores it. Every rank must see the same batch size. The queue is
    identical on every rank (keys are gathered before they are enqueued), so ``broadcast_buffers=False``
    spares DDP a copy of the whole queue at every step; with ``batch_norm="sync"`` keep the default.

    Args:
        encoder: base encoder mapping images to ``(B, feature_dim)`` features, e.g.
            :func:`build_encoder`, used as is (not copied) as the query encoder; or a torchvision or timm
            classification model, whose copy without the classifier (:func:`without_classifier`) is.
        feature_dim: the encoder's feature size; default its ``num_features`` attribute.
        dim: embedding size (128).
        hidden_dim: width of the MLP head's hidden layer; default ``feature_dim`` (MoCo v2).
        projector: a projection head to use instead of the MLP (e.g. ``nn.Linear`` for MoCo v1).
        queue_size: K, the number of queued keys (65536).
        momentum: m of the key encoder's moving average (0.999); may be changed between steps.
        temperature: tau (0.2).
        hard_negative_weight: rho (2.0, the release's).
        batch_norm: ``"shuffle"`` (default), ``"sync"`` or ``"local"``, see above.
        check_finite: raise on non-finite embeddings (one host synchronisation per step).

    Example:
        >>> import torch
        >>> from salmask.ssl import MoCo, build_encoder
        >>> _ = torch.manual_seed(0)
        >>> model = MoCo(build_encoder("resnet18", small_images=True), queue_size=64)
        >>> query, key, hard = torch.randn(3, 4, 3, 32, 32).unbind(0)
        >>> out = model(query, key, hard, torch.tensor([True, True, False, True]))
        >>> out.logits.shape  # positive, 64 queued keys, one hard negative per image
        torch.Size([4, 66])
        >>> out.loss.backward()
        >>> int(model.queue.pointer)
        4
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        feature_dim: int | None = None,
        dim: int = EMBEDDING_DIM,
        hidden_dim: int | None = None,
        projector: nn.Module | None = None,
        queue_size: int = QUEUE_SIZE,
        momentum: float = KEY_ENCODER_MOMENTUM,
        temperature: float = TEMPERATURE,
        hard_negative_weight: float = HARD_NEGATIVE_WEIGHT,
        batch_norm: BatchNormMode = "shuffle",
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        encoder, self.feature_dim, projector = encoder_and_head(encoder, feature_dim, hidden_dim, dim, projector)
        self.momentum = momentum  # validated by the property setter
        self.batch_norm = check_choice(batch_norm, "batch_norm", BATCH_NORM_MODES)
        self.dim = dim
        self.encoder = encoder
        self.projector = projector
        if batch_norm == "sync":
            self.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder)
            self.projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.projector)
        self.momentum_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.queue = MomentumQueue(dim, check_int(queue_size, "queue_size", minimum=1))
        self.criterion = HardNegativeInfoNCE(
            temperature, hard_negative_weight, negatives_layout="DK", check_finite=check_finite
        )

    @property
    def momentum(self) -> float:
        """m of the key encoder's moving average, in ``[0, 1]``."""
        return self._momentum

    @momentum.setter
    def momentum(self, value: float) -> None:
        self._momentum = check_probability(value, "momentum")

    def extra_repr(self) -> str:
        return (
            f"feature_dim={self.feature_dim}, dim={self.dim}, momentum={self.momentum}, batch_norm={self.batch_norm!r}"
        )

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Move every key-encoder parameter: ``key = m * key + (1 - m) * query``.

        Buffers (BN running statistics) are not averaged: the key encoder keeps the statistics of the
        batches it encodes itself, as in MoCo.
        """
        query_params = [*self.encoder.parameters(), *self.projector.parameters()]
        key_params = [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]
        torch._foreach_lerp_(key_params, query_params, 1.0 - self.momentum)

    def embed_query(self, images: Tensor) -> Tensor:
        """L2-normalised ``(B, dim)`` query embeddings, with gradient."""
        return F.normalize(self.projector(checked_features(self.encoder(images), self.feature_dim)), dim=1)

    @torch.no_grad()
    def embed_key(self, images: Tensor) -> Tensor:
        """L2-normalised ``(B, dim)`` key embeddings from the momentum encoder, without gradient.

        ``(B, M, C, H, W)`` batches (M hard negatives per image) give ``(B, M, dim)``. With
        ``batch_norm="shuffle"`` under ``torch.distributed`` the batch is shuffled across ranks first.
        """
        leading = images.shape[:-3]
        images = images.flatten(0, images.ndim - 4)
        if self.batch_norm == "shuffle":
            images, restore = batch_shuffle(images)
        keys = F.normalize(self.momentum_projector(self.momentum_encoder(images)), dim=1)
        if self.batch_norm == "shuffle":
            keys = batch_unshuffle(keys, restore)
        return keys.unflatten(0, leading)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        hard_negatives: Tensor | None = None,
        hard_negative_valid: Tensor | None = None,
    ) -> InfoNCEOutput:
        """One MoCo step: embed, compute the loss, and in training mode update the key encoder and queue.

        Args:
            query: ``(B, C, H, W)`` masked query views (``MaskedViewsOutput.query``).
            key: ``(B, C, H, W)`` key views.
            hard_negatives: ``(B, C, H, W)`` (or ``(B, M, C, H, W)``) hard negatives of each image, or
                ``None`` for plain MoCo v2.
            hard_negative_valid: ``(B,)`` (or ``(B, M)``) bool, ``False`` drops a hard negative; default
                all valid.

        Returns:
            :class:`~salmask.InfoNCEOutput` ``(loss, logits, targets)``; ``(logits.argmax(1) ==
            targets)`` is the instance-discrimination accuracy.

        Raises:
            ValueError: an empty batch (B = 0), views of different shapes, or hard negatives of other images.
        """
        check_step_views(query, key, hard_negatives, hard_negative_valid)
        if self.training:
            self.momentum_update()
        query_embedding = self.embed_query(query)
        key_embedding = self.embed_key(key)
        hard_embedding = None if hard_negatives is None else self.embed_key(hard_negatives)
        output = self.criterion(
            query_embedding,
            key_embedding,
            self.queue.negatives(),
            hard_embedding,
            hard_negative_valid,
            return_logits=True,
        )
        if self.training:
            self.queue.enqueue(key_embedding)
        return output
