"""One rank of the two-process shuffle-BN test in test_shuffle_bn.py; writes its results for the test.

Usage: python _shuffle_worker.py RANK WORLD_SIZE PORT OUTPUT_DIR
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from salmask.ssl import MoCo, batch_shuffle, batch_unshuffle

WORLD_SIZE = 2
PER_RANK = 4
SIZE = 8
QUEUE_SIZE = 16
SHUFFLE_SEED = 7


def tiny_encoder() -> nn.Module:
    encoder = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    encoder.num_features = 8
    return encoder


def build_model() -> MoCo:
    """The same initial model on every rank and in the test."""
    torch.manual_seed(0)
    return MoCo(tiny_encoder(), dim=6, queue_size=QUEUE_SIZE, momentum=0.9).train()


def global_batch() -> dict[str, torch.Tensor]:
    """The views of all ranks; rank r takes rows r * PER_RANK to (r + 1) * PER_RANK."""
    generator = torch.Generator().manual_seed(1234)
    shape = (WORLD_SIZE * PER_RANK, 3, SIZE, SIZE)
    # Images of different brightness, so that which images share a BN batch changes the embeddings.
    offsets = torch.linspace(-2, 2, WORLD_SIZE * PER_RANK).view(-1, 1, 1, 1)
    return {name: torch.randn(shape, generator=generator) + offsets for name in ("query", "key", "hard")}


def main() -> None:
    rank, world_size, port, output_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=30),
    )
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = {name: views[rows] for name, views in global_batch().items()}
    results: dict[str, object] = {}

    torch.manual_seed(100 + rank)  # different local seeds: only rank 0's permutation may count
    shuffled, restore = batch_shuffle(local["key"])
    results["shuffled"] = shuffled
    results["restore"] = restore
    results["unshuffled"] = batch_unshuffle(shuffled, restore)

    # The permutations the step will draw: the keys' first, then the hard negatives'.
    torch.manual_seed(SHUFFLE_SEED)
    results["key_permutation"] = torch.randperm(world_size * PER_RANK)
    results["hard_permutation"] = torch.randperm(world_size * PER_RANK)
    torch.manual_seed(SHUFFLE_SEED)
    model = build_model()
    torch.manual_seed(SHUFFLE_SEED)
    out = model(local["query"], local["key"], local["hard"])
    out.loss.backward()
    results["logits"] = out.logits.detach()
    results["queue"] = model.queue.keys.clone()
    results["queue_ptr"] = model.queue.pointer.clone()

    torch.save(results, output_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
