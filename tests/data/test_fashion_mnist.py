"""Fashion-MNIST from IDX files: the reader, the dataset on tiny files, and the Debian copy when installed."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors
from torchvision.transforms import v2

from salmask.data import FASHION_MNIST_ROOT, FashionMNIST, read_idx


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_split(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray, *, gz: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        content = idx_bytes(array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (root / name).write_bytes(content)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3, 7], dtype=np.uint8)
    write_split(tmp_path, "train", images, labels, gz=True)
    write_split(tmp_path, "t10k", images[:2], labels[:2], gz=False)
    return tmp_path, images, labels


def test_read_idx_types_and_shapes(tmp_path: Path) -> None:
    values = np.arange(-6, 6, dtype=np.int16).reshape(3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(values, 0x0B))
    assert torch.equal(read_idx(tmp_path / "a"), torch.from_numpy(values))
    floats = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3, 1)
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(floats, 0x0D)))
    assert torch.equal(read_idx(tmp_path / "b.gz"), torch.from_numpy(floats))


def test_read_idx_rejects_malformed_files(tmp_path: Path) -> None:
    (tmp_path / "magic").write_bytes(b"\x1f\x8b\x08\x00rest")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match="implies"):
        read_idx(tmp_path / "short")
    (tmp_path / "header").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "header")


def test_dataset_on_tiny_files(tiny: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, images, _ = tiny
    train = FashionMNIST(root)
    assert len(train) == 5 and train.targets.dtype == torch.int64
    image, target = train[2]
    assert type(image) is tv_tensors.Image and image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert torch.equal(image[0], torch.from_numpy(images[2])) and target == 3
    assert train.classes[train[0][1]] == "Ankle boot"
    test = FashionMNIST(root, "test", num_output_channels=3, transform=v2.Resize(32), target_transform=str)
    image, target = test[1]
    assert len(test) == 2 and image.shape == (3, 32, 32) and target == "0"
    assert torch.equal(image[0], image[2])


def test_items_do_not_share_memory_with_the_data(tiny: tuple[Path, np.ndarray, np.ndarray]) -> None:
    dataset = FashionMNIST(tiny[0], num_output_channels=3)
    dataset[0][0].zero_()
    assert torch.equal(dataset.data[0], torch.from_numpy(tiny[1][0]))


def test_missing_files_and_bad_arguments(tmp_path: Path, tiny: tuple[Path, np.ndarray, np.ndarray]) -> None:
    with pytest.raises(FileNotFoundError, match="pass the folder"):
        FashionMNIST(tmp_path / "empty")
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(tiny[0], "val")
    with pytest.raises(ValueError, match="num_output_channels"):
        FashionMNIST(tiny[0], num_output_channels=2)
    root = tmp_path / "mismatch"
    write_split(root, "train", tiny[1], tiny[2][:4], gz=False)
    with pytest.raises(ValueError, match="labels for the 5 images"):
        FashionMNIST(root)
    root = tmp_path / "range"
    write_split(root, "train", tiny[1], np.array([0, 1, 2, 10, 4], np.uint8), gz=False)
    with pytest.raises(ValueError, match="outside 0-9"):
        FashionMNIST(root)


def test_missing_debian_package_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from salmask.data import _fashion_mnist

    monkeypatch.setattr(_fashion_mnist, "FASHION_MNIST_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        _fashion_mnist.FashionMNIST(tmp_path)


@pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist package is not installed",
)
def test_debian_copy() -> None:
    test = FashionMNIST(split="test")
    assert len(test) == 10_000 and test.data.shape == (10_000, 28, 28)
    assert torch.equal(test.targets.bincount(), torch.full((10,), 1000))
    assert test.classes[test[0][1]] == "Ankle boot"


def test_a_damaged_gzip_file_is_named(tmp_path: Path) -> None:
    content = gzip.compress(idx_bytes(np.arange(20, dtype=np.uint8).reshape(4, 5)))
    (tmp_path / "cut-idx2-ubyte.gz").write_bytes(content[:-12])
    with pytest.raises(ValueError, match=r"cut-idx2-ubyte\.gz cannot be read as an IDX file: EOFError"):
        read_idx(tmp_path / "cut-idx2-ubyte.gz")
    (tmp_path / "garbage.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"garbage\.gz cannot be read as an IDX file"):
        read_idx(tmp_path / "garbage.gz")


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    code=st.sampled_from([0x08, 0x0B, 0x0D]),
    compressed=st.booleans(),
    cut=st.integers(0, 64),
    seed=st.integers(0, 2**16),
)
def test_read_idx_reads_back_any_array_and_names_any_truncated_file(shape, code, compressed, cut, seed):
    import tempfile

    values = np.random.default_rng(seed).integers(0, 100, size=shape).astype(np.float32)
    content = idx_bytes(values, code)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("array.gz" if compressed else "array")
        path.write_bytes(gzip.compress(content) if compressed else content)
        assert torch.equal(read_idx(path).double(), torch.from_numpy(values).double())
        damaged = gzip.compress(content)[: -1 - cut] if compressed else content[: max(0, len(content) - 1 - cut)]
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read_idx(path)
