"""``zfvis filters``: a convolution's filters as an image grid (ZF Fig. 6); the figure is
:func:`zfvis.viz.projection.filters_figure`."""

from __future__ import annotations

import argparse

from ._common import add_config_arg, add_model_args, add_output_args, command_parser
from .outputs import check_output, write_settings

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "filters",
        "Draws every filter of one convolution as a small image, in a grid. A first-layer filter is shown in "
        "colour (its three input channels as RGB); a later one, whose inputs are feature maps, as the mean over its "
        "input channels, in grey.",
        ["zfvis filters -o zfvis_filters.png                 # conv1 of the shipped zfnet-cifar10",
         "zfvis filters --model resnet18 --weights random --layer conv1 -o f.png   # any convolution of any zoo model"],
    )
    add_model_args(p)
    p.add_argument("--layer", default="conv1", help="convolution (or its alias; default conv1)")
    add_output_args(p, "zfvis_filters.png")
    add_config_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.deconvnet import Deconvnet
    from ..models.zoo import get_spec
    from ..viz.filters import filters_figure
    from .models import load_zoo_model, resolve_device, resolve_layer

    out = check_output(args.output, overwrite=args.overwrite)
    model, _ = load_zoo_model(args.model, args.weights, resolve_device(args.device))
    dn = Deconvnet(model)
    resolve_layer(dn, args.layer)
    name, conv = dn.convolution(args.layer)
    weights = args.weights or get_spec(args.model).default_weights
    filters_figure(dn, args.layer, model_name=f"{args.model} ({weights})", path=out)
    write_settings(out.with_suffix(".json"), {**vars(args), "module": name, "output": str(out)})
    print(f"wrote {out} ({conv.weight.shape[0]} filters of '{name}')")
    return 0
