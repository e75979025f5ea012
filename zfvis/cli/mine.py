"""`zfvis mine`: the top-k activations of every channel over a data set (ZF Fig. 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import RULES, CLIError, add_config_arg, add_model_args, command_parser, parse_channels, whole

__all__ = ["MAX_TOP", "add_parser", "run"]

#: Largest --top: each entry is a projection and two tiles per channel.
MAX_TOP = 1000


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "mine",
        "Streams a data set through the model, keeps the k strongest activations of every "
        "channel (at most one per image), projects them to pixel space and writes topk.json, one "
        "figure per layer (pages of 64 channels), the tiles and a static HTML gallery (index.html). "
        "Interrupted (Ctrl-C, kill), the same command resumes the run.",
        ["zfvis mine zfvis/assets/cifar10_sample --layers conv3 --channels 0-7 --limit 100 -o runs/mine-demo"
         "   # the shipped images",
         "zfvis mine zfvis/assets/cifar10_sample --layers conv1,conv5 --top 4 --limit 50 -o runs/mine-small"
         "   # two layers, top 4"],
    )
    p.add_argument("dataset", nargs="?", metavar="DATASET", help="folder of images (searched recursively) or a text file of paths")
    add_model_args(p)
    p.add_argument("--layers", help="comma-separated layer names or aliases, e.g. conv1,conv3 (required)")
    p.add_argument("--top", type=whole, default=9, help="activations kept per channel (default 9; the figures show 9)")
    p.add_argument("--channels", help="channels to mine in every layer, e.g. 0-15,32,40 (default: all)")
    p.add_argument("--batch-size", type=whole, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=whole, default=0, help="image-loading worker processes (default 0)")
    p.add_argument("--limit", type=whole, help="use only N images, evenly spaced over the sorted file list (every class of a class-folder layout)")
    p.add_argument("--input-size", type=whole, help="square input side (default: the model's preprocessing)")
    p.add_argument("--state-every", type=whole, default=20, help="save resumable state every N batches, and at least every minute (default 20)")
    p.add_argument("--rule", default="deconvnet", choices=list(RULES),
                   help="how ReLUs pass the signal back in the projections: deconvnet (default), guided, gradient")
    p.add_argument("--feature-vis", action="store_true",
                   help="also optimise, for every mined channel, a synthetic image that maximises it (feature "
                        "visualization), shown beside its top 9 in the figures and the gallery")
    p.add_argument("--feature-vis-steps", type=whole, default=256,
                   help="optimisation steps of each synthetic image (default 256; with --feature-vis)")
    p.add_argument("--restart", action="store_true", help="start again: discard a saved state in OUTDIR, also of a run with other settings")
    p.add_argument("--overwrite", action="store_true", help="write into an OUTDIR that holds files zfvis did not write")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or summary")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="output folder (required)")
    add_config_arg(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> tuple[Path, list[str], Path]:
    """The checks that need no model: numbers, the data set's kind, the output's kind."""
    from ..io.checks import check_input_size, check_int
    from ..io.images import check_data_set

    check_int("--top", args.top, 1, MAX_TOP)
    check_int("--batch-size", args.batch_size, 1, 1 << 16)
    check_int("--workers", args.workers, 0, 256)
    check_int("--state-every", args.state_every, 1)
    check_int("--feature-vis-steps", args.feature_vis_steps, 1, 100_000)
    if args.limit is not None:
        check_int("--limit", args.limit, 1)
    if args.input_size is not None:
        check_input_size(args.input_size)
    if not args.dataset:
        raise CLIError("no DATASET given: pass a folder of images or a text file of paths (or `dataset` in --config)")
    if not args.layers:
        raise CLIError("--layers is required, e.g. --layers conv1,conv3")
    if not args.output:
        raise CLIError("-o/--output OUTDIR is required")
    dataset = check_data_set(args.dataset)
    layers = list(dict.fromkeys(s.strip() for s in str(args.layers).split(",") if s.strip()))
    if not layers:
        raise CLIError("--layers names no layer; e.g. --layers conv1,conv3")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"output '{out}' exists and is not a folder")
    return dataset, layers, out


def run(args: argparse.Namespace) -> int:
    from ..core.deconvnet import Deconvnet
    from ..mining.pipeline import MineSettings, mine
    from ..models.zoo import get_spec
    from .models import fit_input_size, load_zoo_model, resolve_device, resolve_layer

    dataset, layers, out = _check_args(args)
    channels = parse_channels(args.channels) if args.channels else None
    device = resolve_device(args.device)
    model, preprocess = load_zoo_model(args.model, args.weights, device)
    dn = Deconvnet(model)
    for layer in layers:
        resolve_layer(dn, layer)
        if args.input_size is not None:
            fit_input_size(dn, model, layer, args.input_size, preprocess.crop or 224, args.model)
    if args.input_size is not None:
        preprocess = preprocess.with_size(args.input_size)
    record = {**{k: v for k, v in vars(args).items() if k != "func"},
              "layers": layers, "input_size": preprocess.crop, "device": str(device)}
    settings = MineSettings(
        layers=layers, out_dir=out, top=args.top, channels=channels, batch_size=args.batch_size,
        workers=args.workers, device=device, limit=args.limit, state_every=args.state_every,
        progress=not args.no_progress, restart=args.restart, overwrite=args.overwrite, model_name=args.model,
        rule=args.rule, feature_vis=args.feature_vis, feature_vis_steps=args.feature_vis_steps,
        weights=args.weights or f"{get_spec(args.model).default_weights} (default)", record=record,
        option_names=True,
    )
    mine(model, preprocess, dataset, settings=settings)
    return 0
