"""A unit's connections to the layer below, for the page: :func:`unit_links`.

It asks :func:`zfvis.connections` for the unit's input channels by weight and by contribution on
the current image (at the unit's clicked position, else its strongest pre-activation), and names
the layer below as the page does, so that a click on one walks down to it. Each channel below
comes with the address of its feature map on the current image as its thumbnail: one recorded
forward pass (cached, shared with the maps view) serves every thumbnail, and the contribution is
made of exactly those map values under the unit's window. A unit that :func:`zfvis.connections`
does not support (the first convolution, a pooling or fully connected layer, a branch) gets its
one-line reason instead.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import torch

from ..analysis.connections import connections
from ..io.errors import UnsupportedModelError, UserInputError, first_line
from .errors import BadRequest
from .explorer import Explorer, LayerInfo

__all__ = ["unit_links", "TOP"]

#: Channels listed by weight and by contribution.
TOP = 8


def _check(layer: LayerInfo, channel: int, position: tuple[int, int] | None, k: int) -> None:
    count = layer.shape[0] if layer.shape else 0
    if not 0 <= channel < count:
        raise BadRequest(f"channel {channel} is out of range: layer '{layer.name}' has {count} channels "
                         f"(0..{count - 1})")
    if not 1 <= k <= 64:
        raise BadRequest(f"'k' must be in 1..64, got {k}")
    if position is None:
        return
    if len(layer.shape) != 3:
        raise BadRequest(f"layer '{layer.name}' outputs a vector: it has no positions (leave out y and x)")
    h, w = layer.shape[1], layer.shape[2]
    if not (0 <= position[0] < h and 0 <= position[1] < w):
        raise BadRequest(f"position {position} is outside the {h}x{w} map of layer '{layer.name}' "
                         f"(0..{h - 1}, 0..{w - 1})")


def _entries(values: torch.Tensor, order: list[int], image: str, below: str, other: torch.Tensor | None,
             maxima: list[float]) -> list[dict[str, Any]]:  # fmt: skip
    out = []
    for c in order:
        out.append({"channel": c, "value": float(values[c]),
                    "other": None if other is None else float(other[c]), "max": maxima[c],
                    "map": "/api/map.png?" + urlencode({"image": image, "layer": below, "channel": c})})
    return out


def unit_links(ex: Explorer, image: str, layer: LayerInfo, channel: int, position: tuple[int, int] | None,
               k: int = TOP) -> dict[str, Any]:  # fmt: skip
    """The unit's top ``k`` input channels by weight and by contribution on the image, as the API gives them.

    Returns:
        ``supported: False`` with a one-line ``reason`` where :func:`zfvis.connections` refuses the
        layer; else the layer below, the position, bias and pre-activation, and the lists
        ``by_weight`` and ``by_contribution`` (``value`` is what they are sorted by, ``other`` the
        other measure, ``max`` the channel's maximum on the image, ``map`` its thumbnail's address).

    Raises:
        ApiError: An unknown image, a channel, position or ``k`` out of range.
    """
    entry = ex.images.get(image)
    _check(layer, channel, position, k)
    head: dict[str, Any] = {"image": entry.id, "layer": layer.name, "channel": channel}
    x = entry.x[None]
    param = next(ex.model.parameters(), None)
    if param is not None and param.is_floating_point():
        x = x.to(device=param.device, dtype=param.dtype)
    try:
        with ex.lock:
            c = connections(ex.dn, layer.name, channel, images=x, position=position)
    except (UnsupportedModelError, UserInputError) as err:  # the layer is not one connections() takes
        return {**head, "supported": False, "reason": first_line(err)}
    below = ex.layer(c.below)
    maxima = ex.maps(entry.id, below).maxima
    contribution = c.contribution if c.contribution is not None else torch.zeros_like(c.by_weight)
    by_weight = [i for i, _ in c.top(k, by="weight")]
    by_contribution = [i for i, _ in c.top(k, by="contribution")]
    return {**head, "supported": True, "below": below.name, "conv": c.conv, "position": list(c.position or ()),
            "bias": c.bias, "preactivation": c.preactivation, "inputs": int(c.by_weight.numel()),
            "contribution_sum": float(contribution.double().sum()),
            "by_weight": _entries(c.by_weight, by_weight, entry.id, below.name, contribution, maxima),
            "by_contribution": _entries(contribution, by_contribution, entry.id, below.name, c.by_weight, maxima)}
