"""Recording a forward pass over a traced model: what the reverse pass will need.

:func:`record` runs the model's graph (:mod:`zfvis.core.graph`) node by node on the images,
only as far as the requested layers need (every node they depend on, nothing after),
calling the model's own modules (so their hooks run) and functions in the model's own
order. For every node that carries the signal it keeps a :class:`~zfvis.core.ops.Site`: the
node's constant arguments, its shapes, and what its op records (max-pool switches, ReLU
masks for the guided and gradient rules). Nothing in the model is changed; every
module's ``training`` flag is restored, also when the pass raises. In-place operations
run as in the model; one that would overwrite a value still needed later is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..io.checks import forward_failure
from ..io.errors import (
    UnsupportedModelError,
    ZfvisError,
    is_out_of_memory,
)
from .cone import ReceptiveField
from .graph import GraphNode, ModelGraph, eval_mode
from .ops import SUPPORTED_TYPES, Live, Site

__all__ = ["Step", "Recording", "RemovableHandles", "UnsupportedModelError", "record", "SUPPORTED_TYPES", "eval_mode"]


@dataclasses.dataclass
class Step:
    """One node that carries the signal, as a forward pass saw it.

    Attributes:
        name: The node's name (a module's ``named_modules()`` name for a module called once).
        module: The module (``None`` for a function call).
        in_shape: Shape of its (first) input that carries the signal, without batch.
        out_shape: Shape of its output, without batch.
        kind: The module type or function name.
        receptive_field: The receptive field of its output (``None``: the whole input).
    """

    name: str
    module: nn.Module | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kind: str = ""
    receptive_field: ReceptiveField | None = None


@dataclasses.dataclass
class Recording:
    """What one forward pass left for the reverse pass.

    Attributes:
        layer: The node the pass was recorded for (``None``: the model's output).
        output: That node's output, (N, C, H, W) or (N, F).
        input_shape: The shape of the images, (N, C, H, W).
        sites: Per node that carries the signal, what its op needs in reverse.
        rule: The ReLU rule the masks were recorded for.
        graph: The traced model.
        problems: Nodes whose arguments turned out to be unsupported, with the error.
    """

    layer: str | None
    output: torch.Tensor
    input_shape: tuple[int, ...]
    sites: dict[str, Site]
    rule: str
    graph: ModelGraph
    problems: dict[str, UnsupportedModelError] = dataclasses.field(default_factory=dict)

    @property
    def steps(self) -> list[Step]:
        """The recorded nodes that carry the signal, in execution order."""
        return [
            Step(s.node.name, s.node.module, s.in_shapes[0] if s.in_shapes else (), s.out_shape, s.node.kind)
            for s in self.sites.values()
        ]


class RemovableHandles(list):  # type: ignore[type-arg]
    """A list of hook handles whose :meth:`remove` removes them all and empties it."""

    def remove(self) -> None:
        while self:
            self.pop().remove()


def _fetch_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _mutated(node: GraphNode, args: tuple[Any, ...], kwargs: dict[str, Any]) -> GraphNode | None:
    """The input an in-place operation overwrites, or ``None``."""
    fxn = node.fx_node
    inplace = (
        bool(getattr(node.module, "inplace", False))
        or bool(kwargs.get("inplace", False))
        or (fxn.op == "call_method" and str(fxn.target).endswith("_"))
        or (fxn.op == "call_function" and getattr(fxn.target, "__name__", "").endswith("_"))
    )
    first = fxn.args[0] if fxn.args else None
    if not inplace or not isinstance(first, fx.Node):
        return None
    return next((p for p in node.inputs if p.fx_node is first), None)


def _run(node: GraphNode, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    fxn = node.fx_node
    if fxn.op == "get_attr":
        return _fetch_attr(model, str(fxn.target))
    if node.module is not None:
        return node.module(*args, **kwargs)
    if fxn.op == "call_method":
        return getattr(args[0], str(fxn.target))(*args[1:], **kwargs)
    return fxn.target(*args, **kwargs)


def _site(node: GraphNode, env: dict[fx.Node, Any], out: Any) -> Site:
    live = [p for p in node.inputs if p.carries]
    slot = {p.fx_node: k for k, p in enumerate(live)}

    def value(n: fx.Node) -> Any:
        return Live(slot[n]) if n in slot else env[n]

    args = fx.node.map_arg(node.fx_node.args, value)
    kwargs = fx.node.map_arg(node.fx_node.kwargs, value)
    tensors = [env[p.fx_node] for p in live]
    if not isinstance(out, torch.Tensor) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise UnsupportedModelError(
            f"node '{node.name}' ({node.kind}) does not map tensors to one tensor; zfvis cannot reverse it"
        )
    return Site(node, tuple(args), dict(kwargs), live, [tuple(t.shape[1:]) for t in tensors], tuple(out.shape[1:]),
                cone=node.op.cone if node.op is not None else "same")


class _Pass:
    """One forward pass over the needed part of the graph."""

    def __init__(self, graph: ModelGraph, targets: list[GraphNode], rule: str) -> None:
        self.graph = graph
        self.rule = rule
        self.targets = {t.fx_node for t in targets}
        self.needed = graph.ancestors(targets)
        order = {n.fx_node: i for i, n in enumerate(self.needed)}
        self.last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.needed):
            for p in n.inputs:
                self.last_use[p.fx_node] = i
        self.order = order
        self.sites: dict[str, Site] = {}
        self.problems: dict[str, UnsupportedModelError] = {}
        self.outputs: dict[fx.Node, torch.Tensor] = {}

    def run(self, images: torch.Tensor) -> None:
        env: dict[fx.Node, Any] = {}
        model = self.graph.model
        last = len(self.needed) - 1
        for i, node in enumerate(self.needed):
            fxn = node.fx_node
            if fxn.op == "placeholder":
                out: Any = images
            else:
                args = fx.node.map_arg(fxn.args, lambda n: env[n])
                kwargs = fx.node.map_arg(fxn.kwargs, lambda n: env[n])
                self._check_inplace(node, args, kwargs, i)
                inputs = [env[p.fx_node] for p in node.inputs if p.carries] if node.carries else []
                out = _run(node, model, args, kwargs)
                if node.carries:
                    self._record(node, env, out, inputs)
            env[fxn] = out
            if fxn in self.targets and isinstance(out, torch.Tensor):
                self.outputs[fxn] = out if i == last else out.clone()
            for p in node.inputs:
                if self.last_use.get(p.fx_node) == i:
                    env.pop(p.fx_node, None)

    def _check_inplace(self, node: GraphNode, args: Any, kwargs: Any, i: int) -> None:
        victim = _mutated(node, args, kwargs)
        if victim is None:
            return
        later = [u for u in victim.users if u is not node and u.fx_node in self.order and self.order[u.fx_node] > i]
        if later:
            raise UnsupportedModelError(
                f"node '{node.name}' ({node.kind}) overwrites '{victim.name}' in place, which '{later[0].name}' reads "
                "afterwards; zfvis would reverse the wrong values. Hint: make that operation not in-place"
            )

    def _record(self, node: GraphNode, env: dict[fx.Node, Any], out: Any, inputs: list[Any]) -> None:
        if node.op is None:
            return
        try:
            site = _site(node, env, out)
            if node.op.prepare is not None:
                node.op.prepare(site)
            if node.op.record is not None:
                site.state = node.op.record(site, inputs, out, self.rule)
            self.sites[node.name] = site
        except UnsupportedModelError as err:
            self.problems[node.name] = err


def _model_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for p in model.parameters():
        return p.device, p.dtype
    return None, None


def record(graph: ModelGraph, images: torch.Tensor, targets: Sequence[GraphNode], rule: str = "deconvnet") -> tuple[
        dict[str, torch.Tensor], dict[str, Site], dict[str, UnsupportedModelError], tuple[int, ...]]:
    """Runs the model's graph on ``images`` as far as ``targets`` need.

    Args:
        graph: The traced model.
        images: A batch (N, C, H, W); moved to the model's device and dtype.
        targets: The nodes whose outputs are wanted.
        rule: The ReLU rule the reverse pass will use (which masks to keep).

    Returns:
        (outputs by node name, sites by node name, problems by node name, the images' shape).

    Raises:
        ForwardPassError: The forward pass failed (another input size or channel count?);
            a ``ValueError``. Running out of memory is raised as it is.
        UnsupportedModelError: An in-place operation overwrites a value read later.
    """
    device, dtype = _model_device_dtype(graph.model)
    if device is not None:
        images = images.to(device=device, dtype=dtype)
    p = _Pass(graph, list(targets), rule)
    with eval_mode(graph.model), torch.no_grad():
        try:
            p.run(images)
        except RuntimeError as err:
            if isinstance(err, ZfvisError) or is_out_of_memory(err):
                raise
            raise forward_failure(err, graph.model, images) from err
    outputs = {t.name: p.outputs[t.fx_node] for t in targets if t.fx_node in p.outputs}
    return outputs, p.sites, p.problems, tuple(images.shape)
