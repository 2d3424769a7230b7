"""SimCLR with saliency-masked hard negatives."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from salmask._defaults import EMBEDDING_DIM, HARD_NEGATIVE_WEIGHT, TEMPERATURE
from salmask._validation import check_bool, check_step_views
from salmask.losses import InfoNCEOutput, NTXentLoss
from salmask.ssl._encoders import checked_features, encoder_and_head

__all__ = ["SimCLR"]


class SimCLR(nn.Module):
    """SimCLR with per-image hard negatives: one encoder, an MLP projection head and NT-Xent.

    Query and key views go through the encoder in one forward (their batch-norm statistics are those of
    the 2B views, as in SimCLR); the loss is :class:`~salmask.NTXentLoss`, every view an anchor against
    the other 2B - 2 views (of all ranks with ``gather_distributed``), the masked query views also
    against their own rho-weighted hard negatives. Hard negatives are embedded by the same encoder in a
    separate forward, without gradient by default: SimCLR has no key encoder, and the method encodes hard
    negatives on the key side, as constants to be pushed away from.

    Under DDP, SimCLR computes batch norm over the global batch: convert the model with
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` before wrapping it, and pass
    ``gather_distributed=True`` for the global batch's negatives.

    Optimise it as SimCLR does, with LARS and a warm-up then cosine schedule, e.g. from timm::

        optimizer = timm.optim.create_optimizer_v2(model, "lars", lr=0.3 * batch_size / 256,
                                                   weight_decay=1e-6, momentum=0.9)
        scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=epochs, warmup_t=10)

    Args:
        encoder: base encoder mapping images to ``(B, feature_dim)`` features (e.g. :func:`build_encoder`),
            or a torchvision or timm classification model, whose copy without the classifier
            (:func:`without_classifier`) is used.
        feature_dim: the encoder's feature size; default its ``num_features`` attribute.
        dim: embedding size (128).
        hidden_dim: width of the head's hidden layer; default ``feature_dim``.
        projector: a projection head to use instead of the MLP.
        temperature: tau.
        hard_negative_weight: rho.
        gather_distributed: use every rank's views as negatives (gradient flows back to the local slice).
        symmetric_hard_negatives: also contrast the key views with the hard negatives.
        hard_negative_grad: let gradient flow through the hard-negative embeddings.
        check_finite: raise on non-finite embeddings (one host synchronisation per step).

    Example:
        >>> import torch
        >>> from salmask.ssl import SimCLR, build_encoder
        >>> _ = torch.manual_seed(0)
        >>> model = SimCLR(build_encoder("resnet18", small_images=True))
        >>> query, key, hard = torch.randn(3, 4, 3, 32, 32).unbind(0)
        >>> out = model(query, key, hard)
        >>> out.logits.shape  # 2B anchors: positive, 2B - 2 negatives, one hard negative
        torch.Size([8, 8])
        >>> out.loss.backward()
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        feature_dim: int | None = None,
        dim: int = EMBEDDING_DIM,
        hidden_dim: int | None = None,
        projector: nn.Module | None = None,
        temperature: float = TEMPERATURE,
        hard_negative_weight: float = HARD_NEGATIVE_WEIGHT,
        gather_distributed: bool = False,
        symmetric_hard_negatives: bool = False,
        hard_negative_grad: bool = False,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        encoder, self.feature_dim, projector = encoder_and_head(encoder, feature_dim, hidden_dim, dim, projector)
        self.dim = dim
        self.hard_negative_grad = check_bool(hard_negative_grad, "hard_negative_grad")
        # Registered in this order (encoder, then head), which the optimizer's state in a checkpoint follows.
        self.encoder = encoder
        self.projector = projector
        self.criterion = NTXentLoss(
            temperature,
            hard_negative_weight,
            gather_distributed=gather_distributed,
            symmetric_hard_negatives=symmetric_hard_negatives,
            check_finite=check_finite,
        )

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, dim={self.dim}, hard_negative_grad={self.hard_negative_grad}"

    def embed(self, images: Tensor) -> Tensor:
        """``(B, dim)`` projected embeddings (not normalised: the loss normalises them)."""
        return self.projector(checked_features(self.encoder(images), self.feature_dim))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        hard_negatives: Tensor | None = None,
        hard_negative_valid: Tensor | None = None,
    ) -> InfoNCEOutput:
        """Embed the views (and hard negatives) and compute NT-Xent.

        Args:
            query: ``(B, C, H, W)`` masked query views.
            key: ``(B, C, H, W)`` key views.
            hard_negatives: ``(B, C, H, W)`` or ``(B, M, C, H, W)`` hard negatives, or ``None``.
            hard_negative_valid: ``(B,)`` or ``(B, M)`` bool, ``False`` drops a hard negative.

        Returns:
            :class:`~salmask.InfoNCEOutput` ``(loss, logits, targets)``, rows the query anchors then the
            key anchors.

        Raises:
            ValueError: an empty batch (B = 0), views of different shapes, or hard negatives of other images.
        """
        check_step_views(query, key, hard_negatives, hard_negative_valid)
        view_a, view_b = self.embed(torch.cat([query, key])).chunk(2)
        hard_embedding = None
        if hard_negatives is not None:
            leading = hard_negatives.shape[:-3]
            with torch.set_grad_enabled(self.hard_negative_grad and torch.is_grad_enabled()):
                hard_embedding = self.embed(hard_negatives.flatten(0, hard_negatives.ndim - 4))
            hard_embedding = hard_embedding.unflatten(0, leading)
        return self.criterion(view_a, view_b, hard_embedding, hard_negative_valid, return_logits=True)
