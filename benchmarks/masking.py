"""Masking speed: throughput against memory-bound limits, operators per batch, the per-image path.

    python benchmarks/masking.py                 # CPU, batch 64 at 224 px; writes results/masking.md
    python benchmarks/masking.py --device cuda   # on a GPU

1. Throughput of each strategy on a batch, as a ratio to the limit that pays the same memory traffic:
   ``clone()`` of the batch for out-of-place masking, ``copy_`` into a preallocated buffer for
   ``inplace=True``. The blur-based fills are also compared with one separable blur of the batch plus the
   limit, and torchvision's ``gaussian_blur`` is timed for reference.
2. Operators dispatched per batch (one kernel launch each on a GPU) for batch sizes 8 to 256, against a
   per-image loop shaped like the paper's public release (written below as a reference, not imported).
3. The per-image path that runs inside DataLoader workers: images per second on one core, and through
   a DataLoader whose worker processes mask each image (images per second per worker).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OperatorCounter, markdown_table, median_ratio, time_call, time_interleaved, write_report

from salmask import RELEASE_MASK_TYPE_PROBS, HighPassMask, Saliency, SaliencyMask
from salmask.functional import gaussian_blur

SPATIAL = {"spatial": 1.0}


def build(options: dict, **extra: object) -> SaliencyMask:
    """The transform of a configuration: ``recipe="high_pass"`` is HighPassMask, else SaliencyMask(fill=...)."""
    options = {**options, **extra}
    if options.pop("recipe", None) == "high_pass":
        return HighPassMask(**options)
    return SaliencyMask(**options)


def strategies() -> dict[str, dict]:
    """Each benchmarked configuration as keyword arguments of :func:`build`."""
    return {
        "mean": {"fill": "mean"},
        "constant": {"fill": "constant"},
        "noise": {"fill": "noise"},
        "blur": {"fill": "blur"},
        "high-pass (spatial)": {"recipe": "high_pass", "mask_type_probs": SPATIAL},
        "high-pass (channel-wise)": {"recipe": "high_pass", "mask_type_probs": {"channel": 1.0}},
        "high-pass (focal)": {"recipe": "high_pass", "mask_type_probs": {"focal": 1.0}},
        "high-pass (release mix)": {"recipe": "high_pass", "mask_type_probs": RELEASE_MASK_TYPE_PROBS},
        "hard negative (high-pass)": {
            "recipe": "high_pass",
            "hard_negative": True,
            "mask_ratio": (0.4, 0.7),
            "mask_type_probs": RELEASE_MASK_TYPE_PROBS,
        },
        "hard negative (blur)": {"fill": "blur", "hard_negative": True, "mask_ratio": (0.4, 0.7)},
    }


def limit_for(name: str, clone_ms: float, blur_ms: float) -> tuple[str, float]:
    """The limit a configuration is measured against: the copy alone, or one blur plus the copy."""
    if "blur" in name or "high-pass" in name:
        return "blur + copy", blur_ms + clone_ms
    return "copy", clone_ms


def release_shaped_masking(images: torch.Tensor, saliency: torch.Tensor, patch_size: int = 32) -> torch.Tensor:
    """A per-image loop in the shape of the public release: host copy of each map, Python loops over patches.

    Written here only as the reference for operator counts (its count grows with the batch); it keeps the
    release's structure, not its defects.
    """
    out = images.clone()
    noise = torch.randn(images.shape[1], patch_size, patch_size, device=images.device) * 0.18
    for index in range(images.shape[0]):
        grid = saliency[index].cpu().flatten().tolist()
        foreground = [cell for cell, is_fg in enumerate(grid) if is_fg]
        background = [cell for cell, is_fg in enumerate(grid) if not is_fg]
        alpha = random.uniform(0.05, 0.25)
        num_foreground = round(alpha * len(foreground))
        num_background = round(alpha * len(background))
        chosen = random.sample(foreground, num_foreground) + random.sample(background, num_background)
        cols = math.isqrt(len(grid))
        for cell in chosen:
            row, col = divmod(cell, cols)
            rows = slice(row * patch_size, (row + 1) * patch_size)
            columns = slice(col * patch_size, (col + 1) * patch_size)
            out[index, :, rows, columns] = noise
    return out


def throughput(device: torch.device, batch_size: int, size: int, repeats: int) -> str:
    images = torch.rand(batch_size, 3, size, size, device=device)
    saliency = Saliency(torch.rand(batch_size, 7, 7, device=device) < 0.45)
    buffer = torch.empty_like(images)
    limits = {
        "clone": images.clone,
        "copy": lambda: buffer.copy_(images),
        "blur": lambda: gaussian_blur(images, 31, 10.0),
    }
    reference = time_interleaved({**limits, "blur11": lambda: gaussian_blur(images, 11, 5.0)}, device, repeats)
    clone_ms, copy_ms, blur_ms, blur11_ms = (statistics.median(reference[key]) for key in reference)
    torchvision_ms = time_call(lambda: TF.gaussian_blur(images, [31, 31], [10.0, 10.0]), device, max(1, repeats // 2))
    rows = []
    for name, options in strategies().items():
        transform = build(options, check_values=False)
        inplace = build(options, check_values=False, inplace=True)
        # Each configuration is timed in rounds with its limits, and compared with them round by round.
        t = time_interleaved(
            {**limits, "out": lambda t=transform: t(images, saliency), "in": lambda t=inplace: t(buffer, saliency)},
            device,
            repeats,
        )
        uses_blur = limit_for(name, 0.0, 1.0)[1] > 0
        limit_name = limit_for(name, 0.0, 0.0)[0]
        out_limit = [c + (b if uses_blur else 0.0) for c, b in zip(t["clone"], t["blur"], strict=True)]
        in_limit = [c + (b if uses_blur else 0.0) for c, b in zip(t["copy"], t["blur"], strict=True)]
        out_ratio, in_ratio = median_ratio(t["out"], out_limit), median_ratio(t["in"], in_limit)
        out_ms, in_ms = statistics.median(t["out"]), statistics.median(t["in"])
        rows.append(
            [
                name,
                f"{out_ms:.1f}",
                f"{out_ratio:.2f}x {limit_name}",
                f"{in_ms:.1f}",
                f"{in_ratio:.2f}x {limit_name}",
                f"{batch_size / out_ms * 1e3:.0f}",
                "met" if max(out_ratio, in_ratio) <= 2.0 else "missed",
            ]
        )
    limits = markdown_table(
        ["reference", "ms"],
        [
            ["clone() of the batch", f"{clone_ms:.1f}"],
            ["copy_ into a preallocated buffer", f"{copy_ms:.1f}"],
            ["salmask separable blur, kernel 31 (strong blur)", f"{blur_ms:.1f}"],
            ["salmask separable blur, kernel 11 (high-pass filter)", f"{blur11_ms:.1f}"],
            [
                "torchvision gaussian_blur, kernel 31",
                f"{torchvision_ms:.1f} ({torchvision_ms / copy_ms:.0f}x copy_, "
                f"{torchvision_ms / blur_ms:.1f}x salmask's blur)",
            ],
        ],
    )
    table = markdown_table(
        ["configuration", "out-of-place ms", "vs limit", "inplace ms", "vs limit", "images/s", "within 2x"], rows
    )
    return (
        f"## 1. Throughput on a batch of {batch_size} x 3 x {size} x {size} float32 on {device}\n\n"
        f"Limits measured in the same run:\n\n{limits}\n\n"
        "Each configuration is a whole `SaliencyMask` call (drawing the masks and filling them), saliency "
        "on a 7x7 grid, `check_values=False`. The out-of-place limit is `clone()`; the in-place one "
        "`copy_`; blur-based fills add one kernel-31 blur to the limit (the high-pass filter's kernel 11 is "
        "cheaper, so this limit is generous for it). Each configuration is timed in rounds together with its "
        f"limits ({repeats} rounds, order rotating); the ratios are medians of the per-round ratios, the ms "
        "columns medians. Target: within 2x of the limit, both ways.\n\n"
        f"{table}"
    )


def operator_counts(device: torch.device, size: int) -> str:
    rows = []
    for batch_size in (8, 32, 64, 128, 256):
        images = torch.rand(batch_size, 3, size, size, device=device)
        saliency = torch.rand(batch_size, 7, 7, device=device) < 0.45
        counts = []
        for options in (
            {"recipe": "high_pass", "mask_type_probs": RELEASE_MASK_TYPE_PROBS},
            {"fill": "blur"},
            {"fill": "mean"},
        ):
            transform = build(options, check_values=False)
            with OperatorCounter() as counter:
                transform(images, Saliency(saliency))
            counts.append(counter.count)
        with OperatorCounter() as counter:
            release_shaped_masking(images, saliency)
        rows.append([batch_size, *counts, counter.count])
    table = markdown_table(
        ["batch", "salmask high-pass (mix)", "salmask blur", "salmask mean", "release-shaped loop"], rows
    )
    return (
        "## 2. Operators dispatched per batch\n\n"
        "Counted with a `TorchDispatchMode`; on a GPU each is at least one kernel launch (and the loop adds a "
        f"device-to-host copy per image). Images {size} px.\n\n{table}"
    )


def per_image(size: int, count: int) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = [torch.rand(3, size, size) for _ in range(8)]
        saliency = Saliency(torch.rand(size, size) < 0.45)
        rows = []
        for name, options in strategies().items():
            transform = build(options)
            ms = time_call(
                lambda t=transform: [t(images[i % 8], saliency) for i in range(count)],
                torch.device("cpu"),
                repeats=3,
                warmup=1,
            )
            rows.append([name, f"{count / ms * 1e3:.0f}", f"{ms / count:.2f}"])
    finally:
        torch.set_num_threads(threads)
    table = markdown_table(["configuration", "images/s on one core", "ms per image"], rows)
    return (
        "## 3. Per-image path (inside DataLoader workers)\n\n"
        f"One {size} px image per call, saliency at full resolution, `torch.set_num_threads(1)`, value checks "
        f"on (the default).\n\n{table}"
    )


class _MaskedImages(torch.utils.data.Dataset):
    """Images with their full-resolution saliency, masked by ``transform`` (``None``: returned as they are)."""

    def __init__(self, size: int, count: int, transform) -> None:
        self.images = [torch.rand(3, size, size) for _ in range(8)]
        self.saliency = Saliency(torch.rand(size, size) < 0.45)
        self.count, self.transform = count, transform

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index % 8]
        if self.transform is None:
            return image.clone()
        return self.transform(image, self.saliency)[0]


def loader(size: int, workers: int, count: int) -> str:
    """Images per second through a DataLoader whose workers mask each image (worker start-up excluded)."""
    configurations = {"no masking (clone)": None, **strategies()}
    rows = []
    for name, options in configurations.items():
        transform = None if options is None else build(options)
        dataset = _MaskedImages(size, count + 64 * workers, transform)
        batches = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=workers, persistent_workers=False)
        iterator = iter(batches)
        for _ in range(2 * workers):  # start-up and first batches
            next(iterator)
        start = time.perf_counter()
        seen = sum(len(batch) for batch in iterator)
        seconds = time.perf_counter() - start
        rows.append([name, f"{seen / seconds:.0f}", f"{seen / seconds / workers:.0f}"])
    table = markdown_table(["transform", "images/s", f"images/s per worker ({workers} workers)"], rows)
    return (
        f"### 3b. Inside DataLoader workers\n\n{workers} worker processes (one torch thread each), batches of 32 "
        f"images of {size} px with full-resolution saliency, value checks on; the first batches (worker "
        f"start-up) are not timed. The first row is the loader's own cost per image.\n\n{table}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--per-image-count", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--loader-images", type=int, default=512, help="images timed per DataLoader run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the batch timings")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results/masking.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    random.seed(0)
    sections = [
        throughput(device, args.batch_size, args.size, args.repeats),
        operator_counts(device, args.size),
        per_image(args.size, args.per_image_count),
        loader(args.size, args.loader_workers, args.loader_images),
    ]
    print("\n\n".join(sections))
    if not args.no_write:
        command = "python benchmarks/masking.py " + " ".join(sys.argv[1:])
        path = write_report("masking", "Masking speed", command.strip(), device, sections)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
