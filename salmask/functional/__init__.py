"""Pure, batched, device-agnostic kernels under the transforms.

Data flows one way: saliency -> patch grid (:func:`saliency_to_patch_grid`) -> the random draws of the
masks (:func:`draw_mask_params`) -> pixel mask (:func:`render_mask`) -> fill (:func:`apply_fill`);
:func:`apply_mask` renders and fills a draw in one call. The high-pass filter (:func:`high_pass`) is a
view-wide step before the fill. Each step is a function of tensors that can be called on its own, has no
Python loop over images, never synchronises an accelerator with the host (on a CPU the fills read how
many pixels are masked, to touch no more than that), and takes an optional ``torch.Generator`` for every
random draw.
"""

from salmask.functional._fill import fill_blur, fill_constant, fill_mean, fill_noise
from salmask.functional._filters import gaussian_blur, high_pass
from salmask.functional._grid import expand_patch_mask, patch_grid_size, saliency_to_patch_grid
from salmask.functional._masking import FILLS, apply_fill, apply_mask, draw_mask_params, mask_images, render_mask
from salmask.functional._sampling import (
    MASK_TYPES,
    draw_focal_windows,
    draw_mask_ratios,
    draw_mask_types,
    focal_window_mask,
    masked_patch_counts,
    sample_patch_mask,
)

__all__ = [
    "FILLS",
    "MASK_TYPES",
    "apply_fill",
    "apply_mask",
    "draw_focal_windows",
    "draw_mask_params",
    "draw_mask_ratios",
    "draw_mask_types",
    "expand_patch_mask",
    "fill_blur",
    "fill_constant",
    "fill_mean",
    "fill_noise",
    "focal_window_mask",
    "gaussian_blur",
    "high_pass",
    "mask_images",
    "masked_patch_counts",
    "patch_grid_size",
    "render_mask",
    "saliency_to_patch_grid",
    "sample_patch_mask",
]
