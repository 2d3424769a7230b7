"""Assemble ``benchmarks/RESULTS.md`` from the section files the benchmark scripts write under ``results/``.

    python benchmarks/report.py                  # assemble from the existing section files
    python benchmarks/report.py --run            # run every timing benchmark first (about 1 h on 2 quiet cores)
    python benchmarks/report.py --run --quick    # small batches and few repeats (a few minutes), into quick/

A quick run writes its sections and its own ``RESULTS.md`` to ``benchmarks/quick/`` (not committed), never
over the committed results; ``--results DIR`` chooses the folder (``--results benchmarks/results`` replaces
the committed numbers, for a run on a quiet machine).

``--run`` does not start the ablation (about 2 h of two CPU cores): run ``python benchmarks/ablation.py`` on its
own; its section is picked up once written. The variance benchmark needs the ablation's baseline encoder
for its second table. Each section keeps the command and the machine that produced it; ``notes.md``
(written by hand, dated) explains the numbers of the run it names and comes first.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
QUICK_RESULTS = BENCHMARKS / "quick"

# (section file, script, full arguments, quick arguments), in the order of the list.
SECTIONS = [
    ("masking", "masking.py", [], ["--batch-size", "16", "--repeats", "3", "--per-image-count", "16"]),
    ("masking_costs", "masking_costs.py", [], ["--repeats", "7"]),
    ("profile", "profile_masking.py", [], ["--batch-size", "16"]),
    ("saliency_cost", "saliency_cost.py", [], ["--batch", "8", "--repeats", "1", "--crops", "5"]),
    ("moco_step", "moco_step.py", [], ["--archs", "resnet18", "--batch", "8", "--repeats", "2"]),
    ("ablation", None, [], []),
    ("variance", "variance.py", [], ["--photo-images", "12", "--images", "50", "--views", "8"]),
    ("views", "views.py", [], ["--repeats", "3"]),
]
# Sections included when present, never run by --run (moco_step.py --only SCDA --name moco_step_scda,
# variance.py --ablation-config high_pass --name variance_high_pass).
OPTIONAL = ["moco_step_scda", "variance_high_pass"]
# Written by gpu.py on a CUDA machine (never by --run), included when present.
GPU = ["gpu_summary", "gpu_tests", "gpu_fills", "gpu_moco_step", "gpu_pretrain"]

HEADER = """# salmask benchmarks: results

Assembled by `python benchmarks/report.py` on {date} from the section files in `benchmarks/results/`;
every section names the command that produced it and the machine it ran on. How to rerun each benchmark:
`benchmarks/README.md`. Timings belong here, never in the tests.
"""


def run(quick: bool, results: Path) -> None:
    # The scripts write their sections through _common.write_report, which reads this variable.
    environment = {**os.environ, "SALMASK_BENCHMARK_RESULTS": str(results)}
    for _, script, full, short in SECTIONS:
        if script is None:
            continue
        command = [sys.executable, str(BENCHMARKS / script), *(short if quick else full)]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=BENCHMARKS.parent, env=environment)


def demote(text: str) -> str:
    """One heading level down: each file's level-1 title becomes a level-2 section of RESULTS.md."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.strip().splitlines())


def assemble(results: Path = RESULTS) -> Path:
    """RESULTS.md from the section files in ``results``: ``benchmarks/RESULTS.md`` for the committed ones,
    ``<results>/RESULTS.md`` for any other folder (whose numbers the hand-written notes do not describe)."""
    committed = results.resolve() == RESULTS.resolve()
    parts = [HEADER.format(date=datetime.date.today().isoformat())]
    notes = BENCHMARKS / "notes.md"
    if committed and notes.is_file():
        parts.append("\n".join("#" + line if line.startswith("#") else line for line in notes.read_text().splitlines()))
    for name, script, _, _ in SECTIONS:
        path = results / f"{name}.md"
        if path.is_file():
            text = path.read_text().strip()
            # Each file starts with a level-1 title; inside RESULTS.md it becomes a level-2 one.
            text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
            parts.append(text)
        else:
            how = f"python benchmarks/{script or 'ablation.py'}"
            parts.append(f"## {name}\n\nNot run yet: `{how}`.")
    for name in [*OPTIONAL, *GPU]:
        path = results / f"{name}.md"
        if path.is_file():
            parts.append(demote(path.read_text()))
    out = BENCHMARKS / "RESULTS.md" if committed else results / "RESULTS.md"
    out.write_text("\n\n".join(parts).rstrip() + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the timing benchmarks and the variance one first")
    parser.add_argument("--quick", action="store_true", help="with --run: small, fast settings, written to quick/")
    parser.add_argument(
        "--results",
        type=Path,
        help="folder of the section files (default: results/, and quick/ for --quick, never over results/)",
    )
    args = parser.parse_args()
    results = args.results or (QUICK_RESULTS if args.quick else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    if args.run:
        run(args.quick, results)
    print(f"wrote {assemble(results)}")


if __name__ == "__main__":
    main()
