"""The op table's records: :class:`Op` (one entry), :class:`Site` (a node as a forward pass saw it), :class:`Live`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ...io.errors import UnsupportedModelError
from ..reverse import ReverseLayer

if TYPE_CHECKING:
    from ..graph import GraphNode

__all__ = ["Op", "Site", "Live", "RULES", "Pair"]

#: The backward rules for ReLU-family nodes.
RULES = ("deconvnet", "guided", "gradient")

Pair = tuple[int, int]



@dataclasses.dataclass(frozen=True)
class Live:
    """Stands, in a node's recorded arguments, for its k-th input that carries the signal."""

    k: int


@dataclasses.dataclass
class Site:
    """A node as one forward pass saw it: what its op needs to build the reverse layer.

    Attributes:
        node: The graph node.
        args: Its positional arguments, with :class:`Live` in place of input tensors
            that carry the signal and actual values for the rest (weights, constants).
        kwargs: Its keyword arguments, likewise.
        live: The distinct input nodes that carry the signal, in order.
        in_shapes: Their shapes, without the batch dimension.
        out_shape: The output's shape, without the batch dimension.
        state: What the op recorded (switches, masks), or ``None``.
        cone: How windows map through it (``"same"``, ``"spatial"``, ``"full"``;
            ``"bundle"``: a node whose output is a tuple, reversed by its items).
        entry: The op that reverses it, where not the node's own (an item of a tuple
            is reversed as the gradient of the tuple's node).
        fn: The operation as a function of the live inputs, where not the node's own.
        reverse_shapes: The shapes of the live inputs and of the output as the reverse pass
            holds them, where they differ (maps with channels last, held channels first:
            :mod:`zfvis.core.layouts`).
        start: For a stretch where the batch is not the first dimension, reversed as one
            (``fn`` of its batch-first inputs ``live``), the node where it began.
        hand_to: The op (its name) a check of the node's own op handed the site to (a
            convolution padding by reflection: ``"vjp"``); the recording makes it the entry.
        batched: ``id`` of each tensor argument that is not live but has the batch first (made
            from the signal's shape, ``torch.zeros_like(x)``): per seed, its seed's image's item.
        checked: Whether the node's per-image gradient check has passed on this input key (set
            by the recording from :attr:`zfvis.core.capture.Verdict.gradient_checked`, and by
            the check itself): a recording of one image does not run it again.
    """

    node: GraphNode
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    live: list[GraphNode]
    in_shapes: list[tuple[int, ...]]
    out_shape: tuple[int, ...]
    state: Any = None
    cone: str = "same"
    entry: Op | None = None
    fn: Callable[..., Any] | None = None
    reverse_shapes: tuple[list[tuple[int, ...]], tuple[int, ...]] | None = None
    start: GraphNode | None = None
    hand_to: str | None = None
    batched: frozenset[int] = frozenset()
    checked: bool = False

    @property
    def op(self) -> Op:
        """The op that reverses this site."""
        op = self.entry or self.node.op
        if op is None:  # pragma: no cover - nodes without an op get no site
            raise UnsupportedModelError(self.node.problem or f"node '{self.node.name}' has no reverse")
        return op

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Argument ``name`` (positional index ``i``) of a functional call."""
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def fail(self, why: str) -> UnsupportedModelError:
        """An error naming this node, its op and its source line."""
        where = f" ({self.node.source})" if self.node.source else ""
        return UnsupportedModelError(f"node '{self.node.name}' ({self.node.kind}){where}: {why}")


@dataclasses.dataclass(frozen=True)
class Op:
    """One entry of the table.

    Attributes:
        name: The op's name.
        summary: What its reverse does, in words.
        cone: ``"same"``, ``"spatial"`` or ``"full"`` (see the module docstring); ``prepare``
            may refine it per node.
        build: Returns the reverse layer for a recorded site.
        prepare: Checks a site's arguments once its values are known and sets its cone
            (raises :class:`UnsupportedModelError` for uses it cannot reverse).
        record: Computes what the reverse needs from the forward values:
            ``record(site, inputs, output, rule) -> state``.
        params: For ``"spatial"`` ops, (kernel, stride, padding, dilation) pairs.
        reads_inputs: Whether ``record`` reads the inputs (an in-place call's are copied
            before it runs).
        window: For ``"spatial"`` ops, the occlusion engine's rule: the op's forward on
            windows of its input (:mod:`zfvis.core.ops.incremental_rules`); ``None``: a
            spatial node is recomputed whole. (A ``"same"`` node needs none: it is computed
            on windows as it is.)
        folds_into: The op of a producer whose reverse layer can absorb this node's reverse
            (batch norm into the convolution before it), where that producer feeds nothing else.
        work: Multiply-adds the reverse layer does per position of its output map (to batch
            seeds by cost); ``None``: it only reads and writes the signal.
    """

    name: str
    summary: str
    cone: str
    build: Callable[[Site], ReverseLayer]
    prepare: Callable[[Site], None] | None = None
    record: Callable[[Site, list[torch.Tensor], torch.Tensor, str], Any] | None = None
    params: Callable[[Site], tuple[Pair, Pair, Pair, Pair]] | None = None
    reads_inputs: bool = False
    window: Callable[[Site], Any] | None = None
    folds_into: str | None = None
    work: Callable[[Site], float] | None = None
