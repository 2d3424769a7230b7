"""kNN evaluation of a pretraining checkpoint: weighted k-nearest neighbours on frozen features.

The training images (without augmentation) form the labelled bank, the validation images are classified
by their ``k`` most similar bank entries, each weighted by ``exp(cosine / T)`` (by default the k and T
the pretraining's own monitor used: 200 and 0.1, the monitor of InstDisc and MoCo). The encoder, its
input filter and the data come from the checkpoint's recorded settings::

    python examples/knn_eval.py outputs/pretrain_moco_synthetic/checkpoint.pt
    torchrun --nproc_per_node=4 examples/knn_eval.py CKPT --data /datasets/imagenet100
"""

from __future__ import annotations

import argparse
import logging

# The scripts' shared helpers: examples/_common.py (a script's own folder is on sys.path when it runs).
from _common import (
    IN_MEMORY,
    evaluation_transform,
    finish,
    ordered_loader,
    pretraining_dataset,
    pretraining_splits,
    run,
    setup_logging,
)

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
    add("--k", type=int, default=None, help="neighbours (default: the pretraining monitor's, else 200)")
    add("--temperature", type=float, default=None, help="weight temperature (default: the monitor's, else 0.1)")
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
    checkpoint = load_checkpoint(args.checkpoint)
    trained = checkpoint["config"]
    k = trained.get("knn_k", 200) if args.k is None else args.k
    temperature = trained.get("knn_temperature", 0.1) if args.temperature is None else args.temperature
    for name, value in (("k", k), ("batch_size", args.batch_size)):
        if value < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
    if not temperature > 0:
        raise SystemExit(f"--temperature: must be positive, got {temperature}")
    device = init_distributed(args.device)
    rank = get_rank()
    setup_logging(rank)
    encoder = pretrained_encoder(checkpoint).to(device)
    input_filter = input_filter_of(trained, enabled=args.input_filter)
    if input_filter is not None:
        logger.info("applying %r to every input (pretraining strategy %r)", input_filter, trained.get("strategy"))

    resize = pretraining_dataset(trained, args.data) not in IN_MEMORY
    transform = evaluation_transform(args.image_size or trained["image_size"], resize=resize)
    bank, queries, num_classes = pretraining_splits(
        trained, transform, transform, data=args.data, image_size=args.image_size
    )
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
        encoder, *loaders, num_classes, k=k, temperature=temperature, device=device, transform=input_filter,
        progress=rank == 0,
    )  # fmt: skip
    if rank == 0:
        print(
            f"kNN top-1: {top1:.2f}% (k={k}, T={temperature}, {len(bank)} bank and {len(queries)} "
            f"validation images) for {args.checkpoint}"
        )
    return finish()


if __name__ == "__main__":
    run(main)
