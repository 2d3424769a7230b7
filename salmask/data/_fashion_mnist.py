"""Fashion-MNIST read from its IDX files, by default where Debian's ``dataset-fashion-mnist`` installs them."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from salmask._validation import check_choice, check_int, check_path

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "FashionMNIST", "read_idx"]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where ``apt-get install dataset-fashion-mnist`` (Debian, Ubuntu) puts the four gzipped IDX files."""

#: The ten Fashion-MNIST class names, in target order.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes (third byte of the magic number) and their big-endian element types.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read an IDX file (the MNIST format), gzipped or not, into a tensor.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.

    Returns:
        The array with the shape and element type the file declares (``uint8`` for images and labels).

    Raises:
        ValueError: the file is not a well-formed IDX file.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "labels-idx1-ubyte"
        ...     _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
        ...     read_idx(path)
        tensor([7, 0, 9], dtype=torch.uint8)
    """
    path = check_path(path, "path")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            content = stream.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as error:
        # gzip reports a damaged file without its name ("Compressed file ended before ...").
        raise ValueError(f"{path} cannot be read as an IDX file: {type(error).__name__}: {error}") from error
    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file: bad magic number {content[:4].hex()}")
    dtype, ndim = np.dtype(_IDX_TYPES[content[2]]), content[3]
    header = 4 + 4 * ndim
    if len(content) < header:
        raise ValueError(f"{path} is truncated: its header declares {ndim} dimensions")
    shape = tuple(int(size) for size in np.frombuffer(content, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(content) != expected:
        raise ValueError(f"{path} has {len(content)} bytes but its header {shape} implies {expected}")
    array = np.frombuffer(content, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _find(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    hint = (
        "install it with `apt-get install dataset-fashion-mnist` (Debian, Ubuntu)"
        if root == FASHION_MNIST_ROOT
        else "pass the folder holding the IDX files as root"
    )
    raise FileNotFoundError(f"Fashion-MNIST not found: no {name}.gz or {name} in {root}; {hint}")


class FashionMNIST(Dataset):
    """Fashion-MNIST (28 x 28 greyscale photos of ten kinds of clothing), loaded into memory from IDX files.

    Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not, from ``root``. The default root is where
    Debian's ``dataset-fashion-mnist`` package installs the real data set, so it is available offline
    after ``apt-get install dataset-fashion-mnist``.

    Items are ``(image, target)`` with ``image`` a ``tv_tensors.Image`` uint8 ``(C, 28, 28)`` (``C`` is
    ``num_output_channels``; three equal channels suit ImageNet-style ConvNets and colour jitter), ready for
    torchvision v2 transforms.

    Args:
        root: folder holding the IDX files.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        num_output_channels: 1, or 3 to repeat the grey channel.
        transform: applied to the image.
        target_transform: applied to the class index.

    Attributes:
        data: ``(N, 28, 28)`` uint8 images.
        targets: ``(N,)`` int64 class indices into :data:`FASHION_MNIST_CLASSES`.

    Example:
        >>> import tempfile
        >>> files = {"t10k-images-idx3-ubyte": bytes([3, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0, 28]) + bytes(784),
        ...          "t10k-labels-idx1-ubyte": bytes([1, 0, 0, 0, 1, 9])}
        >>> with tempfile.TemporaryDirectory() as root:  # a one-image test split; the default root is Debian's
        ...     for name, content in files.items():
        ...         _ = (Path(root) / name).write_bytes(bytes([0, 0, 8]) + content)
        ...     image, target = FashionMNIST(root, "test")[0]
        >>> tuple(image.shape), FASHION_MNIST_CLASSES[target]
        ((1, 28, 28), 'Ankle boot')
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = FASHION_MNIST_ROOT,
        split: str = "train",
        *,
        num_output_channels: int = 1,
        transform: Callable[..., Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        check_choice(split, "split", tuple(_FILES))
        check_choice(check_int(num_output_channels, "num_output_channels"), "num_output_channels", (1, 3))
        self.root = Path(root)
        self.split = split
        self.num_output_channels = num_output_channels
        self.transform = transform
        self.target_transform = target_transform
        self.classes: list[str] = list(FASHION_MNIST_CLASSES)
        images_name, labels_name = _FILES[split]
        images_path, labels_path = _find(self.root, images_name), _find(self.root, labels_name)
        self.data = read_idx(images_path)
        self.targets = read_idx(labels_path).long()
        if self.data.ndim != 3 or self.data.dtype != torch.uint8:
            raise ValueError(
                f"{images_path} should hold uint8 images (N, H, W), got {self.data.dtype} {tuple(self.data.shape)}"
            )
        if self.targets.shape != (len(self.data),):
            raise ValueError(
                f"{labels_path} holds {tuple(self.targets.shape)} labels for the {len(self.data)} images of "
                f"{images_path}"
            )
        if len(self.targets) and not 0 <= int(self.targets.min()) <= int(self.targets.max()) < len(self.classes):
            raise ValueError(f"{labels_path} holds labels outside 0-{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = tv_tensors.Image(self.data[index].unsqueeze(0).expand(self.num_output_channels, -1, -1).clone())
        target: Any = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, num_images={len(self)})"
