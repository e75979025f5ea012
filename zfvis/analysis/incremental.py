"""Incremental occlusion inference (Krypton: Nakandala et al., SIGMOD 2019).

An occluder changes only the part of each layer's input inside its forward cone.
:class:`IncrementalOcclusion` runs the engine's torch.fx graph of the model
(:class:`zfvis.core.graph.ModelGraph`) once on the unoccluded image, caching every node's
value, and plans for every node how it is computed for each occluder position:

* ``const``: independent of the image (weights, constants): the cached value;
* ``base``: unchanged by every occluder: the cached value;
* ``patch``: recomputed over one window per position, the window that holds the region
  the occluder changes, from the windows of its inputs that the kernel reads (the halo),
  with the cached map pasted around each position's changes;
* ``full``: recomputed whole for the batch of positions, where the window would cover
  the map, or where the operation has no incremental rule
  (the op table's, :mod:`zfvis.core.ops.incremental_rules`): from there on the batch runs as ordinary inference,
  so the result stays exact.

Chains and graphs (residual additions, concatenations, branches) are served alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx

from ..core.graph import ModelGraph, attr_value
from ..core.inplace import overwritten
from ..core.ops.incremental_rules import Pointwise, Rule, Window, rule_of
from ..core.capture import verify
from ..core.record import prepared_site
from ..io.errors import CaptureMismatchError, UnsupportedModelError, UserInputError

__all__ = ["IncrementalOcclusion", "NotIncremental", "map_totals"]

CONST, BASE, PATCH, FULL = "const", "base", "patch", "full"


class NotIncremental(UserInputError):
    """The model cannot be computed incrementally with exact results (the message says why)."""


def map_totals(out: torch.Tensor, channel: int) -> torch.Tensor:
    """Per image, the sum of feature map ``channel`` (or the unit's value for a vector)."""
    return out[:, channel].reshape(out.shape[0], -1).sum(dim=1)


class Patch(NamedTuple):
    """A node's values over one window per position: (B, C, h, w) at top-left offsets (B, 2)."""

    values: torch.Tensor
    offset: torch.Tensor


@dataclasses.dataclass
class Need:
    """The window of one input a node reads, for every position.

    Attributes:
        node: The input node.
        offset: Top-left of the window in the input map, per position (P, 2); may lie
            outside the map (padding).
        size: (h, w) of the window.
        fill: Value outside the map (0 for convolution, -inf for max-pooling).
        pads: (top, bottom, left, right) padding that keeps every window inside.
    """

    node: fx.Node
    offset: torch.Tensor
    size: tuple[int, int]
    fill: float
    pads: tuple[int, int, int, int]


@dataclasses.dataclass
class NodePlan:
    """How a node is computed for every position batch (``mode``: const, base, patch, full).

    Attributes:
        mode: See the module's docstring.
        region: (P, 4): rows [r0, r1), columns [c0, c1) the occluder changes.
        offset: (P, 2): the window's top-left (``patch``).
        size: (h, w) of the window (``patch``).
        rule: The incremental rule (``patch``).
        needs: The input windows it reads (``patch``).
    """

    mode: str
    region: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    size: tuple[int, int] = (0, 0)
    rule: Rule | None = None
    needs: list[Need] = dataclasses.field(default_factory=list)


class IncrementalOcclusion:
    """Incremental occlusion inference over the engine's fx graph of a model.

    Construction runs the unoccluded pass (caching every node's value) and plans every
    node; :meth:`run` computes one batch of positions.

    Args:
        graph: The engine's traced model (:attr:`zfvis.Deconvnet.graph`).
        image: The unoccluded image (C, H, W).
        layer: Engine node name of the layer whose map totals are measured, or ``None``.
        grid: Occluder top-left corners (P, 2).
        patch: Occluder (height, width).
        fill: Occluder colour (C,).

    Raises:
        NotIncremental: The model overwrites, in place, a tensor that it reads again
            (incremental results would differ from the model's).
    """

    method = "incremental"

    def __init__(self, graph: ModelGraph, image: torch.Tensor, layer: str | None, grid: torch.Tensor,
                 patch: tuple[int, int], fill: torch.Tensor) -> None:  # fmt: skip
        self.model, self.image, self.grid, self.patch, self.fill = graph.model, image, grid, patch, fill
        # what the model runs, checked against the graph (marks in-place writes and hooked leaves)
        # first: it may rewire the graph, whose users the plans below read
        try:
            verify(graph, image[None]).check(graph, [graph.nodes[-1]])
        except CaptureMismatchError as err:
            raise NotIncremental(str(err)) from None
        self.modules = dict(self.model.named_modules())
        self.nodes = list(graph.input.fx_node.graph.nodes)
        self.names = {gn.fx_node: gn.name for gn in graph.nodes}
        self.graph_nodes = {gn.fx_node: gn for gn in graph.nodes}
        self.output = next(n for n in self.nodes if n.op == "output")
        order = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((order[u] for u in n.users), default=-1) for n in self.nodes}
        self.base: dict[fx.Node, Any] = {}
        self.writes = {gn.fx_node for gn in graph.nodes if gn.writes}
        self._base_pass()
        self.base_logits = self.base[self.output]
        self.layer_node = None if layer is None else graph.by_name[layer].fx_node
        self.base_layer = None if self.layer_node is None else self.base[self.layer_node]
        self.plans: dict[fx.Node, NodePlan] = {}
        for node in self.nodes:
            self.plans[node] = self._plan(node)
        self._padded: dict[tuple[fx.Node, tuple[int, ...], float], torch.Tensor] = {}

    # ------------------------------------------------------------------ base pass
    def call(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], owned: bool = False) -> Any:
        """Runs one node's operation; an in-place one gets a copy of its first argument
        unless the caller ``owned`` it (no one reads it afterwards)."""
        if self._in_place(node):  # it writes what it is given: its own copies (the first, unless owned)
            args = tuple(a.clone() if isinstance(a, torch.Tensor) and (k or not owned) else a
                         for k, a in enumerate(args))
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)  # type: ignore[index]
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        obj, *rest = args
        return getattr(obj, node.target)(*rest, **kwargs)  # type: ignore[arg-type]

    def _base_pass(self) -> None:
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":  # the images, or a further argument at its default
                value = node.args[0] if node.args else self.image[None]
            elif node.op == "get_attr":
                value = attr_value(self.model, node)
            elif node.op == "output":
                value = fx.node.map_arg(node.args[0], lambda n: self.base[n])
            else:
                args = fx.node.map_arg(node.args, lambda n: self.base[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: self.base[n])
                self._check_inplace(node, args, kwargs, i)  # type: ignore[arg-type]
                value = self.call(node, args, kwargs)  # type: ignore[arg-type]
            self.base[node] = value

    def _in_place(self, node: fx.Node) -> bool:
        return node in self.writes

    def _check_inplace(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], i: int) -> None:
        """Refuses an in-place operation on memory that a later node reads through another
        value (a view of it, or the tensor it is a view of): the engine gives every in-place
        operation a copy, so it would not see the change the model makes."""
        if not args or not self._in_place(node):
            return
        later = ((self.names.get(n, n.name), v) for n, v in self.base.items() if self.last_use[n] > i)
        other = overwritten(args[0], later)
        if other is not None:
            raise NotIncremental(f"the model's forward() changes a tensor in place ({self.names[node]}) that "
                                 f"'{other}' still reads afterwards")

    # ------------------------------------------------------------------ planning
    def _plan(self, node: fx.Node) -> NodePlan:
        if node.op == "placeholder" and node.args:  # a further argument at its default
            return NodePlan(CONST)
        if node.op == "placeholder":
            ph, pw = self.patch
            t, l = self.grid[:, 0], self.grid[:, 1]
            return self._window_plan(torch.stack([t, t + ph, l, l + pw], dim=1), self.base[node], None)
        inputs = node.all_input_nodes
        if node.op == "get_attr" or not any(self.plans[n].mode != CONST for n in inputs):
            return NodePlan(CONST)
        if node.op == "output" or any(self.plans[n].mode == FULL for n in inputs):
            return NodePlan(FULL)
        rule = self._rule(node)
        if rule is None:
            return NodePlan(FULL)
        data = [n for n in inputs if self.plans[n].mode != CONST]
        region = rule.changed([self.plans[n].region for n in data], tuple(self.base[node].shape[-2:]))  # type: ignore[misc]
        plan = self._window_plan(region, self.base[node], rule)
        if plan.mode == PATCH:
            plan.needs = self._needs(node, plan, rule)
        return plan

    def _window_plan(self, region: torch.Tensor, value: torch.Tensor, rule: Rule | None) -> NodePlan:
        """One window size for all positions, each window placed to hold its region."""
        h, w = value.shape[-2:]
        sizes = (region[:, 1::2] - region[:, 0::2]).clamp(min=0)
        wh, ww = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        if wh == 0 or ww == 0:
            return NodePlan(BASE, region=region)
        if wh >= h and ww >= w:
            return NodePlan(FULL, region=region)
        top = region[:, 0].clamp(0, h - wh)
        left = region[:, 2].clamp(0, w - ww)
        return NodePlan(PATCH, region, torch.stack([top, left], dim=1), (wh, ww), rule)

    def _needs(self, node: fx.Node, plan: NodePlan, rule: Rule) -> list[Need]:
        """The window of every input (data, or a constant with a spatial extent) the node reads."""
        needs = []
        offset, size, fill = rule.reads(plan.offset, plan.size)  # type: ignore[arg-type]
        for n in node.all_input_nodes:
            if self.plans[n].mode == CONST and (isinstance(rule, Window) or not _spatial(self.base[n])):
                continue  # a sliding window's weights are not read over the map
            hw = self.base[n].shape[-2:]
            pads = (
                max(0, -int(offset[:, 0].min())),
                max(0, int(offset[:, 0].max()) + size[0] - hw[0]),
                max(0, -int(offset[:, 1].min())),
                max(0, int(offset[:, 1].max()) + size[1] - hw[1]),
            )
            needs.append(Need(n, offset, size, fill, pads))
        return needs

    def _rule(self, node: fx.Node) -> Rule | None:
        """The node's incremental rule, from its op's entry (``None``: full recomputation from here)."""
        out, gn = self.base[node], self.graph_nodes.get(node)
        if not _is_map(out) or gn is None or gn.op is None or not gn.carries:
            return None
        inputs = node.all_input_nodes
        data = [self.base[n] for n in inputs if self.plans[n].mode != CONST]
        consts = [self.base[n] for n in inputs if self.plans[n].mode == CONST]
        if not all(isinstance(self.base[p.fx_node], torch.Tensor) for p in gn.inputs if p.carries):
            return None  # an item of a tuple
        try:
            rule = rule_of(prepared_site(gn, self.base, out))
        except UnsupportedModelError:
            return None
        if isinstance(rule, Pointwise):
            same = all(_is_map(v) and v.shape[-2:] == out.shape[-2:] for v in data)
            usable = all(not isinstance(v, torch.Tensor) or _broadcasts(v, out) for v in consts)
            return rule if same and usable else None
        if isinstance(rule, Window) and len(data) == 1 and _is_map(data[0]):
            return rule
        return None

    def work(self) -> dict[str, tuple[str, float]]:
        """Per layer (engine name) with a map that is recomputed: its mode and the share of
        the map it computes per occluder position (1.0 for ``full``)."""
        out = {}
        for node, plan in self.plans.items():
            value = self.base[node]
            if node in self.names and plan.mode in (PATCH, FULL) and _is_map(value):
                share = plan.size[0] * plan.size[1] / (value.shape[-2] * value.shape[-1]) if plan.mode == PATCH else 1.0
                out[self.names[node]] = (plan.mode, share)
        return out

    # ------------------------------------------------------------------ batches
    def run(self, idx: torch.Tensor, channel: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, K) and the layer's channel totals (B,) for positions ``idx``."""
        env: dict[fx.Node, Any] = {}
        acts = logits = None
        for i, node in enumerate(self.nodes):
            if node.op == "output":
                logits = fx.node.map_arg(node.args[0], lambda n: self._full_value(n, env, len(idx)))
                break
            mode = self.plans[node].mode
            if node.op == "placeholder" and node.args:
                env[node] = node.args[0]
            elif node.op == "placeholder":
                ph, pw = self.patch
                values = self.fill.view(1, -1, 1, 1).expand(len(idx), -1, ph, pw)
                env[node] = Patch(values, self.grid[idx])
                if mode == FULL:
                    env[node] = self._materialise(node, env[node], len(idx))
            elif mode == PATCH:
                env[node] = self._compute_patch(node, env, idx)
            elif mode == FULL:
                env[node] = self._compute_full(node, env, len(idx), i)
            if node is self.layer_node and channel is not None:
                acts = self._layer_totals(node, env, len(idx), channel)
            for n in node.all_input_nodes:
                if self.last_use[n] == i:
                    env.pop(n, None)
        return logits, acts  # type: ignore[return-value]

    def _compute_full(self, node: fx.Node, env: dict[fx.Node, Any], batch: int, i: int) -> Any:
        """The node's operation on whole batched inputs (an owned first input may be overwritten)."""
        args = fx.node.map_arg(node.args, lambda n: self._full_value(n, env, batch))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self._full_value(n, env, batch))
        first = node.args[0] if node.args else None
        owned = isinstance(first, fx.Node) and self.plans[first].mode == FULL and self.last_use[first] == i
        return self.call(node, args, kwargs, owned)  # type: ignore[arg-type]

    def _compute_patch(self, node: fx.Node, env: dict[fx.Node, Any], idx: torch.Tensor) -> Patch:
        plan = self.plans[node]
        windows = {need.node: self._extract(need, env.get(need.node), idx) for need in plan.needs}
        offset = plan.offset[idx]  # type: ignore[index]
        return Patch(plan.rule.compute(node, windows, self.base, offset, plan.size, self.call), offset)  # type: ignore[union-attr]

    def _padded_base(self, need: Need) -> torch.Tensor:
        key = (need.node, need.pads, need.fill)
        if key not in self._padded:
            t, b, l, r = need.pads
            base = self.base[need.node]
            self._padded[key] = F.pad(base, (l, r, t, b), value=need.fill) if any(need.pads) else base
        return self._padded[key]

    def _extract(self, need: Need, value: Any, idx: torch.Tensor) -> torch.Tensor:
        """Each position's window of an input (a fresh tensor): the cached map with the
        position's patch pasted in."""
        base = self._padded_base(need)
        h, w = need.size
        offset = need.offset[idx]
        windows = base[0].unfold(1, h, 1).unfold(2, w, 1).permute(1, 2, 0, 3, 4)
        out = windows[offset[:, 0] + need.pads[0], offset[:, 1] + need.pads[2]]
        if isinstance(value, Patch):
            _paste(out, value, offset)
        return out

    def _materialise(self, node: fx.Node, value: Any, batch: int, channels: slice = slice(None)) -> torch.Tensor:
        """A node's whole map for every position in the batch (B, C, H, W), a fresh tensor."""
        base = self.base[node][:, channels]
        out = base.expand(batch, *base.shape[1:]).clone()
        if isinstance(value, Patch):
            _paste(out, Patch(value.values[:, channels], value.offset), torch.zeros_like(value.offset))
        return out

    def _full_value(self, node: fx.Node, env: dict[fx.Node, Any], batch: int) -> Any:
        mode = self.plans[node].mode
        if mode == CONST:
            return self.base[node]
        if mode == FULL:
            return env[node]
        return self._materialise(node, env.get(node), batch)

    def _layer_totals(self, node: fx.Node, env: dict[fx.Node, Any], batch: int, channel: int) -> torch.Tensor:
        value = env.get(node)
        if self.plans[node].mode == FULL:
            return map_totals(value, channel)  # type: ignore[arg-type]
        return map_totals(self._materialise(node, value, batch, slice(channel, channel + 1)), 0)


def _is_map(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[0] == 1


def _spatial(const: Any) -> bool:
    """Whether a constant argument varies over (y, x) (then it is read over the window too)."""
    return isinstance(const, torch.Tensor) and const.dim() >= 2 and tuple(const.shape[-2:]) != (1, 1)


def _broadcasts(const: torch.Tensor, out: torch.Tensor) -> bool:
    """A constant usable in a windowed op: no (y, x) extent, or the output's whole map (1, C, H, W)."""
    if const.dim() < 2:
        return const.numel() == 1  # a vector would broadcast along x
    if tuple(const.shape[-2:]) == (1, 1):
        return True
    return const.dim() == 4 and const.shape[0] == 1 and const.shape[-2:] == out.shape[-2:]


def _paste(out: torch.Tensor, patch: Patch, offset: torch.Tensor) -> None:
    """Writes each position's patch into its window ``out`` (B, C, h, w) at ``offset``, where they overlap."""
    h, w = out.shape[-2:]
    ph, pw = patch.values.shape[-2:]
    rel = patch.offset - offset
    groups, inverse = torch.unique(rel, dim=0, return_inverse=True)
    for g, (dr, dc) in enumerate(groups.tolist()):
        r0, r1, c0, c1 = max(0, dr), min(h, dr + ph), max(0, dc), min(w, dc + pw)
        if r0 >= r1 or c0 >= c1:
            continue
        src = patch.values[..., r0 - dr : r1 - dr, c0 - dc : c1 - dc]
        if len(groups) == 1:
            out[..., r0:r1, c0:c1] = src
        else:
            sel = (inverse == g).nonzero().squeeze(1)
            out[sel, :, r0:r1, c0:c1] = src[sel]
