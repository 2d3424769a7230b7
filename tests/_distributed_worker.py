"""One rank of the two-process gloo test in test_distributed.py; writes its results for the test to check.

Usage: python _distributed_worker.py RANK WORLD_SIZE PORT OUTPUT_DIR
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from salmask.distributed import all_gather, all_gather_with_grad, get_rank, get_world_size, is_distributed
from salmask.losses import NTXentLoss
from salmask.ssl import MomentumQueue

QUEUE_DIM = 4
QUEUE_SIZE = 10
KEYS_PER_RANK = 3
SIMCLR_BATCH_PER_RANK = 3
SIMCLR_DIM = 5


def rank_keys(rank: int, step: int) -> torch.Tensor:
    """Keys whose every entry encodes (step, rank, row), so the test can read back where each came from."""
    rows = torch.arange(KEYS_PER_RANK, dtype=torch.float32)
    codes = 100.0 * step + 10.0 * rank + rows
    return codes.unsqueeze(1).expand(KEYS_PER_RANK, QUEUE_DIM).clone()


def simclr_global_batch() -> dict[str, torch.Tensor]:
    """The same global batch on every rank (and in the test), each rank taking its own slice."""
    generator = torch.Generator().manual_seed(1234)
    world = 2
    shape = (world * SIMCLR_BATCH_PER_RANK, SIMCLR_DIM)
    return {
        "view_a": torch.randn(shape, generator=generator, dtype=torch.float64),
        "view_b": torch.randn(shape, generator=generator, dtype=torch.float64),
        "hard": torch.randn((world * SIMCLR_BATCH_PER_RANK, 2, SIMCLR_DIM), generator=generator, dtype=torch.float64),
    }


def main() -> None:
    rank, world_size, port, output_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=30),
    )
    results: dict[str, object] = {
        "is_distributed": is_distributed(),
        "rank": get_rank(),
        "world_size": get_world_size(),
    }

    # Queue: two enqueues of 2 x 3 keys into K = 10, so the second one wraps around.
    bank = MomentumQueue(dim=QUEUE_DIM, size=QUEUE_SIZE)
    bank.enqueue(rank_keys(rank, step=0))
    results["queue_after_first"] = bank.keys.clone()
    results["ptr_after_first"] = bank.pointer.clone()
    bank.enqueue(rank_keys(rank, step=1))
    results["queue_after_second"] = bank.keys.clone()
    results["ptr_after_second"] = bank.pointer.clone()

    # Plain gather: rank order, no gradient.
    gathered = all_gather(torch.full((2, 3), float(rank), requires_grad=True))
    results["all_gather"] = gathered
    results["all_gather_requires_grad"] = gathered.requires_grad

    # Gather with gradient: each rank weights every gathered row differently, so the gradient of the local
    # block must be the sum of both ranks' weights for that block.
    local = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    weights = torch.arange(world_size * 2 * 3, dtype=torch.float64).reshape(world_size * 2, 3) * (rank + 1)
    (all_gather_with_grad(local) * weights).sum().backward()
    results["with_grad_gathered"] = all_gather_with_grad(local.detach())
    results["with_grad_local_grad"] = local.grad

    # NT-Xent with cross-rank negatives, on this rank's slice of a shared global batch.
    batch = simclr_global_batch()
    rows = slice(rank * SIMCLR_BATCH_PER_RANK, (rank + 1) * SIMCLR_BATCH_PER_RANK)
    view_a = batch["view_a"][rows].clone().requires_grad_(True)
    view_b = batch["view_b"][rows].clone().requires_grad_(True)
    criterion = NTXentLoss(temperature=0.3, hard_negative_weight=1.5, gather_distributed=True)
    loss = criterion(view_a, view_b, batch["hard"][rows])
    loss.backward()
    results["simclr_loss"] = loss.detach()
    results["simclr_grad_a"] = view_a.grad
    results["simclr_grad_b"] = view_b.grad

    torch.save(results, output_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
