"""MoCo's shuffle-BN in a two-process gloo run, checked against one process replaying the shuffle."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# Loaded by path: the tests run with --import-mode=importlib, and the worker is also run as a script.
WORKER = Path(__file__).with_name("_shuffle_worker.py")
_spec = importlib.util.spec_from_file_location("_shuffle_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
TIMEOUT_SECONDS = 90


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory, free_port) -> list[dict]:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    output_dir = tmp_path_factory.mktemp("shuffle_bn")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(worker.WORLD_SIZE), str(port), str(output_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(worker.WORLD_SIZE)
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
    return [torch.load(output_dir / f"rank{rank}.pt", weights_only=False) for rank in range(worker.WORLD_SIZE)]


def _slices(images: torch.Tensor, permutation: torch.Tensor) -> list[torch.Tensor]:
    return list(images[permutation].split(worker.PER_RANK))


def test_batch_shuffle_deals_one_shared_permutation_and_unshuffle_restores(ranks):
    keys = worker.global_batch()["key"]
    assert torch.equal(ranks[0]["restore"], ranks[1]["restore"])
    permutation = torch.argsort(ranks[0]["restore"])
    for rank, results in enumerate(ranks):
        assert torch.equal(results["shuffled"], _slices(keys, permutation)[rank])
        assert torch.equal(results["unshuffled"], keys[rank * worker.PER_RANK : (rank + 1) * worker.PER_RANK])


def test_keys_get_batch_statistics_of_their_shuffled_slice(ranks):
    batch = worker.global_batch()
    model = worker.build_model()  # at the first step the key encoder is still a copy of the query encoder
    permutation = ranks[0]["key_permutation"]

    def embed(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(model.momentum_projector(model.momentum_encoder(images)), dim=1)

    shuffled_keys = torch.cat([embed(part) for part in _slices(batch["key"], permutation)])
    expected = shuffled_keys[torch.argsort(permutation)]
    filled = worker.WORLD_SIZE * worker.PER_RANK
    for results in ranks:
        torch.testing.assert_close(results["queue"][:, :filled], expected.t())
        assert int(results["queue_ptr"]) == filled
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    # Without the shuffle each rank would normalise its own keys; the test data makes that differ.
    unshuffled = torch.cat([embed(part) for part in batch["key"].split(worker.PER_RANK)])
    assert not torch.allclose(unshuffled, expected, atol=1e-3)


def test_hard_negatives_are_shuffled_too_and_stay_with_their_query(ranks):
    batch = worker.global_batch()
    model = worker.build_model()
    permutation = ranks[0]["hard_permutation"]
    with torch.no_grad():
        shuffled = torch.cat(
            [
                F.normalize(model.momentum_projector(model.momentum_encoder(part)), dim=1)
                for part in _slices(batch["hard"], permutation)
            ]
        )
        hard = shuffled[torch.argsort(permutation)]
        for rank, results in enumerate(ranks):
            rows = slice(rank * worker.PER_RANK, (rank + 1) * worker.PER_RANK)
            query = F.normalize(model.projector(model.encoder(batch["query"][rows])), dim=1)
            torch.testing.assert_close(results["logits"][:, -1], 2.0 * (query * hard[rows]).sum(1) / 0.2)
