"""Checkpoint files: what is written is what loads back, or the load fails naming the file.

Faults are injected for real where the operating system allows it: flipped bytes in the file, a writer
killed with SIGKILL in the middle of a save, writes to a device that is always full (``/dev/full``).
"""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from file_faults import flip_positions, same_content, tensor_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from salmask.ssl import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint, training_state

ROOT = Path(__file__).resolve().parents[2]


def small_checkpoint() -> dict:
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    config = {"arch": "resnet18", "lr": 0.015, "mask_ratio": [0.05, 0.25], "data": None, "amp": False}
    return training_state(model=model, config=config, epoch=3, step=7, optimizer=optimizer, metrics={"loss": 1.5})


def test_one_flipped_byte_fails_to_load_or_loads_the_same_content(tmp_path):
    path = save_checkpoint(small_checkpoint(), tmp_path / "checkpoint.pt")
    original = load_checkpoint(path)
    original.pop("path")
    data = path.read_bytes()
    positions = flip_positions(path, 240)
    different = []
    for position in positions:
        damaged = tmp_path / "damaged.pt"
        damaged.write_bytes(data[:position] + bytes([data[position] ^ 0x10]) + data[position + 1 :])
        try:
            loaded = load_checkpoint(damaged)
        except CheckpointError as error:
            assert "damaged.pt" in str(error)
            continue
        loaded.pop("path")
        if not same_content(loaded, original):
            different.append(position)
    assert not different, f"{len(different)} of {len(positions)} flipped bytes loaded as different content"


def test_resuming_from_a_checkpoint_with_a_flipped_queue_byte_is_refused(tmp_path):
    state = small_checkpoint()
    state["model"]["queue.keys"] = torch.randn(128, 64)
    path = save_checkpoint(state, tmp_path / "checkpoint.pt")
    # The queue is the largest tensor: its storage is the largest record.
    start, size = max(tensor_records(path), key=lambda record: record[1])
    assert size == 128 * 64 * 4
    data = bytearray(path.read_bytes())
    data[start + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint\.pt is corrupt: its content does not match"):
        load_checkpoint(path)


def test_a_checkpoint_written_before_digests_loads_with_a_warning(tmp_path):
    old = {"format": CHECKPOINT_FORMAT, "version": 1, "model": {"w": torch.ones(2)}, "epoch": 1, "step": 0}
    torch.save({**old, "config": {}}, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match=r"old\.pt .*no digest"):
        checkpoint = load_checkpoint(tmp_path / "old.pt")
    assert checkpoint["epoch"] == 1
    # Saving it again adds the digest; it then loads verified, without a warning.
    save_checkpoint(checkpoint, tmp_path / "old.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(tmp_path / "old.pt")["version"] > 1


def test_a_current_checkpoint_without_its_digest_is_refused(tmp_path):
    path = save_checkpoint({"model": {}, "epoch": 0, "step": 0, "config": {}}, tmp_path / "c.pt")
    stripped = torch.load(path, weights_only=True)
    del stripped["digest"]
    torch.save(stripped, path)
    with pytest.raises(CheckpointError, match=r"c\.pt .*lacks the digest"):
        load_checkpoint(path)


# --- what save_checkpoint accepts ---------------------------------------------------------------------


def test_numpy_values_and_paths_are_stored_as_plain_values_that_load_back(tmp_path):
    config = {
        "output_dir": pathlib.Path("/runs/a"),
        "lr": np.float32(0.5),
        "seed": np.int64(3),
        "flag": np.bool_(True),
        "ratios": np.array([0.05, 0.25]),
        "nested": [np.int32(1), (pathlib.PurePosixPath("x"), np.float64(2.0))],
    }
    path = save_checkpoint(
        {"model": {}, "epoch": np.int64(2), "step": 0, "config": config, "metrics": {"acc": np.float64(0.9)}},
        tmp_path / "c.pt",
    )
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and type(loaded["epoch"]) is int
    assert loaded["config"]["output_dir"] == "/runs/a" and loaded["config"]["seed"] == 3
    assert loaded["config"]["lr"] == 0.5 and loaded["config"]["flag"] is True
    assert torch.equal(loaded["config"]["ratios"], torch.tensor([0.05, 0.25], dtype=torch.float64))
    assert loaded["config"]["nested"] == [1, ("x", 2.0)] and loaded["metrics"]["acc"] == 0.9


def test_a_value_weights_only_loading_refuses_is_refused_at_save_time_by_name(tmp_path):
    for bad, kind in ((frozenset([1]), "frozenset"), (lambda: 0, "function"), (object(), "object")):
        with pytest.raises(TypeError, match=rf"checkpoint\['config'\]\['bad'\] holds a {kind}"):
            save_checkpoint({"model": {}, "epoch": 0, "step": 0, "config": {"bad": bad}}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"checkpoint\['config'\]\['bad'\] is empty bytes"):
        save_checkpoint({"model": {}, "epoch": 0, "step": 0, "config": {"bad": b""}}, tmp_path / "c.pt")
    assert not list(tmp_path.iterdir()), "nothing is written"


def test_a_foreign_file_with_numpy_values_is_named_by_type_not_called_corrupt(tmp_path):
    torch.save(
        {"format": CHECKPOINT_FORMAT, "version": 1, "model": {}, "epoch": np.int64(1), "step": 0, "config": {}},
        tmp_path / "numpy.pt",
    )
    with pytest.raises(CheckpointError, match=r"numpy\.pt holds a value of type numpy\S*scalar") as raised:
        load_checkpoint(tmp_path / "numpy.pt")
    assert "corrupt" not in str(raised.value)


def test_the_state_dict_keeps_its_metadata(tmp_path):
    model = nn.BatchNorm1d(3)
    state = model.state_dict()
    path = save_checkpoint({"model": state, "epoch": 0, "step": 0, "config": {}}, tmp_path / "c.pt")
    loaded = load_checkpoint(path)["model"]
    assert isinstance(loaded, OrderedDict) and loaded._metadata == state._metadata


# --- files left behind, permissions, disk space -------------------------------------------------------

_WRITER = """
import sys, torch
from salmask.ssl import save_checkpoint
state = {"model": {"w": torch.zeros(12_000_000)}, "epoch": 0, "step": 0, "config": {}}
print("ready", flush=True)
while True:
    save_checkpoint(state, sys.argv[1])
"""


def test_a_writer_killed_mid_save_leaves_a_temporary_file_that_the_next_save_removes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    temporaries: list[Path] = []
    for _ in range(2):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=environment, stdout=subprocess.PIPE)
        assert writer.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = [entry for entry in tmp_path.iterdir() if entry.suffix == ".tmp"]
            if found and found[0].stat().st_size > 1_000_000:
                break
            time.sleep(0.005)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        temporaries = [entry for entry in tmp_path.iterdir() if entry.suffix == ".tmp"]
    assert temporaries, "the killed writer left its temporary file"
    save_checkpoint({"model": {}, "epoch": 1, "step": 0, "config": {}}, path)
    assert [entry.name for entry in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert load_checkpoint(path)["epoch"] == 1


def test_a_temporary_file_of_a_running_writer_is_left_alone(tmp_path):
    import socket

    running = tmp_path / f".checkpoint.pt.{socket.gethostname()}-{os.getppid()}.abc123.tmp"
    running.write_bytes(b"being written")
    save_checkpoint({"model": {}, "epoch": 1, "step": 0, "config": {}}, tmp_path / "checkpoint.pt")
    assert running.exists()


def test_checkpoints_are_private_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        path = save_checkpoint({"model": {}, "epoch": 0, "step": 0, "config": {}}, tmp_path / "c.pt")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o600


def test_too_little_free_space_is_reported_before_writing(tmp_path, monkeypatch):
    path = save_checkpoint({"model": {}, "epoch": 1, "step": 0, "config": {}}, tmp_path / "c.pt")
    usage = type("Usage", (), {"total": 10**9, "used": 10**9 - 4096, "free": 4096})
    monkeypatch.setattr("shutil.disk_usage", lambda folder: usage)
    big = {"model": {"w": torch.zeros(1_000_000)}, "epoch": 2, "step": 0, "config": {}}
    with pytest.raises(OSError, match=r"cannot write checkpoint .*c\.pt: no room on its disk \(0\.0 MB free") as raised:
        save_checkpoint(big, path)
    assert raised.value.errno == errno.ENOSPC and "3.8 MB" in str(raised.value)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [entry.name for entry in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_disk_that_fills_up_while_writing_is_named_with_the_free_space(tmp_path, monkeypatch):
    path = save_checkpoint({"model": {}, "epoch": 1, "step": 0, "config": {}}, tmp_path / "c.pt")
    real_mkstemp = __import__("tempfile").mkstemp

    def full_device(*args, **kwargs):
        handle, name = real_mkstemp(*args, **kwargs)
        os.close(handle)
        Path(name).unlink()
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr("tempfile.mkstemp", full_device)
    monkeypatch.setattr("os.fchmod", lambda handle, mode: None)  # /dev/full is not ours to chmod
    message = r"cannot write checkpoint .*c\.pt: no room on its disk \([\d,.]+ MB free"
    with pytest.raises(OSError, match=message) as raised:
        save_checkpoint({"model": {"w": torch.zeros(100_000)}, "epoch": 2, "step": 0, "config": {}}, path)
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


# --- rules for every content -------------------------------------------------------------------------

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
tensors = st.builds(
    lambda dtype, shape, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100).to(dtype),
    st.sampled_from(_DTYPES),
    st.lists(st.integers(0, 4), max_size=3),
    st.integers(0, 2**16),
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(min_size=1, max_size=8)
    | tensors
)
contents = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


def same_with_nan(first, second) -> bool:
    if isinstance(first, float) and isinstance(second, float) and first != first:
        return second != second
    if isinstance(first, dict):
        return (
            isinstance(second, dict)
            and list(first) == list(second)
            and all(map(same_with_nan, first.values(), second.values()))
        )
    if isinstance(first, (list, tuple)):
        return type(first) is type(second) and len(first) == len(second) and all(map(same_with_nan, first, second))
    return same_content(first, second)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=contents, flip=st.integers(0, 2**31), bit=st.integers(0, 7))
def test_any_content_loads_back_as_saved_and_a_flipped_bit_never_loads_as_other_content(tmp_path, content, flip, bit):
    path = save_checkpoint({"model": {}, "epoch": 0, "step": 0, "config": {"value": content}}, tmp_path / "c.pt")
    assert same_with_nan(load_checkpoint(path)["config"]["value"], content)
    data = bytearray(path.read_bytes())
    data[flip % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as error:
        assert "c.pt" in str(error)
    else:
        assert same_with_nan(loaded["config"]["value"], content)
