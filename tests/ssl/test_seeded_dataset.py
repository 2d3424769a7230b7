"""SeededDataset blames a file only when the file cannot be read, and names the right one."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import ConcatDataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from salmask.ssl import BadImageError, SeededDataset


@pytest.fixture
def folder(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(3):
            pixels = np.full((8, 8, 3), 40 * index, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{index}.png")
    (tmp_path / "b" / "1.png").write_bytes(b"not a PNG")
    return tmp_path


class FailingTransform:
    """A user's transform with a bug of its own (it fails on dark images)."""

    def __call__(self, image):
        if np.asarray(image).mean() < 10:
            raise ValueError("transform bug: the image is too dark")
        return image


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_an_error_of_the_users_transform_is_not_blamed_on_the_image(folder, policy, caplog):
    dataset = SeededDataset(datasets.ImageFolder(folder, transform=FailingTransform()), on_bad_image=policy)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="transform bug") as raised:
        dataset[0]  # a/0.png: readable and dark
    assert not isinstance(raised.value, BadImageError)
    assert "skipped" not in caplog.text, "an item that failed for another reason than its file is not dropped"


def test_an_unreadable_file_is_still_named_and_skipped_on_request(folder, caplog):
    dataset = datasets.ImageFolder(folder, transform=v2.PILToTensor())
    with pytest.raises(BadImageError, match=r"b/1\.png"):
        SeededDataset(dataset)[4]
    with caplog.at_level(logging.WARNING):
        _, target = SeededDataset(dataset, on_bad_image="skip")[4]
    assert "b/1.png" in caplog.text and target == 1


def test_under_a_subset_or_a_concatenation_the_unreadable_file_is_named(folder):
    dataset = datasets.ImageFolder(folder, transform=v2.PILToTensor())
    with pytest.raises(BadImageError, match=r"cannot read image \S*b/1\.png"):
        SeededDataset(Subset(dataset, [5, 4, 0]))[1]
    with pytest.raises(BadImageError, match=r"cannot read image \S*b/1\.png"):
        SeededDataset(ConcatDataset([Subset(dataset, [0]), Subset(dataset, [3, 4])]))[2]
