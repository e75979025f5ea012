"""``zfvis layers``: every projectable layer with output shape and receptive field."""

from __future__ import annotations

import argparse

from ._common import ZOO_MODELS, add_config_arg, command_parser, whole

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "layers",
        "Prints every layer a projection can start from, in graph order: its name, its paper alias (conv3, "
        "layer2, ...), its type, its output shape and its receptive field (size / jump in input pixels). "
        "No weights are needed: the model is built with random weights, and shapes are computed without "
        "allocating the maps where the model allows.",
        ["zfvis layers                                       # the shipped zfnet-cifar10",
         "zfvis layers --model resnet18 --input-size 64      # any zoo model, at any input size"],
    )
    p.add_argument("--model", default="zfnet-cifar10",
                   help=f"zoo model ({', '.join(ZOO_MODELS)}; or timm:NAME; default zfnet-cifar10)")
    p.add_argument("--input-size", type=whole, help="side of the square input (default: the model's own)")
    add_config_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.deconvnet import Deconvnet
    from ..io.checks import check_input_size
    from .models import check_model_name, fit_input_size, load_zoo_model, shapes_only

    check_model_name(args.model)
    if args.input_size is not None:
        check_input_size(args.input_size)
    model, preprocess = load_zoo_model(args.model, "random", torch.device("cpu"))
    own = preprocess.crop or 224
    size = own if args.input_size is None else args.input_size
    dn = Deconvnet(model)
    last = dn.graph.node_names()[-1]  # the model's output
    fit_input_size(dn, model, last, size, own, args.model, memory=False)
    try:  # shapes only: a large --input-size allocates nothing
        with shapes_only():
            steps = dn.trace((3, size, size))
    except (ImportError, ValueError, RuntimeError):  # no fake tensors for this model: a real pass, if memory allows
        fit_input_size(dn, model, last, size, own, args.model)
        steps = dn.trace((3, size, size))
    alias_of: dict[str, str] = {}
    for alias in dn.aliases:
        alias_of.setdefault(dn.resolve(alias), alias)
    rows = [("layer", "alias", "type", "output", "receptive field (size/jump)")]
    for step in steps:
        rf = step.receptive_field
        shape = "x".join(str(v) for v in step.out_shape)
        field = f"{rf.size[0]}x{rf.size[1]} / {rf.jump[0]}" if rf is not None else "whole input"
        rows.append((step.name, alias_of.get(step.name, ""), step.kind, shape, field))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{args.model}, input 3x{size}x{size}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0
