"""Masking in the data pipeline: a dataset transform that returns the query, key and hard-negative views."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import Tensor

from salmask.ssl._views import MaskedViews
from salmask.tv_tensors import Saliency

__all__ = ["ThreeViews", "ThreeViewsOutput"]


class ThreeViewsOutput(NamedTuple):
    """The views of one image for a MoCo step with a hard negative; the DataLoader batches each field.

    Attributes:
        query: ``(C, H, W)`` masked query view (the positive).
        key: ``(C, H, W)`` key view, never masked (high-pass filtered under the high-pass recipe).
        hard_negative: ``(C, H, W)`` the key view with part of its foreground masked.
        hard_negative_valid: 0-d bool tensor, ``False`` when the key view has no foreground: its hard
            negative is the key itself and must be dropped from the loss.
    """

    query: Tensor
    key: Tensor
    hard_negative: Tensor
    hard_negative_valid: Tensor


class ThreeViews:
    """A dataset transform giving an image's masked query, its key and its hard negative.

    Draws two views of the image with ``pipeline``, as :class:`TwoViews` does, and masks them with
    ``masking`` (a :class:`MaskedViews`, the per-step masking of a batch on the device, applied here to
    one image in the DataLoader worker): the query is masked in proportion to foreground and
    background, the key is left unmasked and the hard negative is the key with most of its foreground
    masked. The result is a :class:`ThreeViewsOutput`, which the default collate function batches into
    one of ``(B, C, H, W)`` views and a ``(B,)`` validity flag, ready for a MoCo model that takes hard
    negatives (see the facebookresearch/moco guide).

    Saliency comes from the dataset (a saliency cache served by
    :class:`~salmask.data.SaliencyImageFolder`, cropped with each view by the v2 ``pipeline``), or, for
    a dataset of plain images, from the :class:`~salmask.SCDA` held by ``masking`` (``MaskedViews(...,
    scda=build_scda())``), run on the two augmented views.

    The pipeline must end with float tensors as the encoders see them (``v2.ToImage()``,
    ``v2.ToDtype(torch.float32, scale=True)``, ``v2.Normalize(...)``): the fills and the localization
    network work on normalised views, as in the paper's release.

    Args:
        pipeline: the v2 augmentation drawn afresh for each view; called as ``pipeline(image, saliency)``
            when the dataset gives a saliency, else as ``pipeline(image)``.
        masking: a :class:`MaskedViews` that makes hard negatives, or the name of a strategy that does
            (``"high_pass"``, ``"blur"`` or ``"mean"``) for ``MaskedViews(masking)``.

    Raises:
        TypeError: ``pipeline`` is not callable or ``masking`` is neither a :class:`MaskedViews` nor a str.
        ValueError: ``masking`` makes no hard negatives.

    Example:
        >>> import torch
        >>> from torchvision.transforms import v2
        >>> from salmask import Saliency
        >>> from salmask.ssl import MaskedViews, ThreeViews
        >>> saliency = Saliency(torch.zeros(48, 48, dtype=torch.bool))
        >>> saliency[8:40, 8:40] = True
        >>> three = ThreeViews(v2.RandomResizedCrop(32, scale=(0.5, 1.0)), MaskedViews("blur", patch_size=8))
        >>> query, key, hard_negative, valid = three(torch.rand(3, 48, 48), saliency)
        >>> tuple(query.shape), tuple(hard_negative.shape), valid.dtype
        ((3, 32, 32), (3, 32, 32), torch.bool)
    """

    def __init__(self, pipeline: Callable[..., Any], masking: MaskedViews | str = "high_pass") -> None:
        if not callable(pipeline):
            raise TypeError(f"pipeline must be callable, got {type(pipeline).__name__}")
        if isinstance(masking, str):
            masking = MaskedViews(masking)
        if not isinstance(masking, MaskedViews):
            raise TypeError(f"masking must be a MaskedViews or a strategy name, got {type(masking).__name__}")
        if not masking.make_hard_negatives:
            raise ValueError(
                f"masking must make hard negatives (strategy 'high_pass', 'blur' or 'mean'), got {masking!r}; "
                "TwoViews serves a two-view pipeline"
            )
        self.pipeline = pipeline
        self.masking = masking

    def __call__(self, image: Any, saliency: Tensor | None = None) -> ThreeViewsOutput:
        """The three views of ``image``; ``saliency`` (at the image's size) comes from a saliency cache."""
        if saliency is None:
            if self.masking.scda is None:
                raise ValueError(
                    "ThreeViews needs a saliency: serve the images with a saliency cache (SaliencyImageFolder) "
                    "or give the masking a localization network, MaskedViews(..., scda=build_scda())"
                )
            query, key = self.pipeline(image), self.pipeline(image)
            query_saliency = key_saliency = None
        else:
            query, query_saliency = self.pipeline(image, saliency)
            key, key_saliency = self.pipeline(image, saliency)
        for name, view in (("query", query), ("key", key)):
            if not isinstance(view, Tensor) or view.ndim != 3 or not view.is_floating_point():
                raise TypeError(
                    f"the pipeline must return a (C, H, W) float tensor for each view (end it with v2.ToImage(), "
                    f"v2.ToDtype(torch.float32, scale=True) and v2.Normalize); the {name} view is "
                    f"{_describe(view)}"
                )
        views = self.masking(
            query.as_subclass(Tensor)[None],
            key.as_subclass(Tensor)[None],
            _batch_of_one(query_saliency),
            _batch_of_one(key_saliency),
        )
        return ThreeViewsOutput(views.query[0], views.key[0], views.hard_negatives[0], views.hard_negative_valid[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline!r}, {self.masking!r})"


def _batch_of_one(saliency: Tensor | None) -> Saliency | None:
    return None if saliency is None else Saliency(saliency.as_subclass(Tensor)[None])


def _describe(view: Any) -> str:
    if isinstance(view, Tensor):
        return f"a {view.dtype} tensor of shape {tuple(view.shape)}"
    return f"a {type(view).__name__}"
