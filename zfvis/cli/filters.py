"""``zfvis filters``: a convolution's filters as an image grid (ZF Fig. 6)."""

from __future__ import annotations

import argparse

from torch import nn

from ..engine import Deconvnet
from ..render import filter_grid
from ..zoo import get_spec
from ._common import (
    add_config_arg,
    add_model_args,
    add_output_args,
    check_output,
    load_zoo_model,
    resolve_device,
    resolve_layer,
    write_settings,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("filters", help="show a convolution's filters as an image grid")
    add_model_args(p)
    p.add_argument("--layer", default="conv1", help="convolution (or its alias; default conv1)")
    add_output_args(p, "zfvis_filters.png")
    add_config_arg(p)
    p.set_defaults(func=run)


def conv_of(dn: Deconvnet, layer: str) -> tuple[str, nn.Conv2d]:
    """The convolution a layer name stands for (:meth:`zfvis.Deconvnet.convolution`)."""
    resolve_layer(dn, layer)
    return dn.convolution(layer)


def run(args: argparse.Namespace) -> int:
    out = check_output(args.output, overwrite=args.overwrite)
    model, _ = load_zoo_model(args.model, args.weights, resolve_device(args.device))
    name, conv = conv_of(Deconvnet(model), args.layer)
    weights = args.weights or get_spec(args.model).default_weights
    w = conv.weight.detach().float().cpu()
    filter_grid(w, out, title=f"{args.model} ({weights}) {args.layer} = '{name}': {w.shape[0]} filters {w.shape[2]}x{w.shape[3]}")
    write_settings(out.with_suffix(".json"), {**vars(args), "module": name, "output": str(out)})
    print(f"wrote {out} ({w.shape[0]} filters of '{name}')")
    return 0
