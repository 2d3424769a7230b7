"""The :class:`Saliency` tv_tensor: a foreground map that moves with its image."""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors

from salmask._validation import check_saliency

__all__ = ["Saliency"]


class Saliency(tv_tensors.Mask):
    """Foreground map of an image or a batch, shaped ``(H, W)``, ``(1, H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)``.

    A subclass of :class:`torchvision.tv_tensors.Mask`, so torchvision's v2 geometric transforms
    (``RandomResizedCrop``, flips, ``Resize``) crop and move it together with the image it belongs to,
    with nearest-neighbour resampling. Its spatial size need not match the image: the masking transforms
    resample it onto their patch grid.

    Values are either boolean (``True`` marks foreground) or floating-point foreground scores in
    ``[0, 1]``; a patch counts as foreground when the mean score over its area reaches the transform's
    ``saliency_threshold`` (0.5 by default).

    Example:
        >>> import torch
        >>> from salmask import Saliency
        >>> saliency = Saliency(torch.zeros(224, 224, dtype=torch.bool))
        >>> saliency[64:160, 64:160] = True
        >>> saliency.sum().item()
        9216
    """

    def __new__(
        cls,
        data: Any,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | int | None = None,
        requires_grad: bool | None = None,
    ) -> Saliency:
        tensor = cls._to_tensor(data, dtype=dtype, device=device, requires_grad=requires_grad)
        check_saliency(tensor, "Saliency")
        return tensor.as_subclass(cls)
