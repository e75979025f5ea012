"""Recording a forward pass over a traced model: what the reverse pass will need.

:func:`record` runs the model's graph (:mod:`zfvis.core.graph`) node by node on the images,
only as far as the requested layers need (every node they depend on, nothing after),
calling the model's own modules (so their hooks run) and functions in the model's own
order. For every node that carries the signal it keeps a :class:`~zfvis.core.ops.Site`: the
node's constant arguments, its shapes, and what its op records (max-pool switches, ReLU
masks for the guided and gradient rules). Nothing in the model is changed; every
module's ``training`` flag is restored, also when the pass raises. In-place operations
run as in the model (each is a new version of the tensor it writes, see
:mod:`zfvis.core.inplace`); one that would overwrite memory another value still to be read
shares (a view) is refused (:mod:`zfvis.core.inplace`). Stretches where the batch is not the
first dimension are recorded whole (:mod:`zfvis.core.stretches`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ..io.checks import forward_failure
from ..io.errors import (
    UnsupportedModelError,
    ZfvisError,
    is_out_of_memory,
)
from .cone import ReceptiveField
from .capture import verify
from .graph import GraphNode, ModelGraph, eval_mode, run_node
from .inplace import overwritten
from .layouts import hold_channels_first
from .model_state import kept_buffers
from .ops import GENERIC, OPS, SUPPORTED_TYPES, Live, Op, Site
from .ops.args import live_call
from .ops.build import plain_max_pool, pool_arguments, pool_with_switches
from .ops.grad import IDENTITY, RULES_WITHOUT_INPUTS, recorded_inputs
from .program import Replays
from .shared_records import SharedRecords
from .stretches import Fold, Stretches, output_shape, tensors_of

__all__ = ["Step", "Recording", "RemovableHandles", "UnsupportedModelError", "record", "prepared_site", "SUPPORTED_TYPES",
           "eval_mode"]


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


def _site(node: GraphNode, env: dict[fx.Node, Any], out: Any, parent: Site | None) -> Site:
    """The node's site. A node whose input is a tuple (``parent``, the site of the node that
    made it) is reversed as the gradient of the composition, from ``parent``'s live inputs."""
    live = [p for p in node.inputs if p.carries]
    slot = {p.fx_node: k for k, p in enumerate(live)}

    def value(n: fx.Node) -> Any:
        return Live(slot[n]) if n in slot else env[n]

    args = fx.node.map_arg(node.fx_node.args, value)
    kwargs = fx.node.map_arg(node.fx_node.kwargs, value)
    cone = "bundle" if tensors_of(out) else None
    if parent is not None:
        if len(live) != 1:
            raise UnsupportedModelError(f"node '{node.name}' ({node.kind}) combines a tuple of tensors with other "
                                        "tensors; zfvis cannot reverse it")
        inner = parent.fn or live_call(parent)
        outer = live_call(Site(node, tuple(args), dict(kwargs), live, [], ()))
        # an op that makes tuples (cone "bundle": a split) reverses their parts itself
        own = parent.node.op if parent.node.op is not None and parent.node.op.cone == "bundle" else None
        return dataclasses.replace(parent, node=node, out_shape=() if cone else output_shape(node, out),
                                   cone=cone or "full", entry=own or OPS[GENERIC], fn=lambda *ts: outer(inner(*ts)),
                                   state=None)
    tensors = [env[p.fx_node] for p in live]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise UnsupportedModelError(f"node '{node.name}' ({node.kind}) does not take tensors; zfvis cannot reverse it")
    shapes = [tuple(t.shape[1:]) for t in tensors]
    if cone:
        return Site(node, tuple(args), dict(kwargs), live, shapes, (), cone=cone, entry=OPS[GENERIC])
    return Site(node, tuple(args), dict(kwargs), live, shapes, output_shape(node, out),
                cone=node.op.cone if node.op is not None else "same")


def _prepare(site: Site) -> Op:
    """Runs the site's op's checks, which set its cone (raises UnsupportedModelError)."""
    op = site.op
    if op.prepare is not None:
        op.prepare(site)
    if site.hand_to is not None:  # handed to another op (a convolution padding by reflection: vjp)
        site.entry, site.hand_to, site.cone = OPS[site.hand_to], None, OPS[site.hand_to].cone
        return _prepare(site)
    return op


def prepared_site(node: GraphNode, env: dict[fx.Node, Any], out: Any) -> Site:
    """The site of a node that carries the signal and takes plain tensors, its op's checks
    run and its cone set (occlusion reads its incremental rule from it).

    Args:
        node: The node (with an op).
        env: Values of the graph's nodes (at least of the node's arguments).
        out: The node's output.

    Raises:
        UnsupportedModelError: The op cannot take this use (occlusion recomputes it whole).
    """
    site = _site(node, env, out, None)
    if site.cone != "bundle":
        _prepare(site)
    return site


def _reads_inputs(node: GraphNode, rule: str) -> bool:
    """Whether the node's op reads its inputs when recording for ``rule``."""
    op = node.op
    return op is not None and op.reads_inputs and rule not in RULES_WITHOUT_INPUTS.get(op.record, ())  # type: ignore[arg-type]


class _Pass(Stretches):
    """One forward pass over the needed part of the graph."""

    def __init__(self, graph: ModelGraph, targets: list[GraphNode], rule: str,
                 not_batch: frozenset[str] = frozenset(), batch_first: frozenset[str] = frozenset()) -> None:
        self.graph = graph
        self.not_batch = not_batch
        self.batch_first = batch_first  # nodes whose output has the batch first (the check's probe)
        self.folds: dict[fx.Node, Fold] = {}
        self.rule = rule
        self.targets = {t.fx_node for t in targets}
        self.needed = graph.ancestors(targets, writes=True)
        order = {n.fx_node: i for i, n in enumerate(self.needed)}
        self.last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.needed):
            for p in n.inputs:
                self.last_use[p.fx_node] = i
        self.order = order
        self.sites: dict[str, Site] = {}
        self.problems: dict[str, UnsupportedModelError] = {}
        self.outputs: dict[fx.Node, torch.Tensor] = {}
        self.bundles: dict[fx.Node, Site] = {}
        self.recorded = SharedRecords()
        self.batch = 0
        self.replays = Replays(graph.model, rule)
        self.switches: dict[fx.Node, torch.Tensor] = {}  # of max-pooling modules run with them
        self.random: frozenset[str] = frozenset()  # nodes that ran a random call (the verdict's)
        self.gradient_checked: set[str] = set()  # the verdict's, of nodes checked on this key

    def run(self, images: torch.Tensor) -> None:
        env: dict[fx.Node, Any] = {}
        model = self.graph.model
        last = len(self.needed) - 1
        for i, node in enumerate(self.needed):
            fxn = node.fx_node
            if node is self.graph.input:
                out: Any = images
                self.batch = int(images.shape[0])
            else:
                args = fx.node.map_arg(fxn.args, lambda n: env[n])
                kwargs = fx.node.map_arg(fxn.kwargs, lambda n: env[n])
                inputs = [env[p.fx_node] for p in node.inputs if p.carries] if node.carries else []
                before = None
                if node.writes:
                    self._check_inplace(node, args, env, i)
                    before = _written_constant(node, env)
                    if _reads_inputs(node, self.rule):  # as they were before the call
                        inputs = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
                if node.op is None or node.op.name == GENERIC:  # unknown code: may write into any argument
                    self.recorded.copy_before_write((args, kwargs))
                elif node.writes and args:  # an in-place op writes its first argument
                    self.recorded.copy_before_write(args[0])
                if node.replayed:  # the model's own code, its calls recorded
                    out = self._replay(node, env, lambda: run_node(node, model, args, kwargs))
                elif node.carries and plain_max_pool(node.module, args, kwargs):  # output and switches at once
                    out, self.switches[fxn] = pool_with_switches(args[0], *pool_arguments(node.module))
                else:
                    out = run_node(node, model, args, kwargs)
                if before is not None:  # its readers after the call read the call: the site sees it as it was
                    env[fxn.args[0]] = before  # type: ignore[index]
                if node.carries:
                    self._record(node, env, out, inputs)
            env[fxn] = out
            if fxn in self.targets and isinstance(out, torch.Tensor):
                self.outputs[fxn] = out if i == last else out.clone()
            for p in node.inputs:
                if self.last_use.get(p.fx_node) == i:
                    env.pop(p.fx_node, None)
        self.recorded.copy_before_write(images)  # the caller's tensor

    def _replay(self, node: GraphNode, env: dict[fx.Node, Any], call: Callable[[], Any]) -> Any:
        """Runs a node of the model's own code: with gradients on where it may
        (:meth:`zfvis.core.program.Replays.run_graphed`), else recording its calls."""
        live_nodes = [p for p in node.inputs if p.carries]
        live = [env[p.fx_node] for p in live_nodes]
        if self.replays.graphable(node, live) and not any(p.fx_node in self.folds for p in live_nodes):
            slot = {p.fx_node: k for k, p in enumerate(live_nodes)}

            def call_on(leaves: list[torch.Tensor]) -> Any:
                args = fx.node.map_arg(node.fx_node.args, lambda n: leaves[slot[n]] if n in slot else env[n])
                kwargs = fx.node.map_arg(node.fx_node.kwargs, lambda n: leaves[slot[n]] if n in slot else env[n])
                return run_node(node, self.graph.model, args, kwargs)

            out = self.replays.run_graphed(node, live, call_on, self.batch)
            if out is not None and node.name not in self.not_batch:
                return out
            self.replays.graphed.discard(node.name)
            self.replays.found.pop(node.fx_node, None)
        return self.replays.run(node, live, call)

    def _check_inplace(self, node: GraphNode, args: Any, env: dict[fx.Node, Any], i: int) -> None:
        # the values still held (read later) in the pass's order, not every node of the pass
        held = sorted((self.order[fxn], v) for fxn, v in env.items() if self.last_use.get(fxn, -1) > i)
        later = ((self.needed[k].name, v) for k, v in held)
        other = overwritten(args[0] if args else None, later)
        if other is not None:
            raise UnsupportedModelError(
                f"node '{node.name}' ({node.kind}) overwrites in place memory that '{other}' shares and is read "
                "afterwards (a view of the same tensor); zfvis would reverse the wrong values. Hint: make that "
                "operation not in-place"
            )

    def _record(self, node: GraphNode, env: dict[fx.Node, Any], out: Any, inputs: list[Any]) -> None:
        if node.op is None:
            return
        failed = next((self.problems[p.name] for p in node.inputs if p.carries and p.name in self.problems), None)
        if failed is not None:  # what cannot be reversed before it: nothing reaches it either
            self.problems[node.name] = failed
            return
        # a mask computed from the images, several images: reversed over the whole batch, where it
        # stands for each image
        per_image = self.batch > 1 and any(p.derived for p in node.inputs)
        replayed = node.fx_node in self.replays.found  # reversed over the whole batch, as recorded
        if per_image or replayed or any(p.fx_node in self.folds for p in node.inputs) or self._folded(node, out):
            try:
                self._fold(node, env, out)
            except UnsupportedModelError as err:
                self.problems[node.name] = err
            return
        parent = next((self.bundles[p.fx_node] for p in node.inputs if p.fx_node in self.bundles), None)
        try:
            site = _site(node, env, out, parent)
            site.batched = frozenset(id(env[p.fx_node]) for p in node.inputs
                                     if not p.carries and p.name in self.batch_first and p.fx_node in env)
            if parent is not None:  # a function of the tuple's node's inputs
                inputs = parent.state
            if site.cone == "bundle":
                site.state = parent.state if parent is not None else recorded_inputs(inputs)
                self.recorded.watch(site)
                self.bundles[node.fx_node] = site
                self.sites[node.name] = site
                return
            op = _prepare(site)
            switches = self.switches.pop(node.fx_node, None)
            if node.fx_node in self.replays.identities:  # returned its input, calling nothing
                site.state, site.cone = IDENTITY, "same"
            elif switches is not None and op is node.op:
                site.state = switches
            elif op.record is not None:
                once = self.batch == 1 and node.name not in self.random  # only the code decides the check
                site.checked = once and node.name in self.gradient_checked
                site.state = op.record(site, inputs, out, self.rule)
                if once and site.checked:
                    self.gradient_checked.add(node.name)
                self.recorded.watch(site)
            self.sites[node.name] = site
        except UnsupportedModelError as err:
            self.problems[node.name] = err


def _written_victim(node: GraphNode) -> GraphNode | None:
    """The node whose tensor an in-place call writes the signal into, where that tensor held
    none (``x.new_zeros(...)`` then ``index_add_``, :func:`zfvis.core.inplace.version_in_place`)."""
    first = node.fx_node.args[0] if node.in_place and node.fx_node.args else None
    victim = next((p for p in node.inputs if p.fx_node is first), None)
    return victim if victim is not None and not victim.carries else None


def _written_constant(node: GraphNode, env: dict[fx.Node, Any]) -> torch.Tensor | None:
    """A copy of what :func:`_written_victim` holds before the call writes it."""
    victim = _written_victim(node)
    value = env.get(victim.fx_node) if victim is not None else None
    return value.clone() if isinstance(value, torch.Tensor) else None


def _model_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for p in model.parameters():
        return p.device, p.dtype
    return None, None


def _real(images: torch.Tensor) -> bool:
    """Whether a tensor holds values (not a fake or meta tensor of a shapes-only pass)."""
    return not isinstance(images, FakeTensor) and images.device.type != "meta"


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
        CaptureMismatchError: The graph is not what the model ran (:mod:`zfvis.core.capture`).
    """
    if torch.is_inference_mode_enabled() or images.is_inference():  # zfvis's autograd needs plain tensors
        with torch.inference_mode(False):
            return record(graph, images.clone(), targets, rule)
    device, dtype = _model_device_dtype(graph.model)
    if device is not None:
        images = images.to(device=device, dtype=dtype)
    verdict = verify(graph, images) if _real(images) else None  # what the model runs, against the graph
    p = _Pass(graph, list(targets), rule, verdict.not_batch if verdict is not None else frozenset(),
              verdict.batch_first if verdict is not None else frozenset())
    p.replays.checked = verdict.replayed if verdict is not None else p.replays.checked
    p.replays.graphed = verdict.graphed if verdict is not None else p.replays.graphed
    if verdict is not None:
        p.random, p.gradient_checked = verdict.random, verdict.gradient_checked
    # a model already in eval mode (all its modules) is left alone: switching and restoring
    # every module's flag costs about a millisecond per pass
    training = verdict.training if verdict is not None else any(m.training for m in graph.model.modules())
    state = verdict.state_writes if verdict is not None else frozenset()
    with (eval_mode(graph.model) if training else contextlib.nullcontext(), torch.no_grad(),
          kept_buffers(graph.model, state) if state else contextlib.nullcontext()):
        try:
            if verdict is not None:
                verdict.check(graph, list(targets))
            p.run(images)
        except RuntimeError as err:
            if isinstance(err, ZfvisError) or is_out_of_memory(err):
                raise
            raise forward_failure(err, graph.model, images) from err
    p.problems.update(p.stretch_problems(list(targets)))
    p.problems.update(verdict.problems(graph, rule, list(targets)) if verdict is not None else {})
    hold_channels_first(p.sites, [t.name for t in targets])
    outputs = {t.name: p.outputs[t.fx_node] for t in targets if t.fx_node in p.outputs}
    return outputs, p.sites, p.problems, tuple(images.shape)
