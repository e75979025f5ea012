"""Stretches of a forward pass where the batch is not the first dimension, each reversed whole.

Windows or attention heads folded into the batch, an axis permuted before it, a tuple of
tensors, or code of the model's own kept whole (:mod:`zfvis.core.program`): such a stretch of
nodes is reversed as one, by its true backward over the whole recorded batch
(:class:`~zfvis.core.reverse_grad.WholeBatchVectorJacobian`), from the inputs where the batch
was first to the node where it is first again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ..io.errors import UnsupportedModelError
from .graph import GraphNode, ModelGraph
from .ops import OPS, WHOLE_BATCH, Live, Site
from .ops.args import live_call
from .ops.grad import RecordedGraph, RecordedInputs
from .program import Replays
from .shared_records import SharedRecords

__all__ = ["Fold", "Stretches", "output_shape", "tensors_of"]


@dataclasses.dataclass
class Fold:
    """A stretch of nodes, so far, where the batch is not the first dimension.

    Attributes:
        start: The node where the batch left the first dimension.
        roots: The stretch's inputs that have the batch first, in order.
        values: Their recorded values (the whole batch).
        fn: The stretch up to here as a function of the roots.
    """

    start: GraphNode
    roots: list[GraphNode]
    values: list[torch.Tensor]
    fn: Callable[..., Any]


def tensors_of(value: Any) -> bool:
    """Whether a value is a tuple or list of tensors (``None`` allowed: attention without weights)."""
    return (isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)
            and all(v is None or isinstance(v, torch.Tensor) for v in value))


def output_shape(node: GraphNode, out: Any) -> tuple[int, ...]:
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(
            f"node '{node.name}' ({node.kind}) does not map tensors to one tensor; zfvis cannot reverse it")
    if not (out.is_floating_point() or out.is_complex()):
        raise UnsupportedModelError(
            f"node '{node.name}' ({node.kind}) gives {out.dtype} values, which have no gradient; zfvis cannot send "
            "the signal back through it")
    return tuple(out.shape[1:])


def _fold_fn(fold: Fold, roots: list[GraphNode]) -> Callable[[tuple[torch.Tensor, ...]], Any]:
    where = [roots.index(r) for r in fold.roots]
    return lambda ts: fold.fn(*(ts[i] for i in where))


def _root_fn(k: int) -> Callable[[tuple[torch.Tensor, ...]], Any]:
    return lambda ts: ts[k]


class Stretches:
    """Stretches of nodes where the batch is not the first dimension (windows or heads
    folded into it, an axis permuted before it), reversed as one each, over the whole batch."""

    graph: ModelGraph
    batch: int
    not_batch: frozenset[str]
    folds: dict[fx.Node, Fold]
    sites: dict[str, Site]
    recorded: SharedRecords
    replays: Replays
    rule: str

    def _folded(self, node: GraphNode, out: Any) -> bool:
        """Whether a node's tensor output does not have the batch as its first dimension."""
        if not isinstance(out, torch.Tensor):
            return False
        return out.dim() == 0 or out.shape[0] != self.batch or node.name in self.not_batch

    def _fold(self, node: GraphNode, env: dict[fx.Node, Any], out: Any) -> None:
        """Extends the stretches the node reads (or starts one) by the node; where its output
        has the batch first again, the stretch ends there and gets its site."""
        live = [p for p in node.inputs if p.carries]
        folds = [self.folds[p.fx_node] for p in live if p.fx_node in self.folds]
        replay = self.replays.found.get(node.fx_node)
        if replay is not None and replay.problem is not None:
            raise replay.problem
        roots: list[GraphNode] = []
        values: list[torch.Tensor] = []
        for i, p in enumerate(live):
            fold = self.folds.get(p.fx_node)
            for k, r in enumerate(fold.roots if fold is not None else [p]):
                if r not in roots:
                    roots.append(r)
                    values.append(fold.values[k] if fold is not None else
                                  replay.values[i] if replay is not None else env[p.fx_node].detach())
        pieces = [_fold_fn(self.folds[p.fx_node], roots) if p.fx_node in self.folds else _root_fn(roots.index(p))
                  for p in live]
        own = _call_site(node, env, live)
        if replay is not None and replay.graph is not None:  # reversed by the graph of its run, never run again
            call: Callable[..., Any] = _graph_only(node.name, self.rule)
        else:
            call = replay.program if replay is not None and replay.program is not None else own.fn or live_call(own)
        start = folds[0].start if folds else node

        def fn(*ts: torch.Tensor) -> Any:
            return call(*(piece(ts) for piece in pieces))

        if self._folded(node, out) or tensors_of(out) or not isinstance(out, torch.Tensor):
            holder = Fold(start, roots, values, fn)
            self.folds[node.fx_node] = holder
            placeholder = Site(node, (), {}, roots, [], (), state=values, cone="bundle", entry=OPS[WHOLE_BATCH])
            self.recorded.watch(placeholder)
            self.sites[node.name] = placeholder
            return
        state = RecordedInputs(values)
        if replay is not None and not folds:  # a stretch of its own: run with gradients on from now on
            if replay.graph is not None:
                state.graph = RecordedGraph(*replay.graph, self.rule)
            elif replay.program is not None and node.name in self.replays.checked:
                self.replays.graphed.add(node.name)
        site = Site(node, own.args, own.kwargs, roots, [tuple(v.shape[1:]) for v in values], output_shape(node, out),
                    state=state, cone="full", entry=OPS[WHOLE_BATCH], fn=fn, start=start)
        self.recorded.watch(site)
        self.sites[node.name] = site

    def stretch_problems(self, targets: list[GraphNode]) -> dict[str, UnsupportedModelError]:
        """A target inside a stretch (its output does not have the batch first) cannot be seeded."""
        found: dict[str, UnsupportedModelError] = {}
        for t in targets:
            fold = self.folds.get(t.fx_node)
            if fold is not None:
                where = f" ({fold.start.source})" if fold.start.source else ""
                found[t.name] = UnsupportedModelError(
                    f"node '{fold.start.name}' ({fold.start.kind}){where}: its output's first dimension is not the "
                    f"batch of {self.batch} images (it merges or drops the batch dimension), so layer '{t.name}' "
                    "cannot be seeded per image. Hint: keep the batch first, e.g. torch.flatten(x, 1), or project "
                    "a layer where the batch is first again")
        return found


def _graph_only(name: str, rule: str) -> Callable[..., Any]:
    def fn(*ts: torch.Tensor) -> Any:
        raise RuntimeError(f"node '{name}' was recorded with its autograd graph for the {rule} rule; "
                           "it is reversed only by that graph")

    return fn


def _call_site(node: GraphNode, env: dict[fx.Node, Any], live: list[GraphNode]) -> Site:
    """A node as a function of its live inputs, tensors or tuples of them (no checks: it is
    reversed as part of a stretch, by its true backward)."""
    slot = {p.fx_node: k for k, p in enumerate(live)}
    args = fx.node.map_arg(node.fx_node.args, lambda n: Live(slot[n]) if n in slot else env[n])
    kwargs = fx.node.map_arg(node.fx_node.kwargs, lambda n: Live(slot[n]) if n in slot else env[n])
    return Site(node, tuple(args), dict(kwargs), live, [], ())
