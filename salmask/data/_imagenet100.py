"""ImageNet-100, the 100-class ImageNet subset of CMC, built from an ImageNet-1k copy by symbolic links."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

__all__ = ["IMAGENET100_CLASSES", "build_imagenet100", "read_val_labels"]

_WNID = re.compile(r"n\d{8}")
# torchvision's ImageFolder keeps only these (case-insensitively); link nothing it would skip.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _load_classes() -> tuple[str, ...]:
    text = resources.files("salmask.data").joinpath("imagenet100.txt").read_text(encoding="utf-8")
    wnids = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    if len(wnids) != 100 or len(set(wnids)) != 100 or not all(_WNID.fullmatch(wnid) for wnid in wnids):
        raise RuntimeError("the packaged imagenet100.txt is damaged: it must list 100 distinct WordNet ids")
    return wnids


IMAGENET100_CLASSES: tuple[str, ...] = _load_classes()
"""The 100 WordNet ids of ImageNet-100 in CMC's order (``IMAGENET100_CLASSES[0] == "n02869837"``)."""


def _images(folder: Path) -> list[Path]:
    return sorted(
        entry
        for entry in folder.iterdir()
        if not entry.name.startswith(".") and entry.suffix.lower() in _IMAGE_EXTENSIONS and entry.is_file()
    )


def read_val_labels(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a validation labels file: one image per line, its file name then its WordNet id.

    Fields may be separated by whitespace or a comma, and the id may be followed by more fields, so
    both ``ILSVRC2012_val_00000001.JPEG n01751748`` lines and the ``ImageId,PredictionString`` CSV of
    the Kaggle ImageNet localisation challenge (``LOC_val_solution.csv``) are read. Lines whose second
    field is not a WordNet id (a header) are skipped. A name without an extension stands for any file
    with that stem.

    Args:
        path: the labels file.

    Returns:
        File name (or stem) to WordNet id.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "labels.csv"
        ...     _ = path.write_text("ImageId,PredictionString\\nILSVRC2012_val_00000001,n01751748 1 2 3 4\\n")
        ...     read_val_labels(path)
        {'ILSVRC2012_val_00000001': 'n01751748'}
    """
    labels: dict[str, str] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            fields = line.replace(",", " ").split()
            if not fields:
                continue
            if len(fields) < 2 or not _WNID.fullmatch(fields[1]):
                if number == 1:
                    continue
                raise ValueError(f"{path}, line {number}: expected '<file name> <WordNet id>', got {line.strip()!r}")
            labels[fields[0]] = fields[1]
    if not labels:
        raise ValueError(f"{path} holds no '<file name> <WordNet id>' line")
    return labels


def _plan_folders(split_root: Path, classes: Sequence[str]) -> dict[str, list[Path]]:
    missing = [wnid for wnid in classes if not (split_root / wnid).is_dir()]
    if missing:
        shown = ", ".join(str(split_root / wnid) for wnid in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{len(missing)} of the {len(classes)} ImageNet-100 class folders are missing from {split_root}: "
            f"{', '.join(missing[:5])}{more} (looked for {shown})"
        )
    plan = {wnid: _images(split_root / wnid) for wnid in classes}
    empty = [wnid for wnid, files in plan.items() if not files]
    if empty:
        raise FileNotFoundError(
            f"no image in the class folder {split_root / empty[0]}"
            + (f" (nor in {len(empty) - 1} other class folders)" if len(empty) > 1 else "")
        )
    return plan


def _plan_flat(split_root: Path, labels: dict[str, str], classes: Sequence[str]) -> dict[str, list[Path]]:
    wanted = set(classes)
    plan: dict[str, list[Path]] = {wnid: [] for wnid in classes}
    for image in _images(split_root):
        wnid = labels.get(image.name, labels.get(image.stem))
        if wnid in wanted:
            plan[wnid].append(image)
    empty = [wnid for wnid, files in plan.items() if not files]
    if empty:
        raise FileNotFoundError(
            f"the labels file names no image of {split_root} for {len(empty)} ImageNet-100 classes "
            f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); is it the labels file of this folder?"
        )
    return plan


def _link(target: Path, link: Path) -> bool:
    """Make ``link`` point at ``target``; ``False`` when it already did."""
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return False
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not a symbolic link; refusing to replace it")
    link.symlink_to(target)
    return True


def build_imagenet100(
    imagenet: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    splits: Sequence[str] = ("train", "val"),
    val_labels: str | os.PathLike[str] | None = None,
    classes: Sequence[str] = IMAGENET100_CLASSES,
    progress: bool = True,
) -> dict[str, int]:
    """Build ImageNet-100 as ``out/<split>/<wnid>/<image>`` symbolic links into an ImageNet-1k copy.

    The output is an ``ImageFolder`` tree; nothing is copied. ``imagenet/train`` must hold one folder per
    class (``train/<wnid>/*.JPEG``, as the ILSVRC2012 archives unpack). ``imagenet/val`` may hold class
    folders too (the usual layout after sorting the validation images), or all images flat together with
    ``val_labels`` (see :func:`read_val_labels`). Every class folder is checked before any link is made.

    Running it again is cheap and safe: links that already point at the right image are kept, links to
    another image (e.g. a moved ImageNet copy) are replaced, and regular files are never overwritten.
    Links are absolute, so ``out`` may live anywhere.

    Args:
        imagenet: the ImageNet-1k root, holding ``train/`` and ``val/``.
        out: root of the subset to create or update.
        splits: which of ``"train"`` and ``"val"`` to build.
        val_labels: labels file for a flat ``val/`` folder; ``None`` expects class folders.
        classes: WordNet ids to keep; ImageNet-100 by default.
        progress: report the count of classes and images linked so far on stderr.

    Returns:
        Number of images in the subset, per split.

    Raises:
        FileNotFoundError: a split folder, a class folder (named by WordNet id and path) or a class's
            images are missing.
        FileExistsError: a path to be linked is a regular file or folder.
        ValueError: an unknown split, or a malformed labels file.
    """
    root, out_root = Path(imagenet).expanduser().resolve(), Path(out).expanduser()
    splits = tuple(splits)
    for split in splits:
        if split not in ("train", "val"):
            raise ValueError(f"splits must be drawn from ('train', 'val'), got {split!r}")
    if not splits:
        raise ValueError("splits must name at least one split")
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise TypeError(f"classes must be a sequence of WordNet ids, got {type(classes).__name__}")
    if not classes or len(set(classes)) != len(classes):
        raise ValueError("classes must be a non-empty sequence of distinct WordNet ids")
    # Each id names a folder under the output: anything else ("../x", an absolute path) would link outside it.
    malformed = [wnid for wnid in classes if not (isinstance(wnid, str) and _WNID.fullmatch(wnid))]
    if malformed:
        raise ValueError(f"classes must be WordNet ids like 'n01749939', got {', '.join(map(repr, malformed[:5]))}")
    if not root.is_dir():
        raise FileNotFoundError(f"the ImageNet root {root} does not exist or is not a folder")

    plans: dict[str, dict[str, list[Path]]] = {}
    for split in splits:
        split_root = root / split
        if not split_root.is_dir():
            raise FileNotFoundError(f"{split_root} does not exist: the ImageNet root must hold train/ and val/")
        if split == "val" and val_labels is not None:
            plans[split] = _plan_flat(split_root, read_val_labels(val_labels), classes)
        elif split == "val" and not any((split_root / wnid).is_dir() for wnid in classes):
            raise FileNotFoundError(
                f"{split_root} has none of the ImageNet-100 class folders; for a flat folder of validation "
                "images pass its labels file (val_labels, --val-labels)"
            )
        else:
            plans[split] = _plan_folders(split_root, classes)

    counts: dict[str, int] = {}
    for split, plan in plans.items():
        created = total = 0
        for done, (wnid, images) in enumerate(plan.items(), start=1):
            folder = out_root / split / wnid
            if folder.exists() and not folder.is_dir():
                raise FileExistsError(f"{folder} exists and is not a folder")
            folder.mkdir(parents=True, exist_ok=True)
            for image in images:
                created += _link(image, folder / image.name)
            total += len(images)
            if progress:
                print(f"\r{split}: {done}/{len(plan)} classes, {total} images", end="", file=sys.stderr, flush=True)
        if progress:
            print(f" ({created} new links)", file=sys.stderr, flush=True)
        counts[split] = total
    return counts
