"""The paper's variance claim (its Table 7): masked views have a higher representation variance than views
made by the standard augmentations alone.

    python benchmarks/variance.py                          # both encoders below, writes results/variance.md
    python benchmarks/variance.py --photo-images 12 --images 50 --views 8     # quick

Variance as the paper's reference [35] (Wang et al., "On the importance of asymmetry for Siamese
representation learning", CVPR 2022) measures it: the variance of an image's encoding over the
randomness of its augmentations. For each image, ``--views`` augmented views are encoded and
L2-normalised; the variance of each output dimension across the views (unbiased) is averaged over the
dimensions, then over the images. The same views are used for every row: the masked rows mask (with
``salmask.ssl.MaskedViews``, query masks, saliency from SCDA on each view) the very views of the
``standard`` row, so the rows differ only by the masking. An L2-normalised D-dimensional encoding has a
variance of at most 1/D, so values are comparable only within one encoder.

Encoders:

- ``lite0``: the ImageNet-pretrained EfficientNet-Lite0 (offline weights), pooled 1280-d features, on the
  scikit-image photos at 224 px with MoCo v2's augmentations; saliency from SCDA on the same network.
- ``ablation``: the Fashion-MNIST encoder trained by ``benchmarks/ablation.py`` (``--ablation-config``,
  default ``none``: without masking; ``--seed``), its embedding (the space of the contrastive loss) and
  its features, on Fashion-MNIST training images with its pretraining's augmentations, the release
  filters scaled to the view and the ablation's SCDA saliency.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation
from _common import markdown_table, write_report

from salmask import build_scda
from salmask.functional import high_pass
from salmask.saliency import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from salmask.ssl import MaskedViews, load_checkpoint, scaled_release_filters

# Table 7 of the paper (x 1e-3, ResNet-50 MoCo v2, TinyImageNet validation).
PAPER = {
    "standard": "6.196",
    "+ high-pass masking": "10.952",
    "high-pass filter, no masking": "8.67",
    "+ strong blur masking": "7.744",
    "+ mean masking": "7.776",
}


def representation_variance(embeddings: torch.Tensor) -> float:
    """``(images, views, D)`` L2-normalised encodings -> mean over images and dimensions of the variance over views."""
    return embeddings.var(dim=1).mean().item()


def variants(view_size: int, patch: int, seed: int) -> dict[str, Callable]:
    """Each row's change to a batch of standard views: ``f(views, saliency) -> views``, with the release's
    filters scaled to ``view_size`` (unscaled at 224 px)."""
    generator = torch.Generator().manual_seed(seed)
    input_filter, blur_options = scaled_release_filters(view_size)
    high_pass_options = {"kernel_size": input_filter.kernel_size, "sigma": input_filter.sigma}

    def masked(strategy: str, **options) -> Callable:
        module = MaskedViews(strategy, hard_negatives=False, patch_size=patch, generator=generator, **options)
        return lambda views, saliency: module(views, views, saliency, saliency).query

    return {
        "standard": lambda views, saliency: views,
        "+ high-pass masking": masked("high_pass", input_filter=input_filter),
        "high-pass filter, no masking": lambda views, saliency: high_pass(views, **high_pass_options),
        "+ strong blur masking": masked("blur", fill_options=blur_options),
        "+ mean masking": masked("mean"),
    }


@torch.no_grad()
def measure(
    images: list, make_views: Callable, encoders: dict[str, Callable], rows: dict
) -> dict[str, dict[str, float]]:
    """Variance of each row for each encoder output; ``make_views(image) -> (views, saliency)``."""
    out: dict[str, dict[str, list[torch.Tensor]]] = {name: {key: [] for key in encoders} for name in rows}
    for image in images:
        batch, saliency = make_views(image)
        for name, change in rows.items():
            changed = change(batch, saliency)
            for key, encode in encoders.items():
                out[name][key].append(F.normalize(encode(changed), dim=1))
    return {
        name: {key: representation_variance(torch.stack(values)) for key, values in per.items()}
        for name, per in out.items()
    }


def photos_setting(args: argparse.Namespace) -> tuple[str, dict]:
    from saliency_cost import PHOTOS, photo

    backbone = build_backbone("efficientnet_lite0", "imagenet").eval()
    scda = build_scda("efficientnet_lite0")
    augment = v2.Compose(
        [
            v2.RandomResizedCrop(224, scale=(0.2, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
        ]
    )
    images = [v2.functional.pil_to_tensor(photo(name)) for name in PHOTOS]
    images = (images * (args.photo_images // len(images) + 1))[: max(args.photo_images, 1)]
    torch.manual_seed(args.seed)

    def make_views(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.stack([augment(image) for _ in range(args.views)])
        return batch, scda(batch)

    results = measure(
        images,
        make_views,
        {"1280-d pooled features": lambda x: backbone(x).mean((2, 3))},
        variants(224, 32, args.seed),
    )
    note = (
        f"EfficientNet-Lite0 (ImageNet, offline weights), {len(set(PHOTOS))} scikit-image photos "
        f"({', '.join(PHOTOS)}) cycled to {len(images)} images x {args.views} views of 224 px (MoCo v2 "
        "augmentations), release filters (high-pass kernel 11 sigma 5, blur kernel 31 sigma 10), 32 px patches, "
        "SCDA saliency of each view."
    )
    return note, results


def ablation_setting(args: argparse.Namespace) -> tuple[str, dict] | None:
    folder = ablation.paths("ablation")["checkpoints"] / "fashion-mnist" / args.ablation_config / f"seed{args.seed}"
    path = folder / "checkpoint.pt"
    if not path.is_file():
        print(f"ablation encoder skipped: {path} not found (run benchmarks/ablation.py first)")
        return None
    pretrain = ablation.example_module("pretrain")

    checkpoint = load_checkpoint(path)
    config = checkpoint["config"]
    model = pretrain.build_model(config, world_size=1, on_gpu=False)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    # The projector's output is the space of the contrastive loss.
    encoder, head = model.encoder, model.projector
    # The training images as the pretraining held them, with the ablation's SCDA saliency, and its views.
    splits = {key: config[key] for key in ("image_size", "train_images", "val_images", "seed")}
    with_cache = {**config, "saliency": "cache", "saliency_cache": ablation.saliency_cache("fashion-mnist", args)}
    images, saliency, _ = pretrain.in_memory_training_set(with_cache, torch.device("cpu"), True, splits).tensors
    views_of = pretrain.batch_views(config)
    generator = torch.Generator().manual_seed(args.seed)

    def make_views(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        copies = [tensor[index : index + 1].expand(args.views, -1, -1, -1) for tensor in (images, saliency)]
        return views_of(*copies, generator)

    results = measure(
        list(range(args.images)),
        make_views,
        {
            f"{head_dim(head)}-d embedding": lambda x: head(encoder(x)),
            f"{encoder.num_features}-d features": lambda x: encoder(x),
        },
        variants(config["image_size"], pretrain.patch_size(config), args.seed),
    )
    note = (
        f"{pretrain.METHOD_NAMES[config['method']]} {config['arch']} (width {config.get('width', 64)}) trained by "
        f"`benchmarks/ablation.py` with configuration `{args.ablation_config}` (seed {args.seed}), "
        f"{args.images} Fashion-MNIST training images x {args.views} views of {config['image_size']} px (the "
        "pretraining's augmentations, the release filters scaled to the view), their SCDA saliency from the "
        "ablation's cache cropped with each view."
    )
    return note, results


def head_dim(head: torch.nn.Module) -> int:
    return [module for module in head.modules() if isinstance(module, torch.nn.Linear)][-1].out_features


def table(note: str, results: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(results.values())))
    header = ["views"]
    for key in keys:
        header += [f"{key}: variance (1e-3)", "vs standard"]
    header.append("paper, Table 7 (1e-3)")
    rows = []
    for name, per in results.items():
        row: list[object] = [name]
        for key in keys:
            row += [f"{per[key] * 1e3:.3f}", f"{per[key] / results['standard'][key]:.2f}x"]
        rows.append([*row, PAPER[name]])
    return f"{note}\n\n{markdown_table(header, rows)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["lite0", "ablation"], choices=["lite0", "ablation"])
    parser.add_argument("--images", type=int, default=500, help="Fashion-MNIST training images (ablation encoder)")
    parser.add_argument("--photo-images", type=int, default=48, help="photos, cycled with fresh views (lite0)")
    parser.add_argument("--views", type=int, default=16, help="augmented views per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ablation-config",
        default="none",
        choices=list(ablation.CONFIGS),
        help="which ablation encoder (Fashion-MNIST) to measure",
    )
    parser.add_argument("--name", default="variance", help="section file: results/<name>.md")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results/<name>.md")
    args = parser.parse_args()
    sections = [
        "## 7. Representation variance of standard and masked views (paper's Table 7)\n\n"
        "Per image, the variance over its augmented views of the L2-normalised encoding, averaged over "
        "dimensions and images (the measure of the paper's reference [35]); every row encodes the same "
        "views, masked or filtered as named."
    ]
    for name in args.encoders:
        result = photos_setting(args) if name == "lite0" else ablation_setting(args)
        if result is not None:
            sections.append(table(*result))
            print(sections[-1], flush=True)
    if not args.no_write:
        command = ("python benchmarks/variance.py " + " ".join(sys.argv[1:])).strip()
        print(f"wrote {write_report(args.name, 'Representation variance', command, torch.device('cpu'), sections)}")


if __name__ == "__main__":
    main()
