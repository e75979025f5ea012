"""``zfvis filters``: a convolution's filters as an image grid (ZF Fig. 6)."""

from __future__ import annotations

import argparse

from torch import nn

from ..engine import Deconvnet
from ..render import filter_grid
from ..zoo import get_spec, load_model
from ._common import CLIError, add_config_arg, add_model_args, check_output, resolve_device, write_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("filters", help="show a convolution's filters as an image grid")
    add_model_args(p)
    p.add_argument("--layer", default="conv1", help="convolution (or its alias; default conv1)")
    p.add_argument("-o", "--output", default="zfvis_filters.png", help="PNG file to write")
    add_config_arg(p)
    p.set_defaults(func=run)


def conv_of(dn: Deconvnet, layer: str) -> tuple[str, nn.Conv2d]:
    """The convolution a layer name stands for (the last one at or before it)."""
    target = dn.resolve(layer)
    found: tuple[str, nn.Conv2d] | None = None
    for name, module in dn.model.named_modules():
        if isinstance(module, nn.Conv2d):
            found = (name, module)
        if name == target:
            break
    if found is None:
        raise CLIError(f"layer '{layer}' has no convolution at or before it")
    return found


def run(args: argparse.Namespace) -> int:
    out = check_output(args.output)
    model, _ = load_model(args.model, weights=args.weights, device=resolve_device(args.device))
    name, conv = conv_of(Deconvnet(model), args.layer)
    weights = args.weights or get_spec(args.model).default_weights
    w = conv.weight.detach().float().cpu()
    filter_grid(w, out, title=f"{args.model} ({weights}) {args.layer} = '{name}': {w.shape[0]} filters {w.shape[2]}x{w.shape[3]}")
    write_settings(out.with_suffix(".json"), {**vars(args), "module": name, "output": str(out)})
    print(f"wrote {out} ({w.shape[0]} filters of '{name}')")
    return 0
