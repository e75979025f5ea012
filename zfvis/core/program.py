"""A node's computation as PyTorch ran it, replayed for its gradient.

Code of the model's own that the graph keeps whole (a submodule fx could not trace, a leaf
with forward hooks, a function of the model's) runs once, in the forward pass, with every
ATen call it makes recorded (:func:`record_program`): the op, its other arguments, and for
each tensor it reads whether it is one of the node's inputs, the output of an earlier call,
or a tensor from outside (a parameter, a buffer). The reverse pass differentiates the
:class:`Program`, those calls run again in order at the recorded inputs (views and in-place
writes included, so autograd sees the same aliasing), never the model's Python: what is
differentiated is what ran. Control flow on values (``.item()``) is replayed as it went,
which is exact at the recorded inputs, the only ones the reverse pass uses.

Rectifiers and local response normalisation are recorded as their ``torch`` function
calls (:func:`zfvis.core.rule_mode.follows_rule`), so that, replayed under
:class:`~zfvis.core.rule_mode.RuleMode`, they pass the signal back by the rule.

A node that calls a random op (in eval mode) or writes into a tensor from outside (state
kept between calls) is refused when recorded. The first time a node is recorded for an
input key, its program is also replayed at once and must give the node's output exactly.

Once a node has passed that check for an input key, and is reversed as a stretch of its own
(:class:`~zfvis.core.reverse_grad.WholeBatchVectorJacobian`), later passes run it with
gradients on, under the rule (:meth:`Replays.run_graphed`), and keep the autograd graph of
that very run for the reverse pass: the same calls, differentiated without running them a
second time.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from ..io.errors import UnsupportedModelError
from .recorder import written_by
from .rule_mode import RuleMode, follows_rule

__all__ = ["Program", "Replay", "Replays", "record_program"]


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A tensor in a program: input ``k``, item ``j`` of step ``k``'s output, or constant ``k``."""

    kind: str
    k: int
    j: int = 0


@dataclasses.dataclass
class _Step:
    func: Callable[..., Any]
    args: Any
    kwargs: Any


@dataclasses.dataclass
class Program:
    """The ATen calls (and rule-following ``torch`` calls) one node made, in order.

    Attributes:
        name: The node's name (for messages).
        steps: The calls, tensors as references.
        consts: Tensors from outside the node (parameters, buffers, other values).
        out: The node's output, tensors as references.
        writes: Whether a call writes in place (autograd then saves copies of what it needs,
            as they were when saved, not as a later call left them).
    """

    name: str
    steps: list[_Step]
    consts: list[torch.Tensor]
    out: Any
    writes: bool = False

    @property
    def identity(self) -> bool:
        """Whether the node returned its one input untouched, calling nothing (as
        ``StochasticDepth`` does in eval mode): reversed by passing the signal through."""
        return not self.steps and self.out == _Ref("input", 0)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """Runs the calls again on ``inputs`` (copied first: the node may write into them)."""
        ins = [t.clone() for t in inputs]
        outs: list[list[Any]] = []

        def get(v: Any) -> Any:
            if not isinstance(v, _Ref):
                return v
            if v.kind == "input":
                return ins[v.k]
            if v.kind == "const":
                return self.consts[v.k]
            return outs[v.k][v.j]

        with _saved_copies() if self.writes else contextlib.nullcontext():
            for step in self.steps:
                out = step.func(*_fill(step.args, get), **_fill(step.kwargs, get))
                outs.append(_items(out))
        return tree_map(get, self.out)


def _items(out: Any) -> list[Any]:
    """A call's outputs in order (an ATen call returns a tensor, or a tuple or list of them)."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _fill(args: Any, get: Callable[[Any], Any]) -> Any:
    if isinstance(args, _Ref):
        return get(args)
    if isinstance(args, (list, tuple)):
        return type(args)(_fill(a, get) for a in args)
    if isinstance(args, dict):
        return {k: _fill(a, get) for k, a in args.items()}
    return args


def _saved_copies() -> Any:
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


class _Tracker:
    """Names every tensor a node's calls read: an input, a call's output, or a constant."""

    def __init__(self, name: str, inputs: list[torch.Tensor], kept: set[int]) -> None:
        self.name = name
        self.refs: dict[int, _Ref] = {id(t): _Ref("input", k) for k, t in enumerate(inputs)}
        self.alive: list[Any] = list(inputs)  # keeps ids unique while recording
        self.steps: list[_Step] = []
        self.consts: list[torch.Tensor] = []
        self.kept = kept  # ids of the model's parameters and buffers: held by reference
        self.paused = 0
        self.writes = False  # some call writes in place (autograd must save copies)
        self.problem: str | None = None

    def refs_of(self, args: Any) -> Any:
        """``args`` (an ATen call's: tensors, scalars, lists of them) with tensors as references."""
        if isinstance(args, torch.Tensor):
            return self.ref(args)
        if isinstance(args, (list, tuple)) and any(isinstance(a, (torch.Tensor, list, tuple)) for a in args):
            return type(args)(self.refs_of(a) for a in args)
        if isinstance(args, dict):
            return {k: self.refs_of(a) for k, a in args.items()}
        return args

    def ref(self, v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        found = self.refs.get(id(v))
        if found is None:  # from outside the node: a value of the pass is copied, it may be overwritten
            self.consts.append(v.detach() if id(v) in self.kept else v.detach().clone())
            self.alive.append(v)
            found = self.refs[id(v)] = _Ref("const", len(self.consts) - 1)
        return found

    def add(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        k = len(self.steps)
        self.steps.append(_Step(func, args, kwargs))
        for j, t in enumerate(_items(out)):
            if isinstance(t, torch.Tensor) and id(t) not in self.refs:  # an in-place call returns its argument
                self.refs[id(t)] = _Ref("step", k, j)
                self.alive.append(t)

    def check_call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Notes a random call, or a write into a tensor from outside (it cannot be replayed)."""
        if self.problem is None and _random(func, args, kwargs):
            self.problem = f"it calls {func}, random in eval mode"
        for t in written_by(func, args, kwargs):
            self.writes = True
            if self.refs.get(id(t), _Ref("const", -1)).kind == "const" and self.problem is None:
                self.problem = (f"it writes into a tensor it did not make and was not given ({func}), state "
                                "kept between calls")


def _random(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether an ATen call draws random numbers: tagged so, and not switched off by its
    arguments (attention or dropout with probability 0, dropout not training)."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for k, arg in enumerate(func._schema.arguments):
        value = args[k] if k < len(args) and not arg.kwarg_only else kwargs.get(arg.name, arg.default_value)
        if (arg.name in ("dropout_p", "p") and value == 0) or (arg.name in ("train", "training") and value is False):
            return False
    return True


class _AtenCalls(TorchDispatchMode):
    def __init__(self, tracker: _Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tr = self.tracker
        if tr.paused:
            return func(*args, **kwargs)
        tr.check_call(func, args, kwargs)
        targs, tkwargs = tr.refs_of(args), tr.refs_of(kwargs)
        out = func(*args, **kwargs)
        tr.add(func, targs, tkwargs, out)
        return out


class _RuleCalls(TorchFunctionMode):
    """Records a rectifier or LRN as its ``torch`` call (what runs inside it is not recorded)."""

    def __init__(self, tracker: _Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tr = self.tracker
        if tr.paused or not follows_rule(func, args, kwargs):
            return func(*args, **kwargs)
        targs, tkwargs = tr.refs_of(args), tr.refs_of(kwargs)
        tr.paused += 1
        try:
            out = func(*args, **kwargs)
        finally:
            tr.paused -= 1
        tr.writes = tr.writes or (bool(args) and out is args[0])  # in place
        tr.add(func, targs, tkwargs, out)
        return out


@dataclasses.dataclass
class Replay:
    """A replayed node as the forward pass recorded it.

    Attributes:
        program: Its calls (``None`` where it cannot be replayed: ``problem`` says why).
        values: Its inputs that carry the signal, as they were when it ran.
        problem: Why it cannot be reversed.
        graph: Where the node ran with gradients on (:meth:`Replays.run_graphed`): the leaves it
            ran on (copies of ``values``) and its output, with the autograd graph of that run.
    """

    program: Program | None
    values: list[torch.Tensor]
    problem: UnsupportedModelError | None = None
    graph: tuple[list[torch.Tensor], torch.Tensor] | None = None


class Replays:
    """The replayed nodes of one forward pass.

    Attributes:
        found: Each replayed node's :class:`Replay`, by its fx node.
        identities: Nodes that returned their one input, calling nothing (passed through).
        checked: Names of the nodes already replayed against their output for this input
            key (:attr:`zfvis.core.capture.Verdict.replayed`; each is checked once).
        graphed: Names of checked nodes reversed as a stretch of their own, which later passes
            for the key run with gradients on (:attr:`zfvis.core.capture.Verdict.graphed`).
    """

    def __init__(self, model: torch.nn.Module, rule: str = "deconvnet") -> None:
        self.model = model
        self.rule = rule
        self.found: dict[Any, Replay] = {}
        self.checked: set[str] = set()
        self.graphed: set[str] = set()
        self.identities: set[Any] = set()
        self._kept: set[int] | None = None

    def graphable(self, node: Any, live: list[Any]) -> bool:
        """Whether a node is run with gradients on (:meth:`run_graphed`): checked for this key
        and reversed alone, it writes into nothing it is given, its live inputs are
        floating-point tensors."""
        return (node.name in self.graphed and node.name in self.checked and not node.writes and bool(live)
                and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in live))

    def run_graphed(self, node: Any, live: list[torch.Tensor], call_on: Callable[[list[torch.Tensor]], Any],
                    batch: int) -> Any:
        """Runs a :meth:`graphable` node on copies of its live inputs with gradients on, its
        rectifiers under the rule, keeping the autograd graph of the run. Returns the output
        (detached, a copy: later in-place calls must not touch what the graph saved), or
        ``None`` where the run gave no batch-first tensor with a gradient (then the node is
        recorded as usual, and no longer run so for this key)."""
        leaves = [t.detach().clone().requires_grad_(True) for t in live]
        with torch.enable_grad(), RuleMode(self.rule):
            out = call_on(leaves)
        if not (isinstance(out, torch.Tensor) and out.requires_grad and out.dim() > 0 and out.shape[0] == batch):
            self.graphed.discard(node.name)
            return None
        self.found[node.fx_node] = Replay(None, [t.detach() for t in leaves], graph=(leaves, out))
        return out.detach().clone()

    def run(self, node: Any, live: list[Any], call: Callable[[], Any]) -> Any:
        """Runs a node of the model's own code (a :class:`~zfvis.core.graph.GraphNode`) on
        its live inputs, recording its program; tuples of tensors: run as traced."""
        if not all(isinstance(t, torch.Tensor) for t in live):
            return call()
        if self._kept is None:  # parameters and buffers: held by reference
            self._kept = {id(t) for t in (*self.model.parameters(), *self.model.buffers())}
        before = [t.detach().clone() for t in live] if node.writes else None  # it writes into them
        out, program, problem = record_program(node.name, call, live, self._kept, before,
                                               check=node.name not in self.checked)
        if problem is None and program.identity and len(live) == 1:
            self.identities.add(node.fx_node)
        elif problem is None:
            self.checked.add(node.name)
            self.found[node.fx_node] = Replay(program, before or [t.detach() for t in live])
        else:
            self.found[node.fx_node] = Replay(None, [], UnsupportedModelError(
                f"node '{node.name}': {problem}; zfvis cannot reverse it. Hint: make it deterministic in eval mode "
                "and free of state, or project a layer before it"))
        return out


def record_program(name: str, call: Callable[[], Any], inputs: list[torch.Tensor], kept: set[int],
                   before: list[torch.Tensor] | None = None, check: bool = True) -> tuple[Any, Program, str | None]:
    """Runs ``call`` (the node, on ``inputs``) and records its program.

    Args:
        name: The node's name.
        call: Runs the node.
        inputs: The tensors it reads that carry the signal, in the order the program takes them.
        kept: ``id`` of every parameter and buffer of the model (held by reference).
        before: Copies of ``inputs`` made before the call, for a node that writes into them.
        check: Whether to replay the program at once and compare with the node's output.

    Returns:
        (the node's output, its program, why it cannot be replayed or ``None``: it calls a
        random op, writes into a tensor from outside, or, replayed, does not give its output).
    """
    tracker = _Tracker(name, inputs, kept)
    with _RuleCalls(tracker), _AtenCalls(tracker):
        out = call()
    program = Program(name, tracker.steps, tracker.consts, tree_map(tracker.ref, out), tracker.writes)
    if check and tracker.problem is None and not _same(program(*(before or inputs)), out):
        tracker.problem = ("run again as recorded, its calls give other values (random in eval mode, or reading "
                           "state that the call changes)")
    return out, program, tracker.problem


def _same(a: Any, b: Any) -> bool:
    la, lb = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (x.shape != y.shape or not torch.allclose(x, y, rtol=0, atol=0,
                                                                                      equal_nan=True)):
            return False
    return True
