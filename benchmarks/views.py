"""The cost of drawing the main job's views: a batch at a time (``BatchViews``) against torchvision's per-image
v2 pipeline, and both against one training step of the main job's encoder.

    python benchmarks/views.py                  # the main job's defaults, writes results/views.md
    python benchmarks/views.py --repeats 3      # quick

The images are the main job's training images as ``examples/pretrain.py`` holds them (uint8 tensors of the
synthetic shapes, 32 px). One call draws one view of each of ``--batch`` images: ``BatchViews`` in one call
on the batch, the v2 pipeline of ``pretrain.augmentation`` once per image (what a data worker does per
item). The training step is one SimCLR step of the main job's model and optimiser on two such batches of
views, forward and backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation
from _common import markdown_table, time_call, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="images per call (default: the main job's 128)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results/views.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    pretrain = ablation.example_module("pretrain")
    config, _ = pretrain.resolve_config(["--batch-size", str(args.batch)])
    splits = {key: config[key] for key in ("image_size", "train_images", "val_images", "seed")}
    images = pretrain.in_memory_training_set(config, device, False, splits).tensors[0][: args.batch]
    if len(images) < args.batch:
        raise SystemExit(f"--batch: at most {len(images)} training images, got {args.batch}")

    batch_views, per_image = pretrain.batch_views(config), pretrain.augmentation(config)
    generator = torch.Generator().manual_seed(0)
    model = pretrain.build_model(config, world_size=1, on_gpu=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    query, _ = batch_views(images, None, generator)
    key, _ = batch_views(images, None, generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(query, key).loss.backward()
        optimizer.step()

    timings = {
        "BatchViews, one call per batch": time_call(lambda: batch_views(images, None, generator), device, args.repeats),
        "torchvision v2, one call per image": time_call(
            lambda: torch.stack([per_image(image) for image in images]), device, args.repeats
        ),
        "one training step (2 x batch views, forward + backward + AdamW)": time_call(step, device, args.repeats),
    }
    step_ms = timings["one training step (2 x batch views, forward + backward + AdamW)"]
    rows = [[name, f"{ms:.1f}", f"{ms / args.batch * 1e3:.0f}", f"{ms / step_ms:.2f}x"] for name, ms in timings.items()]
    section = (
        f"## Drawing the main job's views\n\n{args.batch} views of {config['image_size']} px (crop, flip, colour "
        f"jitter with hue, grayscale, normalisation), median of {args.repeats} calls, torch threads "
        f"{torch.get_num_threads()}. The v2 pipeline draws one view per image (a training step needs two "
        "views of each image).\n\n"
        + markdown_table(["what", "ms per call", "µs per image", "vs one training step"], rows)
    )
    print(section)
    if not args.no_write:
        command = ("python benchmarks/views.py " + " ".join(sys.argv[1:])).strip()
        print(f"wrote {write_report('views', 'Views of data held in memory', command, device, [section])}")


if __name__ == "__main__":
    main()
