"""Argument checks for all of salmask, under one rule: ``TypeError`` for a wrong type, ``ValueError`` for a
wrong value. Every message names the argument and says what was expected.

The checks of numbers use comparisons only, which also hold for the symbolic numbers of ``torch.compile``;
the checks of tensor values (:func:`check_finite_image`, :func:`check_saliency_scores`) read the values and
are skipped by their callers where values cannot be read (:func:`values_readable`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from salmask._defaults import MASK_TYPES


def _kind(value: Any) -> str:
    return f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An int, not a bool; under ``torch.compile`` a symbolic size (``torch.SymInt``) counts as one."""
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def check_bool(value: Any, name: str, *, optional: bool = False) -> bool | None:
    """A bool (``None`` too with ``optional``); a string or a number where a flag belongs is a mistake."""
    if optional and value is None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        expected = "a bool or None" if optional else "a bool"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    return bool(value)


def check_generator(value: Any, name: str = "generator") -> torch.Generator | None:
    """A ``torch.Generator`` or ``None`` (torch's global generator)."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def check_mapping(value: Any, name: str, *, optional: bool = False) -> Mapping[str, Any] | None:
    """A mapping (a dict; ``None`` too with ``optional``)."""
    if optional and value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict{' or None' if optional else ''}, got {type(value).__name__}")
    return value


def check_path(value: Any, name: str) -> Path:
    """A file system path: a ``str`` or an ``os.PathLike``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    return Path(value)


def check_callable(value: Any, name: str, *, optional: bool = True) -> Any:
    """A callable (``None`` too with ``optional``)."""
    if not (callable(value) or (optional and value is None)):
        raise TypeError(f"{name} must be callable{' or None' if optional else ''}, got {type(value).__name__}")
    return value


def check_module(value: Any, name: str) -> Any:
    """A ``torch.nn.Module``."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """An int (not a bool), at least ``minimum``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def check_real(
    value: Any, name: str, *, low: float = -math.inf, high: float = math.inf, open_low: bool = False
) -> float:
    """A finite real number in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    above = value > low if open_low else value >= low
    # Comparisons reject nan and inf too, without math.isfinite, which symbolic numbers do not support.
    if not (above and value <= high and -math.inf < value < math.inf):
        if high == math.inf:
            expected = f"a finite number {'>' if open_low else '>='} {low:g}" if low > -math.inf else "finite"
        else:
            expected = f"in {'(' if open_low else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be {expected}, got {value}")
    return float(value)


def check_positive(value: Any, name: str) -> float:
    """A finite number > 0."""
    return check_real(value, name, low=0.0, open_low=True)


def check_probability(value: Any, name: str) -> float:
    """A probability in ``[0, 1]``."""
    return check_real(value, name, low=0.0, high=1.0)


def check_fraction(value: Any, name: str) -> float:
    """A fraction in ``(0, 1]``, such as a window side relative to the view."""
    return check_real(value, name, low=0.0, high=1.0, open_low=True)


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_mask_ratio(value: Any, name: str = "mask_ratio") -> tuple[float, float]:
    """A fraction in ``[0, 1]`` or a ``(low, high)`` range of fractions, returned as a range."""
    if _is_real(value):
        low = high = value
    elif isinstance(value, Sequence) and len(value) == 2 and all(_is_real(r) for r in value):
        low, high = value
    else:
        raise TypeError(f"{name} must be a number or a (low, high) pair of numbers, got {value!r}")
    if not (0.0 <= low <= 1.0 and 0.0 <= high <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    if low > high:
        raise ValueError(f"{name} range is reversed: low {low} > high {high}")
    return float(low), float(high)


def check_mask_type_probs(mask_type_probs: Any, name: str = "mask_type_probs") -> dict[str, float]:
    """Probabilities of the mask types in ``MASK_TYPES``, summing to 1."""
    if not isinstance(mask_type_probs, Mapping) or not mask_type_probs:
        raise TypeError(f"{name} must be a dict from {MASK_TYPES} to probabilities, got {mask_type_probs!r}")
    unknown = set(mask_type_probs) - set(MASK_TYPES)
    if unknown:
        raise ValueError(f"{name} has unknown mask types {sorted(unknown)}; known: {MASK_TYPES}")
    for mask_type, probability in mask_type_probs.items():
        check_probability(probability, f"{name}[{mask_type!r}]")
    if abs(sum(mask_type_probs.values()) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, got {dict(mask_type_probs)!r}")
    return {mask_type: float(probability) for mask_type, probability in mask_type_probs.items()}


def check_memory_bank_size(value: Any) -> tuple[int, int] | None:
    """A memory bank's ``(K, D)`` (keys, embedding size), or ``None`` for no bank (also given as ``0``).

    The ``(K, D)`` form is lightly's ``memory_bank_size``; a bare K > 0 is refused, as lightly refuses it,
    because the bank is allocated before any embedding shows its size.
    """
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, Sequence)) or isinstance(value, str):
        raise TypeError(f"memory_bank_size must be a (K, D) pair of ints, 0 or None, got {type(value).__name__}")
    if isinstance(value, int):
        raise ValueError(
            f"memory_bank_size must be (K, D), the number of keys and the embedding size, e.g. ({value}, 128); "
            f"got {value} alone"
        )
    if len(value) != 2:
        raise ValueError(f"memory_bank_size must be a (K, D) pair, got {tuple(value)!r}")
    size, dim = value
    return check_int(size, "memory_bank_size[0] (K)", minimum=1), check_int(dim, "memory_bank_size[1] (D)", minimum=1)


def check_kernel(kernel_size: Any, sigma: Any) -> None:
    """A Gaussian kernel: an odd positive length and a positive, finite sigma."""
    check_int(kernel_size, "kernel_size", minimum=1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    check_positive(sigma, "sigma")


def as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    if is_int(value):
        return value, value
    first, second = value
    # Symbolic sizes under torch.compile stay symbolic; int() would specialise them.
    return tuple(side if isinstance(side, torch.SymInt) else int(side) for side in (first, second))  # type: ignore[return-value]


def check_size(value: Any, name: str) -> tuple[int, int]:
    """A positive int side, or a ``(height, width)`` pair of them; returned as a pair."""
    is_pair = isinstance(value, Sequence) and len(value) == 2
    if not (is_int(value) or (is_pair and all(is_int(v) for v in value))):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    height, width = as_pair(value)
    if height < 1 or width < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return height, width


def check_patch_size(patch_size: Any, image_size: Sequence[int] | None = None) -> tuple[int, int]:
    """A patch side or ``(height, width)`` of positive ints, no larger than the image; returned as a pair."""
    patch_height, patch_width = check_size(patch_size, "patch_size")
    if image_size is not None:
        height, width = int(image_size[0]), int(image_size[1])
        if patch_height > height or patch_width > width:
            raise ValueError(
                f"patch_size {(patch_height, patch_width)} is larger than the image ({height}, {width}); "
                "pass a smaller patch_size"
            )
    return patch_height, patch_width


def check_tensor(value: Any, name: str, *, ndim: int | tuple[int, ...] | None = None, floating: bool = False) -> Tensor:
    """A tensor, floating-point if asked, with ``ndim`` dimensions (one of them, for a tuple)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if allowed is not None and value.ndim not in allowed:
        expected = " or ".join(str(n) for n in allowed)
        raise ValueError(f"{name} must have {expected} dimensions, got shape {tuple(value.shape)}")
    return value


def check_image(image: Any, name: str = "image") -> Tensor:
    """A ``(C, H, W)`` or ``(B, C, H, W)`` float or uint8 tensor with at least one channel and pixel."""
    check_tensor(image, name)
    if not (image.is_floating_point() or image.dtype == torch.uint8):
        raise TypeError(f"{name} must be a float or uint8 tensor, got dtype {image.dtype}")
    if image.ndim not in (3, 4):
        raise ValueError(f"{name} must be shaped (C, H, W) or (B, C, H, W), got shape {tuple(image.shape)}")
    if image.shape[-1] == 0 or image.shape[-2] == 0 or image.shape[-3] == 0:
        raise ValueError(f"{name} must have at least one channel and one pixel, got shape {tuple(image.shape)}")
    return image


def check_float_image(image: Tensor, what: str) -> None:
    """An image ``what`` needs in floating point (its values leave the uint8 range)."""
    if not image.is_floating_point():
        raise TypeError(
            f"{what} needs a float image (its values leave the uint8 range), got dtype {image.dtype}; "
            "convert with torchvision.transforms.v2.ToDtype(torch.float32, scale=True)"
        )


def check_mask(mask: Any, image: Tensor) -> None:
    """A boolean pixel mask that broadcasts against ``image``."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {_kind(mask)}")
    if mask.ndim != image.ndim or any(m not in (1, i) for m, i in zip(mask.shape, image.shape, strict=True)):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast against image of shape {tuple(image.shape)}"
        )


def check_views(query: Any, key: Any, names: tuple[str, str] = ("query", "key")) -> None:
    """Two float ``(B, C, H, W)`` batches of one shape: the views of a contrastive step."""
    for view, name in zip((query, key), names, strict=True):
        check_tensor(view, name, floating=True)
        if view.ndim != 4:
            raise ValueError(f"{name} must be a (B, C, H, W) batch, got shape {tuple(view.shape)}")
    if query.shape != key.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must share one shape, got {tuple(query.shape)} and {tuple(key.shape)}"
        )


def check_step_views(query: Any, key: Any, hard_negatives: Any, hard_negative_valid: Any) -> None:
    """The views of a training step: query and key (:func:`check_views`) of at least one image, and hard
    negatives ``(B, C, H, W)`` or ``(B, M, C, H, W)`` of the query's images, whose validity comes only with
    them."""
    check_views(query, key)
    if query.shape[0] == 0:
        # A loss over no image is a mean over nothing (NaN); a step over one has nothing to learn from.
        raise ValueError(f"query holds no images (B=0), shape {tuple(query.shape)}; a training step needs at least one")
    if hard_negatives is None:
        if hard_negative_valid is not None:
            raise ValueError("hard_negative_valid was given without hard_negatives")
        return
    check_tensor(hard_negatives, "hard_negatives", floating=True)
    batch_size, *image_shape = query.shape
    shape = tuple(hard_negatives.shape)
    if not (
        shape == tuple(query.shape) or (len(shape) == 5 and shape[0] == batch_size and list(shape[2:]) == image_shape)
    ):
        raise ValueError(
            f"hard_negatives must be (B, C, H, W) or (B, M, C, H, W) matching query {tuple(query.shape)}, "
            f"got shape {shape}"
        )


def check_saliency(
    saliency: Any, name: str = "saliency", *, batch_size: int | None = None, batched: bool = True
) -> Tensor:
    """A saliency map: bool or float scores, shaped ``(H, W)``, ``(1, H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)``.

    The one check of saliency in salmask; returns the maps as ``(B, h, w)``. With ``batch_size``, also
    checks that they are one per image (``batched=False``: the images are one ``(C, H, W)`` image).
    """
    if not isinstance(saliency, Tensor):
        raise TypeError(f"{name} must be a Saliency or a bool/float tensor, got {type(saliency).__name__}")
    if saliency.dtype != torch.bool and not saliency.is_floating_point():
        raise TypeError(
            f"{name} must be a bool map or float scores in [0, 1], got dtype {saliency.dtype}; "
            "convert integer label maps with `labels > 0` first"
        )
    if saliency.ndim not in (2, 3) and not (saliency.ndim == 4 and saliency.shape[1] == 1):
        raise ValueError(
            f"{name} must be shaped (H, W), (1, H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(saliency.shape)}"
        )
    maps = saliency[:, 0] if saliency.ndim == 4 else saliency[None] if saliency.ndim == 2 else saliency
    if batch_size is not None and maps.shape[0] != batch_size:
        expected = f"a batch of {batch_size}" if batched else "one image"
        raise ValueError(
            f"{name} holds {maps.shape[0]} maps but the images are {expected}; pass one saliency map per image"
        )
    return maps


def values_readable(tensor: Tensor) -> bool:
    """Whether a check may read ``tensor``'s values: not a meta tensor, not while torch.compile or FX trace."""
    if torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return False
    return tensor.device.type != "meta"


def check_finite_image(image: Tensor, sums: Tensor | None = None, name: str = "image") -> None:
    """Reject an image with NaN or infinite values, in one reading pass over it (or none, given its ``sums``).

    ``sums`` are any sums that cover every value of the image, e.g. the per-channel sums a mean fill needs.
    """
    if not image.is_floating_point():
        return
    # A sum is non-finite when any of its terms is, and reads the image at memory speed without a mask the
    # size of the image; only a sum that overflowed from finite values needs the exact test.
    sums = image.sum() if sums is None else sums
    if bool(torch.isfinite(sums).all()) or bool(torch.isfinite(image).all()):
        return
    raise ValueError(f"{name} has non-finite values (nan or inf)")


def check_saliency_scores(saliency: Tensor, name: str = "saliency") -> None:
    """Float saliency scores must lie in ``[0, 1]``."""
    if saliency.is_floating_point() and not bool(((saliency >= 0) & (saliency <= 1)).all()):
        raise ValueError(f"{name} scores must lie in [0, 1] (and be finite); threshold raw maps first")


def raise_if_not_finite(named_tensors: dict[str, Tensor], hint: str) -> None:
    """Reject non-finite values in any of the tensors, at the cost of a single host synchronisation."""
    flags = torch.stack([torch.isfinite(tensor).all() for tensor in named_tensors.values()])
    if not bool(flags.all()):
        bad = [name for name, finite in zip(named_tensors, flags.tolist(), strict=True) if not finite]
        raise ValueError(f"{', '.join(bad)} contain{'s' if len(bad) == 1 else ''} NaN or Inf values; {hint}")


def check_embedding_pair(first: Any, second: Any, names: tuple[str, str]) -> None:
    """Two float ``(B, D)`` embeddings of one shape, row ``i`` of each belonging to image ``i``."""
    check_tensor(first, names[0], ndim=2, floating=True)
    check_tensor(second, names[1], ndim=2, floating=True)
    if first.shape != second.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must both be (B, D) with the same B and D, got "
            f"{tuple(first.shape)} and {tuple(second.shape)}"
        )
    if first.shape[0] == 0:
        raise ValueError(
            f"{names[0]} and {names[1]} hold no embeddings (B=0); a loss needs at least one (its mean over none is NaN)"
        )


def negatives_as_rows(negatives: Any, dim: int, layout: str) -> Tensor:
    """``negatives`` as a ``(K, D)`` tensor (a transposed view for MoCo's ``(D, K)`` queue layout).

    ``layout`` is ``"KD"``, ``"DK"`` or ``"auto"``, which tells them apart by the dimension equal to ``D``.
    """
    check_tensor(negatives, "negatives", ndim=2, floating=True)
    rows, columns = negatives.shape
    if layout == "auto":
        if rows == dim and columns == dim:
            raise ValueError(
                f"negatives is ({rows}, {columns}) with embedding size D={dim}, so it could be (K, D) or "
                "MoCo's (D, K) queue layout; pass negatives_layout='KD' or 'DK' to say which"
            )
        if columns == dim:
            layout = "KD"
        elif rows == dim:
            layout = "DK"
        else:
            raise ValueError(
                f"negatives must be (K, D) or (D, K) with embedding size D={dim}, got shape {(rows, columns)}"
            )
    expected_dim = columns if layout == "KD" else rows
    if expected_dim != dim:
        raise ValueError(
            f"negatives in layout {layout!r} must have embedding size D={dim} along "
            f"{'dimension 1' if layout == 'KD' else 'dimension 0'}, got shape {(rows, columns)}"
        )
    return negatives if layout == "KD" else negatives.t()


def hard_negatives_as_batch(
    hard_negatives: Any, hard_negative_valid: Any, batch_size: int, dim: int
) -> tuple[Tensor | None, Tensor | None]:
    """Hard-negative embeddings as ``(B, M, D)`` and their validity as ``(B, M)`` bool (or ``None``)."""
    if hard_negatives is None:
        if hard_negative_valid is not None:
            raise ValueError("hard_negative_valid was given without hard_negatives")
        return None, None
    check_tensor(hard_negatives, "hard_negatives", floating=True)
    given_shape = tuple(hard_negatives.shape)
    if hard_negatives.ndim == 2:
        hard_negatives = hard_negatives.unsqueeze(1)
    if hard_negatives.ndim != 3 or hard_negatives.shape[0] != batch_size or hard_negatives.shape[2] != dim:
        raise ValueError(
            f"hard_negatives must be (B, D) or (B, M, D) with B={batch_size} and D={dim}, got shape {given_shape}"
        )
    if hard_negative_valid is None:
        return hard_negatives, None
    if not isinstance(hard_negative_valid, Tensor) or hard_negative_valid.dtype != torch.bool:
        raise TypeError(f"hard_negative_valid must be a bool torch.Tensor, got {_kind(hard_negative_valid)}")
    num_hard = hard_negatives.shape[1]
    if hard_negative_valid.shape == (batch_size,):
        hard_negative_valid = hard_negative_valid.unsqueeze(1).expand(batch_size, num_hard)
    elif hard_negative_valid.shape != (batch_size, num_hard):
        raise ValueError(
            f"hard_negative_valid must be (B,) or (B, M) = ({batch_size},) or ({batch_size}, {num_hard}), "
            f"got shape {tuple(hard_negative_valid.shape)}"
        )
    return hard_negatives, hard_negative_valid.to(hard_negatives.device)
