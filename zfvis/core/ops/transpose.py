"""``transpose`` (``swapaxes``, ``swapdims``): two dimensions between the batch and the map
swapped (ShuffleNet's channel shuffle) are swapped back, on windows; any other transpose is
reversed by its vector-Jacobian product on whole maps."""

from __future__ import annotations

from typing import Any

import torch

from .. import reverse as deconv
from ..reverse_shape import Transposed
from .grad import build_vjp, record_vjp
from .site import Site

__all__ = ["build_transpose", "prepare_transpose", "record_transpose", "swapped"]


def swapped(site: Site) -> tuple[int, int] | None:
    """The two dimensions (with the batch, non-negative) a transpose of one live input swaps."""
    if len(site.live) != 1 or not site.in_shapes:
        return None
    d0, d1 = site.arg(1, "dim0"), site.arg(2, "dim1")
    if not (isinstance(d0, int) and isinstance(d1, int)):
        return None
    n = len(site.in_shapes[0]) + 1
    return (d0 % n, d1 % n) if -n <= min(d0, d1) and max(d0, d1) < n else None


def prepare_transpose(site: Site) -> None:
    """On windows where both dimensions lie between the batch and a map's (H, W), and the
    output is the input's shape with them swapped; else whole maps."""
    dims = swapped(site)
    n = len(site.in_shapes[0]) + 1 if site.in_shapes else 0
    between = dims is not None and all(1 <= d <= n - 3 for d in dims)
    site.cone = "same" if between and site.out_shape == _swap(site.in_shapes[0], dims) else "full"


def _swap(shape: tuple[int, ...], dims: Any) -> tuple[int, ...]:
    s = list(shape)
    a, b = dims[0] - 1, dims[1] - 1
    s[a], s[b] = s[b], s[a]
    return tuple(s)


def record_transpose(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> Any:
    """Nothing on windows (a transpose back needs no values); else what :func:`record_vjp` keeps."""
    return None if site.cone == "same" else record_vjp(site, inputs, out, rule)


def build_transpose(site: Site) -> deconv.ReverseLayer:
    dims = swapped(site)
    if site.cone != "same" or dims is None:
        return build_vjp(site)
    return Transposed(dims, site.node.module_name or site.node.name, site.node.kind)
