"""``zfvis optimize``: synthetic images that maximise channels (feature visualization by optimization).

Writes ``OUTDIR/feature_vis.png`` (a row of images per layer; with ``--param both``, the
decorrelated Fourier image beside the plain-pixel one) and ``OUTDIR/feature_vis.json`` (the
settings, and per layer and channel the objective reached and its mean every few steps).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import CLIError, add_config_arg, add_model_args, command_parser, parse_channels, whole
from .outputs import check_output

if TYPE_CHECKING:  # torch loads when the command runs, not for --help
    import torch

    from ..analysis.feature_vis import FeatureVisResult
    from ..core.deconvnet import Deconvnet

__all__ = ["FIGURE", "add_parser", "run"]

#: The figure's file name in OUTDIR (the JSON goes beside it).
FIGURE = "feature_vis.png"
#: The most images one figure shows.
MAX_IMAGES = 512


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "optimize",
        "Optimises an image per channel so that it maximises the channel's mean activation "
        "(decorrelated Fourier parameterisation, random jitter, scale and rotation: Olah et al., Distill 2017), "
        f"and writes OUTDIR/{FIGURE} and OUTDIR/feature_vis.json.",
        ["zfvis optimize --layers conv3 --channels 0-3 --steps 16 -o fv/          # four conv3 channels, shipped model",
         "zfvis optimize --layers conv1 --channels 0 --steps 8 --param both -o fv2/  # Fourier beside plain pixels"],
    )
    add_model_args(p)
    p.add_argument("--layers", help="comma-separated layers (default: the middle conv layer)")
    p.add_argument("--channels", default="0-7", help="channels of each layer, e.g. 0-15,32 (default 0-7)")
    p.add_argument("--steps", type=whole, default=256, help="optimisation steps (default 256)")
    p.add_argument("--param", choices=("fourier", "pixel", "both"), default="fourier",
                   help="image parameterisation; both: Fourier beside plain pixels (default fourier)")
    p.add_argument("--input-size", type=whole, help="image side (default: the model's own input size)")
    p.add_argument("--batch-size", type=whole, default=32, help="images optimised together (default 32)")
    p.add_argument("--seed", type=whole, default=0, help="seed of the starting images and transformations (default 0)")
    p.add_argument("--no-transforms", action="store_true", help="no random jitter, scale and rotation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", default="zfvis_optimize", help="output folder (default zfvis_optimize)")
    p.add_argument("--overwrite", action="store_true", help="replace files in OUTDIR that zfvis did not write")
    add_config_arg(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """The checks that need no model."""
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.input_size is not None and not 8 <= args.input_size <= 4096:
        raise CLIError(f"--input-size must be between 8 and 4096, got {args.input_size}")
    if not 0 <= args.seed < 2**63:
        raise CLIError(f"--seed must be between 0 and {2**63 - 1}, got {args.seed}")
    parse_channels(args.channels)


def _layers(args: argparse.Namespace, dn: Deconvnet) -> list[str]:
    from .models import feature_layers, resolve_layer

    if args.layers is None:
        maps, _ = feature_layers(dn)
        if not maps:
            raise CLIError("the model has no convolution; pass --layers")
        return [maps[len(maps) // 2]]
    layers = [s.strip() for s in args.layers.split(",")]
    for layer in layers:
        resolve_layer(dn, layer)  # '' and unknown names are refused, naming the closest
    return list(dict.fromkeys(layers))


def _channel_counts(dn: Deconvnet, layers: list[str], size: int, channels: str, device: torch.device) -> None:
    """Refuses channels out of range before any optimisation runs."""
    import torch

    from ..io.checks import check_channels

    with torch.no_grad():
        outs = dn.forward_outputs(torch.zeros(1, 3, size, size, device=device), layers)
    total = 0
    for layer in layers:
        total += len(check_channels(parse_channels(channels), outs[layer].shape[1], layer))
    if total > MAX_IMAGES:
        raise CLIError(f"{total} channels in all is more than one figure shows ({MAX_IMAGES}); ask for fewer")


def run(args: argparse.Namespace) -> int:
    from ..core.deconvnet import Deconvnet
    from ..models.zoo import get_spec
    from ..viz.feature_vis import feature_vis_figure
    from .models import fit_input_size, load_zoo_model, resolve_device

    _check_args(args)
    device = resolve_device(args.device)
    model, preprocess = load_zoo_model(args.model, args.weights, device)
    dn = Deconvnet(model)
    layers = _layers(args, dn)
    own = preprocess.crop or 224
    size = args.input_size or own
    for layer in layers:  # the size reaches every layer (and the model's own size is not at fault)
        fit_input_size(dn, model, layer, size, own, args.model, memory=False)
    _channel_counts(dn, layers, size, args.channels, device)
    new = not Path(args.output).exists()
    out_dir = check_output(args.output, directory=True)
    try:
        out = check_output(out_dir / FIGURE, overwrite=args.overwrite)
        results = _optimize_all(args, dn, layers, size, preprocess)
    except BaseException:
        if new and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a start that fails (or Ctrl-C) before any result leaves no folder behind
        raise
    weights = args.weights or get_spec(args.model).default_weights
    title = f"{args.model} ({weights}): images maximising each channel's mean, {args.steps} steps"
    main, *other = results.values()
    feature_vis_figure(main, compare=other[0] if other else None, title=title, path=out)
    _write_json(out.with_suffix(".json"), args, results, layers=layers, size=size, weights=weights)
    print(f"wrote {out} (objectives and settings in {out.with_suffix('.json').name})")
    return 0


def _optimize_all(args: argparse.Namespace, dn: Deconvnet, layers: list[str], size: int,
                  preprocess: Any) -> dict[str, list[FeatureVisResult]]:  # fmt: skip
    """Each layer's images, per parameterisation (Fourier first)."""
    from ..analysis.feature_vis import feature_vis

    params = ("fourier", "pixel") if args.param == "both" else (args.param,)
    results: dict[str, list[FeatureVisResult]] = {p: [] for p in params}
    for layer in layers:
        for param in params:
            res = feature_vis(dn, layer, args.channels, steps=args.steps, size=size, batch_size=args.batch_size,
                              seed=args.seed, param=param, transforms=not args.no_transforms, preprocess=preprocess,
                              progress=not args.no_progress)
            results[param].append(res)
            print(res.summary())
    return results


def _write_json(path: Path, args: argparse.Namespace, results: dict[str, list[FeatureVisResult]], *,
                layers: list[str], size: int, weights: str) -> None:  # fmt: skip
    from ._analysis import write_results

    settings: dict[str, Any] = dict(vars(args))
    settings.update(layers=layers, size=size, weights=weights, output=str(path.with_suffix(".png")))
    every = max(1, args.steps // 32)
    summary = {
        param: {
            res.layer or "logits": {
                "channels": res.units,
                "final": [round(float(v), 6) for v in res.final],
                "steps": list(range(1, args.steps + 1, every)),
                "mean_by_step": [round(float(v), 6) for v in res.values[::every].mean(1)],
                "summary": res.summary(),
            }
            for res in items
        }
        for param, items in results.items()
    }
    write_results(path, settings, result=summary)
