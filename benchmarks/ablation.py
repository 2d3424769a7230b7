"""The ablation: every masking strategy, with and without hard negatives and saliency from SCDA or the
truth, on the synthetic shapes and Fashion-MNIST, three seeds, at a budget where pretraining learns.

    python benchmarks/ablation.py                       # everything below: 2 h 48 min on two CPU cores
    python benchmarks/ablation.py --datasets synthetic --configs none mean --seeds 0 --epochs 2   # a smoke run
    python benchmarks/ablation.py --report-only         # rewrite results/ablation.md from the records
    python benchmarks/ablation.py --device cuda --jobs 1

Each run is the README main job's recipe (``examples/pretrain.py`` with the data set's defaults: SimCLR
on a ResNet-18 of widths 16-128, AdamW, 32 px shapes or 28 px Fashion-MNIST) for half its epochs (30 on
the shapes, 5 on Fashion-MNIST), with one masking configuration, followed by ``examples/linear_eval.py``
on its checkpoint with its defaults:

=========================  ======================================================================
configuration              masking
=========================  ======================================================================
``none``                   none: SimCLR as it is
``mscn``                   MSCN: high-pass views, noise in uniformly random patches, no saliency
``high_pass``              high-pass views, noise in saliency-guided patches, hard negatives
``blur``                   saliency-guided patches from a strong blur, hard negatives
``mean``                   saliency-guided patches set to the image mean, hard negatives
``mean_no_hard_negatives`` ``mean`` without hard negatives (what the hard negatives add)
``mean_scda``              ``mean`` with SCDA saliency instead of the true masks (synthetic only)
=========================  ======================================================================

Saliency: the synthetic shapes' true masks; on Fashion-MNIST (and for ``mean_scda``), SCDA maps of
every training image computed once by EfficientNet-Lite0 on the image upsampled to 224 px
(:func:`salmask.saliency.compute_saliency_cache`), kept in ``.cache/`` and cropped with each view. The
release's filters are scaled to the view (:func:`salmask.ssl.scaled_release_filters`).

Scores, all on the same held-out images: kNN top-1 (k=200, T=0.1) of the trained encoder, of the same
encoder untrained and of raw pixels (printed by every pretraining run), and the linear probe's top-1.

Records: each finished run appends one JSON line to ``results/ablation_runs.jsonl`` (never rewritten; the
report takes the newest line per run) and the report ``results/ablation.md`` is rewritten. A run stopped
midway continues from its last checkpoint (one per epoch, under ``.checkpoints/ablation/``) when the
command is run again; finished runs are skipped. ``--name`` keeps another budget's records, checkpoints
and report apart.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_description, markdown_table

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
EXAMPLES = ROOT / "examples"
CACHE = BENCHMARKS / ".cache"
DATASETS = ("synthetic", "fashion-mnist")
# Each configuration's pretraining flags; None where the data set has no such configuration.
CONFIGS: dict[str, dict[str, list[str] | None]] = {
    "none": {"synthetic": ["--strategy", "none"], "fashion-mnist": ["--strategy", "none"]},
    "mscn": {"synthetic": ["--strategy", "mscn", "--saliency", "none"], "fashion-mnist": ["--strategy", "mscn"]},
    "high_pass": {"synthetic": ["--strategy", "high_pass"], "fashion-mnist": ["--strategy", "high_pass"]},
    "blur": {"synthetic": ["--strategy", "blur"], "fashion-mnist": ["--strategy", "blur"]},
    "mean": {"synthetic": ["--strategy", "mean"], "fashion-mnist": ["--strategy", "mean"]},
    "mean_no_hard_negatives": {
        "synthetic": ["--strategy", "mean", "--no-hard-negatives"],
        "fashion-mnist": ["--strategy", "mean", "--no-hard-negatives"],
    },
    "mean_scda": {"synthetic": ["--strategy", "mean"], "fashion-mnist": None},
}
# Strategies that place masks or hard negatives by saliency; on Fashion-MNIST it comes from SCDA.
SALIENCY_CONFIGS = ("high_pass", "blur", "mean", "mean_no_hard_negatives", "mean_scda")
SCDA_IMAGE_SIZE = 224
# Half the main job's 60 epochs on the synthetic shapes (kNN about 29 % against 16.5 % untrained) and half of
# pretrain.py's 10 on Fashion-MNIST: 39 runs fit a few hours of two CPU cores.
EPOCHS = {"synthetic": 30, "fashion-mnist": 5}


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def paths(name: str) -> dict[str, Path]:
    return {
        "runs": RESULTS_DIR / f"{name}_runs.jsonl",
        "report": RESULTS_DIR / f"{name}.md",
        "checkpoints": BENCHMARKS / ".checkpoints" / name,
    }


def budget_flags(dataset: str, args: argparse.Namespace) -> list[str]:
    return ["--epochs", str(args.epochs or EPOCHS[dataset])]


def example_module(name: str) -> ModuleType:
    """``examples/<name>.py`` imported as the scripts import each other: examples' own ``_common`` is not
    the ``_common`` of benchmarks/, which is put back afterwards."""
    ours = sys.modules.pop("_common", None)
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("_common", None)
        if ours is not None:
            sys.modules["_common"] = ours


def saliency_cache(dataset: str, args: argparse.Namespace) -> Path:
    """SCDA maps of a data set's training images, computed once for every run and seed (the synthetic
    images do not depend on the seed's draws of the views, only on the data seed, which is fixed here)."""
    dataset_splits = example_module("_common").dataset_splits
    from salmask.saliency import build_scda, compute_saliency_cache, load_saliency_cache

    CACHE.mkdir(parents=True, exist_ok=True)
    size = {"synthetic": 32, "fashion-mnist": 28}[dataset]
    images = {"synthetic": 2048, "fashion-mnist": 10000}[dataset]
    path = CACHE / f"{dataset}_{images}_scda_lite0_{SCDA_IMAGE_SIZE}px.pt"
    if path.is_file():
        return path
    train, _, _ = dataset_splits(
        dataset, None, image_size=size, train_transform=None, val_transform=None, train_images=images, val_images=1
    )
    started = time.perf_counter()
    with torch.no_grad():
        cache = compute_saliency_cache(train, build_scda("efficientnet_lite0"), image_size=SCDA_IMAGE_SIZE)
    cache.save(path)
    load_saliency_cache(path)  # what every run will read
    print(f"SCDA maps of {len(train)} {dataset} images in {time.perf_counter() - started:.0f} s -> {path}", flush=True)
    return path


def uses_scda(dataset: str, config: str) -> bool:
    return config == "mean_scda" or (dataset == "fashion-mnist" and config in SALIENCY_CONFIGS)


def run_flags(dataset: str, config: str, args: argparse.Namespace) -> list[str]:
    flags = ["--dataset", dataset, *CONFIGS[config][dataset]]
    if uses_scda(dataset, config):
        flags += ["--saliency-cache", str(saliency_cache(dataset, args))]
    return flags


def run_one(dataset: str, config: str, seed: int, args: argparse.Namespace, log) -> dict:
    """Pretrain (continuing a stopped run), then the linear probe; the record of the finished run."""
    folder = paths(args.name)["checkpoints"] / dataset / config / f"seed{seed}"
    checkpoint = folder / "checkpoint.pt"
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    common = ["--device", args.device, "--threads", str(args.threads)]
    if checkpoint.is_file():
        pretrain = ["--resume", str(checkpoint), *common]
    else:
        pretrain = [*run_flags(dataset, config, args), "--seed", str(seed), "--output-dir", str(folder)]
        pretrain += [*common, *budget_flags(dataset, args)]
    started = time.perf_counter()
    for script, flags in (("pretrain.py", pretrain), ("linear_eval.py", [str(checkpoint)])):
        if script == "linear_eval.py":
            pretrain_s = time.perf_counter() - started
            flags += ["--output-dir", str(folder / "linear"), "--device", args.device]
        command = [sys.executable, str(EXAMPLES / script), *flags]
        # Paths relative to the repository, so that the committed log reads the same on any machine.
        shown = " ".join(os.path.relpath(part, ROOT) if part.startswith(str(ROOT)) else part for part in command[1:])
        log(f"{dataset} {config} seed {seed}: {shown}")
        result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{dataset} {config} seed {seed}: {script} failed:\n{result.stderr[-3000:]}")
        if script == "linear_eval.py":
            linear = json.loads((folder / "linear" / "metrics.jsonl").read_text().splitlines()[-1])
    knn = json.loads((folder / "knn.json").read_text())
    return {
        "dataset": dataset,
        "config": config,
        "seed": seed,
        "epochs": knn["epochs"],
        "knn": knn["trained"],
        "knn_untrained": knn["untrained"],
        "knn_raw_pixels": knn["raw_pixels"],
        "linear": linear["top1"],
        "pretrain_s": round(pretrain_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "device": args.device,
        "threads": args.threads,
        "commit": commit(),
        "machine": machine_description(torch.device(args.device)),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def load_runs(name: str) -> dict[tuple[str, str, int], dict]:
    """The newest record of each (data set, configuration, seed)."""
    records: dict[tuple[str, str, int], dict] = {}
    path = paths(name)["runs"]
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[(record["dataset"], record["config"], record["seed"])] = record
    return records


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def report(args: argparse.Namespace) -> Path:
    runs = load_runs(args.name)
    sections = []
    for dataset in DATASETS:
        done = [record for (name, _, _), record in runs.items() if name == dataset]
        if not done:
            continue
        rows = []
        for config in CONFIGS:
            records = sorted((r for r in done if r["config"] == config), key=lambda r: r["seed"])
            if records:
                rows.append(
                    [
                        f"`{config}`",
                        mean_std([r["knn"] for r in records]),
                        mean_std([r["linear"] for r in records]),
                        ", ".join(f"{r['knn']:.1f}" for r in records),
                        # Each run's references see its own inputs: high-pass filtered under mscn and high_pass.
                        mean_std([r["knn_untrained"] for r in records]),
                        mean_std([r["knn_raw_pixels"] for r in records]),
                        len(records),
                        f"{statistics.mean(r['pretrain_s'] for r in records) / 60:.1f}",
                        ", ".join(sorted({r["commit"] for r in records})),
                    ]
                )
        epochs = ", ".join(str(epoch) for epoch in sorted({r["epochs"] for r in done}))
        table = markdown_table(
            [
                "configuration", "kNN top-1", "linear top-1", "kNN per seed", "untrained encoder, kNN",
                "raw pixels, kNN", "seeds", "pretrain min / run", "commit",
            ],
            rows,
        )  # fmt: skip
        sections.append(
            f"## {dataset}\n\n{epochs} epochs per run (the README recipe of `examples/pretrain.py`). Top-1 in % "
            "as mean ± standard deviation over seeds, on the held-out images"
            + (" (each seed renders its own images)" if dataset == "synthetic" else "")
            + ". The untrained encoder and raw pixels are scored by the same kNN on the same inputs as the "
            "run's encoder: high-pass filtered for `mscn` and `high_pass`.\n\n" + table
        )
    machines = sorted({r["machine"].split(", torch threads")[0] for r in runs.values()})
    threads = sorted({r["threads"] for r in runs.values()})
    command = "python benchmarks/ablation.py" + (f" --name {args.name}" if args.name != "ablation" else "")
    path = paths(args.name)["report"]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    body = [
        "# Ablation: masking strategies at a budget where pretraining learns",
        "",
        f"Command: `{command}`",
        "",
        "Machines: " + "; ".join(machines) + f"; torch threads per run: {', '.join(map(str, threads))} (wall "
        "times are of runs sharing the machine, as the command runs them)",
        "",
        *[section + "\n" for section in sections],
    ]
    path.write_text("\n".join(body))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help=f"pretraining epochs of every run (default: {EPOCHS})")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (default: cpu)")
    parser.add_argument("--name", default="ablation", help="records, checkpoints and report name")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the records")
    args = parser.parse_args(argv)
    if args.report_only:
        print(f"wrote {report(args)}")
        return
    done = load_runs(args.name)
    todo = [
        (dataset, config, seed)
        for seed in args.seeds
        for config in args.configs
        for dataset in args.datasets
        if CONFIGS[config][dataset] is not None and (dataset, config, seed) not in done
    ]
    log_path = RESULTS_DIR / f"{args.name}.log"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        print(line, flush=True)
        with log_path.open("a") as handle:
            handle.write(line + "\n")

    log(f"{len(todo)} runs to do, {args.jobs} at a time, at commit {commit()}")
    for dataset in {dataset for dataset, config, _ in todo if uses_scda(dataset, config)}:
        saliency_cache(dataset, args)  # once, before the runs that share it start

    def work(item: tuple[str, str, int]) -> None:
        record = run_one(*item, args, log)
        with paths(args.name)["runs"].open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        log(f"{item[0]} {item[1]} seed {item[2]}: kNN {record['knn']:.2f} linear {record['linear']:.2f}")
        report(args)

    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(work, item) for item in todo]:
            future.result()
    print(f"wrote {report(args)}")


if __name__ == "__main__":
    main()
