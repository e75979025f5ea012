"""``zfvis filters``: a convolution's filters as an image grid (ZF Fig. 6); the figure is
:func:`zfvis.viz.projection.filters_figure`."""

from __future__ import annotations

import argparse

from ..core.deconvnet import Deconvnet
from ..models.zoo import get_spec
from ..viz.filters import filters_figure
from ._common import add_config_arg, add_model_args, add_output_args
from .models import load_zoo_model, resolve_device, resolve_layer
from .outputs import check_output, write_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("filters", help="show a convolution's filters as an image grid")
    add_model_args(p)
    p.add_argument("--layer", default="conv1", help="convolution (or its alias; default conv1)")
    add_output_args(p, "zfvis_filters.png")
    add_config_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
