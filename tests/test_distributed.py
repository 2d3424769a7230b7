"""salmask.distributed in one process, and a two-process gloo run of the gathers and the queue."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salmask.distributed import (
    all_gather,
    all_gather_with_grad,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
)
from salmask.losses import NTXentLoss

# The tests run with --import-mode=importlib (no tests/ on sys.path), so the worker, which is also run as a
# script, is loaded by path to share its inputs with the checks here.
WORKER = Path(__file__).with_name("_distributed_worker.py")
_spec = importlib.util.spec_from_file_location("_distributed_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
WORLD_SIZE = 2
TIMEOUT_SECONDS = 90


# ---------------------------------------------------------------------------------------------------
# One process, no process group


def test_helpers_without_process_group() -> None:
    assert not is_distributed()
    assert get_rank() == 0
    assert get_world_size() == 1


def test_all_gather_without_process_group_returns_detached_input() -> None:
    tensor = torch.randn(3, 2, requires_grad=True)
    gathered = all_gather(tensor)
    assert torch.equal(gathered, tensor)
    assert not gathered.requires_grad


def test_all_gather_with_grad_without_process_group_passes_gradient() -> None:
    tensor = torch.randn(3, 2, requires_grad=True)
    weights = torch.randn(3, 2)
    (all_gather_with_grad(tensor) * weights).sum().backward()
    assert torch.equal(tensor.grad, weights)


@pytest.mark.parametrize("gather", [all_gather, all_gather_with_grad])
def test_gathers_reject_bad_input(gather) -> None:
    with pytest.raises(TypeError, match=r"tensor must be a torch\.Tensor"):
        gather([1.0, 2.0])
    with pytest.raises(ValueError, match="scalar"):
        gather(torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------------
# Two processes, gloo on CPU


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory, free_port) -> list[dict]:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    output_dir = tmp_path_factory.mktemp("ddp")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(WORLD_SIZE), str(port), str(output_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(WORLD_SIZE)
    ]
    failures = []
    try:
        for rank, process in enumerate(processes):
            _, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
            if process.returncode != 0:
                failures.append(f"rank {rank} exited with {process.returncode}:\n{stderr[-3000:]}")
    except subprocess.TimeoutExpired:
        failures.append(f"the two-process run did not finish within {TIMEOUT_SECONDS} s")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert not failures, "\n".join(failures)
    return [torch.load(output_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def test_two_ranks_see_a_process_group(two_rank_results) -> None:
    for rank, results in enumerate(two_rank_results):
        assert results["is_distributed"]
        assert results["rank"] == rank
        assert results["world_size"] == WORLD_SIZE


def test_queue_holds_keys_of_both_ranks_in_rank_order(two_rank_results) -> None:
    first = torch.cat([worker.rank_keys(rank, step=0) for rank in range(WORLD_SIZE)])
    second = torch.cat([worker.rank_keys(rank, step=1) for rank in range(WORLD_SIZE)])
    filled = len(first)
    wrapped = worker.QUEUE_SIZE - filled
    for results in two_rank_results:
        assert torch.equal(results["queue_after_first"][:, :filled], first.t())
        assert int(results["ptr_after_first"]) == filled
        queue = results["queue_after_second"]
        # 6 + 6 keys into K = 10: the second batch fills columns 6..9, then wraps to columns 0..1.
        assert torch.equal(queue[:, filled:], second[:wrapped].t())
        assert torch.equal(queue[:, : len(second) - wrapped], second[wrapped:].t())
        assert torch.equal(queue[:, len(second) - wrapped : filled], first[len(second) - wrapped :].t())
        assert int(results["ptr_after_second"]) == (2 * filled) % worker.QUEUE_SIZE
    assert torch.equal(two_rank_results[0]["queue_after_second"], two_rank_results[1]["queue_after_second"])


def test_all_gather_concatenates_in_rank_order_without_grad(two_rank_results) -> None:
    expected = torch.cat([torch.full((2, 3), float(rank)) for rank in range(WORLD_SIZE)])
    for results in two_rank_results:
        assert torch.equal(results["all_gather"], expected)
        assert not results["all_gather_requires_grad"]


def test_all_gather_with_grad_gives_local_block_the_gradient_of_every_rank(two_rank_results) -> None:
    expected_gathered = torch.cat([torch.full((2, 3), float(r + 1), dtype=torch.float64) for r in range(2)])
    base = torch.arange(WORLD_SIZE * 2 * 3, dtype=torch.float64).reshape(WORLD_SIZE * 2, 3)
    summed_weights = sum(base * (r + 1) for r in range(WORLD_SIZE))
    for rank, results in enumerate(two_rank_results):
        assert torch.equal(results["with_grad_gathered"], expected_gathered)
        assert torch.equal(results["with_grad_local_grad"], summed_weights[2 * rank : 2 * rank + 2])


def test_gathered_ntxent_matches_one_process_on_the_global_batch(two_rank_results) -> None:
    batch = worker.simclr_global_batch()
    view_a = batch["view_a"].clone().requires_grad_(True)
    view_b = batch["view_b"].clone().requires_grad_(True)
    criterion = NTXentLoss(temperature=0.3, hard_negative_weight=1.5)
    loss = criterion(view_a, view_b, batch["hard"])
    loss.backward()

    mean_rank_loss = sum(results["simclr_loss"] for results in two_rank_results) / WORLD_SIZE
    torch.testing.assert_close(mean_rank_loss, loss.detach())
    per_rank = worker.SIMCLR_BATCH_PER_RANK
    for rank, results in enumerate(two_rank_results):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        # DDP averages gradients over ranks, so each rank's gradient / world size is the global gradient.
        torch.testing.assert_close(results["simclr_grad_a"] / WORLD_SIZE, view_a.grad[rows])
        torch.testing.assert_close(results["simclr_grad_b"] / WORLD_SIZE, view_b.grad[rows])


def test_init_distributed_in_one_process_picks_the_device_and_creates_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert init_distributed("auto") == expected
    assert not is_distributed()


def test_init_distributed_rejects_bad_devices():
    with pytest.raises(ValueError, match="device must be"):
        init_distributed("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            init_distributed("cuda")
