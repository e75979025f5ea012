"""Which operations act on each (y, x) position on its own (in eval mode).

One table for both engines: occlusion (:mod:`zfvis.analysis.incremental_rules`) computes
these on windows, and the deconvnet reverses a generic one (its vector-Jacobian product)
on windows of its map rather than the whole map.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["POINTWISE_MODULES", "POINTWISE_FUNCTIONS", "POINTWISE_METHODS", "acts_per_position"]

POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.LocalResponseNorm,
)  # fmt: skip

POINTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    torch.clamp, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.pow, torch.erf, torch.square,
    torch.sin, torch.cos, F.relu, F.relu_, F.relu6, F.leaky_relu, F.hardtanh, F.elu, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, F.mish, F.softplus, F.softsign, F.logsigmoid, F.selu, F.celu, F.sigmoid, F.tanh,
})  # fmt: skip

POINTWISE_METHODS: frozenset[str] = frozenset({
    "add", "add_", "sub", "mul", "mul_", "div", "relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "neg",
    "exp", "log", "sqrt", "rsqrt", "abs", "pow", "square", "erf", "sigmoid_", "tanh_",
})  # fmt: skip


def acts_per_position(fxn: fx.Node, module: nn.Module | None) -> bool:
    """Whether the node's operation is one of the table's (before its arguments are known)."""
    if fxn.op == "call_module":
        return isinstance(module, POINTWISE_MODULES)
    if fxn.op == "call_method":
        return fxn.target in POINTWISE_METHODS
    return fxn.op == "call_function" and fxn.target in POINTWISE_FUNCTIONS
