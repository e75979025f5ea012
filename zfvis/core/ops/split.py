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
from typing import Any

import torch

from .. import reverse as deconv
from ..reverse_shape import Unsplit
from .grad import build_vjp, record_vjp
from .site import Live, Site

__all__ = ["build_part", "part_of", "prepare_part", "record_part"]



def _frozen(v: Any) -> Any:
    """A hashable copy of a plain constant argument (numbers, strings, ``None``, :class:`Live`,
    lists and tuples of them), each with its type; ``_NOT_PLAIN`` for anything else."""
    if isinstance(v, (list, tuple)):
        items = tuple(_frozen(e) for e in v)
        return _NOT_PLAIN if _NOT_PLAIN in items else (type(v).__name__, items)
    if v is None or type(v) in (int, float, bool, str, Live):
        return (type(v).__name__, v)
    return _NOT_PLAIN


_NOT_PLAIN = object()


def _cache_key(site: Site) -> tuple[Any, ...] | None:
    """What :func:`part_of` depends on, where the part is an item of a split whose arguments
    are all plain constants (its input's shape, the split's arguments, the item's index);
    ``None`` where something else may matter (a value computed by the model)."""
    fxn = site.node.fx_node
    if site.entry is None or site.entry.name != "split" or fxn.kwargs:
        return None
    key = (tuple(site.in_shapes[0]), _frozen(site.args), _frozen(sorted(site.kwargs.items())), _frozen(fxn.args[1:]))
    return None if _NOT_PLAIN in key[1:] else key


def part_of(site: Site) -> tuple[int, int, int | None] | None:
    """(dim, start, length) of the slice a part takes of its split's input (without batch;
    length ``None``: one index, the dimension dropped), where it is a slice of one dimension
    before the map; else ``None``. Found by running the part on the input's flat indices, once
    per input shape where the split's arguments are constants (kept on the fx node)."""
    fxn = site.node.fx_node
    if site.fn is None or len(site.live) != 1 or fxn.target is not operator.getitem:
        return None
    key = _cache_key(site)
    if key is None:
        return _find_part(site)
    found: dict[tuple[Any, ...], Any] = fxn.meta.setdefault("zfvis_part_of", {})
    if key not in found:
        found[key] = _find_part(site)
    return found[key]


def _find_part(site: Site) -> tuple[int, int, int | None] | None:
    shape = site.in_shapes[0]
    if len(shape) < 3 or math.prod(shape) >= 2**53:
        return None
    flat = torch.arange(math.prod(shape), dtype=torch.float64).view(1, *shape)
    with torch.no_grad():
        item = site.fn(flat)
    if not isinstance(item, torch.Tensor) or item.numel() == 0 or item.shape[0] != 1:
        return None
    item = item[0]
    first = _unravel(int(item.reshape(-1)[0]), shape)
    for d in range(len(shape) - 2):
        if item.dim() == len(shape) and torch.equal(item, flat[0].narrow(d, first[d], item.shape[d])):
            return d, first[d], int(item.shape[d])
        if item.dim() == len(shape) - 1 and torch.equal(item, flat[0].select(d, first[d])):
            return d, first[d], None
    return None


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    """The coordinates of a flat index in ``shape`` (C order), as ``torch.unravel_index``."""
    coords = []
    for size in reversed(shape):
        index, c = divmod(index, size)
        coords.append(c)
    return coords[::-1]


def prepare_part(site: Site) -> None:
    """A slice before the map passes windows; any other part is generic. The slice is kept as
    the site's state (:func:`record_part` records it without finding it again)."""
    site.state = part_of(site)
    site.cone = "same" if site.state is not None else "full"


def record_part(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> object:
    """The slice (the generic layer's inputs where the part is not one)."""
    if site.cone != "same":
        return record_vjp(site, inputs, out, rule)
    return site.state if site.state is not None else part_of(site)


def build_part(site: Site) -> deconv.ReverseLayer:
    if site.cone != "same":
        return build_vjp(site)
    dim, start, length = site.state
    split = site.node.inputs[0]
    return Unsplit(dim, start, length, split.name, split.kind)
