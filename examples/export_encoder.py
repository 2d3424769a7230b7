"""Export the encoder of a pretraining checkpoint for transfer: a torchvision / timm state dict or detectron2.

The checkpoint's base encoder (MoCo's query encoder, SimCLR's encoder; no projection head, no
classifier) is written in one of two formats::

    python examples/export_encoder.py outputs/pretrain_moco/checkpoint.pt --out resnet50_salmask.pth
    python examples/export_encoder.py outputs/pretrain_moco/checkpoint.pt --format detectron2 --out r50.pkl

``torchvision``: a plain state dict under torchvision's ResNet names, which timm's ResNets share; it
loads into ``torchvision.models.resnet50()`` with ``strict=False`` (only ``fc`` is missing: the new
task's head) and into ``timm.create_model("resnet50", pretrained=True,
pretrained_cfg_overlay={"file": PATH}, num_classes=N)``.

``detectron2``: the pickle detectron2 reads for its ResNet backbones (``stem.*``, ``res2``-``res5``,
batch norms as ``*.norm``), as facebookresearch/moco's conversion script writes it; point
``MODEL.WEIGHTS`` at it, with ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` and ``INPUT.FORMAT: "RGB"`` for
torchvision's normalisation (moco's detection configs set them).

An encoder pretrained with the high-pass recipe (strategies ``high_pass`` and ``mscn``) has only seen
high-pass filtered images: the script says so, and its inputs downstream need the same filter
(:class:`salmask.HighPassFilter` with the kernel it names).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import sys
from pathlib import Path

import torch

from salmask.ssl import CheckpointError, encoder_state_dict, input_filter_of, load_checkpoint

logger = logging.getLogger("export_encoder")
FORMATS = ("torchvision", "detectron2")


def torchvision_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The encoder's weights under torchvision's ResNet names (without ``fc``), as contiguous CPU tensors."""
    return {name: value.detach().cpu().contiguous() for name, value in encoder_state_dict(checkpoint).items()}


def detectron2_name(name: str) -> str | None:
    """detectron2's name for a torchvision ResNet weight, or ``None`` for a counter detectron2 does not keep.

    >>> detectron2_name("bn1.running_var"), detectron2_name("layer1.0.conv1.weight")
    ('stem.conv1.norm.running_var', 'res2.0.conv1.weight')
    >>> detectron2_name("layer4.0.downsample.1.bias"), detectron2_name("layer2.0.bn3.num_batches_tracked")
    ('res5.0.shortcut.norm.bias', None)
    """
    if name.endswith("num_batches_tracked"):
        return None
    stem = re.fullmatch(r"(conv1|bn1)\.(\w+)", name)
    if stem:
        return f"stem.conv1.{stem.group(2)}" if stem.group(1) == "conv1" else f"stem.conv1.norm.{stem.group(2)}"
    block = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", name)
    if block is None:
        raise ValueError(f"{name!r} is not a weight of a torchvision ResNet trunk")
    stage, index, rest = int(block.group(1)) + 1, block.group(2), block.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    return f"res{stage}.{index}.{rest}"


def detectron2_checkpoint(checkpoint: dict) -> dict:
    """The encoder as detectron2's pickled model dict: numpy weights under detectron2's ResNet names."""
    if checkpoint["config"].get("small_images"):
        raise CheckpointError(
            "the encoder has the small-image stem (a 3x3 conv1 and no max-pool), which detectron2's ResNet stem "
            "cannot load; pretrain with --no-small-images for detection transfer"
        )
    model = {}
    for name, value in torchvision_state_dict(checkpoint).items():
        target = detectron2_name(name)
        if target is not None:
            model[target] = value.numpy()
    return {"model": model, "__author__": "salmask", "matching_heuristics": True}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="pretraining checkpoint (examples/pretrain.py)")
    parser.add_argument("--out", required=True, help="file to write (.pth for torchvision, .pkl for detectron2)")
    parser.add_argument("--format", choices=FORMATS, default="torchvision", help="default: torchvision")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint["config"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "torchvision":
        state = torchvision_state_dict(checkpoint)
        torch.save(state, out)
        logger.info(
            "wrote %d tensors of the %s encoder to %s (torchvision / timm names)", len(state), config["arch"], out
        )
        if config.get("small_images"):
            logger.info(
                "note: the encoder has the small-image stem; load it into salmask.ssl.build_encoder(%r, "
                "small_images=True) or a ResNet whose conv1 is 3x3 with stride 1 and no max-pool",
                config["arch"],
            )
    else:
        exported = detectron2_checkpoint(checkpoint)
        with open(out, "wb") as stream:
            pickle.dump(exported, stream)
        logger.info("wrote %d arrays of the %s encoder to %s (detectron2)", len(exported["model"]), config["arch"], out)
    input_filter = input_filter_of(config)
    if input_filter is not None:
        logger.info(
            "note: the encoder was pretrained on high-pass filtered images; filter its inputs the same way "
            "downstream: salmask.%r",
            input_filter,
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckpointError as error:
        sys.exit(f"error: {error}")
