"""SCDA saliency: a frozen localization network, its activation map and the foreground rule."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salmask._defaults import SCDA_THRESHOLD_STD
from salmask._validation import check_bool, check_choice, check_real, check_size
from salmask.saliency._trunks import feature_map_backbone
from salmask.tv_tensors import Saliency

__all__ = ["SCDA", "activation_from_features", "largest_connected_component", "scda_foreground"]

# Relative spread below which an activation map is treated as constant: a blank view gives a map whose
# cells differ only by rounding, and thresholding that noise would draw a random foreground.
_CONSTANT_MAP_TOLERANCE = 1e-6


def activation_from_features(features: Tensor) -> Tensor:
    """Sum a ``(B, D, U, V)`` feature map over its channels into the SCDA activation map ``(B, U, V)``.

    The sum runs in float32 whatever the feature dtype: under autocast a half-precision sum over a few
    thousand channels can overflow.

    Args:
        features: ``(B, D, U, V)`` feature map of the localization network.

    Returns:
        ``(B, U, V)`` float32 activation map ``A``.

    Example:
        >>> import torch
        >>> activation_from_features(torch.ones(2, 3, 4, 5)).shape
        torch.Size([2, 4, 5])
    """
    if not isinstance(features, Tensor) or features.ndim != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a (B, D, U, V) tensor, got {shape}")
    return features.float().sum(dim=1)


def scda_foreground(
    activation: Tensor,
    threshold_std: float = SCDA_THRESHOLD_STD,
    *,
    largest_component: bool = False,
    connectivity: int = 8,
) -> Tensor:
    """Foreground cells of SCDA activation maps: ``A >= mean(A) - threshold_std * std(A)`` per map.

    ``threshold_std=0`` is the original SCDA rule (mean only); the paper uses 0.6. Mean and standard
    deviation are taken over the cells of each map (population standard deviation). The function is
    batched, has no host synchronisation and works on any device.

    Edge cases, by design:

    - a constant map (all cells equal up to rounding, e.g. a blank view) is all foreground: every cell
      reaches the mean, and downstream masking then falls back to uniform random masking;
    - non-finite cells (NaN) are background; a map with no foreground is returned as such, never an
      error.

    Args:
        activation: ``(U, V)`` or ``(B, U, V)`` activation map ``A``.
        threshold_std: ``k`` in ``mean - k * std``; negative values make the rule stricter than the mean.
        largest_component: keep only the largest connected foreground component of each map (original
            SCDA); see :func:`largest_connected_component`.
        connectivity: 4 or 8, neighbourhood used by ``largest_component``.

    Returns:
        Boolean tensor shaped like ``activation``, ``True`` on foreground cells.

    Example:
        >>> import torch
        >>> activation = torch.tensor([[0.0, 1.0, 0.0], [1.0, 5.0, 1.0], [0.0, 1.0, 0.0]])
        >>> scda_foreground(activation, threshold_std=0.0).int()
        tensor([[0, 1, 0],
                [1, 1, 1],
                [0, 1, 0]], dtype=torch.int32)
    """
    threshold_std = check_real(threshold_std, "threshold_std")
    check_bool(largest_component, "largest_component")
    check_choice(connectivity, "connectivity", (4, 8))
    if not isinstance(activation, Tensor) or activation.ndim not in (2, 3):
        shape = tuple(activation.shape) if isinstance(activation, Tensor) else type(activation).__name__
        raise ValueError(f"activation must be shaped (U, V) or (B, U, V), got {shape}")
    if not activation.is_floating_point():
        raise TypeError(f"activation must be a floating-point tensor, got dtype {activation.dtype}")
    maps = activation.unsqueeze(0) if activation.ndim == 2 else activation
    if maps.shape[-1] * maps.shape[-2] == 0:
        return torch.zeros_like(activation, dtype=torch.bool)

    values = maps.float().flatten(1)
    mean = values.mean(dim=1, keepdim=True)
    std = values.std(dim=1, keepdim=True, correction=0)
    foreground = values >= mean - threshold_std * std
    spread = values.amax(dim=1, keepdim=True) - values.amin(dim=1, keepdim=True)
    scale = values.abs().amax(dim=1, keepdim=True)
    constant = spread <= _CONSTANT_MAP_TOLERANCE * scale
    foreground = torch.where(constant, torch.ones_like(foreground), foreground) & values.isfinite()
    foreground = foreground.view_as(maps)

    if largest_component:
        foreground = largest_connected_component(foreground, connectivity=connectivity)
    return foreground.view_as(activation)


def _propagate_labels(labels: Tensor, foreground: Tensor, connectivity: int) -> Tensor:
    """One step of max-label propagation between neighbouring foreground cells."""
    if connectivity == 8:
        spread = F.max_pool2d(labels.unsqueeze(1), kernel_size=3, stride=1, padding=1).squeeze(1)
    else:
        padded = F.pad(labels, (1, 1, 1, 1))
        spread = torch.stack(
            [
                labels,
                padded[:, :-2, 1:-1],
                padded[:, 2:, 1:-1],
                padded[:, 1:-1, :-2],
                padded[:, 1:-1, 2:],
            ]
        ).amax(dim=0)
    return torch.where(foreground, spread, torch.zeros_like(spread))


def largest_connected_component(foreground: Tensor, *, connectivity: int = 8) -> Tensor:
    """Keep the largest connected component of each boolean map, on the device, without a host sync.

    Components are found by propagating the largest cell index through foreground neighbours for a fixed
    number of steps (the cell count, an upper bound on any path inside a component), so the cost does not
    depend on the data and nothing is copied to the host. Meant for the small grids of SCDA (7 x 7,
    14 x 14). Ties between equally large components go to the one whose last cell comes first in
    row-major order, so the result is deterministic. An empty map stays empty.

    Args:
        foreground: ``(U, V)`` or ``(B, U, V)`` boolean map.
        connectivity: 4 (edges) or 8 (edges and corners) neighbourhood.

    Returns:
        Boolean tensor shaped like ``foreground``.

    Example:
        >>> import torch
        >>> foreground = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1]]).bool()
        >>> largest_connected_component(foreground).int()
        tensor([[0, 0, 0, 0],
                [0, 0, 0, 1],
                [0, 0, 0, 1],
                [0, 0, 0, 1]], dtype=torch.int32)
    """
    check_choice(connectivity, "connectivity", (4, 8))
    if not isinstance(foreground, Tensor) or foreground.ndim not in (2, 3):
        shape = tuple(foreground.shape) if isinstance(foreground, Tensor) else type(foreground).__name__
        raise ValueError(f"foreground must be shaped (U, V) or (B, U, V), got {shape}")
    if foreground.dtype != torch.bool:
        raise TypeError(f"foreground must be a bool tensor, got dtype {foreground.dtype}")
    maps = foreground.unsqueeze(0) if foreground.ndim == 2 else foreground
    batch, height, width = maps.shape
    cells = height * width
    if cells == 0 or batch == 0:
        return foreground.clone()

    # Labels are 1-based cell indices (0 = background), carried in float because max_pool2d has no
    # integer kernel on every device; cell counts of saliency grids are far below float32's exact range.
    index = torch.arange(1, cells + 1, device=maps.device, dtype=torch.float32).view(1, height, width)
    labels = torch.where(maps, index, torch.zeros((), device=maps.device))
    for _ in range(cells):
        labels = _propagate_labels(labels, maps, connectivity)

    flat_labels = labels.flatten(1).long()
    sizes = torch.zeros(batch, cells + 1, device=maps.device, dtype=torch.long)
    sizes.scatter_add_(1, flat_labels, torch.ones_like(flat_labels))
    sizes[:, 0] = 0
    winner = sizes.argmax(dim=1, keepdim=True)
    keep = (flat_labels == winner) & (winner > 0)
    return keep.view_as(foreground)


class SCDA(nn.Module):
    """Frozen SCDA localization network: images in, boolean :class:`~salmask.Saliency` maps out.

    Wraps any feature extractor mapping ``(B, 3, H, W)`` images to a ``(B, D, U, V)`` feature map (a
    tensor, or a list/tuple/dict of maps whose last entry is used, as timm ``features_only`` models and
    torchvision's feature extractors return): a module, any callable, or a torchvision or timm
    classification model, whose layers before global pooling it uses (see
    :func:`~salmask.saliency.build_backbone`). The activation map ``A`` is the channel sum of the features;
    foreground is ``A >= mean(A) - threshold_std * std(A)`` (see :func:`scda_foreground`).

    The module is always frozen: it stays in eval mode even when a parent calls ``.train()``, its
    parameters do not require gradients, it runs under ``torch.no_grad`` and never updates batch-norm
    statistics. ``.to(device)``, ``.to(memory_format=torch.channels_last)`` and autocast work as for any
    module. Backbones from :func:`~salmask.saliency.build_backbone` take images normalised with the
    ImageNet mean and standard deviation, as a training pipeline feeds them.

    To pay for one forward per step, pass the query and key views together: ``scda(query, key)`` runs the
    network once on the concatenated batch and returns one map per view.

    Args:
        backbone: feature extractor (a module or a callable) or classification model; it is put in eval
            mode and frozen (not copied: the layers of a classification model stay shared with it).
        threshold_std: ``k`` in ``mean - k * std``; 0 is the original SCDA rule, 0.6 the paper's.
        largest_component: keep only the largest connected foreground component (original SCDA).
        connectivity: 4 or 8, neighbourhood for ``largest_component``.
        input_size: resize the views (bilinear, antialiased) to this size before the network: a cheaper,
            coarser saliency. ``None`` keeps the view size.
        output_size: resample the activation map (bilinear) to this grid before thresholding, e.g. back to
            the 7 x 7 patch grid when ``input_size`` is reduced. ``None`` keeps the network's grid.
        name: label recorded with the maps (e.g. in saliency caches); defaults to the backbone's
            ``saliency_name`` attribute or its class name.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
        >>> scda = SCDA(backbone)
        >>> query, key = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
        >>> query_saliency, key_saliency = scda(query, key)
        >>> query_saliency.shape, query_saliency.dtype
        (torch.Size([2, 8, 8]), torch.bool)
    """

    def __init__(
        self,
        backbone: nn.Module | Callable[[Tensor], Any],
        threshold_std: float = SCDA_THRESHOLD_STD,
        *,
        largest_component: bool = False,
        connectivity: int = 8,
        input_size: int | tuple[int, int] | None = None,
        output_size: int | tuple[int, int] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = feature_map_backbone(backbone)
        self.threshold_std = check_real(threshold_std, "threshold_std")
        self.largest_component = check_bool(largest_component, "largest_component")
        self.connectivity = check_choice(connectivity, "connectivity", (4, 8))
        self.input_size = None if input_size is None else check_size(input_size, "input_size")
        self.output_size = None if output_size is None else check_size(output_size, "output_size")
        self.name = name or getattr(self.backbone, "saliency_name", None) or type(backbone).__name__
        self.backbone.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> SCDA:
        """Ignore ``mode``: the localization network stays in eval mode so its BN statistics never move."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, threshold_std={self.threshold_std}, "
            f"largest_component={self.largest_component}, "
            f"input_size={self.input_size}, output_size={self.output_size}"
        )

    def _features(self, images: Tensor) -> Tensor:
        output = self.backbone(images)
        if isinstance(output, Mapping):
            output = list(output.values())
        if isinstance(output, (list, tuple)):
            if not output:
                raise ValueError("the backbone returned an empty list of feature maps")
            output = output[-1]
        if not isinstance(output, Tensor) or output.ndim != 4:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"the backbone must return a (B, D, U, V) feature map, got {got}; wrap models whose forward "
                "pools or classifies (e.g. timm models: use forward_features or features_only=True)"
            )
        return output

    @staticmethod
    def _batch(views: tuple[Tensor, ...]) -> Tensor:
        if not views:
            raise TypeError("expected at least one batch of images")
        for view in views:
            if not isinstance(view, Tensor) or view.ndim != 4:
                got = tuple(view.shape) if isinstance(view, Tensor) else type(view).__name__
                raise ValueError(f"images must be (B, C, H, W) tensors, got {got}")
        if len({tuple(view.shape[1:]) for view in views}) > 1:
            shapes = [tuple(view.shape) for view in views]
            raise ValueError(f"views passed together must share (C, H, W) to run in one forward, got {shapes}")
        return views[0] if len(views) == 1 else torch.cat(views)

    @torch.no_grad()
    def _activation(self, images: Tensor) -> Tensor:
        if self.input_size is not None and tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", antialias=True, align_corners=False)
        activation = activation_from_features(self._features(images))
        if self.output_size is not None and tuple(activation.shape[-2:]) != self.output_size:
            activation = F.interpolate(
                activation.unsqueeze(1), size=self.output_size, mode="bilinear", align_corners=False
            ).squeeze(1)
        return activation

    def _split(self, batch: Tensor, views: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        if len(views) == 1:
            return batch
        return batch.split([view.shape[0] for view in views])

    def activation_map(self, *views: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Continuous SCDA activation map ``A`` (channel sum of the features), float32 ``(B, U, V)``.

        Args:
            *views: one or more ``(B, 3, H, W)`` batches of the same size, run through one forward.

        Returns:
            One ``(B, U, V)`` map per view (a tensor for a single view, a tuple otherwise).
        """
        return self._split(self._activation(self._batch(views)), views)

    def foreground(self, activation: Tensor) -> Tensor:
        """Apply this module's thresholding options to an activation map from :meth:`activation_map`."""
        return scda_foreground(
            activation,
            self.threshold_std,
            largest_component=self.largest_component,
            connectivity=self.connectivity,
        )

    def forward(self, *views: Tensor) -> Saliency | tuple[Saliency, ...]:
        """Boolean foreground maps ``(B, U, V)`` of one or more batches of views, in one forward.

        Args:
            *views: ``(B, 3, H, W)`` batches sharing channel and spatial size (e.g. query and key views).

        Returns:
            A :class:`~salmask.Saliency` per view (a single one for a single view, a tuple otherwise).
        """
        batch = self._batch(views)
        foreground = Saliency(self.foreground(self._activation(batch)))
        if len(views) == 1:
            return foreground
        return tuple(Saliency(part) for part in foreground.split([view.shape[0] for view in views]))
