"""Check salmask's facebookresearch/moco patch on the CPU: bit-for-bit logits and two training steps.

Run it on a checkout of facebookresearch/moco at commit 87e36d3 with ``salmask.patch`` applied (see
``docs/guides/moco_patch.md``)::

    python integrations/moco/cpu_check.py /tmp/moco

1. Same weights, same inputs: the patched ``MoCo.forward`` with hard negatives returns the unpatched
   model's logits (read from the checkout's git history) bit for bit in its first 1 + K columns, one
   rho-weighted column per hard negative after them (``-inf`` for an image flagged invalid), the same
   labels, and the same queue afterwards (only keys are enqueued); the hard negatives go through the
   batch shuffle like the keys; with ``im_hard=None`` the whole output equals the unpatched one.
2. ``main_moco.py``'s own ``main_worker`` trains two SGD steps (one epoch of 16 images, batch 8) with
   ``--mask high_pass``, once with a saliency cache and once with SCDA in two DataLoader workers, and
   once with ``--mask none`` (plain MoCo), on a tiny ImageFolder made here; the logits that reach the
   criterion have 1 + K + 1 columns with hard negatives and 1 + K without.

moco only runs under DistributedDataParallel on GPUs. Here it runs as one gloo process on the CPU: this
script sets ``args.distributed`` for a world of one (``main`` would refuse it) and makes
``Tensor.cuda`` and ``Module.cuda`` return their input unchanged, since moco calls them unconditionally
(model, criterion, the shuffle index and the labels). Nothing else of moco is replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image

from salmask import build_saliency_cache, build_scda

MOCO_COMMIT = "87e36d39aa7aa93be45ba2cb8be93c60adfb0bd3"
BATCH, QUEUE, RHO, TEMPERATURE = 8, 32, 2.0, 0.2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo() -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unpatched_builder(moco_dir: Path, scratch: Path):
    source = subprocess.run(
        ["git", "-C", str(moco_dir), "show", f"{MOCO_COMMIT}:moco/builder.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = scratch / "unpatched_builder.py"
    path.write_text(source)
    return load_module("unpatched_builder", path)


def check_logits(moco_dir: Path, scratch: Path) -> None:
    import moco.builder as patched

    plain = unpatched_builder(moco_dir, scratch)
    torch.manual_seed(0)
    reference = plain.MoCo(torchvision.models.resnet18, 128, QUEUE, 0.999, TEMPERATURE, mlp=True)
    model = patched.MoCo(torchvision.models.resnet18, 128, QUEUE, 0.999, TEMPERATURE, mlp=True, rho=RHO)
    model.load_state_dict(reference.state_dict())
    shuffled = []
    shuffle = model._batch_shuffle_ddp
    model._batch_shuffle_ddp = lambda x: (shuffled.append(x), shuffle(x))[1]

    generator = torch.Generator().manual_seed(1)
    im_q, im_k, im_hard = torch.randn(3, BATCH, 3, 64, 64, generator=generator).unbind(0)
    valid = torch.ones(BATCH, dtype=torch.bool)
    valid[3] = False
    runs = {}
    for name, net, extra in (
        ("unpatched", reference, ()),
        ("patched", model, (im_hard, valid)),
        ("patched, im_hard=None", copy.deepcopy(model), ()),
    ):
        net.train()
        torch.manual_seed(2)  # the same shuffle of the keys in every run
        logits, labels = net(im_q, im_k, *extra)
        runs[name] = (logits.detach(), labels, net.queue.clone(), int(net.queue_ptr))

    logits, labels, queue, ptr = runs["patched"]
    plain_logits, plain_labels, plain_queue, plain_ptr = runs["unpatched"]
    first = logits[:, : 1 + QUEUE]
    print(f"logits: unpatched {tuple(plain_logits.shape)}, patched {tuple(logits.shape)}")
    print(f"first 1+K columns bit for bit equal: {torch.equal(first, plain_logits)}")
    hard_column = logits[:, 1 + QUEUE]
    print(f"hard-negative column finite for valid images: {bool(hard_column[valid].isfinite().all())}")
    print(f"hard-negative column -inf for the invalid image: {bool(hard_column[~valid].eq(-float('inf')).all())}")
    print(f"labels equal: {torch.equal(labels, plain_labels)}")
    print(f"queue equal after the step (keys only enqueued): {torch.equal(queue, plain_queue)}, ptr {ptr}")
    print(f"hard negatives batch-shuffled like the keys: {any(x is im_hard for x in shuffled)}")
    off_logits, _, off_queue, _ = runs["patched, im_hard=None"]
    off_equal = torch.equal(off_logits, plain_logits) and torch.equal(off_queue, plain_queue)
    print(f"im_hard=None: output and queue equal to unpatched: {off_equal}")
    assert torch.equal(first, plain_logits) and logits.shape == (BATCH, 1 + QUEUE + 1)
    assert bool(hard_column[valid].isfinite().all()) and bool(hard_column[~valid].eq(-float("inf")).all())
    assert torch.equal(labels, plain_labels) and torch.equal(queue, plain_queue) and ptr == plain_ptr == BATCH
    assert any(x is im_hard for x in shuffled) and off_equal


def make_image_folder(root: Path, count: int = 16) -> Path:
    """Noisy dark 64 px images, each with a bright rectangle (its object), in two classes."""
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / "train" / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        top, left = rng.integers(0, 32, size=2)
        pixels[top : top + 28, left : left + 28] = rng.integers(160, 256, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    return root


def train_two_steps(data: Path, extra: list[str], columns: int) -> None:
    import main_moco

    argv = [str(data), "-a", "resnet18", "-j", "2", "--epochs", "1", "-b", str(BATCH), "--lr", "0.015"]
    argv += ["--moco-k", str(QUEUE), "--moco-t", str(TEMPERATURE), "--mlp", "--aug-plus", "--cos", "-p", "1"]
    argv += extra
    argv += ["--dist-backend", "gloo", "--dist-url", f"tcp://127.0.0.1:{free_port()}", "--world-size", "1"]
    argv += ["--rank", "0"]
    print("main_moco.py " + " ".join(argv))
    args = main_moco.parser.parse_args(argv)
    args.distributed = True  # a world of one process, which main() leaves to the non-DDP path it refuses
    output = io.StringIO()
    widths = []
    accuracy = main_moco.accuracy
    main_moco.accuracy = lambda logits, *rest, **options: (
        widths.append(logits.shape[1]),
        accuracy(logits, *rest, **options),
    )[1]
    try:
        with contextlib.redirect_stdout(output):
            main_moco.main_worker(None, 1, args)
    finally:
        main_moco.accuracy = accuracy
        dist.destroy_process_group()
    steps = [line for line in output.getvalue().splitlines() if line.startswith("Epoch: [0]")]
    print("\n".join(steps))
    checkpoint = torch.load("checkpoint_0000.pth.tar", map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    ptr = int(state["module.queue_ptr"])
    print(f"logit columns per step: {widths}; checkpoint: epoch {checkpoint['epoch']}, queue_ptr {ptr}")
    assert len(steps) == 2 and widths == [columns, columns] and ptr == 2 * BATCH
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("moco", type=Path, help="facebookresearch/moco checkout at 87e36d3 with salmask.patch applied")
    args = parser.parse_args(argv)
    moco_dir = args.moco.resolve()
    if not (moco_dir / "moco" / "builder.py").is_file():
        parser.error(f"{moco_dir} is not a facebookresearch/moco checkout")
    torch.set_num_threads(1)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(moco_dir))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        print("== 1. the patched builder against the unpatched one")
        init_gloo()
        check_logits(moco_dir, scratch)
        dist.destroy_process_group()

        data = make_image_folder(scratch / "data")
        cache = scratch / "train-saliency.pt"
        build_saliency_cache(data / "train", cache, build_scda(), image_size=224, progress=False)
        os.chdir(scratch)  # main_moco.py writes its checkpoint to the working directory
        masking = ["--mask", "high_pass", "--moco-rho", str(RHO)]
        print("== 2. two steps of main_moco.py, saliency from a cache")
        train_two_steps(data, [*masking, "--saliency-cache", str(cache)], columns=1 + QUEUE + 1)
        print("== 3. two steps of main_moco.py, saliency from SCDA in the DataLoader workers")
        train_two_steps(data, masking, columns=1 + QUEUE + 1)
        print("== 4. two steps of main_moco.py without masking (--mask none, the default)")
        train_two_steps(data, [], columns=1 + QUEUE)
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
