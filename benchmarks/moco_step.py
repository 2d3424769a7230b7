"""End to end: one MoCo v2 training step with and without masking, and with each saliency route, as ratios.

    python benchmarks/moco_step.py                         # CPU, ResNet-18 and ResNet-50, batch 32 at 224 px
    python benchmarks/moco_step.py --archs resnet18 --batch 8 --repeats 2     # quick
    python benchmarks/moco_step.py --device cuda --batch 128

A step is what a training loop runs per batch of ``--batch`` query and key views already on the device:
``MaskedViews`` (saliency, masks, fills), ``salmask.ssl.MoCo`` (momentum update, query forward and
backward, key forward, hard negatives through the key encoder, queue of 65 536), ``optimizer.step()``
(SGD). The paper's per-device batch is 32 (128 over 4 GPUs). Variants, timed in one run with the
repeats interleaved: in each round every variant's step runs back to back with a baseline step and with
its ``MaskedViews`` call alone, and ratios are taken within these triples (medians over rounds):

- ``none``: MoCo v2, no masking;
- ``masking``: each fill's query masks with saliency given on the 7 x 7 grid, no hard negatives (the
  masking's own cost);
- ``masking + cache``: the high-pass masks with the saliency of a cache route, full-resolution boolean
  maps of each view, as the data loader collates them (the loader's own work per step, done in worker
  processes in parallel with the step, is timed apart in the last column);
- ``masking + hard negatives``: the full recipe with saliency given (on the 7 x 7 grid, or from the
  cache); the hard negatives cost one more key-encoder forward, which is the method, not the masking;
- ``masking + online SCDA``: saliency computed in the step by ``SCDA`` on query and key views (ResNet-50
  at 224 px as in the paper's release, and at 112 px; EfficientNet-Lite0 at 128 px, the offline route).

``--only SCDA --name moco_step_scda`` times the variants whose name contains ``SCDA`` (with the
baseline) into a section file of their own.

Random weights: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, median_ratio, synchronize, write_report
from saliency_cost import cache_step

from salmask import Saliency
from salmask.saliency import SCDA, build_backbone, offline_weights_path
from salmask.ssl import MaskedViews, MaskedViewsOutput, MoCo, build_encoder

BASELINE = "none"
VIEWS = "views only: "


def variants(batch: int, size: int, device: torch.device) -> dict[str, tuple[MaskedViews, Saliency | None]]:
    """Each variant's masking module and the saliency handed to it (``None``: computed in the step)."""
    grid = torch.rand(batch, size // 32, size // 32, device=device) < 0.45
    full = torch.nn.functional.interpolate(grid[:, None].float(), size=(size, size), mode="nearest")[:, 0].bool()
    grid, full = Saliency(grid), Saliency(full)
    out: dict[str, tuple[MaskedViews, Saliency | None]] = {BASELINE: (MaskedViews("none"), None)}
    for fill in ("high_pass", "blur", "mean"):
        out[f"masking ({fill})"] = (MaskedViews(fill, hard_negatives=False), grid)
    out["masking (high_pass) + cache"] = (MaskedViews("high_pass", hard_negatives=False), full)
    out["masking (high_pass) + hard negatives"] = (MaskedViews("high_pass"), grid)
    out["masking (high_pass) + hard negatives + cache"] = (MaskedViews("high_pass"), full)
    out[f"masking (high_pass) + hard negatives + online SCDA ResNet-50 {size} px"] = (
        MaskedViews("high_pass", scda=SCDA(build_backbone("resnet50", weights=None)).to(device)),
        None,
    )
    # The activation map only has to resolve the 7 x 7 grid: half the input side is a quarter of the cost.
    reduced = SCDA(build_backbone("resnet50", weights=None), input_size=size // 2, output_size=size // 32)
    out[f"masking (high_pass) + hard negatives + online SCDA ResNet-50 {size // 2} px"] = (
        MaskedViews("high_pass", scda=reduced.to(device)),
        None,
    )
    if offline_weights_path("efficientnet_lite0") is not None:
        lite = SCDA(build_backbone("efficientnet_lite0", "imagenet"), input_size=128, output_size=size // 32)
        out["masking (high_pass) + hard negatives + online SCDA Lite0 128 px"] = (
            MaskedViews("high_pass", scda=lite.to(device)),
            None,
        )
    return out


def make_step(model: MoCo, optimizer, masker: MaskedViews, saliency, query, key) -> Callable[[], None]:
    def step() -> None:
        views = make_views(masker, saliency, query, key)()
        out = model(views.query, views.key, views.hard_negatives, views.hard_negative_valid)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


def make_views(masker: MaskedViews, saliency, query, key) -> Callable[[], MaskedViewsOutput]:
    if saliency is None:
        return lambda: masker(query, key)
    return lambda: masker(query, key, saliency, saliency)


def measure(arch: str, args: argparse.Namespace, device: torch.device) -> tuple[dict, dict, dict, float]:
    """Per variant, ``repeats`` rounds of: a MoCo v2 step without masking, the variant's step and its
    ``MaskedViews`` call alone, back to back (the order alternates between rounds and the variants rotate),
    so that each variant is compared with the baseline step timed next to it."""
    torch.manual_seed(0)
    model = MoCo(build_encoder(arch), queue_size=args.queue).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.015, momentum=0.9, weight_decay=1e-4)
    query = torch.randn(args.batch, 3, args.size, args.size, device=device)
    key = torch.randn(args.batch, 3, args.size, args.size, device=device)
    steps, views = {}, {}
    for name, (masker, saliency) in variants(args.batch, args.size, device).items():
        if name != BASELINE and not all(part in name for part in args.only):
            continue
        steps[name] = make_step(model, optimizer, masker, saliency, query, key)
        views[name] = make_views(masker, saliency, query, key)
    baseline = steps.pop(BASELINE)
    views.pop(BASELINE)
    for call in [baseline, *steps.values(), *views.values()]:  # warm-up
        call()
    step_ms = {name: [] for name in steps}
    paired_ms = {name: [] for name in steps}
    views_ms = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(args.repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            order = [("base", baseline), ("step", steps[name]), ("views", views[name])]
            for kind, call in order if round_ % 2 == 0 else order[::-1]:
                synchronize(device)
                start = time.perf_counter()
                call()
                synchronize(device)
                elapsed = (time.perf_counter() - start) * 1e3
                {"base": paired_ms, "step": step_ms, "views": views_ms}[kind][name].append(elapsed)
    loader_ms = _median_ms(cache_step(args.batch), args.repeats)
    return step_ms, paired_ms, views_ms, loader_ms


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def target(name: str, added: float, share: float | None) -> str:
    """The issue's targets: masking alone and masking with the cache under 5 % of the step (the
    ``MaskedViews`` call's share, the direct measure; ``added`` is noisier); online SCDA well under the
    paper's +64 %."""
    if name == BASELINE:
        return "-"
    if "online SCDA" in name:
        return f"{'met' if added < 0.64 else 'missed'} (< +64 %; {added / 0.64:.2f} of the paper's)"
    if "hard negatives" in name:
        return "- (adds an encoder forward)"
    return f"{'met' if share is not None and share < 0.05 else 'missed'} (share < 5 %)"


def section(arch: str, steps: dict, paired: dict, views: dict, loader_ms: float, args: argparse.Namespace) -> str:
    base = statistics.median(value for values in paired.values() for value in values)
    rows = [[BASELINE, f"{base:.0f}", "-", "-", "-", "-"]]
    for name, values in steps.items():
        added = median_ratio(values, paired[name]) - 1.0
        share = median_ratio(views[name], paired[name])
        masking = f"{statistics.median(views[name]):.0f} ({share:.1%})"
        loader = f"{loader_ms:.0f} ({loader_ms / base:.1%})" if name.endswith("+ cache") else "-"
        rows.append(
            [name, f"{statistics.median(values):.0f}", f"{added:+.1%}", masking, target(name, added, share), loader]
        )
    header = [
        "step",
        "ms (median)",
        "added vs MoCo v2",
        "MaskedViews call alone: ms (vs MoCo v2 step)",
        "target",
        "loader work per step, in workers: ms (vs step)",
    ]
    return f"### {arch}, batch {args.batch} x {args.size} px, {args.repeats} interleaved rounds\n\n" + markdown_table(
        header, rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--queue", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="+", default=[], help="time only the variants whose name holds these words")
    parser.add_argument("--name", default="moco_step", help="section file: results/<name>.md")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results/<name>.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sections = [
        "## 5. End to end: one MoCo v2 step\n\n"
        "Each variant's step is timed back to back with a MoCo v2 step without masking and with its "
        "`MaskedViews` call alone (saliency, masks, fills, filters), in rounds; `added` is the median of "
        "the per-round ratio to that baseline step, minus one, and the `MaskedViews` share is the direct "
        "measure of the masking's cost (a difference of two step times carries the noise of both). The paper reports "
        "+64 % per epoch for its high-pass recipe with online SCDA (9 vs 5.5 min on 4 GPUs) and +36 % for "
        "mean filling. The cache row's loader work runs in DataLoader workers, in parallel with the step; "
        "it is hidden as long as the workers keep up."
    ]
    for arch in args.archs:
        steps, paired, views, loader_ms = measure(arch, args, device)
        sections.append(section(arch, steps, paired, views, loader_ms, args))
        print(sections[-1], flush=True)
    if not args.no_write:
        command = ("python benchmarks/moco_step.py " + " ".join(sys.argv[1:])).strip()
        print(f"wrote {write_report(args.name, 'End to end MoCo v2 step', command, device, sections)}")


if __name__ == "__main__":
    main()
