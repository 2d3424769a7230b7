"""Command line: build ImageNet-100 (CMC's 100-class subset) from an ImageNet-1k copy by symbolic links.

Example::

    python -m salmask.data.imagenet100 --imagenet /data/imagenet --out /data/imagenet100

``/data/imagenet`` holds ``train/<wnid>/`` and ``val/<wnid>/``; for a flat ``val/`` folder add
``--val-labels LOC_val_solution.csv`` (or any ``<file name> <wnid>`` list). Re-running it is safe.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from salmask.data._imagenet100 import build_imagenet100

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m salmask.data.imagenet100",
        description="Build ImageNet-100 as an ImageFolder tree of symbolic links into ImageNet-1k.",
    )
    parser.add_argument("--imagenet", required=True, help="ImageNet-1k root holding train/ and val/")
    parser.add_argument("--out", required=True, help="root of the ImageNet-100 tree to create or update")
    parser.add_argument(
        "--val-labels",
        default=None,
        help="labels file for a flat val/ folder ('<file name> <wnid>' lines or LOC_val_solution.csv)",
    )
    parser.add_argument(
        "--splits", nargs="+", choices=("train", "val"), default=["train", "val"], help="splits to build"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress count")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the process exit status (1 with a one-line error on bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        counts = build_imagenet100(
            args.imagenet,
            args.out,
            splits=args.splits,
            val_labels=args.val_labels,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(", ".join(f"{split}: {count} images" for split, count in counts.items()) + f" in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
