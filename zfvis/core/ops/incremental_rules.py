"""Incremental rules: which outputs an input change reaches, and how one window of an op's
output is computed from windows of its inputs (occlusion's incremental inference).

A rule serves :class:`zfvis.analysis.incremental.IncrementalOcclusion`. It follows from the
op's entry in the table and its site, as the deconvnet's reverse does: a node whose cone is
``"same"`` (its output at (y, x) depends on its inputs at (y, x) alone) is
:class:`Pointwise`; a node whose cone is ``"spatial"`` is a :class:`Window` with the op's
own geometry (:mod:`zfvis.core.geometry`) and its forward on a window (the op's
``window`` entry: convolution, max-, average- and adaptive average-pooling); any other
has no rule, and is recomputed whole.

Regions and windows are in the coordinates of each node's own (H, W) map. A region is a
(P, 4) long tensor, one row per occluder position: rows ``[r0, r1)`` and columns
``[c0, c1)`` that the occluder changes (an empty region is ``(BIG, -BIG, BIG, -BIG)``, so
that unions with min/max just work).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ..geometry import Axis, axes
from .args import _conv_args
from .site import Site

__all__ = ["Rule", "Pointwise", "Window", "rule_of", "union", "BIG", "conv_window", "max_pool_window",
           "avg_pool_window", "adaptive_window"]

BIG = 1 << 40

#: Runs one node's operation: ``(node, args, kwargs, owned)`` -> value (``owned``: the first
#: argument is a fresh tensor that an in-place operation may overwrite).
Call = Callable[[fx.Node, tuple[Any, ...], dict[str, Any], bool], Any]

#: An op's forward on unpadded input windows: ``apply(x, offset, size)``.
Apply = Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]


def empty_regions(n: int, device: torch.device) -> torch.Tensor:
    """``n`` empty regions."""
    return torch.tensor([BIG, -BIG, BIG, -BIG], device=device).repeat(n, 1)


def union(regions: Sequence[torch.Tensor]) -> torch.Tensor:
    """The bounding region of several (P, 4) regions, position by position."""
    stack = torch.stack(list(regions))
    lo, hi = stack.amin(dim=0), stack.amax(dim=0)
    return torch.stack([lo[:, 0], hi[:, 1], lo[:, 2], hi[:, 3]], dim=1)


def _is_empty(regions: torch.Tensor) -> torch.Tensor:
    return (regions[:, 1] <= regions[:, 0]) | (regions[:, 3] <= regions[:, 2])


class Rule:
    """An incremental rule: which outputs an input change reaches, and how to compute a window."""

    def changed(self, regions: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        """The (P, 4) output region changed, from the regions of the data inputs."""
        raise NotImplementedError

    def reads(self, offset: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], float]:
        """The input window (top-left offsets, size, fill outside the map) an output window needs."""
        return offset, size, 0.0

    def compute(self, node: fx.Node, windows: Mapping[fx.Node, torch.Tensor], base: Mapping[fx.Node, Any],
                offset: torch.Tensor, size: tuple[int, int], call: Call) -> torch.Tensor:  # fmt: skip
        """The output over windows of ``size`` at ``offset`` (B, 2), from the windows (fresh
        tensors, B, C, h, w) of the inputs it reads and the cached values of the others."""
        raise NotImplementedError


class Pointwise(Rule):
    """Ops whose output at (y, x) needs their inputs at (y, x) only (cone ``"same"``)."""

    def changed(self, regions: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        return union(regions)

    def compute(self, node: fx.Node, windows: Mapping[fx.Node, torch.Tensor], base: Mapping[fx.Node, Any],
                offset: torch.Tensor, size: tuple[int, int], call: Call) -> torch.Tensor:  # fmt: skip
        args = fx.node.map_arg(node.args, lambda n: windows[n] if n in windows else base[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: windows[n] if n in windows else base[n])
        first = node.args[0] if node.args else None
        return call(node, args, kwargs, isinstance(first, fx.Node) and first in windows)  # type: ignore[arg-type]


@dataclasses.dataclass
class Window(Rule):
    """Sliding-window ops (cone ``"spatial"``): the op's geometry per axis, the value its
    padding reads (``fill``), and its forward on unpadded input windows (``apply``)."""

    axes: tuple[Axis, Axis]
    fill: float
    apply: Apply

    def changed(self, regions: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        (region,) = regions
        cols = []
        for i, axis in enumerate(self.axes):
            cols += axis.changed(region[:, 2 * i], region[:, 2 * i + 1], out_hw[i])
        out = torch.stack(cols, dim=1)
        empty = _is_empty(region) | _is_empty(out)
        return torch.where(empty[:, None], empty_regions(len(out), out.device), out)

    def reads(self, offset: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], float]:
        top, _ = self.axes[0].reads(offset[:, 0], 1)
        left, _ = self.axes[1].reads(offset[:, 1], 1)
        span = (self.axes[0].span(size[0]), self.axes[1].span(size[1]))
        return torch.stack([top, left], dim=1), span, self.fill

    def compute(self, node: fx.Node, windows: Mapping[fx.Node, torch.Tensor], base: Mapping[fx.Node, Any],
                offset: torch.Tensor, size: tuple[int, int], call: Call) -> torch.Tensor:  # fmt: skip
        (x,) = windows.values()
        return self.apply(x, offset, size)


def rule_of(site: Site) -> Rule | None:
    """The incremental rule of a prepared site (its cone set), ``None`` where it has none."""
    if site.cone == "same":
        return Pointwise()
    if site.cone == "spatial" and site.op.window is not None:
        return site.op.window(site)
    return None


def conv_window(site: Site) -> Window:
    """A convolution (zero padding) on windows."""
    a = _conv_args(site)
    bias = site.node.module.bias if site.node.module is not None else site.arg(2, "bias")
    stride, dilation, groups, weight = a["stride"], a["dilation"], a["groups"], a["weight"]
    params = site.op.params(site)  # type: ignore[misc]

    def apply(x: torch.Tensor, offset: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride, 0, dilation, groups)

    return Window(axes(params), 0.0, apply)


def max_pool_window(site: Site) -> Window:
    """Max-pooling on windows (its padding reads -inf)."""
    k, s, _, d = params = site.op.params(site)  # type: ignore[misc]

    def apply(x: torch.Tensor, offset: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.max_pool2d(x, k, s, 0, d)

    return Window(axes(params), float("-inf"), apply)


def _pool_counts(n_in: int, n_out: int, axis: Axis, include_pad: bool) -> torch.Tensor:
    """Average-pooling divisor along one axis for every output index (as PyTorch counts)."""
    start = torch.arange(n_out) * axis.s - axis.p
    end = torch.minimum(start + axis.k, torch.tensor(n_in + axis.p))
    if not include_pad:
        return torch.minimum(end, torch.tensor(n_in)) - start.clamp(min=0)
    return end - start


def _average(params: tuple, site: Site, include_pad: bool, divisor: Any) -> Window:
    k, s = params[0], params[1]
    in_hw, out_hw = site.in_shapes[0][-2:], site.out_shape[-2:]
    geometry = axes(params)
    counts = [_pool_counts(in_hw[i], out_hw[i], geometry[i], include_pad) for i in range(2)]

    def apply(x: torch.Tensor, offset: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        sums = F.avg_pool2d(x, k, s, 0, divisor_override=1)
        if divisor:
            return sums / divisor
        rows = counts[0].to(x.device)[offset[:, :1] + torch.arange(size[0], device=x.device)]
        cols = counts[1].to(x.device)[offset[:, 1:] + torch.arange(size[1], device=x.device)]
        return sums / (rows[:, :, None] * cols[:, None, :]).to(sums.dtype)[:, None]

    return Window(geometry, 0.0, apply)


def avg_pool_window(site: Site) -> Window:
    """Average-pooling on windows, with PyTorch's divisors (padding counted or not)."""
    m = site.node.module
    if m is not None:
        include_pad, divisor = m.count_include_pad, m.divisor_override
    else:
        include_pad, divisor = site.arg(5, "count_include_pad", True), site.arg(6, "divisor_override", None)
    return _average(site.op.params(site), site, bool(include_pad), divisor)  # type: ignore[misc]


def adaptive_window(site: Site) -> Window:
    """Adaptive average-pooling whose output divides its input: an average-pooling of
    kernel and stride ``input // output``."""
    return _average(site.op.params(site), site, True, None)  # type: ignore[misc]

