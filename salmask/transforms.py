"""torchvision v2 transforms over :mod:`salmask.functional`.

Each transform is a thin adapter over the kernels through torchvision's two methods: ``make_params`` draws
the masks of a sample (:func:`~salmask.functional.draw_mask_params`: a few small tensors per image, kept
in ``last_params``) and ``transform`` applies them to each image (:func:`~salmask.functional.apply_mask`,
which renders the pixel mask there). Replaying a draw is calling ``transform`` again with the same
parameters: ``masked = mask.transform(image, mask.last_params)``. The transforms accept what v2
transforms accept (an image, a batch, a tuple or dict sample holding a :class:`~salmask.Saliency`) and
return the same structure. Unlike torchvision's transforms, a batch gets an independent mask per image.
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform

from salmask import _defaults
from salmask._defaults import (
    BLUR_KERNEL_SIZE,
    BLUR_SIGMA,
    FOCAL_FILL_FRACTION,
    FOCAL_KEEP_FRACTION,
    HARD_NEGATIVE_MASK_RATIO,
    HIGH_PASS_HARD_NEGATIVE_NOISE_STD,
    HIGH_PASS_KERNEL_SIZE,
    HIGH_PASS_NOISE_STD,
    HIGH_PASS_SIGMA,
    MASK_RATIO,
    PATCH_SIZE,
    SALIENCY_THRESHOLD,
    SPATIAL_ONLY,
)
from salmask._generators import generator_in_process, picklable_state
from salmask._validation import (
    check_bool,
    check_fraction,
    check_generator,
    check_image,
    check_kernel,
    check_mask_ratio,
    check_mask_type_probs,
    check_patch_size,
    check_probability,
    check_real,
)
from salmask.functional import apply_mask, draw_mask_params, high_pass, render_mask
from salmask.functional._masking import check_fill
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
RELEASE_MASK_TYPE_PROBS = _defaults.RELEASE_MASK_TYPE_PROBS


def _is_image(inpt: Any) -> bool:
    return isinstance(inpt, tv_tensors.Image) or (
        isinstance(inpt, Tensor) and not isinstance(inpt, tv_tensors.TVTensor)
    )


def _plain(inpt: Tensor) -> Tensor:
    # as_subclass stops torch.compile; a plain tensor needs none.
    return inpt if type(inpt) is Tensor else inpt.as_subclass(Tensor)


class SaliencyMask(Transform):
    """Saliency-guided masking: mask patches in proportion to foreground and background, then fill them.

    Where to mask: the image is cut into a grid of ``patch_size`` patches (7x7 for 224 px and 32 px
    patches); each image draws a ratio ``alpha`` from ``mask_ratio`` and masks ``round(alpha * N)`` patches,
    split between foreground and background in the proportion of the saliency's foreground fraction, each
    chosen uniformly inside its group. Without a :class:`~salmask.Saliency` in the sample the masks are
    uniformly random (the MSCN baseline). How to mask: ``fill`` names what masked pixels take.

    ==============  ================================================================
    ``fill``        masked pixels take
    ==============  ================================================================
    ``"noise"``     Gaussian noise (``std``, ``mean``)
    ``"blur"``      a strongly blurred copy of the view (``kernel_size`` 31, ``sigma`` 10)
    ``"mean"``      the per-image, per-channel mean of the view
    ``"constant"``  a constant ``value`` (zero masking)
    ==============  ================================================================

    The paper's high-pass recipe is the high-pass filter of the whole view followed by the noise fill:
    :class:`HighPassMask`. The fill options default to the fill kernels' and can be overridden through
    ``fill_options``. The parameters drawn by the last call are kept in :attr:`last_params` (the random
    draws only, see :func:`salmask.functional.draw_mask_params`); ``transform(image, params)`` replays
    them (noise is drawn afresh) and :meth:`pixel_mask` renders them.

    Args:
        fill: what masked pixels take, see above.
        mask_ratio: fraction of the patch grid to mask, fixed or a ``(low, high)`` range drawn per image.
        patch_size: patch side in pixels, or ``(height, width)``.
        mask_type_probs: probabilities of ``"spatial"``, ``"channel"`` and ``"focal"`` masks; default
            spatial only.
        fill_options: options of the fill (``std``, ``kernel_size``, ``sigma``, ``value``, ...).
        hard_negative: mask only foreground patches (see :class:`HardNegativeMask`).
        focal_keep_fraction: side of the window a focal positive keeps, relative to the view.
        focal_fill_fraction: side of the window a focal hard negative fills, relative to the view.
        saliency_threshold: mean saliency a patch needs to count as foreground.
        p: probability that an image is masked.
        same_on_batch: draw one set of parameters for the whole batch.
        generator: source of randomness; ``None`` uses torch's global generator. In each DataLoader worker
            the transform's copy of it is re-seeded once from its state and the worker's seed, so workers
            draw different masks, reproducibly for a seeded DataLoader.
        inplace: write into the input image instead of a new tensor.
        check_values: reject non-finite images: one pass over the image (and, on an accelerator, a host
            synchronisation per call); skipped where values cannot be read (meta tensors, tracing). Turn it
            off in a device-side training step. Float saliency scores are checked against ``[0, 1]`` either
            way (a read of the small map; boolean saliency needs none).

    Attributes:
        last_params: the parameters drawn by the last call (``None`` before the first call).

    Example:
        >>> import torch
        >>> from salmask import Saliency, SaliencyMask
        >>> image = torch.rand(3, 224, 224)
        >>> saliency = Saliency(torch.zeros(224, 224, dtype=torch.bool))
        >>> saliency[48:176, 48:176] = True
        >>> transform = SaliencyMask("blur", mask_ratio=0.25)
        >>> masked, same_saliency = transform(image, saliency)
        >>> int(transform.last_params["patch_mask"].sum())
        12
    """

    _transformed_types = (Tensor, PIL.Image.Image)

    def __init__(
        self,
        fill: str = "noise",
        mask_ratio: float | tuple[float, float] = MASK_RATIO,
        *,
        patch_size: int | tuple[int, int] = PATCH_SIZE,
        mask_type_probs: dict[str, float] | None = None,
        fill_options: dict[str, Any] | None = None,
        hard_negative: bool = False,
        focal_keep_fraction: float = FOCAL_KEEP_FRACTION,
        focal_fill_fraction: float = FOCAL_FILL_FRACTION,
        saliency_threshold: float = SALIENCY_THRESHOLD,
        p: float = 1.0,
        same_on_batch: bool = False,
        generator: torch.Generator | None = None,
        inplace: bool = False,
        check_values: bool = True,
    ) -> None:
        super().__init__()
        # Every argument is checked here, not at the first batch.
        self.fill_options = check_fill(fill, fill_options)
        self.fill = fill
        self.mask_ratio = check_mask_ratio(mask_ratio)
        check_patch_size(patch_size)
        self.patch_size = patch_size
        self.mask_type_probs = check_mask_type_probs(mask_type_probs or SPATIAL_ONLY)
        self.hard_negative = check_bool(hard_negative, "hard_negative")
        self.focal_keep_fraction = check_fraction(focal_keep_fraction, "focal_keep_fraction")
        self.focal_fill_fraction = check_fraction(focal_fill_fraction, "focal_fill_fraction")
        self.saliency_threshold = check_fraction(saliency_threshold, "saliency_threshold")
        self.p = check_probability(p, "p")
        self.same_on_batch = check_bool(same_on_batch, "same_on_batch")
        self.generator = check_generator(generator)
        self.inplace = check_bool(inplace, "inplace")
        self.check_values = check_bool(check_values, "check_values")
        self.last_params: dict[str, Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A generator pickles as plain bytes, so the transform reaches spawned DataLoader workers.
        return picklable_state(self.__dict__)

    @property
    def _generator(self) -> torch.Generator | None:
        return generator_in_process(self.generator)

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
        # The kernels read a Saliency as the tensor it is (and check its scores); unwrapping it would stop
        # torch.compile.
        saliency = saliencies[0] if saliencies else None
        params = draw_mask_params(
            image.shape,
            saliency,
            mask_ratio=self.mask_ratio,
            patch_size=self.patch_size,
            hard_negative=self.hard_negative,
            mask_type_probs=self.mask_type_probs,
            focal_keep_fraction=self.focal_keep_fraction,
            focal_fill_fraction=self.focal_fill_fraction,
            saliency_threshold=self.saliency_threshold,
            p=self.p,
            same_on_batch=self.same_on_batch,
            device=image.device,
            generator=self._generator,
        )
        self.last_params = params
        return params

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not _is_image(inpt):
            return inpt
        output = self._mask(_plain(inpt), params)
        return tv_tensors.wrap(output, like=inpt) if isinstance(inpt, tv_tensors.Image) else output

    def _mask(self, image: Tensor, params: dict[str, Tensor]) -> Tensor:
        return apply_mask(
            image,
            params,
            self.fill,
            patch_size=self.patch_size,
            hard_negative=self.hard_negative,
            generator=self._generator,
            inplace=self.inplace,
            check_finite=self.check_values,
            **self.fill_options,
        )

    def pixel_mask(self, params: dict[str, Tensor], image_size: tuple[int, int]) -> Tensor:
        """The pixels a draw of this transform masks: ``(B, S, H, W)`` (or ``(S, H, W)``) bool.

        Example:
            >>> import torch
            >>> from salmask import MeanFillMask
            >>> transform = MeanFillMask(mask_ratio=0.25)
            >>> _ = transform(torch.rand(3, 224, 224))
            >>> transform.pixel_mask(transform.last_params, (224, 224)).float().mean().item()
            0.2448979616165161
        """
        return render_mask(params, image_size, self.patch_size, hard_negative=self.hard_negative)


class HighPassMask(SaliencyMask):
    """The high-pass recipe: high-pass filter the whole view, then fill masked pixels with Gaussian noise.

    The filter (:class:`HighPassFilter`, the view minus its Gaussian blur) removes the low frequencies that
    make the masks' edges stand out, and the noise matches the statistics of the filtered view. Spatial,
    channel-wise and focal masks are mixed as in the release (see ``RELEASE_MASK_TYPE_PROBS``). Encoders
    pretrained this way need the same filter, :attr:`input_filter`, on their inputs downstream.

    Args:
        mask_ratio: fraction to mask, fixed or a range; default the release's ``U(0.05, 0.25)`` of the grid, or
            ``U(0.4, 0.7)`` of the foreground for hard negatives.
        noise_std: standard deviation of the noise; default the release's 0.18, or 0.14 for hard negatives.
        kernel_size: Gaussian kernel of the filter.
        sigma: Gaussian standard deviation of the filter.
        hard_negative: mask foreground patches only, as :class:`HardNegativeMask`.
        mask_type_probs: default the release's mixture.
        **kwargs: any other argument of :class:`SaliencyMask`.

    Attributes:
        input_filter: the :class:`HighPassFilter` applied to the whole view before the noise fill.

    Example:
        >>> import torch
        >>> from salmask import HighPassMask
        >>> HighPassMask()(torch.rand(8, 3, 224, 224)).shape
        torch.Size([8, 3, 224, 224])
    """

    def __init__(
        self,
        mask_ratio: float | tuple[float, float] | None = None,
        *,
        noise_std: float | None = None,
        kernel_size: int = HIGH_PASS_KERNEL_SIZE,
        sigma: float = HIGH_PASS_SIGMA,
        hard_negative: bool = False,
        mask_type_probs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        check_bool(hard_negative, "hard_negative")
        if mask_ratio is None:
            mask_ratio = HARD_NEGATIVE_MASK_RATIO if hard_negative else MASK_RATIO
        if noise_std is None:
            noise_std = HIGH_PASS_HARD_NEGATIVE_NOISE_STD if hard_negative else HIGH_PASS_NOISE_STD
        check_real(noise_std, "noise_std", low=0.0)
        super().__init__(
            "noise",
            mask_ratio,
            fill_options={"std": noise_std},
            hard_negative=hard_negative,
            mask_type_probs=mask_type_probs or RELEASE_MASK_TYPE_PROBS,
            **kwargs,
        )
        self.input_filter = HighPassFilter(kernel_size, sigma)

    def _mask(self, image: Tensor, params: dict[str, Tensor]) -> Tensor:
        filtered = high_pass(image, self.input_filter.kernel_size, self.input_filter.sigma)
        if self.inplace:
            filtered = image.copy_(filtered)
        noise_std = self.fill_options["std"]
        return apply_mask(
            filtered,
            params,
            "noise",
            patch_size=self.patch_size,
            hard_negative=self.hard_negative,
            generator=self._generator,
            inplace=True,
            check_finite=self.check_values,
            std=noise_std,
        )


class BlurMask(SaliencyMask):
    """The strong-blur strategy: masked pixels take the values of a strongly blurred copy of the view.

    Args:
        mask_ratio: fraction of the grid to mask, fixed or a range.
        kernel_size: Gaussian kernel length (31 in the release).
        sigma: Gaussian standard deviation in pixels (10 in the release).
        **kwargs: any other argument of :class:`SaliencyMask`.

    Example:
        >>> import torch
        >>> from salmask import BlurMask
        >>> BlurMask(mask_ratio=0.25)(torch.rand(3, 224, 224)).shape
        torch.Size([3, 224, 224])
    """

    def __init__(
        self,
        mask_ratio: float | tuple[float, float] = MASK_RATIO,
        *,
        kernel_size: int = BLUR_KERNEL_SIZE,
        sigma: float = BLUR_SIGMA,
        **kwargs: Any,
    ) -> None:
        super().__init__("blur", mask_ratio, fill_options={"kernel_size": kernel_size, "sigma": sigma}, **kwargs)


class MeanFillMask(SaliencyMask):
    """The mean-fill strategy: masked pixels take the per-image, per-channel mean of the view.

    Args:
        mask_ratio: fraction of the grid to mask, fixed or a range.
        **kwargs: any other argument of :class:`SaliencyMask`.

    Example:
        >>> import torch
        >>> from salmask import MeanFillMask
        >>> MeanFillMask()(torch.rand(3, 224, 224)).shape
        torch.Size([3, 224, 224])
    """

    def __init__(self, mask_ratio: float | tuple[float, float] = MASK_RATIO, **kwargs: Any) -> None:
        super().__init__("mean", mask_ratio, **kwargs)


class HardNegativeMask(SaliencyMask):
    """Hard negatives: mask a large share of the object (foreground patches only) in the key view.

    Each image draws ``beta`` from ``mask_ratio`` and masks ``round(beta * n_foreground)`` foreground patches,
    at least one; no background patch is touched. An image without foreground cannot make a hard
    negative: it is returned unmasked and ``last_params["valid"]`` is ``False`` for it, so the loss can
    drop it (an unmasked key contrasted as a negative would be the positive itself). Needs a
    :class:`~salmask.Saliency` in the sample; focal masks (if drawn) fill a window instead. The high-pass
    recipe's hard negatives are ``HighPassMask(hard_negative=True)``.

    Args:
        fill: what masked pixels take, as for :class:`SaliencyMask`.
        mask_ratio: fraction of the foreground to mask, fixed or a range (release: ``U(0.4, 0.7)``).
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
        self, fill: str = "noise", mask_ratio: float | tuple[float, float] = HARD_NEGATIVE_MASK_RATIO, **kwargs: Any
    ):
        super().__init__(fill, mask_ratio, hard_negative=True, **kwargs)


class HighPassFilter(Transform):
    """The high-pass filter alone (the image minus its Gaussian blur): a view-wide step before a fill.

    The first half of the high-pass recipe (:class:`HighPassMask`), and what an encoder pretrained with it
    needs on its inputs downstream, since it has only seen high-passed views. Saliency maps and other
    annotations pass through.

    Args:
        kernel_size: Gaussian kernel of the filter (11 in the release).
        sigma: Gaussian standard deviation (5 in the release).

    Example:
        >>> import torch
        >>> from salmask import HighPassFilter
        >>> HighPassFilter()(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(self, kernel_size: int = HIGH_PASS_KERNEL_SIZE, sigma: float = HIGH_PASS_SIGMA) -> None:
        super().__init__()
        check_kernel(kernel_size, sigma)
        self.kernel_size = kernel_size
        self.sigma = sigma

    def check_inputs(self, flat_inputs: list[Any]) -> None:
        if any(isinstance(inpt, PIL.Image.Image) for inpt in flat_inputs):
            raise TypeError("HighPassFilter works on float tensors; put v2.ToImage() and v2.ToDtype before it")

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not _is_image(inpt):
            return inpt
        output = high_pass(_plain(inpt), self.kernel_size, self.sigma)
        return tv_tensors.wrap(output, like=inpt) if isinstance(inpt, tv_tensors.Image) else output
