"""``zfvis filters``: a convolution's filters as an image grid (ZF Fig. 6)."""

from __future__ import annotations

import argparse

from torch import nn

from ..engine import Deconvnet
from ..render import filter_grid
from ..zoo import get_spec
from ._common import (
    CLIError,
    add_config_arg,
    add_model_args,
    add_output_args,
    check_output,
    layer_modules,
    load_zoo_model,
    resolve_device,
    resolve_layer,
    write_settings,
)

#: Modules that may follow a convolution in the layer an alias names (its rectified output).
_AFTER_CONV = (nn.BatchNorm2d, nn.ReLU)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("filters", help="show a convolution's filters as an image grid")
    add_model_args(p)
    p.add_argument("--layer", default="conv1", help="convolution (or its alias; default conv1)")
    add_output_args(p, "zfvis_filters.png")
    add_config_arg(p)
    p.set_defaults(func=run)


def conv_of(dn: Deconvnet, layer: str) -> tuple[str, nn.Conv2d]:
    """The convolution a layer name stands for: the convolution itself, or its output
    after batch norm and ReLU (what ``conv3`` names).

    Raises:
        CLIError: The layer is something else (a pool, a linear layer, ...).
    """
    target = resolve_layer(dn, layer)
    found: tuple[str, nn.Conv2d] | None = None
    kind = "layer"
    for name, module in layer_modules(dn):
        if isinstance(module, nn.Conv2d):
            found = (name, module)
        elif not isinstance(module, _AFTER_CONV):
            found = None
        if name == target:
            kind = type(module).__name__ if module is not None else "function"
            break
    if found is None:
        convs = [a for a, t in dn.aliases.items() if a.startswith("conv")] or [
            n for n, m in layer_modules(dn) if isinstance(m, nn.Conv2d)
        ]
        shown = ", ".join(convs[:8]) + (", ..." if len(convs) > 8 else "")
        raise CLIError(f"layer '{layer}' is a {kind}, not a convolution; filters exist for convolutions: {shown}")
    return found


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
