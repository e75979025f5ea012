"""The ops of channels-last stretches: ``permute``, ``layer_norm`` and ``linear``.

Each is reversed by the generic layer (``permute``, ``layer_norm``: their vector-Jacobian
product on whole maps) or by the transposed weight (``linear``) until the recording finds
the node inside a channels-last stretch it can hold channels first
(:mod:`zfvis.core.layouts`, which then sets the cone to ``"same"``); there the permutes
pass the signal, a LayerNorm over the channels is its Jacobian at each position, and a
Linear the transposed weight at each position, all on windows.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import reverse as deconv
from ..reverse_channels import ChannelLinear, ChannelNorm, Permuted
from .build import _build_linear
from .grad import build_vjp
from .site import Site

__all__ = ["build_any_linear", "build_layer_norm", "build_permute", "linear_work", "norm_args", "permutation",
           "prepare_whole"]


def permutation(site: Site) -> tuple[int, ...] | None:
    """The dimensions of a ``permute`` call (with the batch), normalised to be non-negative."""
    if len(site.live) != 1:
        return None
    if site.node.fx_node.op == "call_method":
        rest = site.args[1:]
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = dims or site.kwargs.get("dims", ())
    else:
        dims = site.arg(1, "dims", ())
    if not all(isinstance(d, int) for d in dims):
        return None
    n = len(site.in_shapes[0]) + 1
    return tuple(d % n for d in dims) if len(dims) == n else None


def norm_args(site: Site) -> dict[str, Any]:
    """A LayerNorm's normalized_shape, weight and eps (a module's, or the call's)."""
    m = site.node.module
    if m is not None:
        return {"shape": tuple(m.normalized_shape), "weight": m.weight, "eps": float(m.eps)}
    shape = site.arg(1, "normalized_shape", ())
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return {"shape": shape, "weight": site.arg(2, "weight"), "eps": float(site.arg(4, "eps", 1e-5))}


def prepare_whole(site: Site) -> None:
    """Whole maps, until the node is found in a channels-last stretch."""
    site.cone = "full"


def _source(site: Site) -> str:
    return site.node.module_name or site.node.name


def build_permute(site: Site) -> deconv.ReverseLayer:
    if site.cone != "same":
        return build_vjp(site)
    return Permuted(permutation(site) or (), _source(site), site.node.kind)


def build_layer_norm(site: Site) -> deconv.ReverseLayer:
    if site.cone != "same":
        return build_vjp(site)
    a = norm_args(site)
    weight = a["weight"] if isinstance(a["weight"], torch.Tensor) else None
    return ChannelNorm(weight, a["eps"], _source(site), site.node.kind)


def linear_work(site: Site) -> float:
    """Multiply-adds per position of a Linear over a map's channels: its weight's size."""
    m = site.node.module
    return float((m.weight if m is not None else site.arg(1, "weight")).numel())


def build_any_linear(site: Site) -> deconv.ReverseLayer:
    """Over the channels of a map held channels first (cone ``"same"``), else of vectors."""
    if site.cone != "same":
        return _build_linear(site)
    m = site.node.module
    return ChannelLinear(m.weight if m is not None else site.arg(1, "weight"), _source(site))
