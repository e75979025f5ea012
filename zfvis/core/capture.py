"""What the model really ran, captured at the level PyTorch itself records: ATen calls.

zfvis reverses a model over its torch.fx graph (:mod:`zfvis.core.graph`), which is a
*re-derivation* of the model: a symbolic trace, with in-place writes, hooks and submodules
fx cannot trace each handled on their own. This module holds that graph to account, on
every input shape, against what PyTorch executed:

1. **The model's own run.** ``model(images)`` runs as written (its hooks, its in-place
   writes, its untraceable submodules, its Python) under a ``TorchDispatchMode`` that
   records each ATen call: the op, and for each tensor it reads, which earlier call made
   that tensor and which call last wrote the memory it reads (schemas say which arguments
   an op mutates).
2. **The graph's run.** The traced graph runs node by node on a copy of the same images
   under the same recorder, each call tagged with its node.
3. **The verdict.** The two call lists must be the same calls reading the same values.
   Where the model ran an in-place op (``a += b``) that the trace turned into its
   out-of-place twin, the node is marked as writing in place (its readers are rewired,
   :func:`zfvis.core.inplace.mark_in_place`) and the graph is run again: in-place
   semantics come from the schemas of what ran, never from source text. Within the graph's
   run, every node must read only values of the nodes the graph connects it to, at the
   version the graph implies: memory another node overwrote in place without the graph
   showing it, or a value kept between calls, is caught where it is read. A leaf module
   with hooks is reversed as its whole call (hooks included) by its vector-Jacobian product.
   Stretches where the batch is not the first dimension are found by running the graph on
   one more image (:attr:`Verdict.not_batch`).

Anything else is a :class:`~zfvis.io.errors.CaptureMismatchError` naming the first node
that differs, raised when a layer at or after it is asked for. Verdicts are cached per
(input shape, dtype, device, every module's training flag and hooks, global hooks) on the
graph, and made again when any of these change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.weak import WeakTensorKeyDictionary

from ..io.errors import CaptureMismatchError, UnsupportedModelError
from .graph import GraphNode, ModelGraph, eval_mode, is_shape_query, mark_constant, run_node
from .inplace import mark_in_place, storage
from .model_state import kept_buffers
from .recorder import AtenCall, ModelRun, Recorder, RuleCalls, names, run_model, same_output, stops, tensors_in

__all__ = ["Verdict", "verify", "hooked", "capture_key"]


@dataclasses.dataclass
class Violation:
    """A node of the graph whose run does not match what the graph says of it."""

    node: GraphNode
    what: str
    reads: bool  # an undeclared read (else: an undeclared write, or a different call)


@dataclasses.dataclass
class Verdict:
    """The outcome of checking the graph against the model's own run for one input key.

    Attributes:
        violations: Nodes whose run differs from the graph, first first.
        hooked: Leaf nodes whose module has forward hooks (reversed as a whole call).
        not_batch: Nodes whose output's first dimension does not follow the batch size
            (windows or heads folded into it, an axis permuted before it), found by running
            the graph on one more image the first time it is asked for (the deconvnet asks;
            occlusion, which never reverses, does not).
        replayed: Nodes of the model's own code whose recorded calls were replayed and gave
            its output (:mod:`zfvis.core.program`), checked once per key.
        graphed: Those of them reversed as a stretch of their own, which later passes run with
            gradients on, keeping the graph of the run (:meth:`zfvis.core.program.Replays.run_graphed`).
        backward_hooks: The first module with backward hooks (they change the gradient, not
            what the model computes: projections are refused), or ``None``.
        state_writes: Buffers the model's forward writes into (a counter): kept as they were
            around each run of zfvis's (:func:`kept_buffers`).
        training: Whether a module is in training mode (the key holds every module's flag).
        hidden_rectifiers: Nodes that ran a rectifier as an ATen call outside any ``torch``
            call (TorchScript, ``torch.ops.aten.relu``), with that call: the deconvnet and
            guided rules cannot reach it (the gradient rule can).
        random: Nodes that ran a random ATen call (a seeded nondeterministic op).
        gradient_checked: Nodes whose per-image gradient check (:mod:`zfvis.core.ops.grad`)
            passed on this key's one image and which ran no random call: the check is not run
            again on this key (with one image it finds only what the code does, not what the
            values are; with several, values could hide that the images are mixed, so every
            pass checks).
    """

    violations: list[Violation]
    hooked: frozenset[str]
    probe: Any = dataclasses.field(default=None, repr=False)  # () -> not_batch, run once when first asked
    _not_batch: frozenset[str] | None = dataclasses.field(default=None, repr=False)
    # each node's first_dim on the key's input
    first_dims: dict[str, int] = dataclasses.field(default_factory=dict, repr=False)
    replayed: set[str] = dataclasses.field(default_factory=set)
    graphed: set[str] = dataclasses.field(default_factory=set)
    hidden_rectifiers: dict[str, str] = dataclasses.field(default_factory=dict)
    random: frozenset[str] = frozenset()
    gradient_checked: set[str] = dataclasses.field(default_factory=set)
    state_writes: frozenset[str] = frozenset()
    backward_hooks: str | None = None
    training: bool = False

    @property
    def not_batch(self) -> frozenset[str]:
        """Nodes whose output's first dimension is not the batch (found on first use)."""
        if self._not_batch is None:
            self._not_batch = self.probe() if self.probe is not None else frozenset()
            self.probe = None
        return self._not_batch

    @property
    def batch_first(self) -> frozenset[str]:
        """Nodes whose tensor output has the batch first (one item per image, as ``torch.zeros_like(x)``),
        or whose shape output starts with the batch size (``x.shape``), from the same probe as :attr:`not_batch`."""
        return frozenset(self.first_dims) - self.not_batch

    def problems(self, graph: ModelGraph, rule: str, targets: list[GraphNode]) -> dict[str, UnsupportedModelError]:
        """Why projections cannot be made under ``rule``, by node: the targets, where the model
        has backward hooks (:attr:`backward_hooks`); nodes whose rectifiers ``rule`` cannot
        reach (:attr:`hidden_rectifiers`)."""
        found = {}
        if self.backward_hooks is not None:
            err = UnsupportedModelError(
                f"module '{self.backward_hooks}' has backward hooks: they change the model's gradient, not what it "
                "computes, so a projection cannot follow both. Hint: remove them (handle.remove()) before projecting")
            found = {t.name: err for t in targets}
        for name, op in self.hidden_rectifiers.items() if rule != "gradient" else ():
            node = graph.by_name[name]
            where = f" at {node.source}" if node.source else ""
            found.setdefault(name, UnsupportedModelError(
                f"node '{name}' ({node.kind}){where}: it runs a rectifier ({op}) as an ATen call that no torch "
                "function call makes visible (inside TorchScript, torch.ops.aten, or a PyTorch function such as "
                f"F.lp_pool2d), so the {rule} rule cannot reach it and the projection would be wrong. Hint: call it "
                "as F.relu / nn.ReLU in Python, or use the gradient rule"))
        return found

    def check(self, graph: ModelGraph, targets: list[GraphNode]) -> None:
        """Raises for the first violation that can change the targets' values."""
        if not targets:
            return
        last = max(t.index for t in targets)
        ancestors = {n.index for n in graph.ancestors(targets, writes=True)}
        for v in self.violations:
            if v.node.index <= last and (not v.reads or v.node.index in ancestors):
                where = f" at {v.node.source}" if v.node.source else ""
                raise CaptureMismatchError(
                    f"node '{v.node.name}' ({v.node.kind}){where}: {v.what}; zfvis's graph of the model is not what the "
                    "model ran, so its projection would be wrong. Hint: make that operation not in-place, or that "
                    "code a plain sequence of tensor operations (no values kept between calls); layers before it "
                    "can still be projected"
                )


class _GraphRun:
    """Runs the whole graph under a recorder, checking each node's reads and writes."""

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.owner: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # tensor -> {node: write seen}
        self.violations: list[Violation] = []
        self.flagged: set[str] = set()
        self.rec: Recorder | None = None
        self.declared: set[str] = set()
        self.constant: set[str] = set()  # nodes whose values are integers or booleans: no signal
        self.writers: set[str] = set()  # nodes that write into memory they did not make
        self.failed: GraphNode | None = None  # the node where the forward pass failed
        self.first_dims: dict[str, int] = {}  # each tensor or shape output's first dimension (first_dim)

    def _flag(self, node: GraphNode, what: str, reads: bool) -> None:
        if node.name not in self.flagged:
            self.flagged.add(node.name)
            self.violations.append(Violation(node, what, reads))

    def _producer(self, call: int) -> str:
        rec = self.rec
        node = rec.calls[call].node if rec is not None and 0 <= call < len(rec.calls) else None
        return f"node '{node}'" if node else "another node"

    def on_call(self, tensors: list[torch.Tensor], written: list[torch.Tensor]) -> None:
        """Checks that each tensor a call reads is the value, at its version, of a node the
        graph passes to the running node (or made or written inside that node). A write
        matters only where something reads the memory afterwards: the reader's check finds it;
        a node that writes memory it did not make is noted (:attr:`Verdict.writers`)."""
        rec, node = self.rec, self.graph_node
        if rec is None or node is None:
            return
        if any(rec.born.get(storage(t), -1) < rec.start for t in written):
            self.writers.add(node.name)
        for t in tensors:
            made, wrote = rec.ref(t)
            inside = [v for v in (made, wrote) if isinstance(v, int)]
            if not inside or any(v >= rec.start for v in inside):  # a constant, or this node's own
                continue
            seen = self.owner.get(t) or {}
            if any(name in self.declared and w == wrote for name, w in seen.items()):
                continue
            declared = [name for name in seen if name in self.declared]
            writer = rec.calls[wrote].node if isinstance(wrote, int) and wrote < len(rec.calls) else None
            if declared and writer is not None:  # its input, overwritten since through shared memory
                self._flag(self.graph.by_name[writer], f"it overwrites in place memory that '{declared[0]}' shares "
                           f"and node '{node.name}' reads afterwards (a view of the same tensor, or a tensor it "
                           "was given)", reads=False)
            else:
                self._flag(node, f"it reads a value made by {self._producer(made if not seen else wrote)} that the "
                                 "graph does not pass to it (a value kept between calls, or one written in place "
                                 "where the graph does not show it)", reads=True)

    def _check_versions(self, node: GraphNode, env: dict[fx.Node, Any]) -> None:
        """Every value a node is given must be as its producer left it: memory overwritten
        since (through a name the graph does not connect: a view, dropout's input returned
        as its output) means the node reads another value than the graph says."""
        rec = self.rec
        if rec is None or is_shape_query(node.fx_node):
            return
        for p in node.inputs:
            for t in tensors_in(env.get(p.fx_node)):
                left = (self.owner.get(t) or {}).get(p.name)
                wrote = rec.ref(t)[1]
                if left is None or left == wrote:
                    continue
                writer = rec.calls[wrote].node if isinstance(wrote, int) and wrote < len(rec.calls) else None
                self._flag(self.graph.by_name[writer] if writer else node,
                           f"it overwrites in place memory that '{p.name}' shares and node '{node.name}' reads "
                           "afterwards (a view of the same tensor, or a tensor it was given)", reads=False)

    graph_node: GraphNode | None = None

    def run(self, images: torch.Tensor, names: dict[int, str]) -> tuple[list[AtenCall], Any]:
        env: dict[fx.Node, Any] = {}
        model = self.graph.model
        rec = self.rec = Recorder(names)
        rec.on_call = self.on_call
        out: Any = None
        with RuleCalls(rec), rec, stops(self):
            for node in self.graph.nodes:
                fxn = node.fx_node
                if node is self.graph.input:
                    out = images
                else:
                    args = fx.node.map_arg(fxn.args, lambda n: env[n])
                    kwargs = fx.node.map_arg(fxn.kwargs, lambda n: env[n])
                    rec.node, rec.start, self.graph_node = node, len(rec.calls), node
                    self.declared = {p.name for p in node.inputs} | {node.name}
                    self._check_versions(node, env)
                    self.failed = node
                    out = run_node(node, model, args, kwargs)
                    self.failed = rec.node = self.graph_node = None
                env[fxn] = out
                found = tensors_in(out)
                dim = first_dim(out)
                if dim is not None:
                    self.first_dims[node.name] = dim
                if node.carries and found and not any(t.is_floating_point() or t.is_complex() for t in found):
                    self.constant.add(node.name)
                for t in found:
                    seen = dict(self.owner.get(t) or {})
                    seen[node.name] = rec.ref(t)[1]
                    self.owner[t] = seen
        output = next((n for n in reversed(self.graph.input.fx_node.graph.nodes) if n.op == "output"), None)
        value = fx.node.map_arg(output.args[0], lambda n: env.get(n)) if output is not None and not self.failed else None
        return rec.calls, value


def hooked(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules that have forward hooks or forward pre-hooks: of their own, or every module
    where global ones are registered (``register_module_forward_hook``), which run on every call."""
    from torch.nn.modules import module as mod

    every = any(getattr(mod, g, None) for g in ("_global_forward_hooks", "_global_forward_pre_hooks"))
    for name, m in model.named_modules():
        if every or m._forward_hooks or m._forward_pre_hooks:
            yield name, m


def _backward_hooked(model: nn.Module) -> str | None:
    """The first module with backward hooks of its own, or a word for global ones."""
    from torch.nn.modules import module as mod

    found = next((name or "<the model>" for name, m in model.named_modules()
                  if m._backward_hooks or m._backward_pre_hooks), None)
    if found is None and any(getattr(mod, g, None) for g in ("_global_backward_hooks", "_global_backward_pre_hooks")):
        found = "every module (global backward hooks)"
    return found


def _global_hooks() -> tuple[Any, ...]:
    from torch.nn.modules import module as mod

    return tuple(tuple(getattr(mod, name, {}).keys()) for name in
                 ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                  "_global_backward_pre_hooks"))


def capture_key(model: nn.Module, images: torch.Tensor) -> tuple[Any, ...]:
    """What a verdict depends on besides the code: the input's shape, dtype and device, every
    module's training flag and hooks (forward and backward), and the global module hooks."""
    state = tuple((m.training, tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks),
                   tuple(m._backward_pre_hooks)) for m in model.modules())
    return tuple(images.shape), images.dtype, images.device, state, _global_hooks()


def _first_difference(graph: ModelGraph, model_calls: list[AtenCall], graph_calls: list[AtenCall],
                      stopped: bool) -> int | None:
    for i, (a, b) in enumerate(zip(model_calls, graph_calls)):
        # a node marked as writing in place runs its out-of-place twin (``a += b`` traced as ``a + b``)
        twin = a.in_place and not b.in_place and b.node is not None and graph.by_name[b.node].writes
        if a.op != b.op or (a.in_place != b.in_place and not twin) or a.reads != b.reads or a.consts != b.consts:
            return i
    if len(model_calls) != len(graph_calls) and not stopped:
        return min(len(model_calls), len(graph_calls))
    return None


def _in_place_twins(graph: ModelGraph, model_calls: list[AtenCall], graph_calls: list[AtenCall]) -> list[GraphNode]:
    """Nodes whose call the model ran in place where the graph runs its out-of-place twin
    (``a += b`` traced as ``a + b``), before the first call that differs otherwise."""
    found: list[GraphNode] = []
    for a, b in zip(model_calls, graph_calls):
        if a.op != b.op or a.consts != b.consts:
            break
        if a.in_place and not b.in_place and b.node is not None:
            node = graph.by_name[b.node]
            if node.fx_node.op == "call_function" and not node.writes and node not in found:
                found.append(node)
    return found


def _difference(graph: ModelGraph, i: int, model_calls: list[AtenCall], graph_calls: list[AtenCall]) -> Violation:
    a = model_calls[i] if i < len(model_calls) else None
    b = graph_calls[i] if i < len(graph_calls) else None
    name = b.node if b is not None and b.node else None
    node = graph.by_name[name] if name else graph.nodes[-1]
    if a is None or b is None:
        what = (f"the model ran {len(model_calls)} ATen calls where the graph runs {len(graph_calls)} "
                "(the model's own hooks or code outside forward())")
    elif a.in_place and not b.in_place and a.reads and str(a.reads[0][0]).startswith("buffer:"):
        what = (f"the model's forward() writes into its buffer '{str(a.reads[0][0])[7:]}' ({a.describe()}), which the "
                "trace ran once, when it was made, and the graph does not run (keep that state outside forward())")
    elif a.op != b.op or a.in_place != b.in_place:
        what = f"the model ran {a.describe()} where the graph runs {b.describe()}"
        after = graph_calls[i - 1].node if i > 0 else None
        if after and after != name:  # the model's extra (or missing) call may belong to the node before
            what += f", right after node '{after}' ({graph.by_name[after].kind}), whose code (a hook?) may differ"
    elif a.consts != b.consts:
        what = f"the model ran {a.op} with other arguments than the graph ({a.consts} against {b.consts})"
    else:
        what = (f"{b.op} reads other values in the model than in the graph (an in-place write or a value kept "
                "between calls that the trace does not show)")
    return Violation(node, what, reads=False)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Fake tensors log an error (with a traceback) where a shape does not fit, as a
    classifier head after another input size; the probe stops there by design."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    disabled = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = disabled


def _first_dims(graph: ModelGraph, images: torch.Tensor) -> dict[str, int]:
    """Each node's tensor output's first dimension on ``images``, from shapes alone (fake
    tensors: nothing is computed), up to where that fails (a submodule that reads values)."""
    env: dict[fx.Node, Any] = {}
    dims: dict[str, int] = {}
    run = ModelRun()
    with _quiet(), FakeTensorMode(allow_non_fake_inputs=True) as mode, stops(run):
        fake = mode.from_tensor(images)
        for node in graph.nodes:
            fxn = node.fx_node
            if node is graph.input:
                out: Any = fake
            else:
                args = fx.node.map_arg(fxn.args, lambda n: env[n])
                kwargs = fx.node.map_arg(fxn.kwargs, lambda n: env[n])
                out = run_node(node, graph.model, args, kwargs)
            env[fxn] = out
            dim = first_dim(out)
            if dim is not None:
                dims[node.name] = dim
    return dims


def first_dim(out: Any) -> int | None:
    """A tensor's first dimension (-1 for a scalar), a shape's first size (``x.shape``, whose
    first size is the batch where it follows it: ``t.expand(x.shape)``); else ``None``."""
    if isinstance(out, torch.Tensor):
        return int(out.shape[0]) if out.dim() else -1
    if isinstance(out, torch.Size) and len(out):
        return int(out[0])
    return None


def _not_batch(graph: ModelGraph, images: torch.Tensor, dims: dict[str, int]) -> frozenset[str]:
    """The nodes whose first dimension is not the batch: it is not the batch size on
    ``images``, or does not grow by one on one more image."""
    n = int(images.shape[0])
    more = _first_dims(graph, images.new_empty((n + 1, *images.shape[1:])))
    return frozenset(name for name, d in dims.items() if d != n or more.get(name, n + 1) != n + 1)


def verify(graph: ModelGraph, images: torch.Tensor) -> Verdict:
    """Checks the graph against the model's own run on ``images`` (cached per
    :func:`capture_key` on the graph). Marks the nodes that write in place as the model
    ran them, and the hooked leaves, on the graph.

    Args:
        graph: The traced model.
        images: A batch on the model's device and dtype (real values, not fake).
    """
    model = graph.model
    key = capture_key(model, images)
    cached = graph.verdicts.get(key)
    if cached is not None:
        graph.set_hooked(cached.hooked)  # the hooks of this key (another key's may be set)
        return cached
    hooked_names = frozenset(name for name, _ in hooked(model))
    graph.set_hooked(hooked_names)
    with eval_mode(model), torch.no_grad(), kept_buffers(model) as written:
        first = images.clone()
        model_calls, model_run = run_model(model, first, names(model, first))
        for _ in range(len(graph.nodes)):
            copy = images.clone()
            run = _GraphRun(graph)
            graph_calls, graph_out = run.run(copy, names(model, copy))
            if run.constant:
                mark_constant(graph, run.constant)
            for name in run.writers:  # an opaque call that writes into what it was given
                graph.by_name[name].writes = True
            twins = _in_place_twins(graph, model_calls, graph_calls)
            if not twins:
                break
            mark_in_place(graph, twins)
    violations = list(run.violations)
    stopped = model_run.failed is not None or run.failed is not None
    i = _first_difference(graph, model_calls, graph_calls, stopped)
    if i is not None:
        violations.append(_difference(graph, i, model_calls, graph_calls))
    elif not stopped and not any(c.random for c in graph_calls) and not same_output(model_run.output, graph_out):
        violations.append(Violation(graph.nodes[-1], "the graph's output differs from the model's own", reads=False))
    violations.sort(key=lambda v: v.node.index)
    dims = run.first_dims

    def probe() -> frozenset[str]:
        with eval_mode(model), torch.no_grad():
            return _not_batch(graph, images, dims)

    hidden: dict[str, str] = {}
    for c in graph_calls:
        if c.hidden_rectifier and c.node is not None:
            hidden.setdefault(c.node, c.op)
    random = frozenset(c.node for c in graph_calls if c.random and c.node is not None)
    verdict = Verdict(violations, hooked_names, probe, first_dims=dims, hidden_rectifiers=hidden, random=random,
                      state_writes=frozenset(written), backward_hooks=_backward_hooked(model),
                      training=any(m.training for m in model.modules()))
    graph.verdicts[key] = verdict
    return verdict
