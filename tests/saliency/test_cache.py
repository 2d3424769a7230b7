from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from file_faults import flip_positions, same_content
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from salmask import Saliency
from salmask._storage import save_verified
from salmask.data import SaliencyDataset
from salmask.saliency import (
    CACHE_FORMAT_VERSION,
    SCDA,
    SaliencyCache,
    SaliencyCacheError,
    build_saliency_cache,
    compute_saliency_cache,
    load_saliency_cache,
    scda_foreground,
)
from salmask.saliency._cache import quantize_activation
from salmask.saliency.build_cache import main

GRID = 8


class Brightness(nn.Module):
    """A 'network' whose feature map is the mean brightness of 8 x 8 cells: saliency = bright region."""

    saliency_name = "brightness"

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(8)
        self.fail_after = fail_after
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return self.pool(images)


def make_image_folder(root: Path, count: int = 6, size: tuple[int, int] = (48, 64)) -> list[tuple[int, int]]:
    """Dark images with one bright cell-aligned rectangle each; returns its top-left cell per image."""
    height, width = size
    cell_h, cell_w = height // GRID, width // GRID
    corners = []
    for index in range(count):
        folder = root / ("cats" if index % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        top, left = index % 5, (2 * index) % 5
        pixels = np.full((height, width, 3), 20, dtype=np.uint8)
        pixels[top * cell_h : (top + 3) * cell_h, left * cell_w : (left + 3) * cell_w] = 235
        Image.fromarray(pixels).save(folder / f"image_{index:02d}.png")
        corners.append((top, left))
    return corners


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    make_image_folder(tmp_path / "train")
    return tmp_path / "train"


def build(root: Path, out: Path) -> SaliencyCache:
    scda = SCDA(Brightness(), threshold_std=0.0)
    return build_saliency_cache(root, out, scda, image_size=64, batch_size=2, progress=False)


def test_build_load_and_serve(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "saliency.pt"
    cache = build(image_folder, out)
    assert not list(tmp_path.glob("*.partial"))
    loaded = load_saliency_cache(out)
    assert len(loaded) == 6 and loaded.grid == (GRID, GRID)
    assert loaded.header["backbone"] == "brightness" and loaded.header["version"] == CACHE_FORMAT_VERSION
    assert loaded.header["complete"] and loaded.done.all()
    assert loaded.paths == sorted(loaded.paths) and loaded.paths[0].startswith("cats/")
    assert torch.equal(loaded.activation, cache.activation)
    assert loaded.activation.dtype == torch.uint8
    # Each image's bright 3 x 3 cells are its foreground (paths are sorted: cats = odd indices first).
    for entry, path in enumerate(loaded.paths):
        index = int(path.split("_")[1].split(".")[0])
        top, left = index % 5, (2 * index) % 5
        expected = torch.zeros(GRID, GRID, dtype=torch.bool)
        expected[top : top + 3, left : left + 3] = True
        assert torch.equal(loaded.foreground(entry), expected), path
    batched = loaded.foreground(torch.arange(6))
    assert batched.shape == (6, GRID, GRID)
    saliency = loaded.saliency(0, (48, 64))
    assert isinstance(saliency, Saliency) and saliency.shape == (48, 64) and saliency.dtype == torch.bool
    assert saliency.sum() == 9 * 6 * 8


def test_resumes_after_an_interruption(image_folder: Path, tmp_path: Path) -> None:
    reference = build(image_folder, tmp_path / "reference.pt")
    out = tmp_path / "saliency.pt"
    interrupted = SCDA(Brightness(fail_after=2), threshold_std=0.0)
    with pytest.raises(KeyboardInterrupt):
        build_saliency_cache(image_folder, out, interrupted, image_size=64, batch_size=2, progress=False)
    with pytest.raises(SaliencyCacheError, match="incomplete"):
        load_saliency_cache(out)
    partial = load_saliency_cache(out, allow_incomplete=True)
    # One probe forward for the grid, then one batch of two images before the interruption.
    assert int(partial.done.sum()) == 2 and not partial.header["complete"]
    counting = SCDA(Brightness(), threshold_std=0.0)
    resumed = build_saliency_cache(image_folder, out, counting, image_size=64, batch_size=2, progress=False)
    assert counting.backbone.calls == 1 + 2, "only the four missing images are computed"
    assert torch.equal(resumed.activation, reference.activation)
    assert load_saliency_cache(out).header["complete"]
    again = SCDA(Brightness(), threshold_std=0.0)
    build_saliency_cache(image_folder, out, again, image_size=64, progress=False)
    assert again.backbone.calls == 1, "a complete cache is not recomputed"


def test_refuses_to_mix_with_another_build(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "saliency.pt"
    build(image_folder, out)
    other = SCDA(Brightness(), name="other")
    with pytest.raises(SaliencyCacheError, match="backbone"):
        build_saliency_cache(image_folder, out, other, image_size=64, progress=False)
    with pytest.raises(SaliencyCacheError, match="image_size"):
        build_saliency_cache(image_folder, out, SCDA(Brightness()), image_size=128, progress=False)
    (image_folder / "dogs" / "image_00.png").rename(image_folder / "dogs" / "image_99.png")
    with pytest.raises(SaliencyCacheError, match=r"entry 3 is .dogs/image_00.png. in the cache"):
        build(image_folder, out)


def test_validation_on_load(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "saliency.pt"
    build(image_folder, out)
    state = torch.load(out, weights_only=True)
    del state["digest"]

    def broken(**changes) -> Path:
        # Well-formed files (their digest matches) with a bad layout.
        path = tmp_path / f"broken_{'_'.join(changes)}.pt"
        save_verified({**state, **changes}, path, what="saliency cache")
        return path

    cases = {
        "version": broken(version=CACHE_FORMAT_VERSION + 1),
        "format": broken(format="something else"),
        "uint8": broken(activation=state["activation"].float()),
        "does not match header": broken(num_images=7),
        "paths": broken(paths=state["paths"][:-1]),
    }
    for message, path in cases.items():
        with pytest.raises(SaliencyCacheError, match=message):
            load_saliency_cache(path)
    del state["done"]
    save_verified(state, tmp_path / "no_done.pt", what="saliency cache")
    with pytest.raises(SaliencyCacheError, match="missing fields"):
        load_saliency_cache(tmp_path / "no_done.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a cache")
    with pytest.raises(SaliencyCacheError, match=r"junk\.pt cannot be read; it is corrupt"):
        load_saliency_cache(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match=r"python -m salmask\.saliency\.build_cache"):
        load_saliency_cache(tmp_path / "absent.pt")


def test_quantization_keeps_the_foreground() -> None:
    activation = torch.randn(64, 7, 7, generator=torch.Generator().manual_seed(0)) * 30 + 100
    stored = quantize_activation(activation)
    assert stored.dtype == torch.uint8 and stored.flatten(1).amax(1).eq(255).all()
    agreement = (scda_foreground(stored.float() / 255) == scda_foreground(activation)).float().mean()
    assert agreement >= 0.99
    assert not quantize_activation(torch.full((1, 3, 3), 5.0)).any()
    assert scda_foreground(quantize_activation(torch.full((1, 3, 3), 5.0)).float()).all()


def test_command_line(image_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.pt"
    status = main(
        [
            "--root",
            str(image_folder),
            "--out",
            str(out),
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--image-size",
            "64",
            "--no-progress",
        ]
    )
    assert status == 0
    cache = load_saliency_cache(out)
    assert cache.grid == (2, 2) and cache.header["backbone"] == "resnet18" and cache.header["threshold_std"] == 0.6
    assert "wrote" in capsys.readouterr().out


def test_one_flipped_byte_fails_to_load_or_loads_the_same_cache(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "saliency.pt"
    build(image_folder, out)
    original = load_saliency_cache(out)
    data = out.read_bytes()
    different = []
    positions = flip_positions(out, 160)
    for position in positions:
        damaged = tmp_path / "damaged.pt"
        damaged.write_bytes(data[:position] + bytes([data[position] ^ 0x04]) + data[position + 1 :])
        try:
            cache = load_saliency_cache(damaged)
        except SaliencyCacheError as error:
            assert "damaged.pt" in str(error)
            continue
        if not same_content(cache.state(), original.state()):
            different.append(position)
    assert not different, f"{len(different)} of {len(positions)} flipped bytes loaded as a different cache"


def test_a_cache_written_before_digests_loads_with_a_warning(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "saliency.pt"
    build(image_folder, out)
    state = torch.load(out, weights_only=True)
    del state["digest"]
    torch.save({**state, "version": 1}, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match=r"old\.pt .*no digest"):
        assert len(load_saliency_cache(tmp_path / "old.pt")) == 6
    torch.save(state, tmp_path / "stripped.pt")
    with pytest.raises(SaliencyCacheError, match="lacks the digest"):
        load_saliency_cache(tmp_path / "stripped.pt")


def test_the_cache_file_is_private_whatever_the_umask(image_folder: Path, tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        build(image_folder, tmp_path / "saliency.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "saliency.pt").stat().st_mode & 0o777 == 0o600
    assert [path.name for path in tmp_path.iterdir() if path.is_file()] == ["saliency.pt"]


def test_entries_outside_the_cache_are_named(image_folder: Path, tmp_path: Path) -> None:
    cache = build(image_folder, tmp_path / "saliency.pt")
    for index in (-1, 6, torch.tensor([0, 6]), torch.tensor([-1])):
        with pytest.raises(IndexError, match=r"index .* outside the saliency cache's entries 0\.\.5"):
            cache.saliency(index, (48, 64)) if isinstance(index, int) else cache.foreground(index)
    with pytest.raises(IndexError, match="outside"):
        cache.activation_map(-1)
    with pytest.raises(TypeError, match="index must be an int or an integer tensor"):
        cache.foreground(1.5)


def test_an_in_memory_cache_serves_each_item_its_own_map_at_the_item_size():
    # Small images upsampled for the network: the map follows the bright square of each image.
    images = torch.zeros(6, 1, 16, 16, dtype=torch.uint8)  # grey images, as Fashion-MNIST's
    for index in range(6):
        row, column = divmod(index, 3)
        images[index, :, row * 8 : row * 8 + 8, column * 5 : column * 5 + 6] = 255
    scda = SCDA(nn.AvgPool2d(4), threshold_std=-0.5)  # activation = mean brightness per 4 x 4 cell
    cache = compute_saliency_cache(TensorDataset(images, torch.arange(6)), scda, image_size=16, batch_size=4)
    assert len(cache) == 6 and cache.header["complete"] and cache.paths == [str(i) for i in range(6)]
    for index in range(6):
        saliency = cache.saliency(index, (16, 16))
        bright = images[index, 0] > 0
        assert saliency[bright].float().mean() > 0.9 and saliency[~bright].float().mean() < 0.2
    dataset = SaliencyDataset(TensorDataset(images, torch.arange(6)), cache, return_target=True)
    (image, saliency), target = dataset[4]
    assert torch.equal(image, images[4]) and saliency.shape == (16, 16) and int(target) == 4
