"""A small ablation on real data: MoCo v2 on Fashion-MNIST with no masking, MSCN-style random masking and
the three saliency-guided strategies, same budget and seeds, scored by kNN top-1.

    python benchmarks/ablation.py                          # 5 configurations x 3 seeds, about 45 min on 2 cores
    python benchmarks/ablation.py --steps 20 --seeds 0     # a quick smoke run
    python benchmarks/ablation.py --report-only            # rebuild results/ablation.md from the finished runs

Setup (everything is a flag):

- Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``--data``), the first ``--train-images``
  training images for pretraining and as the kNN memory bank, the 10 000 test images as queries. Images
  keep their 28 px (with 4 px patches, the paper's 7 x 7 grid) and are repeated to 3 channels.
- Saliency: SCDA with the offline ImageNet EfficientNet-Lite0 (``salmask.build_scda``), computed once per
  training image (the image upsampled to ``--scda-size`` 128 px, its 4 x 4 activation map resampled to
  the 7 x 7 patch grid, threshold mean - 0.6 std) and cached; the cached map is cropped and flipped
  together with each view, so every view's masks follow its own crop (the saliency-cache route).
  Fashion-MNIST has no saliency labels; as a check, the report gives the agreement of these maps with
  the garment's own silhouette (pixels above 5 % intensity).
- Views: MoCo v2's recipe for grey images, batched on the tensor: random resized crop (scale 0.2-1) and
  horizontal flip applied to image and saliency together, brightness and contrast jitter (p = 0.8).
- Model: ``salmask.ssl.MoCo`` on a ResNet-18 with the standard stem (``build_encoder("resnet18")``; the
  small-image stem costs 15x more per step, beyond the CPU budget), queue 4096, momentum 0.99,
  temperature 0.2, hard-negative weight 2, SGD lr 0.06 with cosine decay, batch 128, 100 steps (the
  CPU budget; ``--steps`` for more). The seeds train in parallel processes of one thread each
  (``--jobs``), which uses small CPUs better than one process with several threads.
- Masking: ``salmask.ssl.MaskedViews`` with patches of 4 px (a 7 x 7 grid), masking ratio U(0.05, 0.25)
  for every masked configuration; the release's filters scaled by 28/224 (high-pass kernel 3, sigma 0.62;
  strong blur kernel 5, sigma 1.25). ``mscn`` is the high-pass recipe with uniform random patches and
  no hard negatives; the saliency strategies add one hard negative per image.
- Score: weighted kNN (k = 200, temperature 0.1, cosine) on the encoder's pooled features; models
  trained on high-pass views are evaluated on high-passed images, as they must be downstream.

Each finished run appends a line to ``results/ablation_runs.jsonl`` (a rerun of the same configuration
and seed replaces it) and saves its encoder under ``benchmarks/.checkpoints/ablation/``;
``results/ablation.md`` is rewritten after every run. ``--name NAME`` keeps another budget apart:
``results/NAME.md``, ``results/NAME_runs.jsonl`` and ``.checkpoints/NAME/``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, markdown_table, write_report

from salmask import HighPassFilter, build_scda
from salmask.functional import high_pass
from salmask.saliency import IMAGENET_MEAN, IMAGENET_STD
from salmask.ssl import MaskedViews, MoCo, build_encoder

BENCHMARKS = Path(__file__).resolve().parent
CACHE = BENCHMARKS / ".cache"
DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
CONFIGS = ("none", "mscn", "high_pass", "blur", "mean")
SIZE = 28
PATCH = 4
FMNIST_MEAN, FMNIST_STD = 0.286, 0.353
# The release's filters (high-pass kernel 11, sigma 5; strong blur kernel 31, sigma 10) scaled by 28 / 224.
SCALE = SIZE / 224
HIGH_PASS = {"kernel_size": 3, "sigma": 5.0 * SCALE}
STRONG_BLUR = {"kernel_size": 5, "sigma": 10.0 * SCALE}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, gzipped): big-endian dims after a 4-byte magic number."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: Path) -> dict[str, torch.Tensor]:
    """uint8 images ``(N, 28, 28)`` and int64 labels of both splits."""
    files = {
        "train_images": "train-images-idx3-ubyte.gz",
        "train_labels": "train-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [name for name in files.values() if not (root / name).is_file()]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST not found in {root} (missing {missing}); apt-get install dataset-fashion-mnist"
        )
    out = {key: torch.from_numpy(read_idx(root / name).copy()) for key, name in files.items()}
    return {key: value.long() if key.endswith("labels") else value for key, value in out.items()}


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> float ``(N, 1, SIZE, SIZE)`` in [0, 1]."""
    images = images[:, None].float() / 255.0
    if images.shape[-1] != SIZE:
        images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return images


def normalise(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` in [0, 1] -> the encoder's normalised 3-channel input."""
    return ((images - FMNIST_MEAN) / FMNIST_STD).expand(-1, 3, -1, -1).contiguous()


def scda_saliency(images: torch.Tensor, input_size: int, batch: int = 256) -> torch.Tensor:
    """Bool ``(N, 7, 7)`` SCDA maps of the whole images (EfficientNet-Lite0 on an upsampling to ``input_size``)."""
    scda = build_scda("efficientnet_lite0", input_size=input_size, output_size=SIZE // PATCH)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    maps = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch].expand(-1, 3, -1, -1)
            maps.append(scda((chunk - mean) / std).as_subclass(torch.Tensor).bool())
    return torch.cat(maps)


def cached_saliency(images: torch.Tensor, input_size: int) -> torch.Tensor:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"fashion_mnist_{SIZE}px_scda_lite0_{input_size}px_{len(images)}.pt"
    if path.is_file():
        return torch.load(path)
    start = time.perf_counter()
    maps = scda_saliency(images, input_size)
    torch.save(maps, path)
    print(f"SCDA saliency of {len(images)} images in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
    return maps


def saliency_agreement(maps: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """SCDA cells against the silhouette on the same 7 x 7 grid (a cell is foreground if half its pixels are)."""
    silhouette = F.avg_pool2d((images > 0.05).float(), PATCH)[:, 0] >= 0.5
    union = (maps | silhouette).sum((1, 2)).clamp(min=1)
    iou = ((maps & silhouette).sum((1, 2)) / union).float()
    return {
        "iou": iou.mean().item(),
        "cells": (maps == silhouette).float().mean().item(),
        "gamma_scda": maps.float().mean().item(),
        "gamma_silhouette": silhouette.float().mean().item(),
    }


def augment(images: torch.Tensor, saliency: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One batch of views: crop, flip, jitter; the saliency map follows crop and flip.

    ``images`` ``(B, 1, S, S)`` in [0, 1], ``saliency`` ``(B, 1, S, S)`` float. Returns the normalised
    ``(B, 3, S, S)`` view and its ``(B, S, S)`` saliency in [0, 1].
    """
    batch = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(batch).uniform_(low, high, generator=generator)

    area = uniform(0.2, 1.0) * SIZE * SIZE
    aspect = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    width = torch.sqrt(area * aspect).clamp(max=SIZE)
    height = torch.sqrt(area / aspect).clamp(max=SIZE)
    left = uniform(0.0, 1.0) * (SIZE - width)
    top = uniform(0.0, 1.0) * (SIZE - height)
    boxes = torch.stack([torch.arange(batch, dtype=torch.float), left, top, left + width, top + height], 1)
    stacked = roi_align(torch.cat([images, saliency], 1), boxes, SIZE, 1.0, 2, aligned=True)
    flip = (uniform(0.0, 1.0) < 0.5)[:, None, None, None]
    stacked = torch.where(flip, stacked.flip(-1), stacked)
    view, view_saliency = stacked[:, :1], stacked[:, 1]
    jitter = (uniform(0.0, 1.0) < 0.8)[:, None, None, None]
    brightness = uniform(0.6, 1.4)[:, None, None, None]
    contrast = uniform(0.6, 1.4)[:, None, None, None]
    jittered = view * brightness
    mean = jittered.mean((1, 2, 3), keepdim=True)
    jittered = ((jittered - mean) * contrast + mean).clamp(0, 1)
    view = torch.where(jitter, jittered, view)
    return normalise(view), view_saliency.clamp(0, 1)


def masked_views(config: str, generator: torch.Generator) -> MaskedViews:
    options = {"patch_size": PATCH, "generator": generator}
    if config == "none":
        return MaskedViews("none", generator=generator)
    if config in ("mscn", "high_pass"):
        return MaskedViews(config, input_filter=HighPassFilter(**HIGH_PASS), **options)
    if config == "blur":
        return MaskedViews(
            "blur", fill_options=dict(STRONG_BLUR), hard_negative_fill_options=dict(STRONG_BLUR), **options
        )
    return MaskedViews(config, **options)


def eval_input(config: str, images: torch.Tensor) -> torch.Tensor:
    """What the encoder sees downstream: the normalised image, high-passed for the high-pass recipes."""
    images = normalise(images)
    return high_pass(images, **HIGH_PASS) if config in ("mscn", "high_pass") else images


@torch.no_grad()
def features(encoder: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    encoder.eval()
    out = torch.cat([encoder(images[i : i + batch]) for i in range(0, len(images), batch)])
    return F.normalize(out.flatten(1), dim=1)


@torch.no_grad()
def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    labels: torch.Tensor,
    k: int = 200,
    t: float = 0.1,
) -> float:
    """Weighted kNN (votes exp(cos / t) of the k nearest bank features), top-1 accuracy in percent."""
    classes = int(bank_labels.max()) + 1
    correct = 0
    for start in range(0, len(queries), 1000):
        similarity = queries[start : start + 1000] @ bank.T
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top), classes).scatter_add_(1, bank_labels[index], (top / t).exp())
        correct += (votes.argmax(1) == labels[start : start + 1000]).sum().item()
    return 100.0 * correct / len(queries)


def train_one(config: str, seed: int, data: dict, args: argparse.Namespace, log) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = MoCo(build_encoder("resnet18"), queue_size=args.queue, momentum=0.99, temperature=0.2)
    masker = masked_views(config, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    images, saliency = data["train"], data["saliency"]
    start = time.perf_counter()
    model.train()
    losses = []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        index = torch.randint(0, len(images), (args.batch,), generator=generator)
        batch, batch_saliency = images[index], saliency[index]
        query, query_saliency = augment(batch, batch_saliency, generator)
        key, key_saliency = augment(batch, batch_saliency, generator)
        views = masker(query, key, query_saliency, key_saliency)
        out = model(views.query, views.key, views.hard_negatives, views.hard_negative_valid)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = statistics.fmean(losses[-args.log_every :])
            log(
                f"  {config} seed {seed} step {step + 1}/{args.steps} loss {recent:.3f} "
                f"{time.perf_counter() - start:.0f} s"
            )
    train_seconds = time.perf_counter() - start
    encoder = model.encoder
    bank = features(encoder, eval_input(config, data["bank"]))
    queries = features(encoder, eval_input(config, data["test"]))
    top1 = knn_top1(bank, data["bank_labels"], queries, data["test_labels"])
    checkpoints = paths(args.name)["checkpoints"]
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"config": config, "seed": seed, "encoder": encoder.state_dict(), "projector": model.projector.state_dict()},
        checkpoints / f"{config}_seed{seed}.pt",
    )
    return {
        "config": config,
        "seed": seed,
        "knn_top1": top1,
        "final_loss": statistics.fmean(losses[-args.log_every :]),
        "train_seconds": round(train_seconds, 1),
        "steps": args.steps,
        "batch": args.batch,
        "train_images": args.train_images,
    }


def references(data: dict, seeds: list[int]) -> list[list[object]]:
    """kNN of raw pixels and of randomly initialised encoders: what pretraining has to beat."""
    rows = []
    pixels = F.normalize(data["bank"].flatten(1) - FMNIST_MEAN, dim=1)
    queries = F.normalize(data["test"].flatten(1) - FMNIST_MEAN, dim=1)
    rows.append(["raw pixels", f"{knn_top1(pixels, data['bank_labels'], queries, data['test_labels']):.2f}", "-", 1])
    scores = []
    for seed in seeds:
        torch.manual_seed(seed)
        encoder = build_encoder("resnet18")
        bank = features(encoder, normalise(data["bank"]))
        test = features(encoder, normalise(data["test"]))
        scores.append(knn_top1(bank, data["bank_labels"], test, data["test_labels"]))
    spread = f"{statistics.stdev(scores):.2f}" if len(scores) > 1 else "-"
    rows.append(["random-init ResNet-18 (no training)", f"{statistics.fmean(scores):.2f}", spread, len(scores)])
    return rows


def paths(name: str) -> dict[str, Path]:
    """Where a run named ``name`` keeps its records, references and encoders (``--name``: another budget
    gets its own table instead of mixing with the default one)."""
    return {
        "runs": RESULTS_DIR / f"{name}_runs.jsonl",
        "extra": RESULTS_DIR / f"{name}_extra.json",
        "checkpoints": BENCHMARKS / ".checkpoints" / name,
    }


def load_runs(name: str) -> list[dict]:
    """The finished runs, the last record of each (configuration, seed)."""
    runs_file = paths(name)["runs"]
    if not runs_file.is_file():
        return []
    runs = {}
    for line in runs_file.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            runs[record["config"], record["seed"]] = record
    return sorted(runs.values(), key=lambda r: (CONFIGS.index(r["config"]), r["seed"]))


def save_run(result: dict, name: str) -> None:
    runs_file = paths(name)["runs"]
    runs_file.parent.mkdir(parents=True, exist_ok=True)
    with runs_file.open("a") as handle:  # one short append per run: safe with parallel seed processes
        handle.write(json.dumps(result) + "\n")


def report(args: argparse.Namespace) -> None:
    extra_file = paths(args.name)["extra"]
    extra = json.loads(extra_file.read_text()) if extra_file.is_file() else {}
    runs = load_runs(args.name)
    rows = []
    for config in CONFIGS:
        scores = [r["knn_top1"] for r in runs if r["config"] == config]
        if not scores:
            continue
        seeds = sorted(r["seed"] for r in runs if r["config"] == config)
        spread = f"{statistics.stdev(scores):.2f}" if len(scores) > 1 else "-"
        seconds = statistics.fmean(r["train_seconds"] for r in runs if r["config"] == config)
        rows.append(
            [
                config,
                f"{statistics.fmean(scores):.2f}",
                spread,
                ", ".join(f"{s:.2f}" for s in scores),
                ", ".join(map(str, seeds)),
                f"{seconds:.0f}",
            ]
        )
    setup = runs[0] if runs else {}
    sections = [
        "## 6. Ablation on Fashion-MNIST (kNN top-1, %)\n\n"
        f"MoCo v2, ResNet-18 (standard stem) at {SIZE} px, {setup.get('steps', '?')} steps of batch "
        f"{setup.get('batch', '?')} on the first {setup.get('train_images', '?')} training images (the kNN "
        "memory bank), 10 000 test images as queries; weighted kNN k = 200, t = 0.1. Mean and sample "
        "standard deviation over seeds; same seeds and budget for every configuration; `train s / run` is "
        "wall time with the seeds trained in parallel processes of one thread each. See the docstring of "
        "`benchmarks/ablation.py` for the full setup.\n\n"
        + markdown_table(["configuration", "kNN top-1", "std", "per seed", "seeds", "train s / run"], rows)
    ]
    if extra.get("references"):
        sections.append(
            "References (no pretraining):\n\n"
            + markdown_table(["encoder", "kNN top-1", "std", "seeds"], extra["references"])
        )
    if extra.get("agreement"):
        a = extra["agreement"]
        sections.append(
            "Saliency check: SCDA (EfficientNet-Lite0, ImageNet) on the training images against the garment's "
            f"silhouette on the 7 x 7 grid: mean IoU {a['iou']:.3f}, cells that agree {a['cells']:.3f}, "
            f"foreground fraction {a['gamma_scda']:.3f} (SCDA) vs {a['gamma_silhouette']:.3f} (silhouette)."
        )
    command = extra.get("command", args.command)
    print(
        f"wrote {write_report(args.name, 'Ablation on real data', command, torch.device('cpu'), sections)}", flush=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.06)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument(
        "--scda-size", type=int, default=128, help="SCDA input size (its 4 x 4 map is resampled to 7 x 7)"
    )
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 per seed process)")
    parser.add_argument("--jobs", type=int, default=3, help="seeds trained in parallel, one process of one thread each")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="ablation", help="results/<name>.md, its runs file and checkpoints")
    parser.add_argument("--report-only", action="store_true", help="rebuild results/<name>.md from the runs file")
    args = parser.parse_args()
    args.command = "python benchmarks/ablation.py " + " ".join(sys.argv[1:])
    args.command = args.command.strip()
    if args.report_only:
        torch.set_num_threads(args.threads or 1)  # the machine line names the threads the runs used by default
        report(args)
        return
    parallel = args.jobs > 1 and len(args.seeds) > 1 and not args.worker
    if args.threads or parallel or args.worker:
        torch.set_num_threads(args.threads or 1)

    def log(message: str) -> None:
        print(message, flush=True)

    raw = load_fashion_mnist(args.data)
    train = to_unit(raw["train_images"][: args.train_images])
    data = {
        "train": train,
        "bank": train,
        "bank_labels": raw["train_labels"][: args.train_images],
        "test": to_unit(raw["test_images"]),
        "test_labels": raw["test_labels"],
    }
    maps = cached_saliency(train, args.scda_size)
    data["saliency"] = F.interpolate(maps[:, None].float(), size=(SIZE, SIZE), mode="nearest")
    if not args.worker:
        extra = {
            "agreement": saliency_agreement(maps, train),
            "references": references(data, args.seeds),
            "command": args.command,
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        paths(args.name)["extra"].write_text(json.dumps(extra, indent=1))
        log(f"saliency agreement {extra['agreement']}; references {extra['references']}")
    if parallel:
        run_seed_processes(args)
        report(args)
        return
    for seed in args.seeds:  # seed-major: a partial run still compares every configuration
        for config in args.configs:
            result = train_one(config, seed, data, args, log)
            save_run(result, args.name)
            log(f"{config} seed {seed}: kNN top-1 {result['knn_top1']:.2f} ({result['train_seconds']:.0f} s)")
            report(args)


def run_seed_processes(args: argparse.Namespace) -> None:
    """Train the seeds in ``args.jobs`` parallel processes of one torch thread each (same flags otherwise)."""
    common = ["--data", str(args.data), "--configs", *args.configs, "--steps", str(args.steps)]
    common += ["--batch", str(args.batch), "--lr", str(args.lr), "--queue", str(args.queue)]
    common += ["--train-images", str(args.train_images), "--scda-size", str(args.scda_size)]
    common += ["--log-every", str(args.log_every), "--threads", str(args.threads or 1), "--name", args.name, "--worker"]
    pending = list(args.seeds)
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            running.append(subprocess.Popen([sys.executable, __file__, *common, "--seeds", str(seed)]))
        running[0].wait()
        running = [process for process in running if process.poll() is None]


if __name__ == "__main__":
    main()
