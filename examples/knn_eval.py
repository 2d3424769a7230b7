"""kNN evaluation of a pretraining checkpoint: weighted k-nearest neighbours on frozen features.

The training images (without augmentation) form the labelled bank, the validation images are classified
by their ``k`` most similar bank entries, each weighted by ``exp(cosine / T)`` (k=200, T=0.1, the monitor
of InstDisc and MoCo). The encoder and its input filter come from the checkpoint's recorded settings::

    python examples/knn_eval.py outputs/pretrain_moco_synthetic/checkpoint.pt
    torchrun --nproc_per_node=4 examples/knn_eval.py CKPT --data /datasets/imagenet100
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

# The scripts' shared helpers: examples/_common.py (a script's own folder is on sys.path when it runs).
from _common import evaluation_transform, finish, image_folder_splits, ordered_loader, run, setup_logging

from salmask.data import SyntheticShapes
from salmask.distributed import get_rank, init_distributed
from salmask.ssl import (
    input_filter_of,
    knn_top1,
    load_checkpoint,
    pretrained_encoder,
)

logger = logging.getLogger("knn_eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("checkpoint", help="pretraining checkpoint")
    add("--data", help="ImageFolder root with train/ and val/ (default: the pretraining data)")
    add("--k", type=int, default=200, help="neighbours (default: 200)")
    add("--temperature", type=float, default=0.1, help="weight temperature (default: 0.1)")
    add("--image-size", type=int, default=None, help="default: the pretraining view size")
    add("--batch-size", type=int, default=256, help="images per forward and rank (default: 256)")
    add("--workers", type=int, default=None, help="data-loading processes per rank (default: the pretraining's)")
    add(
        "--input-filter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="high-pass filter the inputs (default: when the encoder was pretrained on filtered views)",
    )
    add("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default: auto)")
    add("--on-bad-image", choices=("fail", "skip"), default="fail", help="unreadable images (default: fail)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("k", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if not args.temperature > 0:
        raise SystemExit(f"--temperature: must be positive, got {args.temperature}")
    device = init_distributed(args.device)
    rank = get_rank()
    setup_logging(rank)
    checkpoint = load_checkpoint(args.checkpoint)
    trained = checkpoint["config"]
    encoder = pretrained_encoder(checkpoint).to(device)
    input_filter = input_filter_of(trained, enabled=args.input_filter)
    if input_filter is not None:
        logger.info("applying %r to every input (pretraining strategy %r)", input_filter, trained.get("strategy"))

    size = args.image_size or trained["image_size"]
    data = args.data or trained.get("data")
    transform = evaluation_transform(size, resize=data is not None)
    if data is None:
        common = {"image_size": size, "seed": trained.get("seed", 0), "transform": transform, "in_memory": True}
        bank = SyntheticShapes("train", num_images=trained.get("synthetic_train_size"), **common)
        queries = SyntheticShapes("val", num_images=trained.get("synthetic_val_size"), **common)
        num_classes = bank.num_classes
    else:
        if not (Path(data) / "train").is_dir():
            raise SystemExit(f"--data: {data} has no train/ folder (expected an ImageFolder root with train/ and val/)")
        bank, queries = image_folder_splits(data, transform, transform)
        num_classes = len(bank.classes)
    workers = trained.get("workers", 4) if args.workers is None else args.workers
    loaders = [
        ordered_loader(
            dataset,
            args.batch_size,
            on_bad_image=args.on_bad_image,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        for dataset in (bank, queries)
    ]
    # Features of a large bank take minutes: a bar per pass (bank, then validation images) on rank 0.
    top1 = knn_top1(
        encoder, *loaders, num_classes, k=args.k, temperature=args.temperature, device=device, transform=input_filter,
        progress=rank == 0,
    )  # fmt: skip
    if rank == 0:
        print(
            f"kNN top-1: {top1:.2f}% (k={args.k}, T={args.temperature}, {len(bank)} bank and {len(queries)} "
            f"validation images) for {args.checkpoint}"
        )
    return finish()


if __name__ == "__main__":
    run(main)
