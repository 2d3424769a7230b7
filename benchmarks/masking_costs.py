"""Three costs of the masking path: blurs per training step, the mean fill against a copy, the kept draws.

    python benchmarks/masking_costs.py        # CPU; writes results/masking_costs.md

1. Gaussian blurs per ``MaskedViews`` step, per strategy: the high-pass filter is one view-wide step,
   applied once to the query and once to the key, and the strong-blur fill blurs each view it fills once.
2. ``MeanFillMask()`` with its defaults (value check on) on a 64 x 3 x 224 x 224 batch, as a ratio to a
   ``clone()`` of the batch, both timed in the same rounds (order rotating; median of per-round ratios).
3. Bytes of the draws a transform keeps in ``last_params`` for a 256-image batch at 224 px (meta tensors:
   the shapes are real, no memory is used), for the transform with the largest draws (channel-wise masks
   possible, focal windows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, median_ratio, time_interleaved, write_report

import salmask.functional._fill as fill_module
import salmask.functional._filters as filters_module
from salmask import HighPassMask, MeanFillMask, Saliency
from salmask.ssl import STRATEGIES, MaskedViews


def blurs_per_step(size: int = 64, batch: int = 8) -> list[list[object]]:
    """Calls of the Gaussian blur in one MaskedViews step of each strategy."""
    query, key = torch.randn(2, batch, 3, size, size).unbind(0)
    saliency = torch.zeros(batch, size, size, dtype=torch.bool)
    saliency[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    rows = []
    for strategy in STRATEGIES:
        masker = MaskedViews(strategy, patch_size=size // 8)
        blur = filters_module.gaussian_blur
        with (
            mock.patch.object(filters_module, "gaussian_blur", wraps=blur) as in_filter,
            mock.patch.object(fill_module, "gaussian_blur", wraps=blur) as in_fill,
        ):
            out = masker(query, key, saliency, saliency)
        hard = "yes" if out.hard_negatives is not None else "no"
        rows.append([strategy, hard, in_filter.call_count + in_fill.call_count])
    return rows


def mean_fill_ratio(batch: int, size: int, repeats: int) -> tuple[float, float, float]:
    """(MeanFillMask() / clone, MeanFillMask(check_values=False) / clone, clone ms), median over rounds."""
    images = torch.randn(batch, 3, size, size)
    checked, unchecked = MeanFillMask(), MeanFillMask(check_values=False)
    calls = {"clone": images.clone, "checked": lambda: checked(images), "unchecked": lambda: unchecked(images)}
    samples = time_interleaved(calls, torch.device("cpu"), repeats=repeats, warmup=2)
    clone_ms = sorted(samples["clone"])[len(samples["clone"]) // 2]
    return (
        median_ratio(samples["checked"], samples["clone"]),
        median_ratio(samples["unchecked"], samples["clone"]),
        clone_ms,
    )


def params_bytes(batch: int = 256, size: int = 224) -> list[list[object]]:
    images = torch.empty(batch, 3, size, size, device="meta")
    saliency = Saliency(torch.empty(batch, size // 32, size // 32, dtype=torch.bool, device="meta"))
    rows = []
    for name, transform in (
        ("MeanFillMask()", MeanFillMask()),
        ("HighPassMask() (release mix of mask types)", HighPassMask()),
        ("HighPassMask(hard_negative=True)", HighPassMask(hard_negative=True)),
    ):
        transform(images, saliency)
        kept = sum(value.nbytes for value in transform.last_params.values())
        shapes = ", ".join(f"{key} {tuple(value.shape)}" for key, value in transform.last_params.items())
        rows.append([name, f"{kept:,}", f"{kept / 2**20:.3f}", shapes])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)

    blur_rows = blurs_per_step()
    checked, unchecked, clone_ms = mean_fill_ratio(args.batch_size, args.image_size, args.repeats)
    bytes_rows = params_bytes()
    shape = f"{args.batch_size} x 3 x {args.image_size} x {args.image_size}"
    sections = [
        "## Gaussian blurs per MaskedViews step\n\n"
        "Calls of `gaussian_blur` in one step (8 views of 64 px, saliency given, default options): the "
        "high-pass filter runs once on the query and once on the key, the strong blur once per view it fills. "
        "Target: two for the high-pass recipe.\n\n"
        + markdown_table(["strategy", "hard negatives", "blurs per step"], blur_rows),
        f"## Mean fill against a copy\n\n`MeanFillMask()` on a {shape} batch on one CPU thread, as a ratio to "
        f"`clone()` of the batch (median over {args.repeats} interleaved rounds; the clone took {clone_ms:.1f} "
        "ms). Target: at most 1.5 with the default value check.\n\n"
        + markdown_table(
            ["call", "time / clone()"],
            [["`MeanFillMask()` (value check on)", f"{checked:.2f}"], ["`check_values=False`", f"{unchecked:.2f}"]],
        ),
        "## Draws kept per call\n\nBytes of `last_params` for 256 images at 224 px. Target: at most 1 MB.\n\n"
        + markdown_table(["transform", "bytes", "MiB", "tensors"], bytes_rows),
    ]
    for section in sections:
        print(section + "\n")
    if not args.no_write:
        command = "python benchmarks/masking_costs.py" + (
            f" --batch-size {args.batch_size}" if args.batch_size != 64 else ""
        )
        path = write_report("masking_costs", "Masking costs", command, torch.device("cpu"), sections)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
