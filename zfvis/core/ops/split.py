"""The ``split`` op: ``torch.split``, ``torch.chunk``, ``torch.unbind`` (and the tensor methods),
whose parts are reversed on windows where the split runs along a dimension before the map.

A split returns a tuple; the nodes that take its parts (``parts[k]``) are reversed, each, as
the part's own operation on the split's input (:mod:`zfvis.core.record`). Where that part is
a slice of one dimension before the map (channels), the signal goes back into the slice and
is zero elsewhere, on each seed's window; anything else (a split of the map, a consumer of
the whole tuple) is reversed by the generic layer.
"""

from __future__ import annotations

import math
import operator

import torch

from .. import reverse as deconv
from ..reverse_shape import Unsplit
from .grad import build_vjp, record_vjp
from .site import Site

__all__ = ["build_part", "part_of", "prepare_part", "record_part"]



def part_of(site: Site) -> tuple[int, int, int | None] | None:
    """(dim, start, length) of the slice a part takes of its split's input (without batch;
    length ``None``: one index, the dimension dropped), where it is a slice of one dimension
    before the map; else ``None``. Found by running the part on the input's flat indices."""
    fxn = site.node.fx_node
    if site.fn is None or len(site.live) != 1 or fxn.target is not operator.getitem:
        return None
    shape = site.in_shapes[0]
    if len(shape) < 3 or math.prod(shape) >= 2**53:
        return None
    flat = torch.arange(math.prod(shape), dtype=torch.float64).view(1, *shape)
    with torch.no_grad():
        item = site.fn(flat)
    if not isinstance(item, torch.Tensor) or item.numel() == 0 or item.shape[0] != 1:
        return None
    item = item[0]
    first = [int(c) for c in torch.unravel_index(item.reshape(-1)[0].long(), shape)]
    for d in range(len(shape) - 2):
        if item.dim() == len(shape) and torch.equal(item, flat[0].narrow(d, first[d], item.shape[d])):
            return d, first[d], int(item.shape[d])
        if item.dim() == len(shape) - 1 and torch.equal(item, flat[0].select(d, first[d])):
            return d, first[d], None
    return None


def prepare_part(site: Site) -> None:
    """A slice before the map passes windows; any other part is generic."""
    site.cone = "same" if part_of(site) is not None else "full"


def record_part(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> object:
    """The slice (the generic layer's inputs where the part is not one)."""
    return part_of(site) if site.cone == "same" else record_vjp(site, inputs, out, rule)


def build_part(site: Site) -> deconv.ReverseLayer:
    if site.cone != "same":
        return build_vjp(site)
    dim, start, length = site.state
    split = site.node.inputs[0]
    return Unsplit(dim, start, length, split.name, split.kind)
