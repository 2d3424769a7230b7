"""ImageNet-100: the class list, and the symlinked subset built from a fake ImageNet tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder

from salmask.data import IMAGENET100_CLASSES, build_imagenet100, read_val_labels
from salmask.data.imagenet100 import main

EXTRA = ("n01440764", "n01443537")  # ImageNet-1k classes outside the subset


def test_class_list_is_cmc_imagenet100() -> None:
    assert len(IMAGENET100_CLASSES) == 100 == len(set(IMAGENET100_CLASSES))
    assert IMAGENET100_CLASSES[:3] == ("n02869837", "n01749939", "n02488291")
    assert IMAGENET100_CLASSES[-1] == "n02090622"
    assert not set(EXTRA) & set(IMAGENET100_CLASSES)


def fake_imagenet(root: Path, *, flat_val: bool = False, skip: str | None = None) -> Path:
    """Two train and one val image per class (tiny files: links never read them), plus two other classes."""
    for index, wnid in enumerate((*IMAGENET100_CLASSES, *EXTRA)):
        if wnid == skip:
            continue
        (root / "train" / wnid).mkdir(parents=True)
        for number in range(2):
            (root / "train" / wnid / f"{wnid}_{number}.JPEG").write_bytes(b"jpeg")
        (root / "train" / wnid / ".DS_Store").write_bytes(b"")
        name = f"ILSVRC2012_val_{index:08d}.JPEG"
        if flat_val:
            (root / "val").mkdir(exist_ok=True)
            (root / "val" / name).write_bytes(b"jpeg")
        else:
            (root / "val" / wnid).mkdir(parents=True)
            (root / "val" / wnid / name).write_bytes(b"jpeg")
    return root


def test_builds_an_image_folder_of_links(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    imagenet = fake_imagenet(tmp_path / "imagenet")
    counts = build_imagenet100(imagenet, tmp_path / "out")
    assert counts == {"train": 200, "val": 100}
    assert "train: 100/100 classes, 200 images" in capsys.readouterr().err
    train = ImageFolder(str(tmp_path / "out" / "train"), loader=lambda path: path)
    assert sorted(train.classes) == sorted(IMAGENET100_CLASSES) and len(train) == 200
    link = tmp_path / "out" / "val" / "n01749939" / "ILSVRC2012_val_00000001.JPEG"
    assert link.is_symlink() and Path(os.readlink(link)) == (imagenet / "val" / "n01749939" / link.name).resolve()
    assert not (tmp_path / "out" / "train" / EXTRA[0]).exists()
    assert not (tmp_path / "out" / "train" / "n01749939" / ".DS_Store").exists()


def test_rerun_is_idempotent_and_follows_a_moved_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    imagenet = fake_imagenet(tmp_path / "imagenet")
    build_imagenet100(imagenet, tmp_path / "out", splits=["train"])
    capsys.readouterr()
    assert build_imagenet100(imagenet, tmp_path / "out", splits=["train"]) == {"train": 200}
    assert "(0 new links)" in capsys.readouterr().err
    moved = imagenet.rename(tmp_path / "moved")
    build_imagenet100(moved, tmp_path / "out", splits=["train"], progress=False)
    link = tmp_path / "out" / "train" / "n02869837" / "n02869837_0.JPEG"
    assert link.resolve() == (moved / "train" / "n02869837" / "n02869837_0.JPEG").resolve()
    assert link.read_bytes() == b"jpeg"


def test_missing_class_folder_is_named(tmp_path: Path) -> None:
    imagenet = fake_imagenet(tmp_path / "imagenet", skip="n04592741")
    with pytest.raises(FileNotFoundError, match=r"n04592741.*train[/\\]n04592741"):
        build_imagenet100(imagenet, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # checked before any link is made


def test_empty_class_folder_and_missing_splits(tmp_path: Path) -> None:
    imagenet = fake_imagenet(tmp_path / "imagenet")
    for image in (imagenet / "train" / "n02090622").iterdir():
        image.unlink()
    with pytest.raises(FileNotFoundError, match=r"no image in the class folder .*n02090622"):
        build_imagenet100(imagenet, tmp_path / "out", splits=["train"], progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_imagenet100(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train"):
        build_imagenet100(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="splits"):
        build_imagenet100(imagenet, tmp_path / "out", splits=["test"], progress=False)


def test_flat_val_with_a_labels_file(tmp_path: Path) -> None:
    imagenet = fake_imagenet(tmp_path / "imagenet", flat_val=True)
    with pytest.raises(FileNotFoundError, match="labels file"):
        build_imagenet100(imagenet, tmp_path / "out", splits=["val"], progress=False)
    labels = tmp_path / "LOC_val_solution.csv"
    rows = [f"ILSVRC2012_val_{i:08d},{wnid} 10 20 30 40" for i, wnid in enumerate((*IMAGENET100_CLASSES, *EXTRA))]
    labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    counts = build_imagenet100(imagenet, tmp_path / "out", splits=["val"], val_labels=labels, progress=False)
    assert counts == {"val": 100}
    assert (tmp_path / "out" / "val" / "n02488291" / "ILSVRC2012_val_00000002.JPEG").is_symlink()
    assert not (tmp_path / "out" / "val" / EXTRA[1]).exists()


def test_read_val_labels_formats_and_errors(tmp_path: Path) -> None:
    plain = tmp_path / "val.txt"
    plain.write_text("a.JPEG n01440764\n\nb.JPEG  n01443537\n")
    assert read_val_labels(plain) == {"a.JPEG": "n01440764", "b.JPEG": "n01443537"}
    bad = tmp_path / "bad.txt"
    bad.write_text("a.JPEG n01440764\nb.JPEG 17\n")
    with pytest.raises(ValueError, match="line 2"):
        read_val_labels(bad)
    (tmp_path / "header.txt").write_text("name,label\n")
    with pytest.raises(ValueError, match="no '<file name> <WordNet id>' line"):
        read_val_labels(tmp_path / "header.txt")


def test_refuses_to_overwrite_a_regular_file(tmp_path: Path) -> None:
    imagenet = fake_imagenet(tmp_path / "imagenet")
    folder = tmp_path / "out" / "train" / "n02869837"
    folder.mkdir(parents=True)
    (folder / "n02869837_1.JPEG").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"n02869837_1\.JPEG"):
        build_imagenet100(imagenet, tmp_path / "out", splits=["train"], progress=False)
    assert (folder / "n02869837_1.JPEG").read_bytes() == b"mine"


def test_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    imagenet = fake_imagenet(tmp_path / "imagenet")
    assert main(["--imagenet", str(imagenet), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "train: 200 images, val: 100 images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--imagenet", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert "missing does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["../outside", "../../outside", "n01749939/../../outside", "/tmp", "n0174993"])
def test_classes_must_be_wordnet_ids_so_that_no_link_lands_outside_the_output(tmp_path: Path, bad: str) -> None:
    imagenet = tmp_path / "imagenet"
    for split in ("train", "val"):
        (imagenet / split / "n01749939").mkdir(parents=True)
        (imagenet / split / "n01749939" / "a.JPEG").write_bytes(b"x")
    (imagenet / "outside").mkdir()
    (imagenet / "outside" / "b.JPEG").write_bytes(b"x")
    with pytest.raises(ValueError, match=rf"classes must be WordNet ids .*{bad!r}"):
        build_imagenet100(imagenet, tmp_path / "out" / "subset", classes=["n01749939", bad], progress=False)
    assert not (tmp_path / "out").exists(), "nothing is created"
