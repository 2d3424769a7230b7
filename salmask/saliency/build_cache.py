"""Command line: build (or resume) the saliency cache of an ImageFolder.

Example::

    python -m salmask.saliency.build_cache --root data/imagenet100/train --out imagenet100-saliency.pt \\
        --backbone efficientnet_lite0 --device cuda --batch-size 128 --num-workers 8

Re-running the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from salmask._defaults import SCDA_THRESHOLD_STD
from salmask.saliency._backbones import BACKBONES, build_scda
from salmask.saliency._cache_builder import build_saliency_cache

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m salmask.saliency.build_cache",
        description="Compute the SCDA saliency of every image of an ImageFolder once, into one cache file.",
    )
    parser.add_argument("--root", required=True, help="ImageFolder root (root/<class>/<image>)")
    parser.add_argument("--out", required=True, help="cache file to write or resume (e.g. saliency.pt)")
    parser.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help=f"one of {', '.join(BACKBONES)} or timm:<model> (default: efficientnet_lite0)",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (default), 'none' for random weights, or a path to a state dict file",
    )
    parser.add_argument(
        "--threshold-std",
        type=float,
        default=SCDA_THRESHOLD_STD,
        help=f"k in mean - k*std (default {SCDA_THRESHOLD_STD})",
    )
    parser.add_argument("--largest-component", action="store_true", help="keep the largest component only")
    parser.add_argument("--image-size", type=int, default=448, help="side each image is resized to (default 448)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--checkpoint-seconds", type=float, default=60.0, help="time between checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the process exit status."""
    args = _parser().parse_args(argv)
    weights = None if args.weights.lower() == "none" else args.weights
    scda = build_scda(
        args.backbone,
        weights=weights,
        threshold_std=args.threshold_std,
        largest_component=args.largest_component,
    )
    cache = build_saliency_cache(
        args.root,
        args.out,
        scda,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        checkpoint_seconds=args.checkpoint_seconds,
        progress=not args.no_progress,
    )
    print(f"wrote {args.out}: {cache}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
