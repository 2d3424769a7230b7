"""The per-step masking of a contrastive batch: masked query, clean key, hard negatives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from salmask._defaults import (
    BLUR_KERNEL_SIZE,
    BLUR_SIGMA,
    HARD_NEGATIVE_MASK_RATIO,
    HIGH_PASS_HARD_NEGATIVE_NOISE_STD,
    HIGH_PASS_KERNEL_SIZE,
    HIGH_PASS_NOISE_STD,
    HIGH_PASS_SIGMA,
    MASK_RATIO,
    PATCH_SIZE,
    RELEASE_MASK_TYPE_PROBS,
    SALIENCY_THRESHOLD,
    SPATIAL_ONLY,
)
from salmask._generators import generator_in_process, picklable_state
from salmask._validation import (
    check_fraction,
    check_generator,
    check_int,
    check_mapping,
    check_mask_ratio,
    check_mask_type_probs,
    check_patch_size,
    check_saliency,
    check_views,
)
from salmask.functional import apply_mask, draw_mask_params, high_pass
from salmask.functional._masking import check_fill
from salmask.saliency import SCDA
from salmask.transforms import HighPassFilter

__all__ = ["STRATEGIES", "MaskedViews", "MaskedViewsOutput", "TwoViews", "scaled_release_filters"]


class _Strategy(NamedTuple):
    fill: str | None  # what masked pixels take; None: nothing is masked
    filters_views: bool  # every view goes through the high-pass filter first
    saliency_guided: bool  # the query's masks follow saliency
    hard_negatives: bool  # made by default
    fill_options: dict[str, Any]  # for the query
    hard_negative_fill_options: dict[str, Any]
    mask_type_probs: dict[str, float]


_HIGH_PASS_NOISE = ({"std": HIGH_PASS_NOISE_STD}, {"std": HIGH_PASS_HARD_NEGATIVE_NOISE_STD})
_STRATEGIES = {
    "high_pass": _Strategy("noise", True, True, True, *_HIGH_PASS_NOISE, RELEASE_MASK_TYPE_PROBS),
    "blur": _Strategy("blur", False, True, True, {}, {}, SPATIAL_ONLY),
    "mean": _Strategy("mean", False, True, True, {}, {}, SPATIAL_ONLY),
    "mscn": _Strategy("noise", True, False, False, *_HIGH_PASS_NOISE, RELEASE_MASK_TYPE_PROBS),
    "none": _Strategy(None, False, False, False, {}, {}, SPATIAL_ONLY),
}
#: The masking strategies of :class:`MaskedViews`.
STRATEGIES = tuple(_STRATEGIES)


class MaskedViewsOutput(NamedTuple):
    """The views of one training step, ready for the encoders.

    Attributes:
        query: ``(B, C, H, W)`` masked query view (the positive).
        key: ``(B, C, H, W)`` key view, never masked; high-pass filtered under the high-pass recipe so that
            it lives in the same input space as the query.
        hard_negatives: ``(B, C, H, W)`` key views with part of their foreground masked, or ``None``.
        hard_negative_valid: ``(B,)`` bool, ``False`` for images without foreground (their hard negative
            is the key itself and must be dropped from the loss), or ``None``.
        query_params: the random draws of the query masks (see
            :func:`salmask.functional.draw_mask_params`), or ``None`` when the query is not masked.
        hard_negative_params: the random draws of the hard negatives, or ``None``.
    """

    query: Tensor
    key: Tensor
    hard_negatives: Tensor | None
    hard_negative_valid: Tensor | None
    query_params: dict[str, Tensor] | None
    hard_negative_params: dict[str, Tensor] | None


class MaskedViews(nn.Module):
    """Mask the two augmented views of a batch for one contrastive step, on the device.

    Takes the query and key views (normalised ``(B, C, H, W)`` float batches, as the encoders see them)
    and returns a :class:`MaskedViewsOutput`: the masked query, the key (never masked: masking only the
    query branch works best) and hard negatives, made by masking the key's foreground, with a per-image
    validity flag. Each image draws its own masks; there is no Python loop over images and no host
    synchronisation. The step calls the kernels of :mod:`salmask.functional` directly.

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

    Under the high-pass recipe the filter is a view-wide step, applied once to the query and once to the
    key before any fill: the hard negatives are the filtered key with noise in its foreground, so they
    differ from the key only where they are masked. An encoder trained this way is evaluated on filtered
    inputs: :attr:`input_filter` is the filter to record with its checkpoint.

    Saliency comes, in order of preference, from the ``query_saliency`` / ``key_saliency`` arguments
    (e.g. a saliency cache served by :class:`~salmask.data.SaliencyDataset` and moved through the same
    augmentations), or from the :class:`~salmask.SCDA` given as ``scda``, run once on query and key
    together. The saliency-guided strategies need one of the two.

    Args:
        strategy: one of ``STRATEGIES``, see above.
        scda: localization network computing saliency on the fly when none is passed to ``forward``: an
            :class:`~salmask.SCDA`, or what it takes as its backbone (a torchvision or timm classification
            model, a module or a callable returning feature maps), wrapped in ``SCDA`` with its defaults.
        hard_negatives: make hard negatives; default ``True`` for the saliency-guided strategies, ``False``
            for ``"mscn"`` (which then needs saliency) and ``"none"`` (which cannot make them).
        mask_ratio: alpha, the fraction of the patch grid masked in the query, fixed or a ``(low, high)`` range
            drawn per image.
        hard_negative_mask_ratio: beta, the fraction of the foreground masked in a hard negative.
        patch_size: patch side in pixels (32 gives the paper's 7x7 grid at 224 px; scale it with the view,
            e.g. 8 for 64 px views).
        mask_type_probs: probabilities of ``"spatial"``, ``"channel"`` and ``"focal"`` masks for the query
            (default: the release's mixture under the high-pass recipe, spatial only otherwise).
        hard_negative_mask_type_probs: the same for the hard negatives (default: as for the query).
        fill_options: options of the query's fill (the noise's ``std`` under the high-pass recipe, the
            blur's ``kernel_size`` and ``sigma``).
        hard_negative_fill_options: options of the hard negatives' fill (release high-pass noise: 0.14).
        input_filter: the high-pass filter of ``"high_pass"`` and ``"mscn"`` (default: the release's,
            kernel 11 and sigma 5); the other strategies feed unfiltered views.
        saliency_threshold: mean saliency a patch needs to count as foreground.
        generator: source of randomness of every mask and noise draw; ``None`` uses torch's global one. In
            a DataLoader worker (:class:`ThreeViews`) the worker's copy is re-seeded once from its state and
            the worker's seed, so workers draw different masks.

    Attributes:
        input_filter: the :class:`~salmask.HighPassFilter` every view goes through (``None`` for the
            strategies that feed unfiltered views); record it with a checkpoint
            (:func:`~salmask.ssl.record_input_filter`) for evaluation.

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
        scda: SCDA | nn.Module | Callable[[Tensor], Any] | None = None,
        hard_negatives: bool | None = None,
        mask_ratio: float | tuple[float, float] = MASK_RATIO,
        hard_negative_mask_ratio: float | tuple[float, float] = HARD_NEGATIVE_MASK_RATIO,
        patch_size: int | tuple[int, int] = PATCH_SIZE,
        mask_type_probs: dict[str, float] | None = None,
        hard_negative_mask_type_probs: dict[str, float] | None = None,
        fill_options: dict[str, Any] | None = None,
        hard_negative_fill_options: dict[str, Any] | None = None,
        input_filter: HighPassFilter | None = None,
        saliency_threshold: float = SALIENCY_THRESHOLD,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if scda is not None and not isinstance(scda, SCDA):
            if not callable(scda):
                raise TypeError(
                    "scda must be an SCDA, a model or callable SCDA accepts as its backbone, or None, got "
                    f"{type(scda).__name__}"
                )
            scda = SCDA(scda)
        if hard_negatives is not None and not isinstance(hard_negatives, bool):
            raise TypeError(f"hard_negatives must be a bool or None, got {type(hard_negatives).__name__}")
        if input_filter is not None and not isinstance(input_filter, HighPassFilter):
            raise TypeError(f"input_filter must be a HighPassFilter or None, got {type(input_filter).__name__}")
        check_mapping(fill_options, "fill_options", optional=True)
        check_mapping(hard_negative_fill_options, "hard_negative_fill_options", optional=True)
        setup = _STRATEGIES[strategy]
        self.strategy = strategy
        self.fill = setup.fill
        self.saliency_guided = setup.saliency_guided
        self.make_hard_negatives = setup.hard_negatives if hard_negatives is None else hard_negatives
        if input_filter is not None and not setup.filters_views:
            raise ValueError(
                f"strategy {strategy!r} feeds unfiltered views; input_filter applies to high_pass and mscn"
            )
        self.input_filter = (input_filter or HighPassFilter()) if setup.filters_views else None
        if self.fill is None:
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
        else:
            filter_options = {"kernel_size", "sigma"} & {*(fill_options or {}), *(hard_negative_fill_options or {})}
            if setup.filters_views and filter_options:
                raise ValueError(
                    f"{sorted(filter_options)} set the high-pass filter of every view, not the noise fill: pass "
                    "input_filter=HighPassFilter(kernel_size, sigma)"
                )
            self.fill_options = check_fill(self.fill, {**setup.fill_options, **(fill_options or {})})
            try:
                self.hard_negative_fill_options = check_fill(
                    self.fill, {**setup.hard_negative_fill_options, **(hard_negative_fill_options or {})}
                )
            except (TypeError, ValueError) as error:
                raise type(error)(f"hard_negative_fill_options: {error}") from error
        self.scda = scda
        self.generator = check_generator(generator)
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.hard_negative_mask_ratio = check_mask_ratio(hard_negative_mask_ratio, "hard_negative_mask_ratio")
        check_patch_size(patch_size)
        self.patch_size = patch_size
        self.mask_type_probs = check_mask_type_probs(mask_type_probs or setup.mask_type_probs)
        self.hard_negative_mask_type_probs = check_mask_type_probs(
            hard_negative_mask_type_probs or self.mask_type_probs, "hard_negative_mask_type_probs"
        )
        self.saliency_threshold = check_fraction(saliency_threshold, "saliency_threshold")

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, hard_negatives={self.make_hard_negatives}"

    def __getstate__(self) -> dict[str, Any]:
        # A generator pickles as plain bytes, so the module reaches spawned DataLoader workers.
        return picklable_state(self.__dict__)

    @property
    def needs_saliency(self) -> bool:
        """Whether ``forward`` needs saliency (passed in, or from ``scda``) for the query or the key."""
        return self.saliency_guided or self.make_hard_negatives

    def _saliency(
        self, query: Tensor, key: Tensor, query_saliency: Tensor | None, key_saliency: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
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

    def _filter(self, view: Tensor) -> Tensor:
        if self.input_filter is None:
            return view
        return high_pass(view, self.input_filter.kernel_size, self.input_filter.sigma)

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
        check_views(query, key)
        batch_size = query.shape[0]
        if query_saliency is not None:
            query_saliency = check_saliency(query_saliency, "query_saliency", batch_size=batch_size)
        if key_saliency is not None:
            key_saliency = check_saliency(key_saliency, "key_saliency", batch_size=batch_size)
        if self.fill is None:
            return MaskedViewsOutput(query, key, None, None, None, None)

        query_saliency, key_saliency = self._saliency(query, key, query_saliency, key_saliency)
        common: dict[str, Any] = {"patch_size": self.patch_size, "generator": generator_in_process(self.generator)}
        query_params = draw_mask_params(
            query.shape,
            query_saliency if self.saliency_guided else None,
            mask_ratio=self.mask_ratio,
            mask_type_probs=self.mask_type_probs,
            saliency_threshold=self.saliency_threshold,
            device=query.device,
            **common,
        )
        # A filtered query is a tensor of this step's own, filled in place.
        filtered_query = self._filter(query)
        masked_query = apply_mask(
            filtered_query, query_params, self.fill, inplace=filtered_query is not query, **common, **self.fill_options
        )
        key = self._filter(key)
        hard_negatives = hard_negative_valid = hard_negative_params = None
        if self.make_hard_negatives:
            hard_negative_params = draw_mask_params(
                key.shape,
                key_saliency,
                mask_ratio=self.hard_negative_mask_ratio,
                hard_negative=True,
                mask_type_probs=self.hard_negative_mask_type_probs,
                saliency_threshold=self.saliency_threshold,
                device=key.device,
                **common,
            )
            # From the key as the encoders see it: outside its masked patches a hard negative equals the key.
            hard_negatives = apply_mask(
                key, hard_negative_params, self.fill, hard_negative=True, **common, **self.hard_negative_fill_options
            )
            hard_negative_valid = hard_negative_params["valid"]
        return MaskedViewsOutput(
            masked_query, key, hard_negatives, hard_negative_valid, query_params, hard_negative_params
        )


def scaled_release_filters(view_size: int) -> tuple[HighPassFilter, dict[str, Any]]:
    """The release's filters, made for 224 px views, scaled to views of ``view_size`` pixels.

    The high-pass filter (kernel 11, sigma 5) and the strong blur (kernel 31, sigma 10) are scaled by
    ``view_size / 224``, as the patch grid is (32 px patches at 224 px, 4 px at 32 px), kernels rounded to
    odd sizes of at least 3: at 32 px, 3 and 5 pixels. Unscaled, the blur would turn a 32 px view into its
    mean and the high-pass filter would keep nearly all of it.

    Args:
        view_size: side of the views in pixels.

    Returns:
        ``(input_filter, blur_options)``: the :class:`~salmask.HighPassFilter` for ``MaskedViews(...,
        input_filter=...)`` of the high-pass recipes, and the ``fill_options`` (and
        ``hard_negative_fill_options``) of the ``"blur"`` strategy.

    Example:
        >>> from salmask.ssl import MaskedViews, scaled_release_filters
        >>> high_pass, blur = scaled_release_filters(32)
        >>> (high_pass.kernel_size, round(high_pass.sigma, 3)), (blur["kernel_size"], round(blur["sigma"], 3))
        ((3, 0.714), (5, 1.429))
        >>> scaled_release_filters(224)[1]
        {'kernel_size': 31, 'sigma': 10.0}
        >>> masker = MaskedViews("blur", patch_size=4, fill_options=blur, hard_negative_fill_options=blur)
    """
    check_int(view_size, "view_size", minimum=1)
    scale = view_size / 224

    def odd(kernel_size: int) -> int:
        return max(3, round(kernel_size * scale) // 2 * 2 + 1)

    high_pass = HighPassFilter(odd(HIGH_PASS_KERNEL_SIZE), HIGH_PASS_SIGMA * scale)
    return high_pass, {"kernel_size": odd(BLUR_KERNEL_SIZE), "sigma": BLUR_SIGMA * scale}


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
