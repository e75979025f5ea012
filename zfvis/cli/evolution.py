"""``zfvis evolution``: how features evolve during training (ZF Fig. 4).

For each feature map of a layer, the strongest activation over a set of images is
projected to pixel space, at each checkpoint given: one column per checkpoint, one row
per feature map.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from .. import default_image
from ..data import list_images, load_image, resolve
from ..engine import Deconvnet, Seeds
from ..mining import crop_winners, image_maxima, merge_topk
from ..render import grid_figure, normalize_projection
from ..zoo import load_model
from ._common import CLIError, add_config_arg, parse_channels, check_output, resolve_device, write_settings


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
    p.add_argument("-o", "--output", default="zfvis_evolution.png", help="PNG file to write")
    add_config_arg(p)
    p.set_defaults(func=run)


def _load_images(dataset: str | None, limit: int, preprocess) -> tuple[torch.Tensor, list[str]]:
    if dataset is None:
        paths = [default_image()]
    else:
        found = list_images(dataset)
        step = max(1, len(found) // limit)  # spread over the whole (sorted) data set
        paths = [resolve(dataset, p) for p in found[::step][:limit]]
    tensors, names = [], []
    for path in paths:
        try:
            tensors.append(preprocess(load_image(path)))
            names.append(str(path))
        except (ValueError, FileNotFoundError):
            continue
    if not tensors:
        raise CLIError(f"no readable image in '{dataset}'")
    return torch.stack(tensors), names


def strongest(dn: Deconvnet, images: torch.Tensor, layer: str, channels: list[int], batch: int = 128):
    """For each channel, the (value, image index, y, x) of its strongest activation
    (ties: the first image, then the first position, as in mining)."""
    sel = torch.tensor(channels, device=images.device)
    best = None
    for start in range(0, len(images), batch):
        out = dn.record(images[start : start + batch], layer).output
        values, pos = image_maxima(out, sel)
        index = torch.arange(start, start + out.shape[0]).expand_as(values)
        part = {"values": values, "index": index, "pos": pos}
        best = merge_topk([part] if best is None else [best, part], 1)
        width = out.shape[-1] if out.dim() == 4 else 1
    if best is None:
        raise CLIError("no image to search")
    pos = best["pos"][:, 0]
    y = torch.where(pos >= 0, pos // width, -1)
    x = torch.where(pos >= 0, pos % width, -1)
    return best["values"][:, 0], best["index"][:, 0], y, x


def run(args: argparse.Namespace) -> int:
    out = check_output(args.output)
    device = resolve_device(args.device)
    for ck in args.checkpoints:
        if not Path(ck).is_file():
            raise FileNotFoundError(f"checkpoint '{ck}' does not exist")
    if args.limit < 1:
        raise CLIError(f"--limit must be at least 1, got {args.limit}")
    columns: list[list[torch.Tensor | None]] = []
    channels: list[int] = []
    for ck in tqdm(args.checkpoints, desc="checkpoints", unit="ckpt"):
        model, preprocess = load_model(args.model, weights=ck, device=device)
        if args.input_size:
            preprocess = preprocess.with_size(args.input_size)
        if not columns:
            images, _ = _load_images(args.dataset, args.limit, preprocess)
            images = images.to(device)
        dn = Deconvnet(model)
        if not channels:
            count = dn.record(images[:1], args.layer).output.shape[1]
            channels = parse_channels(args.channels, count, args.layer)
        value, index, y, x = strongest(dn, images, args.layer, channels)
        winners = sorted(set(index.tolist()))
        local = torch.tensor([winners.index(int(i)) for i in index], device=device)
        seeds = Seeds(local, torch.tensor(channels, device=device), y.to(device), x.to(device), value.to(device))
        crops = crop_winners(dn, images[winners], args.layer, seeds)
        columns.append([normalize_projection(p.float()) if float(v) > 0 else None for (p, _, _), v in zip(crops, value)])
    cells = [[col[r] for col in columns] for r in range(len(channels))]
    grid_figure(
        cells,
        out,
        row_labels=[f"ch {c}" for c in channels],
        col_labels=[Path(c).stem for c in args.checkpoints],
        title=f"{args.model} {args.layer}: strongest activation per feature map, by checkpoint (blank: never active)",
    )
    write_settings(out.with_suffix(".json"), {**vars(args), "channels": channels, "output": str(out)})
    print(f"wrote {out} ({len(channels)} feature maps x {len(args.checkpoints)} checkpoints)")
    return 0
