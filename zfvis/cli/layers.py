"""``zfvis layers``: every projectable layer with output shape and receptive field."""

from __future__ import annotations

import argparse

from ..engine import Deconvnet
from ..receptive import receptive_fields
from ..zoo import load_model
from ._common import add_config_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="list a model's layers, output shapes and receptive fields")
    p.add_argument("--model", default="zfnet-cifar10", help="zoo model (default zfnet-cifar10)")
    p.add_argument("--input-size", type=int, help="side of the square input (default: the model's own)")
    add_config_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, preprocess = load_model(args.model, weights="random")
    size = args.input_size or preprocess.crop or 224
    if size < 1:
        raise ValueError(f"--input-size must be positive, got {size}")
    dn = Deconvnet(model)
    steps = dn.trace((3, size, size))
    fields = receptive_fields(steps)
    alias_of = {v: k for k, v in dn.aliases.items()}
    rows = [("layer", "alias", "type", "output", "receptive field (size/jump)")]
    for step, rf in zip(steps, fields):
        shape = "x".join(str(v) for v in step.out_shape)
        field = f"{rf.size[0]}x{rf.size[1]} / {rf.jump[0]}" if rf is not None else "whole input"
        rows.append((step.name, alias_of.get(step.name, ""), step.kind, shape, field))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{args.model}, input 3x{size}x{size}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0
