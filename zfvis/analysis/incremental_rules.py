"""Incremental rules of occlusion inference: which outputs an input change reaches, and how
one window of an operation's output is computed from windows of its inputs.

A rule serves :class:`zfvis.analysis.incremental.IncrementalOcclusion`. Regions and windows are in
the coordinates of each node's own (H, W) map. A region is a (P, 4) long tensor, one row
per occluder position: rows ``[r0, r1)`` and columns ``[c0, c1)`` that the occluder
changes (an empty region is ``(BIG, -BIG, BIG, -BIG)``, so that unions with min/max just
work). Operations with a rule: convolutions (zero padding), max- and average-pooling,
and everything that acts on each (y, x) position on its own (pointwise activations,
batch norm in eval mode, dropout, identity, local response normalisation, elementwise
arithmetic, channel concatenation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.utils import _pair as as_pair

from ..core.ops.pointwise import acts_per_position

__all__ = ["Rule", "Pointwise", "Window", "module_rule", "is_pointwise", "union", "BIG"]

BIG = 1 << 40

#: Runs one node's operation: ``(node, args, kwargs, owned)`` -> value (``owned``: the first
#: argument is a fresh tensor that an in-place operation may overwrite).
Call = Callable[[fx.Node, tuple[Any, ...], dict[str, Any], bool], Any]


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
    """Elementwise operations and channel concatenation: output (y, x) needs input (y, x)."""

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
    """Sliding-window operations (convolution, pooling): kernel, stride, padding, dilation per
    axis; ``apply(x, offset, size)`` computes the output windows from unpadded input windows."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    fill: float
    apply: Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]

    def changed(self, regions: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        (region,) = regions
        cols = []
        for axis in range(2):
            k, s, p, d = self.kernel[axis], self.stride[axis], self.padding[axis], self.dilation[axis]
            a, b = region[:, 2 * axis], region[:, 2 * axis + 1]
            lo = -torch.div(-(a + p - d * (k - 1)), s, rounding_mode="floor")  # ceil
            hi = torch.div(b - 1 + p, s, rounding_mode="floor") + 1
            cols += [lo.clamp(0, out_hw[axis]), hi.clamp(0, out_hw[axis])]
        out = torch.stack(cols, dim=1)
        empty = _is_empty(region) | _is_empty(out)
        return torch.where(empty[:, None], empty_regions(len(out), out.device), out)

    def reads(self, offset: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], float]:
        s = torch.tensor(self.stride, device=offset.device)
        p = torch.tensor(self.padding, device=offset.device)
        span = tuple((size[a] - 1) * self.stride[a] + self.dilation[a] * (self.kernel[a] - 1) + 1 for a in range(2))
        return offset * s - p, span, self.fill  # type: ignore[return-value]

    def compute(self, node: fx.Node, windows: Mapping[fx.Node, torch.Tensor], base: Mapping[fx.Node, Any],
                offset: torch.Tensor, size: tuple[int, int], call: Call) -> torch.Tensor:  # fmt: skip
        (x,) = windows.values()
        return self.apply(x, offset, size)


def _geometry(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """(kernel, stride, padding, dilation) of a conv or pool module (``same`` padding: the
    top/left amount; the rest lies outside the map and reads the fill)."""
    kernel = as_pair(module.kernel_size)
    stride = as_pair(module.stride if module.stride is not None else module.kernel_size)
    dilation = as_pair(getattr(module, "dilation", 1))
    padding = module.padding
    if padding == "valid":
        padding = 0
    elif padding == "same":
        padding = tuple(dilation[a] * (kernel[a] - 1) // 2 for a in range(2))
    return kernel, stride, as_pair(padding), dilation


def _conv_rule(m: nn.Conv2d) -> Window | None:
    if m.padding_mode != "zeros":
        return None
    k, s, p, d = _geometry(m)

    def apply(x: torch.Tensor, offset: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)

    return Window(k, s, p, d, 0.0, apply)


def _maxpool_rule(m: nn.MaxPool2d) -> Window | None:
    if m.return_indices:
        return None
    k, s, p, d = _geometry(m)

    def apply(x: torch.Tensor, offset: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.max_pool2d(x, k, s, 0, d)

    return Window(k, s, p, d, float("-inf"), apply)


def _pool_counts(n_in: int, n_out: int, k: int, s: int, p: int, include_pad: bool) -> torch.Tensor:
    """Average-pooling divisor along one axis for every output index (as PyTorch counts)."""
    start = torch.arange(n_out) * s - p
    end = torch.minimum(start + k, torch.tensor(n_in + p))
    if not include_pad:
        return torch.minimum(end, torch.tensor(n_in)) - start.clamp(min=0)
    return end - start


def _avgpool_rule(m: nn.AvgPool2d, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> Window:
    k, s, p, d = _geometry(m)
    counts = [_pool_counts(in_hw[a], out_hw[a], k[a], s[a], p[a], m.count_include_pad) for a in range(2)]

    def apply(x: torch.Tensor, offset: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        sums = F.avg_pool2d(x, k, s, 0, divisor_override=1)
        if m.divisor_override:
            return sums / m.divisor_override
        rows = counts[0].to(x.device)[offset[:, :1] + torch.arange(size[0], device=x.device)]
        cols = counts[1].to(x.device)[offset[:, 1:] + torch.arange(size[1], device=x.device)]
        return sums / (rows[:, :, None] * cols[:, None, :]).to(sums.dtype)[:, None]

    return Window(k, s, p, d, 0.0, apply)


def module_rule(m: nn.Module, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> Window | None:
    """The sliding-window rule of a module of one input, ``None`` where it has none."""
    if type(m) is nn.Conv2d:
        return _conv_rule(m)
    if type(m) is nn.MaxPool2d:
        return _maxpool_rule(m)
    if type(m) is nn.AvgPool2d:
        return _avgpool_rule(m, in_hw, out_hw)
    return None


def is_pointwise(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether the node's operation acts on each (y, x) position on its own (in eval mode)."""
    if node.op == "call_module":
        m = modules[node.target]  # type: ignore[index]
        if isinstance(m, nn.BatchNorm2d):
            return m.running_mean is not None  # batch statistics are not pointwise
        return acts_per_position(node, m)
    if node.op == "call_method":
        return acts_per_position(node, None)
    if node.op != "call_function":
        return False
    if node.target is F.dropout:  # the identity when not training
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return training is False
    if node.target is torch.cat:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return dim in (1, -3)
    return acts_per_position(node, None)
