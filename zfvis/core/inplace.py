"""In-place operations: which nodes write into a tensor, and which values that write would change.

An in-place call (``t.relu_()``, ``F.relu(t, inplace=True)``, ``nn.ReLU(inplace=True)``,
``a += b``) makes a new version of the tensor it writes. :func:`version_in_place` turns it
into one when the graph is traced: every node that reads the tensor after the call reads the
call's node instead, so a call whose result is unused still runs, and the reverse pass sees
the version each node read (also where the call writes the signal into a tensor that held
none, ``x.new_zeros(...)`` then ``index_add_``). What no rewiring can see is another value
sharing the written memory (a view taken before the call, or the tensor a written view was
cut from) that is read later: :func:`overwritten` finds it, for the deconvnet's forward pass
and occlusion's alike.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

if TYPE_CHECKING:
    from .graph import GraphNode, ModelGraph

__all__ = ["writes_in_place", "version_in_place", "mark_in_place", "overwritten", "storage"]

#: Augmented assignments: ``a += b`` writes into ``a`` when it is a tensor.
_AUGMENTED = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul,
})  # fmt: skip


def writes_in_place(fxn: fx.Node, module: nn.Module | None) -> bool:
    """Whether the traced call writes into its first argument. (An augmented assignment
    ``a += b`` is traced by fx as ``a + b``: :mod:`zfvis.core.capture` finds it in the
    model's own run.)"""
    if fxn.op == "call_module":
        return getattr(module, "inplace", False) is True
    if fxn.op == "call_method":
        name = str(fxn.target)
        return name.endswith("_") and not name.startswith("__")
    if fxn.op != "call_function":
        return False
    if fxn.target in _AUGMENTED or fxn.kwargs.get("inplace") is True:
        return True
    name = getattr(fxn.target, "__name__", "")
    if name.endswith("_") and not name.startswith("__"):
        return True
    # a torch.nn.functional call given ``inplace`` positionally (F.relu(x, True))
    return getattr(fxn.target, "__module__", "") == "torch.nn.functional" and any(a is True for a in fxn.args[1:])


def version_in_place(nodes: list[GraphNode], of: dict[fx.Node, GraphNode]) -> bool:
    """Makes every in-place call that carries the signal a new version of the tensor it
    writes: the nodes after it that read that tensor read the call's node instead.

    Returns:
        Whether a call wrote the signal into a tensor that held none (``x.new_zeros(...)``
        then ``index_add_``): the nodes after it must be classified again.
    """
    again = False
    for gn in nodes:
        gn.writes = writes_in_place(gn.fx_node, gn.module)
        if gn.writes:
            again = _new_version(gn, of, into_constant=True) or again
    return again


def mark_in_place(graph: ModelGraph, nodes: list[GraphNode]) -> None:
    """Marks nodes the model's own run showed writing into their first argument (``a += b``,
    which fx traces as ``a + b``) and makes each a new version of what it writes."""
    of = {n.fx_node: n for n in graph.nodes}
    graph._ancestors.clear()  # the edges change
    for gn in nodes:
        gn.writes = True
        _new_version(gn, of)


def _new_version(gn: GraphNode, of: dict[fx.Node, GraphNode], into_constant: bool = False) -> bool:
    """Rewires the readers of what ``gn`` writes after it to ``gn``; with ``into_constant``, also
    where only ``gn`` carries the signal. Returns whether a reader that carries none moved."""
    first = gn.fx_node.args[0] if gn.fx_node.args else None
    victim = of.get(first) if isinstance(first, fx.Node) else None
    if victim is None or not gn.carries or not (victim.carries or into_constant):
        return False
    gn.in_place = True
    moved = False
    for user in [u for u in victim.users if u.index > gn.index]:
        user.fx_node.replace_input_with(victim.fx_node, gn.fx_node)
        user.inputs = [of[a] for a in user.fx_node.all_input_nodes if a in of]
        victim.users.remove(user)
        gn.users.append(user)
        moved = moved or not user.carries
    return moved


def storage(t: torch.Tensor) -> int:
    """The address of a tensor's memory, 0 where it has none of its own (fake, meta, functional)."""
    if isinstance(t, FakeTensor):  # shapes only: no memory to share
        return 0
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (fake, functional)
        return 0


def overwritten(target: Any, later: Iterable[tuple[str, Any]]) -> str | None:
    """The name of a value read later that shares memory with ``target`` (which an in-place
    call is about to write), or ``None``.

    Args:
        target: The tensor the call writes.
        later: (name, value) of every value still to be read after the call (not the
            written tensor's own node: its later readers read the call's result).
    """
    if not isinstance(target, torch.Tensor):
        return None
    ptr = storage(target)
    if ptr == 0:  # no memory of its own (an empty, meta or fake tensor: a shapes-only pass)
        return None
    for name, value in later:
        if isinstance(value, torch.Tensor) and value is not target and storage(value) == ptr:
            return name
    return None
