"""torchvision v2 transforms over :mod:`salmask.functional`.

The transforms draw their parameters (:func:`~salmask.functional.draw_mask_params`) and apply a fill
(:func:`~salmask.functional.apply_fill`); everything else lives in the kernels. They accept what v2
transforms accept (an image, a batch, a tuple or dict sample holding a :class:`~salmask.Saliency`) and
return the same structure. Unlike torchvision's transforms, a batch gets an independent mask per image.
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform

from salmask.functional import FILLS, apply_fill, draw_mask_params, high_pass
from salmask.functional._checks import check_image, check_kernel, check_probability, check_ratio
from salmask.functional._masking import check_mask_type_probs
from salmask.tv_tensors import Saliency

__all__ = [
    "RELEASE_MASK_TYPE_PROBS",
    "BlurMask",
    "HardNegativeMask",
    "HighPassFilter",
    "HighPassMask",
    "MeanFillMask",
    "SaliencyMask",
]

#: The high-pass release's mixture of mask types (focal with p=0.2, else spatial with p=0.3, else
#: channel-wise).
RELEASE_MASK_TYPE_PROBS = {"spatial": 0.24, "channel": 0.56, "focal": 0.2}

# Per strategy: the fill options and the mask types of the paper's release, for positives.
_STRATEGY_DEFAULTS: dict[str, tuple[dict[str, Any], dict[str, float]]] = {
    "high_pass": ({"noise_std": 0.18, "kernel_size": 11, "sigma": 5.0}, RELEASE_MASK_TYPE_PROBS),
    "blur": ({"kernel_size": 31, "sigma": 10.0}, {"spatial": 1.0}),
    "mean": ({}, {"spatial": 1.0}),
    "constant": ({"value": 0.0}, {"spatial": 1.0}),
    "noise": ({"std": 1.0, "mean": 0.0}, {"spatial": 1.0}),
}
# The release draws weaker noise into hard negatives than into positives.
_HARD_NEGATIVE_NOISE_STD = 0.14


def _is_image(inpt: Any) -> bool:
    return isinstance(inpt, tv_tensors.Image) or (
        isinstance(inpt, Tensor) and not isinstance(inpt, tv_tensors.TVTensor)
    )


class SaliencyMask(Transform):
    """Saliency-guided masking: mask patches in proportion to foreground and background, then fill them.

    Where to mask: the image is cut into a grid of ``patch_size`` patches (7x7 for 224 px and 32 px
    patches); each image draws a ratio ``alpha`` from ``ratio`` and masks ``round(alpha * N)`` patches,
    split between foreground and background in the proportion of the saliency's foreground fraction, each
    chosen uniformly inside its group. Without a :class:`~salmask.Saliency` in the sample the masks are
    uniformly random (the MSCN baseline). How to mask: ``strategy`` names the fill.

    ======================  ================================================================
    ``strategy``            fill
    ======================  ================================================================
    ``"high_pass"``         high-pass filter the view, then Gaussian noise in masked pixels
    ``"blur"``              masked pixels from a strongly blurred copy (kernel 31, sigma 10)
    ``"mean"``              per-image, per-channel mean of the view
    ``"constant"``          a constant ``value`` (zero masking)
    ``"noise"``             Gaussian noise
    ======================  ================================================================

    The fill options default to the paper's release and can be overridden through ``fill_options``. The
    parameters drawn by the last call are kept in :attr:`last_params` (a dict of tensors, see
    :func:`salmask.functional.draw_mask_params`) and can be replayed with ``transform(inputs,
    params=...)``; noise is drawn afresh on replay.

    Args:
        strategy: the fill, see above.
        ratio: fraction of the patch grid to mask, fixed or a ``(low, high)`` range drawn per image.
        patch_size: patch side in pixels, or ``(height, width)``.
        mask_type_probs: probabilities of ``"spatial"``, ``"channel"`` and ``"focal"`` masks; default the
            release's: the high-pass mixture for ``"high_pass"``, spatial only otherwise.
        fill_options: options of the fill (``noise_std``, ``kernel_size``, ``sigma``, ``value``, ...).
        hard_negative: mask only foreground patches (see :class:`HardNegativeMask`).
        focal_keep_fraction: side of the window a focal positive keeps, relative to the view.
        focal_fill_fraction: side of the window a focal hard negative fills, relative to the view.
        saliency_threshold: mean saliency a patch needs to count as foreground.
        p: probability that an image is masked.
        same_on_batch: draw one set of parameters for the whole batch.
        generator: source of randomness; ``None`` uses torch's global generator.
        inplace: write into the input image instead of a new tensor.
        check_values: reject non-finite images and saliency outside ``[0, 1]`` (one host synchronisation
            per call; turn off in a device-side training step).

    Attributes:
        last_params: the parameters drawn by the last call (``None`` before the first call).

    Example:
        >>> import torch
        >>> from salmask import Saliency, SaliencyMask
        >>> image = torch.rand(3, 224, 224)
        >>> saliency = Saliency(torch.zeros(224, 224, dtype=torch.bool))
        >>> saliency[48:176, 48:176] = True
        >>> transform = SaliencyMask("blur", ratio=0.25)
        >>> masked, same_saliency = transform(image, saliency)
        >>> int(transform.last_params["patch_mask"].sum())
        12
    """

    _transformed_types = (Tensor, PIL.Image.Image)

    def __init__(
        self,
        strategy: str = "high_pass",
        ratio: float | tuple[float, float] = (0.05, 0.25),
        *,
        patch_size: int | tuple[int, int] = 32,
        mask_type_probs: dict[str, float] | None = None,
        fill_options: dict[str, Any] | None = None,
        hard_negative: bool = False,
        focal_keep_fraction: float = 200 / 224,
        focal_fill_fraction: float = 130 / 224,
        saliency_threshold: float = 0.5,
        p: float = 1.0,
        same_on_batch: bool = False,
        generator: torch.Generator | None = None,
        inplace: bool = False,
        check_values: bool = True,
    ) -> None:
        super().__init__()
        if strategy not in FILLS:
            raise ValueError(f"strategy must be one of {sorted(FILLS)}, got {strategy!r}")
        default_fill_options, default_mask_types = _STRATEGY_DEFAULTS[strategy]
        if hard_negative and strategy == "high_pass":
            default_fill_options = {**default_fill_options, "noise_std": _HARD_NEGATIVE_NOISE_STD}
        unknown = set(fill_options or {}) - set(default_fill_options)
        if unknown:
            raise ValueError(
                f"fill_options {sorted(unknown)} do not apply to strategy {strategy!r}; "
                f"it takes {sorted(default_fill_options)}"
            )
        self.strategy = strategy
        self.ratio = check_ratio(ratio)
        self.patch_size = patch_size
        self.mask_type_probs = check_mask_type_probs(mask_type_probs or default_mask_types)
        self.fill_options = {**default_fill_options, **(fill_options or {})}
        self.hard_negative = hard_negative
        self.focal_keep_fraction = focal_keep_fraction
        self.focal_fill_fraction = focal_fill_fraction
        self.saliency_threshold = saliency_threshold
        self.p = check_probability(p, "p")
        self.same_on_batch = same_on_batch
        self.generator = generator
        self.inplace = inplace
        self.check_values = check_values
        self.last_params: dict[str, Tensor] | None = None
        # Fail at construction, not at the first batch, on a bad kernel or fraction.
        if "kernel_size" in self.fill_options:
            check_kernel(self.fill_options["kernel_size"], self.fill_options["sigma"])
        for name in ("focal_keep_fraction", "focal_fill_fraction", "saliency_threshold"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")

    def forward(self, *inputs: Any, params: dict[str, Tensor] | None = None) -> Any:
        """Mask the image(s) in ``inputs``; ``params`` replays an earlier draw instead of drawing."""
        flat_inputs, spec = tree_flatten(inputs if len(inputs) > 1 else inputs[0])
        self.check_inputs(flat_inputs)
        needs_transform = self._needs_transform_list(flat_inputs)
        if params is None:
            params = self.make_params([x for x, needed in zip(flat_inputs, needs_transform, strict=True) if needed])
        self.last_params = params
        flat_outputs = [
            self.transform(x, params) if needed else x for x, needed in zip(flat_inputs, needs_transform, strict=True)
        ]
        return tree_unflatten(flat_outputs, spec)

    def check_inputs(self, flat_inputs: list[Any]) -> None:
        for inpt in flat_inputs:
            if isinstance(inpt, PIL.Image.Image):
                raise TypeError(
                    f"{type(self).__name__} works on tensors; put v2.ToImage() and "
                    "v2.ToDtype(torch.float32, scale=True) before it"
                )
            if isinstance(inpt, tv_tensors.Video):
                raise TypeError(f"{type(self).__name__} does not mask videos; got a tv_tensors.Video")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        images = [x for x in flat_inputs if _is_image(x)]
        saliencies = [x for x in flat_inputs if isinstance(x, Saliency)]
        if not images:
            raise TypeError(f"{type(self).__name__} found no image in its input")
        if len(saliencies) > 1:
            raise ValueError(f"{type(self).__name__} takes at most one Saliency per sample, got {len(saliencies)}")
        image = images[0]
        check_image(image)
        if any(other.shape != image.shape for other in images[1:]):
            raise ValueError(
                f"all images in a sample must share one shape to share masks, got "
                f"{sorted({tuple(x.shape) for x in images})}"
            )
        saliency = saliencies[0].as_subclass(Tensor) if saliencies else None
        if self.check_values:
            self._check_values(image, saliency)
        return draw_mask_params(
            image.shape,
            saliency,
            ratio=self.ratio,
            patch_size=self.patch_size,
            hard_negative=self.hard_negative,
            mask_type_probs=self.mask_type_probs,
            focal_keep_fraction=self.focal_keep_fraction,
            focal_fill_fraction=self.focal_fill_fraction,
            saliency_threshold=self.saliency_threshold,
            p=self.p,
            same_on_batch=self.same_on_batch,
            device=image.device,
            generator=self.generator,
        )

    @staticmethod
    def _check_values(image: Tensor, saliency: Tensor | None) -> None:
        if image.is_floating_point() and not bool(torch.isfinite(image).all()):
            raise ValueError("image has non-finite values (nan or inf)")
        out_of_range = (
            saliency is not None
            and saliency.is_floating_point()
            and not bool(((saliency >= 0) & (saliency <= 1)).all())
        )
        if out_of_range:
            raise ValueError("saliency scores must lie in [0, 1] (and be finite); threshold raw maps first")

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not _is_image(inpt):
            return inpt
        output = apply_fill(
            inpt.as_subclass(Tensor),
            params["mask"],
            self.strategy,
            generator=self.generator,
            inplace=self.inplace,
            **self.fill_options,
        )
        return tv_tensors.wrap(output, like=inpt) if isinstance(inpt, tv_tensors.Image) else output


class HighPassMask(SaliencyMask):
    """The high-pass strategy: high-pass filter the view, fill masked pixels with Gaussian noise.

    Spatial, channel-wise and focal masks mixed as in the release (see ``RELEASE_MASK_TYPE_PROBS``).
    Encoders pretrained this way need :class:`HighPassFilter` on their inputs downstream.

    Args:
        ratio: fraction of the grid to mask, fixed or a range.
        noise_std: standard deviation of the noise (0.18 for positives in the release).
        kernel_size: Gaussian kernel of the filter.
        sigma: Gaussian standard deviation of the filter.
        **kwargs: any other argument of :class:`SaliencyMask`.

    Example:
        >>> import torch
        >>> from salmask import HighPassMask
        >>> HighPassMask()(torch.rand(8, 3, 224, 224)).shape
        torch.Size([8, 3, 224, 224])
    """

    def __init__(
        self,
        ratio: float | tuple[float, float] = (0.05, 0.25),
        *,
        noise_std: float = 0.18,
        kernel_size: int = 11,
        sigma: float = 5.0,
        **kwargs: Any,
    ) -> None:
        fill_options = {"noise_std": noise_std, "kernel_size": kernel_size, "sigma": sigma}
        super().__init__("high_pass", ratio, fill_options=fill_options, **kwargs)


class BlurMask(SaliencyMask):
    """The strong-blur strategy: masked pixels take the values of a strongly blurred copy of the view.

    Args:
        ratio: fraction of the grid to mask, fixed or a range.
        kernel_size: Gaussian kernel length (31 in the release).
        sigma: Gaussian standard deviation in pixels (10 in the release).
        **kwargs: any other argument of :class:`SaliencyMask`.

    Example:
        >>> import torch
        >>> from salmask import BlurMask
        >>> BlurMask(ratio=0.25)(torch.rand(3, 224, 224)).shape
        torch.Size([3, 224, 224])
    """

    def __init__(
        self,
        ratio: float | tuple[float, float] = (0.05, 0.25),
        *,
        kernel_size: int = 31,
        sigma: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__("blur", ratio, fill_options={"kernel_size": kernel_size, "sigma": sigma}, **kwargs)


class MeanFillMask(SaliencyMask):
    """The mean-fill strategy: masked pixels take the per-image, per-channel mean of the view.

    Args:
        ratio: fraction of the grid to mask, fixed or a range.
        **kwargs: any other argument of :class:`SaliencyMask`.

    Example:
        >>> import torch
        >>> from salmask import MeanFillMask
        >>> MeanFillMask()(torch.rand(3, 224, 224)).shape
        torch.Size([3, 224, 224])
    """

    def __init__(self, ratio: float | tuple[float, float] = (0.05, 0.25), **kwargs: Any) -> None:
        super().__init__("mean", ratio, **kwargs)


class HardNegativeMask(SaliencyMask):
    """Hard negatives: mask a large share of the object (foreground patches only) in the key view.

    Each image draws ``beta`` from ``ratio`` and masks ``round(beta * n_foreground)`` foreground patches,
    at least one; no background patch is touched. An image without foreground cannot make a hard
    negative: it is returned unmasked and ``last_params["valid"]`` is ``False`` for it, so the loss can
    drop it (an unmasked key contrasted as a negative would be the positive itself). Needs a
    :class:`~salmask.Saliency` in the sample; focal masks (if drawn) fill a window instead.

    Args:
        strategy: the fill, as for :class:`SaliencyMask`; high-pass noise defaults to std 0.14.
        ratio: fraction of the foreground to mask, fixed or a range (release: ``U(0.4, 0.7)``).
        **kwargs: any other argument of :class:`SaliencyMask`.

    Example:
        >>> import torch
        >>> from salmask import HardNegativeMask, Saliency
        >>> saliency = Saliency(torch.zeros(2, 7, 7, dtype=torch.bool))
        >>> saliency[0, 2:5, 2:5] = True
        >>> transform = HardNegativeMask("mean")
        >>> _ = transform(torch.rand(2, 3, 224, 224), saliency)
        >>> transform.last_params["valid"].tolist()
        [True, False]
    """

    def __init__(
        self, strategy: str = "high_pass", ratio: float | tuple[float, float] = (0.4, 0.7), **kwargs: Any
    ) -> None:
        super().__init__(strategy, ratio, hard_negative=True, **kwargs)


class HighPassFilter(Transform):
    """The high-pass filter alone (the image minus its Gaussian blur), for downstream evaluation.

    An encoder pretrained with :class:`HighPassMask` has only seen high-passed views; evaluate it on
    high-passed images too. Saliency maps and other annotations pass through.

    Args:
        kernel_size: Gaussian kernel of the filter (11 in the release).
        sigma: Gaussian standard deviation (5 in the release).

    Example:
        >>> import torch
        >>> from salmask import HighPassFilter
        >>> HighPassFilter()(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(self, kernel_size: int = 11, sigma: float = 5.0) -> None:
        super().__init__()
        check_kernel(kernel_size, sigma)
        self.kernel_size = kernel_size
        self.sigma = sigma

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, PIL.Image.Image):
            raise TypeError("HighPassFilter works on float tensors; put v2.ToImage() and v2.ToDtype before it")
        if not _is_image(inpt):
            return inpt
        output = high_pass(inpt.as_subclass(Tensor), self.kernel_size, self.sigma)
        return tv_tensors.wrap(output, like=inpt) if isinstance(inpt, tv_tensors.Image) else output
