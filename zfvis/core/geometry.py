"""Sliding-window geometry along one axis: the interval arithmetic of both engines.

A convolution or pooling of kernel size k, stride s, padding p and dilation d reads, for
output index o, the input indices ``o*s - p + j*d`` (j = 0 .. k-1). Everything the engines
need follows from that one formula, and lives here once:

- :meth:`Axis.reads`: the input interval a run of outputs reads (the reverse pass's cone,
  occlusion's halo), unclipped;
- :meth:`Axis.reached`: the same, clipped to the map, and exact with dilation (whose taps
  next to a border can skip the border's first rows);
- :meth:`Axis.changed`: the outputs that read any of a run of inputs (occlusion's forward
  cone);
- :meth:`Axis.field`: a receptive field carried through the layer.

Intervals are half-open, ``[a, b)``; ``a`` and ``b`` may be tensors of one entry per
window (the engines plan all seeds, or all occluder positions, at once) or ints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["Axis", "axes"]

Pair = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Axis:
    """A sliding window's geometry along one axis.

    Attributes:
        k: Kernel size.
        s: Stride.
        p: Padding before the first index (padding after the last lies outside the map).
        d: Dilation.
    """

    k: int
    s: int
    p: int
    d: int

    @property
    def extent(self) -> int:
        """Input indices one output spans, first tap to last."""
        return self.d * (self.k - 1) + 1

    @property
    def gapless(self) -> bool:
        """Whether consecutive outputs read every input index between their first and last tap."""
        return self.d == 1 and self.s <= self.k

    def span(self, n: int) -> int:
        """Input indices ``n`` consecutive outputs span."""
        return (n - 1) * self.s + self.extent

    def reads(self, a: Any, b: Any) -> tuple[Any, Any]:
        """The input interval outputs ``[a, b)`` read, unclipped (it may start in the padding)."""
        return a * self.s - self.p, (b - 1) * self.s - self.p + self.extent

    def reached(self, a: torch.Tensor, b: torch.Tensor, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        """First and one-past-last input index, inside a map of ``n_in``, that outputs
        ``[a, b)`` read (per window).

        Where the taps leave gaps (dilation, or a stride longer than the kernel), those next
        to a border can skip its first (or last) rows, so the clipped interval of
        :meth:`reads` may overshoot; only outputs near a border need looking at. Outputs that
        read only padding reach nothing: the clipped interval is kept.
        """
        lo, hi = self.reads(a, b)
        lo, hi = lo.clamp(min=0), hi.clamp(max=n_in)
        if self.gapless:  # every input index between the taps is read
            return lo, hi
        m = (self.extent + self.p) // self.s + 2
        t = torch.arange(m, device=a.device)
        j = torch.arange(self.k, device=a.device) * self.d
        first_out, last_out = a[:, None] + t, b[:, None] - 1 - t
        taps_lo = first_out[:, :, None] * self.s - self.p + j
        taps_hi = last_out[:, :, None] * self.s - self.p + j
        ok_lo = (first_out < b[:, None])[:, :, None] & (taps_lo >= 0) & (taps_lo < n_in)
        ok_hi = (last_out >= a[:, None])[:, :, None] & (taps_hi >= 0) & (taps_hi < n_in)
        first = torch.where(ok_lo, taps_lo, torch.full_like(taps_lo, n_in)).amin(dim=(1, 2))
        last = torch.where(ok_hi, taps_hi, torch.full_like(taps_hi, -1)).amax(dim=(1, 2)) + 1
        empty = first >= last
        return torch.where(empty, lo, first), torch.where(empty, hi, last)

    def changed(self, a: torch.Tensor, b: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs, inside a map of ``n_out``, with a tap on an input of ``[a, b)``: exact
        without dilation; with it, a bounding interval (it may hold outputs whose taps
        straddle the run, which are then recomputed needlessly, but exactly)."""
        lo = -torch.div(-(a + self.p - self.d * (self.k - 1)), self.s, rounding_mode="floor")  # ceil
        hi = torch.div(b - 1 + self.p, self.s, rounding_mode="floor") + 1
        return lo.clamp(0, n_out), hi.clamp(0, n_out)

    def field(self, size: int, jump: int, offset: int) -> tuple[int, int, int]:
        """A receptive field (size, jump, offset, in input pixels) of this layer's input,
        carried to its output."""
        return size + (self.k - 1) * self.d * jump, jump * self.s, offset - self.p * jump


def axes(params: tuple[Pair, Pair, Pair, Pair]) -> tuple[Axis, Axis]:
    """The (rows, columns) axes of an op's (kernel, stride, padding, dilation) pairs."""
    k, s, p, d = params
    return Axis(k[0], s[0], p[0], d[0]), Axis(k[1], s[1], p[1], d[1])
