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

from .geometry import axes
from .resampling import Resampling

__all__ = ["ReceptiveField", "Window", "StepCost", "group_seeds", "plan", "receptive_field", "union"]

Pair = tuple[int, int]


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
        ints: For one seed, where known: (top, left, *cone) as Python numbers, so that planning
            one seed's windows needs no arithmetic on one-element tensors.
    """

    size: tuple[int, int]
    top: torch.Tensor
    left: torch.Tensor
    cone: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    map_size: tuple[int, int]
    ints: tuple[int, ...] | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def one(cls, size: tuple[int, int], ints: Sequence[int], map_size: tuple[int, int], device: torch.device) -> Window:
        """The window of one seed from its (top, left, *cone) numbers."""
        t = torch.tensor(list(ints), device=device)
        return cls(size, t[0:1], t[1:2], (t[2:3], t[3:4], t[4:5], t[5:6]), map_size, tuple(ints))

    @property
    def is_full(self) -> bool:
        """Whether the window is the whole map."""
        return self.size == self.map_size

    @classmethod
    def points(cls, y: torch.Tensor, x: torch.Tensor, map_size: tuple[int, int]) -> Window:
        """1x1 windows at positions (y, x)."""
        ints = (int(y), int(x), int(y), int(x), int(y) + 1, int(x) + 1) if y.numel() == 1 else None
        return cls((1, 1), y, x, (y, x, y + 1, x + 1), map_size, ints)

    @classmethod
    def whole(cls, batch: int, map_size: tuple[int, int], device: torch.device) -> Window:
        """Windows covering the whole map."""
        z = torch.zeros(batch, dtype=torch.long, device=device)
        h = torch.full_like(z, map_size[0])
        w = torch.full_like(z, map_size[1])
        return cls(map_size, z, z, (z, z, h, w), map_size, (0, 0, 0, 0, *map_size) if batch == 1 else None)


def _back_one(params: tuple, out: Window, in_size: tuple[int, int]) -> Window:
    """:func:`_back` for one seed through taps without gaps, in Python numbers (a reverse
    pass plans about a hundred steps; tensor arithmetic on one element costs more)."""
    cone = list(out.ints[2:]) if out.ints is not None else [int(c) for c in out.cone]
    size, values = [], [0] * 6
    for i, axis in enumerate(axes(params)):
        a, b = axis.reads(cone[i], cone[i + 2])
        a, b = max(0, a), min(in_size[i], b)
        n = min(in_size[i], max(1, b - a))
        size.append(n)
        values[i], values[2 + i], values[4 + i] = min(a, in_size[i] - n), a, b  # start, cone start, cone end
    return Window.one((size[0], size[1]), values, in_size, out.top.device)


def _back(params: tuple | Resampling, out: Window, in_size: tuple[int, int]) -> Window:
    """The input windows output windows ``out`` reach, through a spatial op's (kernel,
    stride, padding, dilation) or a resampling's weights (:mod:`zfvis.core.resampling`)."""
    if not isinstance(params, Resampling) and out.top.numel() == 1 and all(a.gapless for a in axes(params)):
        return _back_one(params, out, in_size)
    size, starts, cone_a, cone_b = [], [], [], []
    for i in range(2):
        if isinstance(params, Resampling):
            a, b = params.reach(i, out.cone[i], out.cone[i + 2])
        else:
            a, b = axes(params)[i].reached(out.cone[i], out.cone[i + 2], in_size[i])
        # as large as the largest cone: a seed whose cone a border clips computes less
        n = min(in_size[i], max(1, int((b - a).max())))
        size.append(n)
        starts.append(torch.minimum(a, torch.full_like(a, in_size[i] - n)))
        cone_a.append(a)
        cone_b.append(b)
    return Window(tuple(size), starts[0], starts[1], (cone_a[0], cone_a[1], cone_b[0], cone_b[1]), in_size)  # type: ignore[arg-type]


def union(windows: Sequence[Window], map_size: tuple[int, int]) -> Window:
    """The smallest windows (one size for all seeds) that hold every seed's cones."""
    if len(windows) == 1:
        return windows[0]
    first = windows[0]
    if all(w.ints is not None for w in windows):
        return _union_one(windows, map_size)
    if all(w.size == first.size and bool((w.top == first.top).all()) and bool((w.left == first.left).all())
           and all(bool((a == b).all()) for a, b in zip(w.cone, first.cone)) for w in windows[1:]):
        return first
    top = torch.stack([w.cone[0] for w in windows]).amin(0)
    left = torch.stack([w.cone[1] for w in windows]).amin(0)
    bottom = torch.stack([w.cone[2] for w in windows]).amax(0)
    right = torch.stack([w.cone[3] for w in windows]).amax(0)
    h = min(map_size[0], max(1, int((bottom - top).max())))
    w = min(map_size[1], max(1, int((right - left).max())))
    start_y = torch.minimum(top, torch.full_like(top, map_size[0] - h)).clamp(min=0)
    start_x = torch.minimum(left, torch.full_like(left, map_size[1] - w)).clamp(min=0)
    return Window((h, w), start_y, start_x, (top, left, bottom, right), map_size)


def _union_one(windows: Sequence[Window], map_size: tuple[int, int]) -> Window:
    """:func:`union` for one seed, in Python numbers."""
    first = windows[0]
    if all(w.ints == first.ints and w.size == first.size for w in windows[1:]):
        return first
    cones = [w.ints[2:] for w in windows]  # type: ignore[index]
    top, left = min(c[0] for c in cones), min(c[1] for c in cones)
    bottom, right = max(c[2] for c in cones), max(c[3] for c in cones)
    h, w = min(map_size[0], max(1, bottom - top)), min(map_size[1], max(1, right - left))
    start_y, start_x = max(0, min(top, map_size[0] - h)), max(0, min(left, map_size[1] - w))
    return Window.one((h, w), (start_y, start_x, top, left, bottom, right), map_size, first.top.device)


def _request(cone: str, params: tuple | None, out: Window | None, in_shape: tuple[int, ...], batch: int,
             device: torch.device) -> Window | None:
    """The window of one input that a node's output windows ``out`` reach."""
    if len(in_shape) < 2:
        return None
    in_size = (int(in_shape[-2]), int(in_shape[-1]))
    if out is None or cone == "full":
        return Window.whole(batch, in_size, device)
    if cone == "same":
        return out
    return _back(params, out, in_size)  # type: ignore[arg-type]


def plan(steps: Sequence, seed: str, top: Window | None, image_node: str, image_shape: tuple[int, ...], *,
         batch: int, device: torch.device) -> dict[str, Window | None]:
    """The window of every node's output on a reverse path.

    Args:
        steps: The path's :class:`zfvis.core.reverse.ReverseStep` list, in reverse execution
            order (each with ``node``, ``inputs``, ``cone``, ``params``, ``in_shapes``).
        seed: The seed node's name.
        top: The seeds' windows at the seed node's output (``None``: a vector).
        image_node: The input node's name.
        image_shape: The images' shape without batch.
        batch: Number of seeds.
        device: Where the window offsets live.

    Returns:
        Node name -> window of its output; where several nodes consume one output, its
        window holds all their cones (the producer sums their signals there).
    """
    windows: dict[str, Window | None] = {seed: top}
    requests: dict[str, list[Window | None]] = {}
    shapes: dict[str, tuple[int, ...]] = {image_node: tuple(image_shape)}

    def settle(name: str) -> bool:
        if name in windows:
            return True
        reqs = requests.get(name)
        if not reqs:
            return False
        maps = [r for r in reqs if r is not None]
        windows[name] = union(maps, maps[0].map_size) if maps else None
        return True

    for step in steps:
        if not settle(step.node):
            continue
        out = windows[step.node]
        for name, shape in zip(step.inputs, step.in_shapes):
            shapes[name] = shape
            requests.setdefault(name, []).append(_request(step.cone, step.params, out, shape, batch, device))
    settle(image_node)
    return windows


def receptive_field(steps: Sequence, image_node: str) -> dict[str, ReceptiveField | None]:
    """The receptive field of every node's output on a path (``None`` where outputs are
    vectors, a layer sees its whole input, or branches meet with different strides).

    Args:
        steps: :class:`zfvis.core.reverse.ReverseStep` list in reverse execution order.
        image_node: The input node's name.
    """
    fields: dict[str, ReceptiveField | None] = {image_node: ReceptiveField((1, 1), (1, 1), (0, 0))}
    for step in reversed(steps):
        ins = [fields.get(name) for name in step.inputs]
        rf: ReceptiveField | None = None
        if len(step.out_shape) >= 2 and ins and all(f is not None for f in ins):
            if step.cone == "same":
                rf = _merge(ins)  # type: ignore[arg-type]
            elif step.cone == "spatial" and len(ins) == 1 and ins[0] is not None:
                f = ins[0]
                rows, cols = (axis.field(f.size[i], f.jump[i], f.offset[i]) for i, axis in enumerate(axes(step.params)))
                rf = ReceptiveField((rows[0], cols[0]), (rows[1], cols[1]), (rows[2], cols[2]))
        fields[step.node] = rf
    return fields


def _merge(fields: Sequence[ReceptiveField]) -> ReceptiveField | None:
    """The field that holds each of ``fields`` (they must share their jump)."""
    first = fields[0]
    if any(f.jump != first.jump for f in fields):
        return None
    lo = tuple(min(f.offset[i] for f in fields) for i in range(2))
    hi = tuple(max(f.offset[i] + f.size[i] for f in fields) for i in range(2))
    return ReceptiveField((hi[0] - lo[0], hi[1] - lo[1]), first.jump, lo)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class StepCost:
    """What one reverse step costs, per pixel of the window it takes.

    Attributes:
        window: That window (per seed: its cone).
        work: Multiply-adds (or their equivalent in memory traffic) per pixel.
        channels: Channels of the signal on the window.
    """

    window: Window
    work: float
    channels: int


def group_seeds(n: int, steps: Sequence[StepCost], *, overhead: float, max_elements: int,
                max_size: int) -> list[list[int]]:
    """Splits seeds into batches that are cheap to reverse together.

    A batch shares one window size per step, the largest of its seeds' cones, so a seed
    whose cone is small (near a border, or lower in the network) pays for its
    neighbours' when batched with them; a batch also pays ``overhead`` once (running
    the steps), and its largest signal should stay small enough to work in cache.
    Seeds are taken largest first, and each joins the current batch while that costs
    less than reversing it on its own.

    Args:
        n: The number of seeds.
        steps: Every step with a map window, from one plan of all the seeds.
        overhead: The fixed cost of one batch, in the unit of ``work``.
        max_elements: The most elements a batch's signal may have at any step (a batch
            of one seed may have more).
        max_size: The most seeds in a batch.

    Returns:
        Batches of seed indices (each in increasing order), largest cones first.
    """
    if not steps:
        return [list(range(i, min(i + max_size, n))) for i in range(0, n, max_size)]
    heights = torch.stack([(s.window.cone[2] - s.window.cone[0]).clamp(min=1) for s in steps]).double().cpu()
    widths = torch.stack([(s.window.cone[3] - s.window.cone[1]).clamp(min=1) for s in steps]).double().cpu()
    work = torch.tensor([s.work for s in steps], dtype=torch.float64)
    channels = torch.tensor([s.channels for s in steps], dtype=torch.float64)
    own = (work[:, None] * heights * widths).sum(0)
    order = torch.argsort(own, descending=True, stable=True).tolist()
    groups: list[list[int]] = []
    members: list[int] = []
    gh = gw = torch.zeros(len(steps), dtype=torch.float64)
    cost = 0.0
    for j in order:
        nh, nw = torch.maximum(gh, heights[:, j]), torch.maximum(gw, widths[:, j])
        k = len(members) + 1
        merged = k * float((work * nh * nw).sum())
        fits = k <= max_size and k * float((channels * nh * nw).max()) <= max_elements
        if members and (not fits or merged - cost > float(own[j]) + overhead):
            groups.append(sorted(members))
            members, nh, nw = [], heights[:, j].clone(), widths[:, j].clone()
            merged = float(own[j])
        members.append(j)
        gh, gw, cost = nh, nw, merged
    groups.append(sorted(members))
    return groups
