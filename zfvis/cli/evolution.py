"""``zfvis evolution``: how features evolve during training (ZF Fig. 4).

For each feature map of a layer, the strongest activation over a set of images is
projected to pixel space, at each checkpoint given: one column per checkpoint, one row
per feature map. The command parses and checks; :mod:`zfvis.evolution` computes and
draws.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from torch import nn

from ..analysis.evolution import evolution, load_images, sample_images
from ..core.deconvnet import Deconvnet
from ..io.checks import check_input_size, check_int, check_memory
from ..io.images import default_image
from ..models.checkpoints import check_checkpoint_file
from ..models.zoo import Preprocess
from ..viz.evolution import evolution_figure
from ._common import CLIError, add_config_arg, add_output_args, parse_channels, whole
from .models import (
    check_model_name,
    fit_input_size,
    load_zoo_model,
    resolve_device,
    resolve_layer,
)
from .outputs import check_output, write_settings

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evolution", help="strongest projection of each feature map at each training checkpoint")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="state dicts / checkpoints, in training order")
    p.add_argument("--model", default="zfnet-cifar10", help="architecture of the checkpoints (default zfnet-cifar10)")
    p.add_argument("--dataset", help="images to search (directory or list file; default: the shipped photo)")
    p.add_argument("--layer", required=True, help="layer name or alias")
    p.add_argument("--channels", default="0-15", help="feature maps to show, e.g. 0-15,32 (default 0-15)")
    p.add_argument("--limit", type=whole, default=512, help="use at most N images, evenly spread over the data set (default 512)")
    p.add_argument("--input-size", type=whole, help="side of the square input (default: the model's own)")
    p.add_argument("--device", default="cpu")
    add_output_args(p, "zfvis_evolution.png")
    add_config_arg(p)
    p.set_defaults(func=run)


def _image_paths(dataset: str | None, limit: int) -> list[Path]:
    """The images to search: ``limit`` evenly spaced over the data set (every class, the last included)."""
    return [default_image()] if dataset is None else sample_images(dataset, limit)


def _check_args(args: argparse.Namespace) -> list[tuple[int, int]]:
    if not args.checkpoints:
        raise CLIError("no CHECKPOINT given: pass the training checkpoints in training order")
    check_model_name(args.model)
    check_int("--limit", args.limit, 1)
    if args.input_size is not None:
        check_input_size(args.input_size)
    for ck in args.checkpoints:
        check_checkpoint_file(ck, "checkpoint")
    return parse_channels(args.channels)  # type: ignore[return-value]


def _first_model(args: argparse.Namespace, device: torch.device, count: int) -> tuple[nn.Module, Preprocess]:
    """The first checkpoint's model, with the layer and input size checked, and the preprocessing to use."""
    model, preprocess = load_zoo_model(args.model, args.checkpoints[0], device)
    dn = Deconvnet(model)
    resolve_layer(dn, args.layer)
    own = preprocess.crop or 224
    if args.input_size:
        fit_input_size(dn, model, args.layer, args.input_size, own, args.model)
    side = args.input_size or own
    check_memory(count * 3 * side * side * 4, torch.device("cpu"), f"{count} images of {side}x{side}",
                 "--limit or --input-size")  # the images are held on the CPU
    return model, preprocess.with_size(args.input_size) if args.input_size else preprocess


def run(args: argparse.Namespace) -> int:
    out = check_output(args.output, overwrite=args.overwrite)
    device = resolve_device(args.device)
    ranges = _check_args(args)
    paths = _image_paths(args.dataset, args.limit)
    first, preprocess = _first_model(args, device, len(paths))
    images = load_images(paths, preprocess, progress=len(paths) > 50)
    later = (load_zoo_model(args.model, ck, device)[0] for ck in args.checkpoints[1:])  # one model at a time
    evo = evolution(itertools.chain([first], later), images.batch.to(device), args.layer, ranges,
                    labels=[Path(c).stem for c in args.checkpoints], progress=True)
    evolution_figure(evo, model_name=args.model, path=out)
    write_settings(out.with_suffix(".json"), {**vars(args), "channels": evo.channels, "output": str(out)})
    skipped = len(images.skipped)
    searched = f"{len(images.paths)} images" + (f" ({skipped} unreadable, skipped)" if skipped else "")
    print(f"wrote {out} ({len(evo.channels)} feature maps x {len(args.checkpoints)} checkpoints, searched {searched})")
    return 0
