"""Receptive fields and the cones of influence that bound every reverse pass.

Each spatial layer maps an interval of output rows [a, b) to the interval of input rows
that can affect it: for a kernel k, stride s, padding p and dilation d that is
[a*s - p, (b - 1)*s - p + d*(k - 1) + 1), clipped to the map. Repeating this from one
activation down to the pixels gives the exact window of the input that activation sees
(its receptive field, clipped at the borders) and, for every layer in between, the only
region a reverse pass started at that activation can reach. :func:`plan` computes these
regions for a batch of seeds; the reverse layers then compute only inside them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .recording import Step

__all__ = ["ReceptiveField", "Window", "spatial_params", "plan", "receptive_fields"]

_IDENTITY_TYPES = (nn.ReLU, nn.LocalResponseNorm, nn.Dropout, nn.Dropout2d, nn.Identity, nn.BatchNorm2d)


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """The input window one activation of a layer sees, before clipping at the borders.

    Activation (y, x) sees rows ``offset[0] + y*jump[0]`` up to (excluding)
    ``offset[0] + y*jump[0] + size[0]``, and likewise for columns.

    Attributes:
        size: Height and width of the window in input pixels.
        jump: Distance in input pixels between neighbouring activations.
        offset: Input coordinate of the top-left corner of activation (0, 0)'s window
            (negative where it starts in the padding).
    """

    size: tuple[int, int]
    jump: tuple[int, int]
    offset: tuple[int, int]

    def window(self, y: int, x: int, input_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of activation (y, x)'s window, clipped to the input."""
        top = self.offset[0] + y * self.jump[0]
        left = self.offset[1] + x * self.jump[1]
        return (
            max(0, top),
            max(0, left),
            min(input_size[0], top + self.size[0]),
            min(input_size[1], left + self.size[1]),
        )


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def spatial_params(step: Step) -> str | tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """How a step maps space: ``"identity"``, ``"full"``, ``"vector"`` or (k, s, p, d) pairs.

    ``p`` is the padding before the first row/column (PyTorch pads ``"same"`` convolutions
    with the larger half after).
    """
    m = step.module
    if m is None or isinstance(m, (nn.Flatten, nn.Linear)):
        return "vector"
    if isinstance(m, _IDENTITY_TYPES):
        return "identity"
    if isinstance(m, nn.Conv2d):
        k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        if isinstance(m.padding, str):
            p = (0, 0) if m.padding == "valid" else tuple(d[i] * (k[i] - 1) // 2 for i in range(2))
        else:
            p = _pair(m.padding)
        return k, s, p, d  # type: ignore[return-value]
    if isinstance(m, nn.MaxPool2d):
        k = _pair(m.kernel_size)
        return k, _pair(m.stride if m.stride is not None else k), _pair(m.padding), _pair(m.dilation)
    if isinstance(m, nn.AvgPool2d):
        k = _pair(m.kernel_size)
        return k, _pair(m.stride if m.stride is not None else k), _pair(m.padding), (1, 1)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        h_in, w_in = step.in_shape[-2:]
        h_out, w_out = step.out_shape[-2:]
        if h_in % h_out == 0 and w_in % w_out == 0:
            k = (h_in // h_out, w_in // w_out)
            return k, k, (0, 0), (1, 1)
        return "full"
    raise TypeError(f"no spatial rule for {step.kind}")


def receptive_fields(steps: Sequence[Step]) -> list[ReceptiveField | None]:
    """The receptive field of each step's output (``None`` once outputs are vectors or
    a non-uniform adaptive pooling makes windows irregular)."""
    size, jump, offset = [1, 1], [1, 1], [0, 0]
    out: list[ReceptiveField | None] = []
    regular = True
    for step in steps:
        rule = spatial_params(step)
        if rule in ("vector", "full"):
            regular = False
        elif rule != "identity":
            k, s, p, d = rule  # type: ignore[misc]
            for i in range(2):
                size[i] += (k[i] - 1) * d[i] * jump[i]
                offset[i] -= p[i] * jump[i]
                jump[i] *= s[i]
        out.append(ReceptiveField(tuple(size), tuple(jump), tuple(offset)) if regular else None)  # type: ignore[arg-type]
    return out


@dataclasses.dataclass
class Window:
    """Per-seed rectangles of one feature map, all of the same size.

    The window of seed b covers rows ``top[b]`` to ``top[b] + size[0]`` (and likewise
    columns); it always lies inside the map and contains the seed's cone: the exact set
    of positions its reverse pass can make non-zero, rows ``cone[0][b]:cone[2][b]`` and
    columns ``cone[1][b]:cone[3][b]``.

    Attributes:
        size: Window height and width.
        top: Per-seed first row (B,).
        left: Per-seed first column (B,).
        cone: Per-seed (top, left, bottom, right) of the cone, each (B,).
        map_size: Height and width of the whole map.
    """

    size: tuple[int, int]
    top: torch.Tensor
    left: torch.Tensor
    cone: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    map_size: tuple[int, int]

    @property
    def is_full(self) -> bool:
        """Whether the window is the whole map."""
        return self.size == self.map_size

    @classmethod
    def points(cls, y: torch.Tensor, x: torch.Tensor, map_size: tuple[int, int]) -> Window:
        """1x1 windows at positions (y, x)."""
        return cls((1, 1), y, x, (y, x, y + 1, x + 1), map_size)

    @classmethod
    def whole(cls, batch: int, map_size: tuple[int, int], device: torch.device) -> Window:
        """Windows covering the whole map."""
        z = torch.zeros(batch, dtype=torch.long, device=device)
        h = torch.full_like(z, map_size[0])
        w = torch.full_like(z, map_size[1])
        return cls(map_size, z, z, (z, z, h, w), map_size)


def _reached(a0: torch.Tensor, b0: torch.Tensor, k: int, s: int, p: int, d: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last input index that outputs ``a0 .. b0 - 1`` read (B,).

    The kernel taps ``o*s - p + j*d`` that fall inside the map; with dilation the taps
    next to a border can skip its first (or last) rows, so clamping the interval
    ``[a0*s - p, (b0 - 1)*s - p + extent)`` to the map may overshoot. Only outputs near a
    border need looking at; the others are never clipped.
    """
    extent = d * (k - 1) + 1
    m = (extent + p) // s + 2
    t = torch.arange(m, device=a0.device)
    j = torch.arange(k, device=a0.device) * d
    lo = a0[:, None] + t
    hi = b0[:, None] - 1 - t
    taps_lo = lo[:, :, None] * s - p + j
    taps_hi = hi[:, :, None] * s - p + j
    ok_lo = (lo < b0[:, None])[:, :, None] & (taps_lo >= 0) & (taps_lo < n_in)
    ok_hi = (hi >= a0[:, None])[:, :, None] & (taps_hi >= 0) & (taps_hi < n_in)
    first = torch.where(ok_lo, taps_lo, torch.full_like(taps_lo, n_in)).amin(dim=(1, 2))
    last = torch.where(ok_hi, taps_hi, torch.full_like(taps_hi, -1)).amax(dim=(1, 2)) + 1
    # outputs that read only padding reach nothing: keep the clamped interval
    a = (a0 * s - p).clamp(min=0)
    b = ((b0 - 1) * s - p + extent).clamp(max=n_in)
    empty = first >= last
    return torch.where(empty, a, first), torch.where(empty, b, last)


def _back(rule: tuple, out: Window, in_size: tuple[int, int]) -> Window:
    k, s, p, d = rule
    size, starts, cone_a, cone_b = [], [], [], []
    for i in range(2):
        extent = d[i] * (k[i] - 1) + 1
        generic = (out.size[i] - 1) * s[i] + extent
        n = min(in_size[i], generic)
        if d[i] == 1:  # every input row between the taps is read: the clamped interval is exact
            a = (out.cone[i] * s[i] - p[i]).clamp(min=0)
            b = ((out.cone[i + 2] - 1) * s[i] - p[i] + extent).clamp(max=in_size[i])
        else:
            a, b = _reached(out.cone[i], out.cone[i + 2], k[i], s[i], p[i], d[i], in_size[i])
        size.append(n)
        starts.append(torch.minimum(a, torch.full_like(a, in_size[i] - n)))
        cone_a.append(a)
        cone_b.append(b)
    return Window(tuple(size), starts[0], starts[1], (cone_a[0], cone_a[1], cone_b[0], cone_b[1]), in_size)  # type: ignore[arg-type]


def plan(steps: Sequence[Step], top: Window | None, *, batch: int, device: torch.device) -> list[Window | None]:
    """The window of each step's input, for seeds whose windows at the last step's output
    are ``top`` (``None`` where that output is a vector).

    Args:
        steps: The recorded chain, ending at the seeds' layer.
        top: The seeds' windows at the last step's output.
        batch: Number of seeds.
        device: Where the window offsets live.

    Returns:
        A list as long as ``steps``; entry i is the window of step i's input (``None``
        where that input is a vector).
    """
    windows: list[Window | None] = [None] * len(steps)
    out = top
    for i in range(len(steps) - 1, -1, -1):
        step = steps[i]
        rule = spatial_params(step)
        in_shape = step.in_shape
        if len(in_shape) != 3:
            win = None
        else:
            in_size = (in_shape[1], in_shape[2])
            if rule == "identity" and out is not None:
                win = out
            elif rule in ("vector", "full") or out is None:
                win = Window.whole(batch, in_size, device)
            else:
                win = _back(rule, out, in_size)  # type: ignore[arg-type]
        windows[i] = win
        out = win
    return windows

