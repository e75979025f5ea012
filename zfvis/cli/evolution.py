"""``zfvis evolution``: how features evolve during training (ZF Fig. 4).

For each feature map of a layer, the strongest activation over a set of images is
projected to pixel space, at each checkpoint given: one column per checkpoint, one row
per feature map. With no CHECKPOINT it draws the training snapshots shipped with zfvis
(:mod:`zfvis.models.snapshots`) over the CIFAR-10 images shipped with it. The command
parses and checks; :mod:`zfvis.analysis.evolution` computes and :mod:`zfvis.viz.evolution`
draws.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import CLIError, add_config_arg, add_output_args, command_parser, parse_channels, whole
from .outputs import check_output, write_settings

if TYPE_CHECKING:  # torch loads when the command runs, not for --help
    import torch
    from torch import nn

    from ..models.snapshots import Snapshots
    from ..models.zoo import Preprocess

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "evolution",
        "For each feature map of a layer, finds its strongest activation over a set of images at each "
        "checkpoint and projects it to pixel space: one row per feature map, one column per checkpoint. With no "
        "CHECKPOINT it draws the training snapshots shipped with zfvis (zfnet-cifar10 through conv2) over the "
        "500 CIFAR-10 test images shipped with it, offline.",
        ["zfvis evolution --limit 200 -o zfvis_evolution.png  # the shipped snapshots, conv2, maps 0-15, 200 images",
         "zfvis evolution --channels 0-5 --limit 100 -o evo.png   # fewer maps, searched over 100 images"],
    )
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                   help="state dicts / checkpoints, in training order (default: the training snapshots shipped with "
                   "zfvis, zfnet-cifar10 after epochs 1, 2, 3 and 5 of a short run)")
    p.add_argument("--model", default="zfnet-cifar10", help="architecture of the checkpoints (default zfnet-cifar10)")
    p.add_argument("--dataset", help="images to search (directory or list file; default for zfnet-cifar10: the 500 "
                   "CIFAR-10 test images shipped with zfvis, for other models the shipped photo)")
    p.add_argument("--layer", help="layer name or alias (required with CHECKPOINTs; default for the shipped "
                   "snapshots: conv2)")
    p.add_argument("--channels", default="0-15", help="feature maps to show, e.g. 0-15,32 (default 0-15)")
    p.add_argument("--limit", type=whole, default=512, help="use at most N images, evenly spread over the data set (default 512)")
    p.add_argument("--input-size", type=whole, help="side of the square input (default: the model's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add_output_args(p, "zfvis_evolution.png")
    add_config_arg(p)
    p.set_defaults(func=run)


def _image_paths(args: argparse.Namespace) -> list[Path]:
    """The images to search: ``limit`` evenly spaced over the data set (every class, the last included)."""
    from ..analysis.evolution import sample_images
    from ..io.images import default_dataset, default_image

    if args.dataset is not None:
        return sample_images(args.dataset, args.limit)
    return sample_images(default_dataset(), args.limit) if args.model == "zfnet-cifar10" else [default_image()]


def _check_args(args: argparse.Namespace) -> list[tuple[int, int]]:
    from ..io.checks import check_input_size, check_int
    from ..models.checkpoints import check_checkpoint_file
    from .models import check_model_name

    check_model_name(args.model)
    if not args.checkpoints and args.model != "zfnet-cifar10":
        raise CLIError(f"zfvis ships training snapshots of zfnet-cifar10 only: pass the checkpoints of a "
                       f"{args.model} training run (CHECKPOINT...), or leave out --model")
    if args.checkpoints and args.layer is None:
        raise CLIError("--layer is required with CHECKPOINTs: name the layer whose feature maps to show (e.g. conv2)")
    check_int("--limit", args.limit, 1)
    if args.input_size is not None:
        check_input_size(args.input_size)
    for ck in args.checkpoints:
        check_checkpoint_file(ck, "checkpoint")
    return parse_channels(args.channels)  # type: ignore[return-value]


def _snapshots(args: argparse.Namespace, device: torch.device) -> Snapshots:
    """The shipped snapshots, on ``device``; the layer must lie within the layers they hold."""
    import torch

    from ..core.deconvnet import Deconvnet
    from ..models.snapshots import training_snapshots
    from .models import resolve_layer

    snaps = training_snapshots()
    args.layer = args.layer or snaps.through
    dn = Deconvnet(snaps.models[0])
    resolve_layer(dn, args.layer)
    out = dn.output(torch.zeros(1, 3, 32, 32), args.layer)
    if not torch.isfinite(out).all():
        raise CLIError(f"the shipped snapshots hold zfnet-cifar10's weights through {snaps.through} only, not "
                       f"{args.layer}: choose --layer {snaps.through} or an earlier layer, or pass the checkpoints of "
                       "your own training run (scripts/train.py --save-epochs)")
    snaps.models = [m.to(device) for m in snaps.models]
    return snaps


def _first_model(args: argparse.Namespace, device: torch.device, count: int, *,
                 model: nn.Module | None = None) -> tuple[nn.Module, Preprocess]:
    """The first checkpoint's model, with the layer and input size checked, and the preprocessing to use."""
    import torch

    from ..core.deconvnet import Deconvnet
    from ..io.checks import check_memory
    from ..models.zoo import get_spec
    from .models import fit_input_size, load_zoo_model, resolve_layer

    if model is None:
        model, preprocess = load_zoo_model(args.model, args.checkpoints[0], device)
    else:
        preprocess = get_spec(args.model).preprocess
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
    from ..analysis.evolution import evolution, load_images
    from ..viz.evolution import evolution_figure
    from .models import load_zoo_model, resolve_device

    out = check_output(args.output, overwrite=args.overwrite)
    device = resolve_device(args.device)
    ranges = _check_args(args)
    snaps = None if args.checkpoints else _snapshots(args, device)
    paths = _image_paths(args)
    if snaps is None:
        first, preprocess = _first_model(args, device, len(paths))
        later = (load_zoo_model(args.model, ck, device)[0] for ck in args.checkpoints[1:])  # one model at a time
        models, labels = itertools.chain([first], later), [Path(c).stem for c in args.checkpoints]
    else:
        first, preprocess = _first_model(args, device, len(paths), model=snaps.models[0])
        models, labels = iter(snaps.models), snaps.labels
    images = load_images(paths, preprocess, progress=len(paths) > 50)
    evo = evolution(models, images.batch.to(device), args.layer, ranges, labels=labels, progress=True)
    evolution_figure(evo, model_name=args.model, path=out)
    source = "shipped snapshots" if snaps is not None else "checkpoints"
    write_settings(out.with_suffix(".json"), {**vars(args), "channels": evo.channels, "output": str(out),
                                              "source": source, "labels": labels,
                                              **({"snapshots": snaps.command} if snaps is not None else {})})
    skipped = len(images.skipped)
    searched = f"{len(images.paths)} images" + (f" ({skipped} unreadable, skipped)" if skipped else "")
    print(f"wrote {out} ({len(evo.channels)} feature maps x {len(labels)} {source}, {args.layer}, searched {searched})")
    return 0
