"""What PyTorch ran: every ATen call of a run, recorded under a ``TorchDispatchMode``.

:class:`Recorder` keeps, for each call, the op (an in-place op named as its out-of-place
twin, with a flag), its other arguments, and for each tensor it reads which earlier call
made that tensor and which call last wrote the memory it reads (an op's schema says which
arguments it writes). Two runs of the same computation give the same list of calls:
:mod:`zfvis.core.capture` compares the model's own run with its graph's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from .inplace import storage
from .rule_mode import follows_rule, is_aten_rectifier

if TYPE_CHECKING:
    from .graph import GraphNode

__all__ = ["AtenCall", "Recorder", "RuleCalls", "ModelRun", "run_model", "names", "tensors_in", "stops", "same_output",
           "written_by"]


@dataclasses.dataclass(frozen=True)
class AtenCall:
    """One ATen call as it ran.

    Attributes:
        op: The op's name and overload, an in-place op named as its out-of-place twin
            (``aten::add.Tensor`` for ``aten::add_.Tensor``).
        in_place: Whether it wrote into one of its arguments (from the op's schema).
        reads: For each tensor argument: (the call that made the tensor, the call that
            last wrote its memory); a tensor no call made is named (``param:conv1.weight``,
            ``input``) or described by shape and dtype.
        consts: Its other arguments.
        node: The graph node it ran in (the graph's run only).
    """

    op: str
    in_place: bool
    reads: tuple[Any, ...]
    consts: tuple[Any, ...]
    node: str | None = None
    random: bool = False
    hidden_rectifier: bool = False  # a rectifier run outside any ``torch`` call the rule can swap

    def describe(self) -> str:
        return f"{self.op}{' (in place)' if self.in_place else ''}"



def written_by(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an ATen call writes into, from its schema."""
    out: list[torch.Tensor] = []
    schema = func._schema
    for k, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = args[k] if k < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        for t in tree_flatten(value)[0]:
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def _from_numbers(read: tuple[Any, Any]) -> bool:
    """Whether a tensor a call reads was made from numbers alone, and not written by a call since
    (see :meth:`Recorder.ref`: it is named by its shape and dtype)."""
    made, last = read
    return isinstance(made, tuple) and made[:1] == ("tensor",) and last == made


def _aliases_input(func: Any) -> bool:
    """Whether an ATen call returns a view of an argument (``view``, ``slice``, ...)."""
    return any(r.alias_info is not None for r in func._schema.returns)


def _op_name(func: Any, in_place: bool) -> str:
    name = func._schema.name
    if in_place and name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    overload = func._overloadname
    return f"{name}.{overload}" if overload and overload != "default" else name


def _const(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str, complex)):
        return v
    return repr(v)


class Recorder(TorchDispatchMode):
    """Records every ATen call run inside it (see :class:`AtenCall`)."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.calls: list[AtenCall] = []
        self.made: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # tensor -> call that made it
        self.wrote: dict[int, int] = {}  # storage address -> call that last wrote it
        self.born: dict[int, int] = {}  # storage address -> call that allocated it
        self.node: GraphNode | None = None
        self.start = 0
        self.on_call: Any = None  # the graph run's check of each call
        self.rule_calls = 0  # depth inside rectifier calls seen as ``torch`` calls (:class:`RuleCalls`)

    def ref(self, t: torch.Tensor) -> tuple[Any, Any]:
        made = self.made.get(t)
        ptr = storage(t)
        if made is None:
            made = self.names.get(ptr) or ("tensor", tuple(t.shape), str(t.dtype))
        return made, self.wrote.get(ptr, made)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        """Runs the call and records it; a view of parameters or buffers alone is not recorded
        (its output is named as the memory it views)."""
        kwargs = kwargs or {}
        i = len(self.calls)
        flat = tree_flatten((args, kwargs))[0]
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        reads = tuple(self.ref(t) for t in tensors)
        written = written_by(func, args, kwargs)
        if self.on_call is not None:
            self.on_call(tensors, written)
        out = func(*args, **kwargs)
        random = torch.Tag.nondeterministic_seeded in func.tags
        if not random and all(_from_numbers(r) for r in reads):
            # a tensor made from numbers alone (``torch.arange(8)``, ``torch.arange(8) * 0.1``): a trace
            # may have made it once, as a constant; it is not a call of either run, and named by its
            # shape and dtype (the runs' outputs are compared by value)
            for t in (*tree_flatten(out)[0], *written):
                if isinstance(t, torch.Tensor):
                    self.born[storage(t)] = i
                    self.wrote.pop(storage(t), None)  # new memory: what a freed tensor there had is gone
                    self.made.pop(t, None)
            return out
        for t in written:
            self.made[t] = i
            self.wrote[storage(t)] = i
        view = _aliases_input(func)
        if view and not written and reads and all(not isinstance(r[0], int) and r[0] != "input" for r in reads):
            # a view of constants alone (``buf.view(-1)``, a parameter's, a made tensor's) names the
            # same memory: a trace may have taken it once, as a constant; not a call of either run
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not any(t is w for w in written):
                self.made[t] = i
                ptr = storage(t)
                if not view and ptr:
                    self.wrote[ptr] = i
                    self.born[ptr] = i
        consts = tuple(_const(v) for v in flat if not isinstance(v, torch.Tensor))
        name = self.node.name if self.node is not None else None
        hidden = self.rule_calls == 0 and is_aten_rectifier(func, args)
        self.calls.append(AtenCall(_op_name(func, bool(written)), bool(written), reads, consts, name, random, hidden))
        return out


def names(model: nn.Module, images: torch.Tensor) -> dict[int, str]:
    names = {storage(images): "input"}
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for n, t in items:
            names.setdefault(storage(t), f"{kind}:{n}")
    names.pop(0, None)
    return names


def tensors_in(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]



@contextlib.contextmanager
def stops(holder: Any) -> Iterator[None]:
    """Ends a run quietly where the forward pass fails (another input size than the head
    takes, say): what ran before is still compared; the recording itself reports the failure."""
    try:
        yield
    except Exception:  # noqa: BLE001 - any failure of the model's own code; ``holder.failed`` says where
        if holder.failed is None:
            holder.failed = True


class RuleCalls(TorchFunctionMode):
    """Counts, on a :class:`Recorder`, how deep the run is inside a rectifier's ``torch``
    call (one :class:`~zfvis.core.rule_mode.RuleMode` swaps): ATen rectifiers outside any are hidden."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not follows_rule(func, args, kwargs):
            return func(*args, **kwargs)
        self.rec.rule_calls += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.rec.rule_calls -= 1


class ModelRun:
    failed: Any = None
    output: Any = None


def run_model(model: nn.Module, images: torch.Tensor, names: dict[int, str]) -> tuple[list[AtenCall], ModelRun]:
    rec, run = Recorder(names), ModelRun()
    with RuleCalls(rec), rec, stops(run):  # as the graph's run (a function mode turns off fused fast paths)
        run.output = model(images)
    return rec.calls, run


def same_output(model_out: Any, graph_out: Any) -> bool:
    """Whether the graph's output equals the model's (the same calls on the same values give
    the same numbers; a GPU's reductions may differ in the last bits)."""
    a, b = tensors_in(model_out), tensors_in(graph_out)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.device.type == "cpu":  # the same kernels on the same values: the same bits (NaN where NaN)
            same = x == y if not x.is_floating_point() else (x == y) | (x.isnan() & y.isnan())
            if not bool(same.all()):
                return False
            continue
        scale = float(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).abs().max()) if x.numel() else 0.0
        if not torch.allclose(x, y, rtol=1e-5, atol=1e-5 * scale, equal_nan=True):
            return False
    return True


