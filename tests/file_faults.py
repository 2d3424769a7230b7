"""Faults injected into files: flipped bytes at chosen places, and what counts as the same content."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch


def same_content(first, second) -> bool:
    """Equal tensors (dtype, shape, bits) and plain values, in the same structure."""
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return (
            isinstance(first, torch.Tensor)
            and isinstance(second, torch.Tensor)
            and first.dtype == second.dtype
            and first.shape == second.shape
            and torch.equal(first.reshape(-1).view(torch.uint8), second.reshape(-1).view(torch.uint8))
        )
    if isinstance(first, dict):
        return (
            isinstance(second, dict)
            and list(first) == list(second)
            and all(same_content(first[key], second[key]) for key in first)
        )
    if isinstance(first, (list, tuple)):
        return type(first) is type(second) and len(first) == len(second) and all(map(same_content, first, second))
    return type(first) is type(second) and first == second


def tensor_records(path: Path) -> list[tuple[int, int]]:
    """``(offset, size)`` of each tensor storage's bytes in the file (stored uncompressed in the zip)."""
    records = []
    with zipfile.ZipFile(path) as archive, path.open("rb") as raw:
        for info in archive.infolist():
            if "/data/" not in info.filename or info.file_size == 0:
                continue
            # The local header's name and extra lengths (its extra field pads the data for alignment).
            raw.seek(info.header_offset + 26)
            name_length, extra_length = (int.from_bytes(raw.read(2), "little") for _ in range(2))
            records.append((info.header_offset + 30 + name_length + extra_length, info.file_size))
    return records


def flip_positions(path: Path, count: int) -> list[int]:
    """``count`` byte positions spread over the file, half of them inside the tensors' stored bytes."""
    spread = np.linspace(0, path.stat().st_size - 1, count // 2).astype(int).tolist()
    inside = [start + offset for start, size in tensor_records(path) for offset in (0, size // 2, size - 1)]
    return sorted(set(spread + inside[: count - len(spread)]))
