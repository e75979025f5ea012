"""The model as a graph: torch.fx tracing, node names, and which nodes carry the signal.

:func:`trace_model` traces a model symbolically (in eval mode) with torch.fx, keeping as
leaves every module type the op table knows (by exact type: a subclass, such as timm's
``BatchNormAct2d``, is traced into, since its ``forward`` may differ), plus torch.nn's own
modules. Containers (``nn.Sequential``, a ResNet block, an Inception module) are traced
through, so functional calls in ``forward()`` (``F.relu``, ``x + y``, ``torch.cat``,
``torch.flatten``) become nodes too.

Nodes are named as torchvision's ``get_graph_node_names`` names them: a module call by
its ``named_modules()`` name, a function call by the enclosing module's name and the
function's (``layer1.0.add``), with ``_1``, ``_2``, ... for repeated names within a
module (``layer1.0.relu_1``). A custom module that cannot be traced (its ``forward``
raises, or branches on tensor values) is kept as one opaque node, reversed by its
gradient at its recorded input. An in-place call is a new version of the tensor it
writes: every later reader of that tensor reads the call's node
(:mod:`zfvis.core.inplace`)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..io.errors import UnsupportedModelError
from . import ops
from .inplace import version_in_place
from .model_state import kept_buffers
from .source_lines import describe, node_source, trace_failure, user_frame

__all__ = ["GraphNode", "ModelGraph", "trace_model", "eval_mode", "attr_value"]

_CONSTANT = "zfvis_constant"  # fx node meta: a tensor the trace made (kept off the model)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts every module in eval mode and restores each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@dataclasses.dataclass(eq=False)
class GraphNode:
    """One node of the traced model.

    Attributes:
        name: Its name (``layer1.0.relu_1``).
        fx_node: The torch.fx node it comes from.
        index: Position in execution order.
        module_name: For a module call, the module's ``named_modules()`` name.
        module: For a module call, the module.
        op: The op-table entry that reverses it (``None``: no entry).
        carries: Whether the node's value depends on the input image through tensors
            (the reverse signal can flow through it); shape queries like ``x.size(0)``
            depend on the input but carry no signal.
        problem: Why the node cannot be reversed, for nodes that carry the signal
            without an op-table entry.
        source: ``file:line: code`` of the call in the model's source, where fx knows it.
        writes: Whether it writes into its first argument (:mod:`zfvis.core.inplace`; an
            augmented assignment ``a += b``, which fx traces as ``a + b``, once the model's
            own run showed it, :mod:`zfvis.core.capture`).
        in_place: Whether it writes into its first argument, which carries the signal.
        hooked: A leaf module with forward hooks: reversed as the whole call, hooks included.
        derived: An integer or boolean value computed from the images (a mask ``x > 0``):
            it carries no signal, but differs per image.
        traced_op: The op-table entry the trace found (``op`` differs while ``hooked``).
        replayed: Code of the model's own kept whole (a submodule fx could not trace, a
            function of the model's, a hooked leaf): reversed by replaying the ATen calls it
            made in the forward pass (:mod:`zfvis.core.program`), not by running it again.
    """

    name: str
    fx_node: fx.Node
    index: int
    module_name: str | None = None
    module: nn.Module | None = None
    op: ops.Op | None = None
    carries: bool = False
    problem: str | None = None
    function: str | None = None  # the torch.autograd.Function whose forward made it
    source: str | None = None
    in_place: bool = False
    writes: bool = False
    hooked: bool = False
    derived: bool = False
    traced_op: ops.Op | None = None
    replayed: bool = False
    inputs: list[GraphNode] = dataclasses.field(default_factory=list)
    users: list[GraphNode] = dataclasses.field(default_factory=list)

    @property
    def kind(self) -> str:
        """A short description of what the node does (module type or function name)."""
        if self.module is not None:
            return type(self.module).__name__
        target = self.fx_node.target
        if self.fx_node.op == "call_method":
            return f"Tensor.{target}"
        return getattr(target, "__name__", str(target))

    def __repr__(self) -> str:
        return f"GraphNode({self.name!r}, {self.kind})"


@dataclasses.dataclass
class ModelGraph:
    """A traced model.

    Attributes:
        model: The model.
        nodes: Every node in execution order (the input first).
        by_name: Nodes by name.
        module_output: For each ``named_modules()`` name that a forward call produced,
            the node holding its (last) output.
        first_call: For modules called more than once, the node of the first call.
        opaque: Modules kept whole because tracing into them failed, with the reason.
        tuples: Modules that return a tuple or list, with the names of the nodes of its tensors.
    """

    model: nn.Module
    nodes: list[GraphNode]
    by_name: dict[str, GraphNode]
    module_output: dict[str, GraphNode]
    first_call: dict[str, GraphNode]
    opaque: dict[str, str]
    tuples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    verdicts: dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False)
    _ancestors: dict[Any, list[GraphNode]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def input(self) -> GraphNode:
        """The image placeholder."""
        return self.nodes[0]

    def node_names(self) -> list[str]:
        """Names of the nodes that carry the signal, in execution order (not the input)."""
        return [n.name for n in self.nodes[1:] if n.carries]

    def ancestors(self, targets: list[GraphNode], *, writes: bool = False) -> list[GraphNode]:
        """Every node the targets depend on (including them), in execution order; with
        ``writes``, also every in-place call before the last of them (it may write into
        memory a target reads through a view) and what it depends on (kept until the edges change)."""
        key = (tuple(t.index for t in targets), writes)
        found = self._ancestors[key] = self._ancestors.get(key) or self._find_ancestors(targets, writes)
        return list(found)

    def _find_ancestors(self, targets: list[GraphNode], writes: bool) -> list[GraphNode]:
        seen: set[int] = set()
        stack = list(targets)
        if writes and targets:
            last = max(t.index for t in targets)
            stack += [n for n in self.nodes if n.in_place and n.index < last]
        while stack:
            n = stack.pop()
            if n.index in seen:
                continue
            seen.add(n.index)
            stack.extend(n.inputs)
        return [n for n in self.nodes if n.index in seen]

    def set_hooked(self, modules: frozenset[str]) -> None:
        """Marks the leaf nodes whose module has forward hooks (names in ``modules``): each
        is reversed as its whole call, hooks included, by its vector-Jacobian product."""
        for n in self.nodes:
            n.hooked = n.carries and n.module_name in modules and n.traced_op is not None
            n.op = ops.OPS[ops.GENERIC] if n.hooked else n.traced_op
            n.replayed = n.hooked or _own_code(n, self.opaque)

    def signal_path(self, seed: GraphNode) -> list[GraphNode]:
        """The nodes a reverse pass from ``seed`` runs through, in execution order: those
        that carry the signal and reach ``seed`` through nodes that carry it (not a value that
        only gates it: ``torch.round(a).detach() * a`` sends nothing back through the round)."""
        seen: set[int] = set()
        stack = [seed] if seed.carries else []
        while stack:
            n = stack.pop()
            if n.index not in seen:
                seen.add(n.index)
                stack.extend(p for p in n.inputs if p.carries)
        return [n for n in self.nodes if n.index in seen]


class _Tracer(fx.Tracer):
    """fx tracer that keeps op-table modules as leaves and names nodes like torchvision."""

    def __init__(self, opaque: set[str]) -> None:
        super().__init__(autowrap_functions=(), param_shapes_constant=False)
        self.record_stack_traces = True
        self.opaque = opaque
        self.path = ""
        self.names: dict[fx.Node, str] = {}
        self.module_of: dict[fx.Node, str] = {}
        self.counts: dict[str, int] = {}
        self.outputs: dict[str, fx.Node] = {}
        self.calls: dict[str, list[fx.Node]] = {}
        self.failed: tuple[str, str] | None = None
        self.tuples: dict[str, list[fx.Node]] = {}
        self.no_grad: set[fx.Node] = set()  # made where the model's code turned gradients off
        self.function: str | None = None  # the torch.autograd.Function whose forward is being traced
        self.in_function: dict[fx.Node, str] = {}  # made inside one
        self.made: list[torch.Tensor] = []  # tensors the trace made (constants)

    def create_arg(self, a: Any) -> Any:
        """As fx's, but a tensor the trace made (not a parameter, buffer or attribute of the
        model) is kept on its ``get_attr`` node: fx would set it on the model."""
        if type(a) is torch.Tensor and self.tensor_attrs.get(a) is None:
            node = self.create_node("get_attr", f"_zfvis_constant_{len(self.made)}", (), {})
            node.meta[_CONSTANT] = a
            self.made.append(a)
            return node
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque or type(m) in ops.MODULE_OPS:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        outer = self.path
        qualname = self.path_of_module(m)
        self.path = qualname
        try:
            if self.is_leaf_module(m, qualname):
                out = self.create_proxy("call_module", qualname, args, kwargs)
            else:
                try:
                    out = forward(*args, **kwargs)
                except Exception as err:
                    if self.failed is None and qualname:
                        self.failed = (qualname, describe(err))
                    raise
            if isinstance(out, fx.Proxy):
                self.outputs[qualname] = out.node
                self.calls.setdefault(qualname, []).append(out.node)
            elif isinstance(out, (tuple, list)) and qualname:
                self.tuples[qualname] = [p.node for p in out if isinstance(p, fx.Proxy)]
            return out
        finally:
            self.path = outer

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if not torch.is_grad_enabled():  # inside the model's ``with torch.no_grad():`` (traced with them on)
            self.no_grad.add(node)
        if self.function is not None:
            self.in_function[node] = self.function
        if kind == "call_module":
            base = str(target)
            self.module_of[node] = base
        elif kind == "placeholder":
            base = node.name
        else:
            local = re.sub(r"_\d+$", "", node.name)
            base = f"{self.path}.{local}" if self.path else local
        n = self.counts.get(base, -1) + 1
        self.counts[base] = n
        self.names[node] = base if n == 0 else f"{base}_{n}"
        return proxy


def _defaults(model: nn.Module) -> dict[str, Any] | None:
    """The arguments of ``forward`` after the images that have defaults (``attn_mask=None``,
    ``is_causal=False``): the trace keeps each at its default."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    found = {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}
    return found or None


@contextlib.contextmanager
def _functions_named(tracer: _Tracer) -> Iterator[None]:
    """While tracing, a ``torch.autograd.Function`` call names the nodes its forward makes."""
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        outer, tracer.function = tracer.function, cls.__name__
        try:
            return original.__get__(None, cls)(*args, **kwargs)
        finally:
            tracer.function = outer

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.autograd.Function.apply = original  # type: ignore[method-assign]


def _trace(model: nn.Module) -> tuple[fx.Graph, _Tracer, dict[str, str]]:
    opaque: dict[str, str] = {}
    for _ in range(len(list(model.modules())) + 1):
        tracer = _Tracer(set(opaque))
        try:
            with eval_mode(model), torch.enable_grad(), kept_buffers(model), _functions_named(tracer):
                graph = tracer.trace(model, concrete_args=_defaults(model))
            return graph, tracer, opaque
        except Exception as err:  # noqa: BLE001 - any failure inside a module's forward
            if tracer.failed is None or tracer.failed[0] in opaque:
                raise trace_failure(err) from None
            name, why = tracer.failed
            where = user_frame(err)
            opaque[name] = why + (f" at {where}" if where else "")
    raise UnsupportedModelError("cannot trace the model's forward() with torch.fx")  # pragma: no cover


def trace_model(model: nn.Module) -> ModelGraph:
    """Traces ``model`` (in eval mode; its modes are restored) into a :class:`ModelGraph`.

    Raises:
        UnsupportedModelError: The model's own ``forward()`` cannot be traced, or it
            does not take exactly one input tensor.
    """
    ops.refuse_volumes(model)
    graph, tracer, opaque = _trace(model)
    modules = dict(model.named_modules())
    nodes: list[GraphNode] = []
    of: dict[fx.Node, GraphNode] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder" and not n.args]  # args: a default
    if len(placeholders) != 1:
        raise UnsupportedModelError(
            f"the model's forward() takes {len(placeholders)} inputs without defaults; zfvis needs a model of one "
            "image batch (further arguments with defaults are left at their defaults)"
        )
    for fxn in graph.nodes:
        if fxn.op == "output":
            continue
        gn = GraphNode(tracer.names.get(fxn, fxn.name), fxn, len(nodes))
        if fxn.op == "call_module":
            gn.module_name = str(fxn.target)
            gn.module = modules[gn.module_name]
        gn.source = node_source(fxn)
        gn.inputs = [of[a] for a in fxn.all_input_nodes if a in of]
        for parent in gn.inputs:
            parent.users.append(gn)
        of[fxn] = gn
        nodes.append(gn)
    no_grad = {of[n] for n in tracer.no_grad if n in of}
    for fxn, name in tracer.in_function.items():
        of[fxn].function = name
    _classify(nodes, opaque, no_grad)
    while version_in_place(nodes, of):  # a tensor made from a shape alone now holds the signal
        _classify(nodes, opaque, no_grad)
    for gn in nodes:
        gn.traced_op = gn.op
    module_output = {name: of[n] for name, n in tracer.outputs.items() if n in of}
    first_call = {name: of[c[0]] for name, c in tracer.calls.items() if len(c) > 1 and c[0] in of}
    tuples = {name: [of[n].name for n in items if n in of] for name, items in tracer.tuples.items()
              if name not in module_output}
    return ModelGraph(model, nodes, {n.name: n for n in nodes}, module_output, first_call, opaque, tuples)


def _classify(nodes: list[GraphNode], opaque: dict[str, str], no_grad: set[GraphNode]) -> None:
    """Marks which nodes carry the signal and finds each one's op-table entry. A value
    made with gradients off (``torch.no_grad()``, ``detach()``, ``.data``) carries none: its true
    backward sends nothing back; computed from the images, it is ``derived``."""
    nodes[0].carries = True
    for gn in nodes[1:]:
        if is_shape_query(gn.fx_node):
            continue
        if gn.function is not None and any(p.carries for p in gn.inputs):
            gn.carries, gn.op, gn.problem = True, None, _problem(gn, f"it runs inside the torch.autograd.Function "
                                                                 f"'{gn.function}', whose backward is its own, which "
                                                                 "zfvis cannot follow. Hint: layers before it can "
                                                                 "still be projected")
            continue
        if gn in no_grad or _detaches(gn.fx_node) or not any(p.carries for p in gn.inputs):
            gn.derived = any(p.carries or p.derived for p in gn.inputs)
            continue
        gn.carries, gn.derived = True, False
        if gn.module_name in opaque:  # kept whole: reversed by its gradient
            gn.op = ops.OPS[ops.GENERIC]
            gn.replayed = True
            continue
        gn.op, why = lookup(gn)
        gn.replayed = _own_code(gn, opaque)
        if why is not None:
            gn.problem = _problem(gn, f"{why}. Hint: layers before it can still be projected; see `zfvis layers` for "
                                      "the supported operations")


def _problem(gn: GraphNode, why: str) -> str:
    return f"node '{gn.name}' ({gn.kind}){f' at {gn.source}' if gn.source else ''}: {why}"


def _detaches(fxn: fx.Node) -> bool:
    """Whether a node is ``t.detach()`` or ``t.data`` (its value without a gradient)."""
    if fxn.op == "call_function" and fxn.target is getattr:
        return fxn.args[1:2] == ("data",)
    return (fxn.op == "call_method" and fxn.target == "detach") or (
        fxn.op == "call_function" and fxn.target in (torch.detach, torch.Tensor.detach))


#: Where the functions a graph calls come from when they are PyTorch's or Python's own.
_LIBRARY = ("torch", "_operator", "operator", "builtins", "math", "einops")


def _own_code(gn: GraphNode, opaque: dict[str, str]) -> bool:
    """Whether a node runs the model's own Python, reversed by replay: a module kept whole,
    or a function (kept whole by the trace) that is not PyTorch's or Python's."""
    if not gn.carries or gn.op is None or gn.op.name != ops.GENERIC:
        return False
    fxn = gn.fx_node
    if fxn.op == "call_module":
        return gn.module_name in opaque
    if fxn.op != "call_function":
        return False
    where = getattr(fxn.target, "__module__", None) or ""
    return where.split(".")[0] not in _LIBRARY


_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "type", "get_device", "element_size", "stride"})
_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda"})


def mark_constant(graph: ModelGraph, names: set[str]) -> None:
    """Marks nodes whose values the model's own run showed to be integers or booleans (a
    mask ``x > 0``, an argmax) as carrying no signal (their gradient is zero), and what
    depends on the signal only through them."""
    for gn in graph.nodes[1:]:
        if gn.name in names or (gn.carries and not any(p.carries for p in gn.inputs)):
            gn.carries, gn.op, gn.traced_op, gn.problem, gn.derived = False, None, None, None, True


def attr_value(model: nn.Module, fxn: fx.Node) -> Any:
    """The value a ``get_attr`` node reads: an attribute of the model, or a tensor the
    trace made once (``torch.arange(8)``), which it keeps on the node, not on the model."""
    if _CONSTANT in fxn.meta:
        return fxn.meta[_CONSTANT]
    obj: Any = model
    for part in str(fxn.target).split("."):
        obj = getattr(obj, part)
    return obj


def run_node(node: GraphNode, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Runs one node as the model would: a module by its call (its hooks run), a method
    or function as traced."""
    fxn = node.fx_node
    if fxn.op == "placeholder":  # an argument after the images, at its default
        return fxn.args[0]
    if fxn.op == "get_attr":
        return attr_value(model, fxn)
    if node.module is not None:
        return node.module(*args, **kwargs)
    if fxn.op == "call_method":
        return getattr(args[0], str(fxn.target))(*args[1:], **kwargs)
    return fxn.target(*args, **kwargs)


def is_shape_query(fxn: Any) -> bool:
    """Whether an fx node asks for a tensor's size or type, or makes a tensor from its
    shape alone (its value carries no signal)."""
    if fxn.op == "call_method":
        return fxn.target in _SHAPE_METHODS or fxn.target in ops.SHAPE_ONLY
    if fxn.op == "call_function" and fxn.target in ops.SHAPE_ONLY:
        return True
    if fxn.op == "call_function" and fxn.target is getattr:
        return len(fxn.args) > 1 and fxn.args[1] in _SHAPE_ATTRS
    return False


def _qualified(target: Any) -> str:
    """``module.name`` of a function (empty for method names and other targets)."""
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}" if callable(target) else ""


def lookup(node: GraphNode) -> tuple[ops.Op | None, str | None]:
    """The op of a node that carries the signal, or ``(None, why not)``."""
    fxn = node.fx_node
    if node.module is not None:
        return ops.OPS[ops.MODULE_OPS.get(type(node.module), ops.GENERIC)], None
    if fxn.op not in ("call_method", "call_function"):
        return None, f"{node.kind} has no reverse"
    key: Any = str(fxn.target) if fxn.op == "call_method" else fxn.target
    table: dict[Any, str] = ops.METHOD_OPS if fxn.op == "call_method" else ops.FUNCTION_OPS  # type: ignore[assignment]
    try:
        why, name = ops.REFUSED.get(key), table.get(key) or ops.NAMED_FUNCTION_OPS.get(_qualified(key), ops.GENERIC)
    except TypeError:  # an unhashable target
        why, name = None, ops.GENERIC
    if why is not None:
        return None, f"{why}, so nothing can be sent back through it"
    return ops.OPS[name], None
