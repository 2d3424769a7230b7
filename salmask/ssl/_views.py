"""The per-step masking of a contrastive batch: masked query, clean key, hard negatives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from salmask.functional import high_pass
from salmask.saliency import SCDA
from salmask.transforms import HardNegativeMask, SaliencyMask
from salmask.tv_tensors import Saliency

__all__ = ["STRATEGIES", "MaskedViews", "MaskedViewsOutput", "TwoViews"]

#: The masking strategies of :class:`MaskedViews`.
STRATEGIES = ("high_pass", "blur", "mean", "mscn", "none")

# Strategy -> (fill of the masking transforms, whether the query's masks follow saliency,
# whether hard negatives are made by default).
_STRATEGY_SETUP: dict[str, tuple[str | None, bool, bool]] = {
    "high_pass": ("high_pass", True, True),
    "blur": ("blur", True, True),
    "mean": ("mean", True, True),
    "mscn": ("high_pass", False, False),
    "none": (None, False, False),
}


class MaskedViewsOutput(NamedTuple):
    """The views of one training step, ready for the encoders.

    Attributes:
        query: ``(B, C, H, W)`` masked query view (the positive).
        key: ``(B, C, H, W)`` key view, never masked; high-pass filtered under the high-pass recipe so that
            it lives in the same input space as the query.
        hard_negatives: ``(B, C, H, W)`` key views with part of their foreground masked, or ``None``.
        hard_negative_valid: ``(B,)`` bool, ``False`` for images without foreground (their hard negative
            is the key itself and must be dropped from the loss), or ``None``.
        query_params: the parameters drawn for the query masks (see
            :func:`salmask.functional.draw_mask_params`), or ``None`` when the query is not masked.
        hard_negative_params: the parameters drawn for the hard negatives, or ``None``.
    """

    query: Tensor
    key: Tensor
    hard_negatives: Tensor | None
    hard_negative_valid: Tensor | None
    query_params: dict[str, Tensor] | None
    hard_negative_params: dict[str, Tensor] | None


def _check_view(view: Any, name: str) -> None:
    if not isinstance(view, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(view).__name__}")
    if view.ndim != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) batch, got shape {tuple(view.shape)}")
    if not view.is_floating_point():
        raise TypeError(f"{name} must be a float tensor (a normalised view), got dtype {view.dtype}")


def _as_saliency(saliency: Any, batch_size: int, name: str) -> Saliency | None:
    if saliency is None:
        return None
    if not isinstance(saliency, Tensor):
        raise TypeError(f"{name} must be a Saliency (or a bool/float tensor), got {type(saliency).__name__}")
    if saliency.ndim not in (3, 4) or saliency.shape[0] != batch_size:
        raise ValueError(
            f"{name} must hold one map per image, shaped (B, h, w) or (B, 1, h, w) with B={batch_size}, "
            f"got shape {tuple(saliency.shape)}"
        )
    # A collated batch of Saliency maps comes back from the DataLoader as a plain tensor.
    return saliency if isinstance(saliency, Saliency) else Saliency(saliency)


class MaskedViews(nn.Module):
    """Mask the two augmented views of a batch for one contrastive step, on the device.

    Takes the query and key views (normalised ``(B, C, H, W)`` float batches, as the encoders see them)
    and returns a :class:`MaskedViewsOutput`: the masked query, the key (never masked: masking only the
    query branch works best) and hard negatives, made by masking the key's foreground, with a per-image
    validity flag. Each image draws its own masks; there is no Python loop over images and no host
    synchronisation.

    ===============  ============================================  ===================  =================
    ``strategy``     query                                          key                  hard negatives
    ===============  ============================================  ===================  =================
    ``"high_pass"``  high-pass filtered, noise in saliency-guided   high-pass filtered   foreground noise
                     patches (release mixture of mask types)
    ``"blur"``       saliency-guided patches from a strong blur     as given             foreground blur
    ``"mean"``       saliency-guided patches set to the mean        as given             foreground mean
    ``"mscn"``       high-pass recipe, uniform random patches       high-pass filtered   none by default
    ``"none"``       as given (the plain MoCo / SimCLR baseline)    as given             none
    ===============  ============================================  ===================  =================

    Under the high-pass recipe the whole view is filtered, so the key (and the hard negatives, which are
    the key with noise in its foreground) are filtered too; an encoder trained this way is evaluated on
    filtered inputs (:class:`~salmask.HighPassFilter`).

    Saliency comes, in order of preference, from the ``query_saliency`` / ``key_saliency`` arguments
    (e.g. a saliency cache served by :class:`~salmask.data.SaliencyDataset` and moved through the same
    augmentations), or from the :class:`~salmask.SCDA` given as ``scda``, run once on query and key
    together. The saliency-guided strategies need one of the two.

    Args:
        strategy: one of ``STRATEGIES``, see above.
        scda: localization network computing saliency on the fly when none is passed to ``forward``.
        hard_negatives: make hard negatives; default ``True`` for the saliency-guided strategies, ``False``
            for ``"mscn"`` (which then needs saliency) and ``"none"`` (which cannot make them).
        ratio: alpha, the fraction of the patch grid masked in the query, fixed or a ``(low, high)`` range
            drawn per image.
        hard_negative_ratio: beta, the fraction of the foreground masked in a hard negative.
        patch_size: patch side in pixels (32 gives the paper's 7x7 grid at 224 px; scale it with the view,
            e.g. 8 for 64 px views).
        mask_type_probs: probabilities of ``"spatial"``, ``"channel"`` and ``"focal"`` masks for the query
            (default: the release's per fill, see :class:`~salmask.SaliencyMask`).
        hard_negative_mask_type_probs: the same for the hard negatives (default: as for the query).
        fill_options: options of the query's fill (``noise_std``, ``kernel_size``, ``sigma``); the
            high-pass ``kernel_size`` and ``sigma`` also filter the key.
        hard_negative_fill_options: options of the hard negatives' fill (release high-pass noise: 0.14).
            Under the high-pass recipe the hard negatives take the query's filter, so that they differ
            from the filtered key only where they are masked.
        saliency_threshold: mean saliency a patch needs to count as foreground.
        generator: source of randomness of every mask and noise draw; ``None`` uses torch's global one.

    Example:
        >>> import torch
        >>> from salmask import Saliency
        >>> from salmask.ssl import MaskedViews
        >>> query, key = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
        >>> saliency = Saliency(torch.zeros(2, 8, 8, dtype=torch.bool))
        >>> saliency[0, 2:6, 2:6] = True  # image 1 has no foreground
        >>> views = MaskedViews("mean", patch_size=8)(query, key, saliency, saliency)
        >>> views.query.shape, torch.equal(views.key, key)
        (torch.Size([2, 3, 64, 64]), True)
        >>> views.hard_negative_valid.tolist()
        [True, False]
    """

    def __init__(
        self,
        strategy: str = "high_pass",
        *,
        scda: SCDA | None = None,
        hard_negatives: bool | None = None,
        ratio: float | tuple[float, float] = (0.05, 0.25),
        hard_negative_ratio: float | tuple[float, float] = (0.4, 0.7),
        patch_size: int | tuple[int, int] = 32,
        mask_type_probs: dict[str, float] | None = None,
        hard_negative_mask_type_probs: dict[str, float] | None = None,
        fill_options: dict[str, Any] | None = None,
        hard_negative_fill_options: dict[str, Any] | None = None,
        saliency_threshold: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if strategy not in _STRATEGY_SETUP:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if scda is not None and not isinstance(scda, SCDA):
            raise TypeError(f"scda must be a salmask SCDA module or None, got {type(scda).__name__}")
        if hard_negatives is not None and not isinstance(hard_negatives, bool):
            raise TypeError(f"hard_negatives must be a bool or None, got {type(hard_negatives).__name__}")
        fill, self.saliency_guided, default_hard_negatives = _STRATEGY_SETUP[strategy]
        self.strategy = strategy
        self.make_hard_negatives = default_hard_negatives if hard_negatives is None else hard_negatives
        if fill is None:
            if self.make_hard_negatives:
                raise ValueError(
                    "strategy 'none' masks nothing and cannot make hard negatives; pass hard_negatives=False"
                )
            for name, value in (
                ("mask_type_probs", mask_type_probs),
                ("hard_negative_mask_type_probs", hard_negative_mask_type_probs),
                ("fill_options", fill_options),
                ("hard_negative_fill_options", hard_negative_fill_options),
            ):
                if value is not None:
                    raise ValueError(f"{name} has no effect with strategy 'none'; leave it unset")
        self.scda = scda
        self.generator = generator
        # check_values=False: the value checks cost a host synchronisation per call.
        common: dict[str, Any] = {
            "patch_size": patch_size,
            "saliency_threshold": saliency_threshold,
            "generator": generator,
            "check_values": False,
        }
        self.query_mask: SaliencyMask | None = None
        self.hard_negative_mask: HardNegativeMask | None = None
        if fill is not None:
            self.query_mask = SaliencyMask(
                fill, ratio, mask_type_probs=mask_type_probs, fill_options=fill_options, **common
            )
            if self.make_hard_negatives:
                hard_negative_fill_options = dict(hard_negative_fill_options or {})
                if fill == "high_pass":
                    hard_negative_fill_options = self._shared_filter(hard_negative_fill_options)
                self.hard_negative_mask = HardNegativeMask(
                    fill,
                    hard_negative_ratio,
                    mask_type_probs=hard_negative_mask_type_probs or mask_type_probs,
                    fill_options=hard_negative_fill_options,
                    **common,
                )
        self.filters_views = fill == "high_pass"

    @property
    def input_filter(self) -> dict[str, Any] | None:
        """The filter every view went through, to record with a checkpoint for evaluation (see
        :func:`~salmask.ssl.input_filter_of`); ``None`` when the strategy feeds unfiltered views."""
        if not self.filters_views:
            return None
        options = self.query_mask.fill_options
        return {"name": "high_pass", "kernel_size": options["kernel_size"], "sigma": options["sigma"]}

    def _shared_filter(self, hard_negative_fill_options: dict[str, Any]) -> dict[str, Any]:
        query_filter = {name: self.query_mask.fill_options[name] for name in ("kernel_size", "sigma")}
        for name, value in query_filter.items():
            if hard_negative_fill_options.setdefault(name, value) != value:
                raise ValueError(
                    f"hard_negative_fill_options[{name!r}] must equal the query's high-pass {name} ({value}): the key "
                    "and its hard negatives are filtered alike; set it in fill_options instead"
                )
        return hard_negative_fill_options

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, hard_negatives={self.make_hard_negatives}"

    @property
    def needs_saliency(self) -> bool:
        """Whether ``forward`` needs saliency (passed in, or from ``scda``) for the query or the key."""
        return self.saliency_guided or self.make_hard_negatives

    def _saliency(
        self, query: Tensor, key: Tensor, query_saliency: Saliency | None, key_saliency: Saliency | None
    ) -> tuple[Saliency | None, Saliency | None]:
        need_query = self.saliency_guided and query_saliency is None
        need_key = self.make_hard_negatives and key_saliency is None
        if not (need_query or need_key):
            return query_saliency, key_saliency
        if self.scda is None:
            missing = "query_saliency" if need_query else "key_saliency"
            raise ValueError(
                f"strategy {self.strategy!r} needs {missing} (or an SCDA module passed as scda=...) "
                f"to {'place the query masks' if need_query else 'make hard negatives'}"
            )
        if need_query and need_key:
            computed_query, computed_key = self.scda(query, key)
            return computed_query, computed_key
        if need_query:
            return self.scda(query), key_saliency
        return query_saliency, self.scda(key)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        query_saliency: Tensor | None = None,
        key_saliency: Tensor | None = None,
    ) -> MaskedViewsOutput:
        """Mask one batch of view pairs.

        Args:
            query: ``(B, C, H, W)`` normalised float batch of query views.
            key: ``(B, C, H, W)`` key views of the same images.
            query_saliency: ``(B, h, w)`` saliency of the query views (bool or scores in ``[0, 1]``), or
                ``None`` to compute it with ``scda`` (ignored by ``"mscn"`` and ``"none"``).
            key_saliency: the same for the key views, used for the hard negatives.

        Returns:
            A :class:`MaskedViewsOutput`. Inputs are never modified; with ``"none"`` the given tensors are
            returned as they are.

        Raises:
            TypeError: a view is not a float tensor, or a saliency is not a tensor.
            ValueError: views of different shapes, saliency of the wrong batch size, or saliency needed and
                neither given nor computable.
        """
        _check_view(query, "query")
        _check_view(key, "key")
        if query.shape != key.shape:
            raise ValueError(f"query and key must share one shape, got {tuple(query.shape)} and {tuple(key.shape)}")
        batch_size = query.shape[0]
        query_saliency = _as_saliency(query_saliency, batch_size, "query_saliency")
        key_saliency = _as_saliency(key_saliency, batch_size, "key_saliency")
        if self.query_mask is None:
            return MaskedViewsOutput(query, key, None, None, None, None)

        query_saliency, key_saliency = self._saliency(query, key, query_saliency, key_saliency)
        if self.saliency_guided:
            masked_query, _ = self.query_mask(query, query_saliency)
        else:
            masked_query = self.query_mask(query)
        query_params = self.query_mask.last_params

        hard_negatives = hard_negative_valid = hard_negative_params = None
        if self.hard_negative_mask is not None:
            # Masked from the raw key: the high-pass fill filters the whole view itself, so outside the
            # masked patches a hard negative equals the filtered key below.
            hard_negatives, _ = self.hard_negative_mask(key, key_saliency)
            hard_negative_params = self.hard_negative_mask.last_params
            hard_negative_valid = hard_negative_params["valid"]
        if self.filters_views:
            options = self.query_mask.fill_options
            key = high_pass(key, options["kernel_size"], options["sigma"])
        return MaskedViewsOutput(
            masked_query, key, hard_negatives, hard_negative_valid, query_params, hard_negative_params
        )


class TwoViews:
    """Apply one random pipeline twice to a sample: the query and key views of an image and its saliency.

    A dataset transform in the style of the two-crop transforms of MoCo and SimCLR; the torchvision v2
    pipeline crops and flips a :class:`~salmask.Saliency` together with its image, independently per view.

    Args:
        pipeline: the augmentation drawn afresh for each view.

    Example:
        >>> import torch
        >>> from torchvision.transforms import v2
        >>> from salmask import Saliency
        >>> two = TwoViews(v2.RandomResizedCrop(8))
        >>> query, query_saliency, key, key_saliency = two(torch.rand(3, 16, 16), Saliency(torch.ones(16, 16)))
        >>> tuple(query.shape), tuple(key_saliency.shape)
        ((3, 8, 8), (8, 8))
    """

    def __init__(self, pipeline: Callable[..., Any]) -> None:
        if not callable(pipeline):
            raise TypeError(f"pipeline must be callable, got {type(pipeline).__name__}")
        self.pipeline = pipeline

    def __call__(self, image: Any, saliency: Any = None) -> tuple[Any, ...]:
        """``(query, key)``, or ``(query, query_saliency, key, key_saliency)`` when a saliency is given."""
        if saliency is None:
            return self.pipeline(image), self.pipeline(image)
        query, query_saliency = self.pipeline(image, saliency)
        key, key_saliency = self.pipeline(image, saliency)
        return query, query_saliency, key, key_saliency

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline!r})"
