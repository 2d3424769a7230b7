"""Where the time of a masking call goes: the top operators of each configuration, against a copy of the batch.

    python benchmarks/profile_masking.py                   # CPU, batch 64 at 224 px; writes results/profile.md
    python benchmarks/profile_masking.py --device cuda
    python benchmarks/profile_masking.py --configs noise mean --threads 1

``torch.profiler`` over ``--calls`` calls of each configuration of ``benchmarks/masking.py`` (after two
warm-up calls); each operator's self time per masking call is shown in ms and as a multiple of one
``copy_`` of the batch into a preallocated buffer (the in-place limit), profiled the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_report
from masking import build, strategies

from salmask import Saliency


def profiled(call, calls: int, device: torch.device) -> list[tuple[str, int, float]]:
    """``(operator, calls, self ms)`` per call of ``call``, most expensive first."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(2):
        call()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        rows.append((event.key, event.count // calls, self_us / calls / 1e3))
    return sorted(rows, key=lambda row: -row[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["mean", "constant", "noise", "blur", "high-pass (release mix)", "hard negative (high-pass)"],
        help="names from benchmarks/masking.py",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.size, args.size, device=device)
    buffer = torch.empty_like(images)
    saliency = Saliency(torch.rand(args.batch_size, 7, 7, device=device) < 0.45)
    copy_ms = sum(ms for _, _, ms in profiled(lambda: buffer.copy_(images), args.calls, device))
    sections = [
        f"## Profile of the masking calls (in place, batch {args.batch_size} x 3 x {args.size} x {args.size}, "
        f"{device}, {torch.get_num_threads()} threads)\n\n"
        f"One `copy_` of the batch: {copy_ms:.2f} ms. Self time per masking call of the top {args.top} "
        "operators; the total covers every operator."
    ]
    configurations = strategies()
    for name in args.configs:
        transform = build(configurations[name], check_values=False, inplace=True)
        rows = profiled(lambda t=transform: t(buffer, saliency), args.calls, device)
        total = sum(ms for _, _, ms in rows)
        table = [[op, count, f"{ms:.2f}", f"{ms / copy_ms:.2f}x"] for op, count, ms in rows[: args.top]]
        table.append(["total", sum(count for _, count, _ in rows), f"{total:.2f}", f"{total / copy_ms:.2f}x"])
        sections.append(f"### {name}\n\n" + markdown_table(["operator", "calls", "ms", "x copy_"], table))
    print("\n\n".join(sections))
    if not args.no_write:
        command = ("python benchmarks/profile_masking.py " + " ".join(sys.argv[1:])).strip()
        print(f"wrote {write_report('profile', 'Masking profile', command, device, sections)}")


if __name__ == "__main__":
    main()
