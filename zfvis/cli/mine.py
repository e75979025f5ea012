"""`zfvis mine`: the top-k activations of every channel over a data set (ZF Fig. 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engine import Deconvnet
from ..mining import mine
from ..zoo import get_spec, load_model
from ._common import CLIError, add_config_arg, parse_channels, add_model_args, check_output, resolve_device, write_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mine",
        help="top-k activations per channel over a data set, with projections (ZF Fig. 2)",
        description="Streams a data set through the model, keeps the k strongest activations of every "
        "channel (at most one per image), projects them to pixel space and writes topk.json, one "
        "figure per layer (pages of 64 channels), the tiles and a static HTML gallery (index.html).",
    )
    p.add_argument("dataset", nargs="?", metavar="DATASET", help="folder of images (searched recursively) or a text file of paths")
    add_model_args(p)
    p.add_argument("--layers", help="comma-separated layer names or aliases, e.g. conv1,conv3 (required)")
    p.add_argument("--top", type=int, default=9, help="activations kept per channel (default 9)")
    p.add_argument("--channels", help="channels to mine in every layer, e.g. 0-15,32,40 (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=0, help="image-loading worker processes (default 0)")
    p.add_argument("--limit", type=int, help="use only N images, evenly spaced over the sorted file list (every class of a class-folder layout)")
    p.add_argument("--input-size", type=int, help="square input side (default: the model's preprocessing)")
    p.add_argument("--state-every", type=int, default=20, help="save resumable state every N batches (default 20)")
    p.add_argument("--restart", action="store_true", help="discard a saved state in OUTDIR and start again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or summary")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="output folder (required)")
    add_config_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("top", "batch_size", "state_every"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        raise CLIError("--workers must be 0 or more")
    if args.limit is not None and args.limit < 1:
        raise CLIError("--limit must be at least 1")
    if not args.dataset:
        raise CLIError("no DATASET given: pass a folder of images or a text file of paths (or `dataset` in --config)")
    if not args.layers:
        raise CLIError("--layers is required, e.g. --layers conv1,conv3")
    if not args.output:
        raise CLIError("-o/--output OUTDIR is required")
    dataset = Path(args.dataset)
    if not dataset.exists():
        raise CLIError(f"data set '{dataset}' does not exist; pass a folder of images or a text file of paths")
    layers = [s.strip() for s in str(args.layers).split(",") if s.strip()]
    if not layers:
        raise CLIError("--layers names no layer; e.g. --layers conv1,conv3")
    channels = parse_channels(args.channels) if args.channels else None
    device = resolve_device(args.device)
    out = check_output(args.output, directory=True)
    model, preprocess = load_model(args.model, weights=args.weights, device=device)
    if args.input_size is not None:
        preprocess = preprocess.with_size(args.input_size)
    dn = Deconvnet(model)
    for layer in layers:
        dn.resolve(layer)  # unknown layer -> ValueError with the closest names
    write_settings(out / "settings.json", {**vars(args), "layers": layers, "channels": channels,
                                           "input_size": preprocess.crop, "device": str(device)})
    mine(
        model,
        preprocess,
        dataset,
        layers,
        out_dir=out,
        top=args.top,
        channels=channels,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
        limit=args.limit,
        state_every=args.state_every,
        progress=not args.no_progress,
        restart=args.restart,
        model_name=args.model,
        weights=args.weights or f"{get_spec(args.model).default_weights} (default)",
    )
    return 0
