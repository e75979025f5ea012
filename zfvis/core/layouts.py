"""Maps with channels last, held channels first by the reverse pass.

A ConvNeXt block (and a ``LayerNorm2d``) permutes its (N, C, H, W) map to (N, H, W, C), works
on each position's channels (LayerNorm, Linear, GELU, ...) and permutes back. The engine's
windows lie on a map's last two dimensions, so the reverse pass holds such a stretch's maps
channels first: :func:`hold_channels_first` finds, after a recording, every stretch that
starts with ``permute(0, 2, 3, 1)`` of a map, runs through ops that act on each position
alone, and ends in ``permute(0, 3, 1, 2)``, and sets its sites up for that: the shapes the
reverse pass sees, recorded values permuted to channels first, and cones ``"same"``.

A stretch is held so only if every op in it qualifies, every consumer of its values is in
it or permutes back, and no value of it is a recording's target (a seed's layer); any
other is left as recorded (the generic layer, on whole maps).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .ops import POINTWISE, Site
from .ops.channels_last import norm_args, permutation

__all__ = ["TO_FIRST", "TO_LAST", "hold_channels_first"]

#: The permutes into and out of a channels-last stretch.
TO_LAST, TO_FIRST = (0, 2, 3, 1), (0, 3, 1, 2)

#: Ops that act on each element alone (their recorded values are all of the output's shape).
_ELEMENTWISE = frozenset({"relu", "relu6", "hardtanh", "rectifier", "gate", "identity"})


def _constants(values: Iterable[Any]) -> bool:
    """Whether arguments hold a tensor other than a number (it would broadcast along the channels)."""
    for v in values:
        if isinstance(v, (list, tuple)) and _constants(v):
            return True
        if isinstance(v, torch.Tensor) and v.numel() > 1:
            return True
    return False


def _per_position(site: Site) -> bool:
    """Whether a site whose inputs are all channels-last maps acts on each position's channels alone."""
    name = site.op.name
    m = site.node.module
    if name not in ("layer_norm", "linear") and m is not None and any(True for _ in (*m.parameters(), *m.buffers())):
        return False  # its own weights (a PReLU's) would broadcast along the channels
    if name in _ELEMENTWISE:
        return True
    if name in ("add", "sub", "scale"):
        return site.cone == "same" and not _constants((*site.args, *site.kwargs.values()))
    if name == POINTWISE:
        return site.cone == "same" and site.fn is None and not _constants((*site.args, *site.kwargs.values()))
    if name == "layer_norm":
        return norm_args(site)["shape"] == site.in_shapes[0][-1:]
    return name == "linear"


def _is_permute(site: Site, dims: tuple[int, ...]) -> bool:
    return site.op.name == "permute" and len(site.in_shapes[0]) == 3 and permutation(site) == dims


def _stretches(sites: list[Site]) -> tuple[dict[str, str], dict[str, str]]:
    """Node -> the stretch it belongs to (by its first permute), for channels-last values and
    for the permutes back; stretches joined by an op are merged."""
    owner: dict[str, str] = {}
    parent: dict[str, str] = {}

    def root(s: str) -> str:
        while parent[s] != s:
            s = parent[s]
        return s

    exits: dict[str, str] = {}
    for site in sites:
        name = site.node.name
        ins = [owner.get(p.name) for p in site.live]
        if not any(ins):
            if _is_permute(site, TO_LAST):
                owner[name] = parent.setdefault(name, name)
            continue
        if not all(ins):
            continue
        roots = {root(s) for s in ins if s is not None}
        first = min(roots)
        for r in roots:
            parent[r] = first
        if _is_permute(site, TO_FIRST):
            exits[name] = first
        elif _per_position(site):
            owner[name] = first
    return {n: root(s) for n, s in owner.items()}, {n: root(s) for n, s in exits.items()}


def hold_channels_first(sites: dict[str, Site], targets: Iterable[str]) -> None:
    """Sets up every channels-last stretch of a recording that the reverse pass can hold
    channels first (see the module's docstring); the others stay as recorded."""
    order = [s for s in sites.values() if s.cone != "bundle"]
    owner, exits = _stretches(order)
    bad = {owner[t] for t in targets if t in owner}
    for site in sites.values():
        for p in site.live:
            if p.name in owner and site.node.name not in owner and site.node.name not in exits:
                bad.add(owner[p.name])  # a consumer outside the stretch
    for site in order:
        stretch = owner.get(site.node.name, exits.get(site.node.name))
        if stretch is None or stretch in bad:
            continue
        _hold(site, {p.name for p in site.live if p.name in owner})


def _first(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[2], shape[0], shape[1])


def _hold(site: Site, last: set[str]) -> None:
    """Sets one site of a held stretch up: shapes channels first, its recorded values too."""
    ins = [_first(s) if p.name in last else s for p, s in zip(site.live, site.in_shapes)]
    permute = site.op.name == "permute"
    back = permute and bool(last)  # the permute back gives a channels-first map, as it is
    site.reverse_shapes = (ins, site.out_shape if back else _first(site.out_shape))
    site.state = None if permute else _permuted(site.state)
    site.cone = "same"


def _permuted(state: Any) -> Any:
    """Recorded values of a channels-last site, as channels-first views."""
    if isinstance(state, torch.Tensor) and state.dim() == 4:
        return state.permute(*TO_FIRST)
    if isinstance(state, list):
        return [_permuted(s) for s in state]
    return state

