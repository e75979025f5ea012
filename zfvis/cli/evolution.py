"""``zfvis evolution``: how features evolve during training (ZF Fig. 4).

For each feature map of a layer, the strongest activation over a set of images is
projected to pixel space, at each checkpoint given: one column per checkpoint, one row
per feature map.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .. import default_image
from ..checkpoints import check_checkpoint_file
from ..checks import check_channels, check_input_size, check_int
from ..data import evenly_spaced, list_images, load_image, resolve
from ..engine import Deconvnet
from ..mining import crop_winners, make_seeds
from ..render import grid_figure, normalize_projection
from ..topk import strongest
from ._common import (
    CLIError,
    add_config_arg,
    add_output_args,
    check_model_name,
    check_output,
    fit_input_size,
    load_zoo_model,
    parse_channels,
    progress,
    resolve_device,
    resolve_layer,
    write_settings,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evolution", help="strongest projection of each feature map at each training checkpoint")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="state dicts / checkpoints, in training order")
    p.add_argument("--model", default="zfnet-cifar10", help="architecture of the checkpoints (default zfnet-cifar10)")
    p.add_argument("--dataset", help="images to search (directory or list file; default: the shipped photo)")
    p.add_argument("--layer", required=True, help="layer name or alias")
    p.add_argument("--channels", default="0-15", help="feature maps to show, e.g. 0-15,32 (default 0-15)")
    p.add_argument("--limit", type=int, default=512, help="use at most N images, evenly spread over the data set (default 512)")
    p.add_argument("--input-size", type=int, help="side of the square input (default: the model's own)")
    p.add_argument("--device", default="cpu")
    add_output_args(p, "zfvis_evolution.png")
    add_config_arg(p)
    p.set_defaults(func=run)


def _image_paths(dataset: str | None, limit: int) -> list[Path]:
    if dataset is None:
        return [default_image()]
    found = list_images(dataset)
    return [resolve(dataset, found[i]) for i in evenly_spaced(len(found), limit)]  # every class, the last included


def _check_memory(count: int, side: int) -> None:
    need = count * 3 * side * side * 4
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have // 2:
        raise CLIError(f"{count} images of {side}x{side} need {need / 2**30:.1f} GiB in memory, more than half of the "
                       f"{have / 2**30:.1f} GiB here; lower --limit or --input-size")


def _load_images(paths: list[Path], preprocess, show: bool) -> tuple[torch.Tensor, list[str], int]:
    """The readable images as one batch, their names, and how many were skipped."""
    tensors, names = [], []
    with progress(len(paths), "reading images", "img", show=show and len(paths) > 50) as bar:
        for path in paths:
            try:
                tensors.append(preprocess(load_image(path)))
                names.append(str(path))
            except (ValueError, FileNotFoundError):
                pass
            bar.update(1)
    if not tensors:
        raise CLIError(f"none of the {len(paths)} images is readable")
    return torch.stack(tensors), names, len(paths) - len(tensors)


def _column(dn: Deconvnet, images: torch.Tensor, layer: str, channels: list[int]) -> list[torch.Tensor | None]:
    """One checkpoint's column: each channel's strongest activation, projected and cropped."""
    best = strongest(dn, images, layer, channels)
    winners = sorted(set(best.image.tolist()))
    where = {i: j for j, i in enumerate(winners)}
    rows = [(where[int(i)], c, int(yy), int(xx), float(v))
            for i, c, yy, xx, v in zip(best.image, channels, best.y, best.x, best.value)]
    crops = crop_winners(dn, images[winners], layer, make_seeds(rows, images.device))
    return [normalize_projection(p.float()) if float(v) > 0 else None for (p, _, _), v in zip(crops, best.value)]


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


def run(args: argparse.Namespace) -> int:
    out = check_output(args.output, overwrite=args.overwrite)
    device = resolve_device(args.device)
    ranges = _check_args(args)
    paths = _image_paths(args.dataset, args.limit)
    columns: list[list[torch.Tensor | None]] = []
    channels: list[int] = []
    skipped = 0
    with progress(len(args.checkpoints), "checkpoints", "ckpt") as bar:
        for ck in args.checkpoints:
            model, preprocess = load_zoo_model(args.model, ck, device)
            dn = Deconvnet(model)
            own = preprocess.crop or 224
            if not columns:
                resolve_layer(dn, args.layer)
                if args.input_size:
                    fit_input_size(dn, model, args.layer, args.input_size, own, args.model)
                _check_memory(len(paths), args.input_size or own)
                sized = preprocess.with_size(args.input_size) if args.input_size else preprocess
                images, _, skipped = _load_images(paths, sized, True)
                images = images.to(device)
                count = dn.record(images[:1], args.layer).output.shape[1]
                channels = check_channels(ranges, count, args.layer)
            columns.append(_column(dn, images, args.layer, channels))
            bar.update(1)
    grid_figure(
        [[col[r] for col in columns] for r in range(len(channels))],
        out,
        row_labels=[f"ch {c}" for c in channels],
        col_labels=[Path(c).stem for c in args.checkpoints],
        title=f"{args.model} {args.layer}: strongest activation per feature map, by checkpoint (blank: never active)",
    )
    write_settings(out.with_suffix(".json"), {**vars(args), "channels": channels, "output": str(out)})
    searched = f"{len(images)} images" + (f" ({skipped} unreadable, skipped)" if skipped else "")
    print(f"wrote {out} ({len(channels)} feature maps x {len(args.checkpoints)} checkpoints, searched {searched})")
    return 0
