"""Connections of a unit: which channels of the layer below feed a convolution's channel.

A convolution's output channel ``c`` at a position is a sum over its input channels ``i``:
``z_c = b_c + sum_i (W[c, i] * a_i)(position)``, ``a_i`` the convolution's input (the rectified,
possibly pooled and normalised, output of the convolution below). A batch norm right after the
convolution is folded in: its scale multiplies every term and its shift joins the bias, so ``z_c``
is the pre-activation (the value before the ReLU). :func:`connections` gives, for one unit,

* ``by_weight``: each input channel's weight norm ``||W[c, i]||`` (times the batch norm's scale);
* ``contribution``: each input channel's term on a given image at a position (by default the
  position of the unit's strongest pre-activation), which with ``bias`` sums to the
  pre-activation exactly (up to rounding).

Supported: a unit that is a ``Conv2d`` output (groups 1, zero padding), whose input comes, through
ReLU, max- or average-pooling, batch norm, local response normalisation or dropout (ops that keep
each channel apart), from

* a rectified convolution (ZF Net, AlexNet, VGG): ``sources`` is one ``"chain"`` run;
* a concatenation along the channels (Inception, DenseNet): each input channel belongs to one
  branch; ``sources`` gives per run of channels the branch's layer and the channel there
  (nested concatenations are followed);
* a sum of branches (ResNet's residual add): each input channel is the sum of the same channel of
  every addend; ``sources`` names the addends' layers.

The contributions are the terms of the convolution on its actual input, so ``contribution``
and ``bias`` sum to the pre-activation whatever lies below. Anything else (a difference, a
product, an upsampling, a concatenation along another axis, ...) is refused with an
:class:`~zfvis.UnsupportedModelError` naming the layer and the op.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..core.deconvnet import Deconvnet
from ..core.graph import GraphNode, eval_mode
from ..io.checks import check_channels, check_model
from ..io.errors import UnsupportedModelError, UserInputError
from ..models import aliases as _aliases  # noqa: F401 - registers the zoo's layer names (conv3, conv5_3, ...)

__all__ = ["Connections", "Source", "connections"]

#: Ops that may stand between the layer below's convolution and the unit's convolution (each keeps
#: the channels apart: channel i of its output comes from channel i of its input).
_BETWEEN = ("relu", "max_pool2d", "avg_pool2d", "identity", "batch_norm", "batch_norm_function")  # identity: LRN, ...


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a run of the convolution's input channels comes from.

    Input channel ``i`` (``first <= i < first + count``) is channel ``offset + i - first`` of
    ``layers[0]`` (a chain or a concatenation's branch) or the sum of that channel of every
    layer of ``layers`` (a sum of branches), passed through channel-wise ops (ReLU, pooling,
    batch norm).

    Attributes:
        first: The run's first input channel of the unit's convolution.
        count: Its number of channels.
        layers: The layer it comes from; several for a sum (one per addend, in the sum's order).
        offset: The channel of ``layers`` that input channel ``first`` comes from.
        kind: ``"chain"`` (one rectified convolution below), ``"concat"`` (a branch of a
            concatenation) or ``"sum"`` (a sum of branches).
    """

    first: int
    count: int
    layers: tuple[str, ...]
    offset: int = 0
    kind: str = "chain"

    def channels(self, i: int) -> list[tuple[str, int]]:
        """(layer, channel) of each layer that input channel ``i`` of this run comes from."""
        return [(name, self.offset + i - self.first) for name in self.layers]


@dataclasses.dataclass
class Connections:
    """The input channels of one unit, by weight and by contribution on an image.

    Attributes:
        layer: The unit's layer as given.
        conv: The convolution's module name.
        channel: The unit's channel.
        below: The layer below (its paper name where the model has one, else the node's name).
        by_weight: Each input channel's weight norm (C_in,), times the batch norm's scale if folded.
        contribution: Each input channel's term at ``position`` on the image (C_in,); ``None`` without an image.
        bias: The bias (with a folded batch norm's shift).
        preactivation: The unit's value at ``position`` (the convolution's output, after the batch norm).
        position: (row, column) in the unit's feature map.
        sources: Where the input channels come from, in runs that cover ``0 .. C_in - 1`` in order
            (:class:`Source`); :meth:`source` answers it per input channel.
    """

    layer: str
    conv: str
    channel: int
    below: str
    by_weight: torch.Tensor
    contribution: torch.Tensor | None = None
    bias: float = 0.0
    preactivation: float | None = None
    position: tuple[int, int] | None = None
    sources: list[Source] = dataclasses.field(default_factory=list)

    def source(self, i: int) -> list[tuple[str, int]]:
        """The (layer, channel) pairs input channel ``i`` comes from: one for a chain or a
        concatenation's branch, one per addend for a sum.

        Raises:
            UserInputError: ``i`` is not an input channel.
        """
        for run in self.sources:
            if not isinstance(i, bool) and isinstance(i, int) and run.first <= i < run.first + run.count:
                return run.channels(i)
        n = self.by_weight.shape[0]
        raise UserInputError(f"input channel {i!r} is out of range: the convolution '{self.conv}' has {n} input "
                             f"channels (0..{n - 1})")

    def top(self, k: int = 9, *, by: str = "contribution") -> list[tuple[int, float]]:
        """The ``k`` input channels with the largest ``by_weight`` or (signed) ``contribution``,
        largest first, as (channel, value)."""
        values = self.contribution if by == "contribution" else self.by_weight
        if values is None:
            raise UserInputError("no contribution without an image; pass images= to connections(), or by='weight'")
        order = torch.argsort(values, descending=True, stable=True)[:k]
        return [(int(i), float(values[i])) for i in order]


def _conv_node(dn: Deconvnet, layer: str) -> GraphNode:
    """The Conv2d node a layer stands for (the layer itself, or its convolution before BN and ReLU)."""
    name, _ = dn.convolution(layer)
    return dn.graph.module_output[name]


def _down(dn: Deconvnet, node: GraphNode) -> tuple[GraphNode, GraphNode | None]:
    """Walks down from ``node`` through ops that keep channels apart; returns the node reached
    and the first ReLU passed (``None``: none)."""
    relu = None
    while node is not dn.graph.input and node.op is not None and node.op.name in _BETWEEN:
        if relu is None and node.op.name == "relu":
            relu = node
        live = [p for p in node.inputs if p.carries]
        if len(live) != 1:
            break
        node = live[0]
    return node, relu


def _below(dn: Deconvnet, conv: GraphNode, layer: str) -> tuple[GraphNode, str, list[Source]]:
    """The convolution's input node, the name of the layer below and where each input channel
    comes from (checked: a rectified convolution, a concatenation or a sum of branches)."""
    input_node = [p for p in conv.inputs if p.carries][0]
    node, relu = _down(dn, input_node)
    if _operands(node) is not None:
        sources = _Walk(dn, layer).parts(input_node, 0, "concat")
        return input_node, _name(dn, input_node), sources
    if relu is None or not isinstance(node.module, nn.Conv2d):
        what = "the input image" if node is dn.graph.input else f"'{node.name}' ({node.kind})"
        raise UnsupportedModelError(f"connections of layer '{layer}': its convolution is fed by {what}, not by a "
                                    "rectified convolution, a concatenation of branches or a sum of branches; "
                                    "supported are ZF Net, VGG, Inception, ResNet and DenseNet")
    alias = next((a for a, t in dn.aliases.items() if t in (relu.name, relu.module_name)), None)
    below = alias or (relu.name if dn.layers.table.get(relu.name) is relu else _name(dn, relu))
    return input_node, below, [Source(0, int(conv.module.in_channels), (below,))]  # type: ignore[union-attr]


def _operands(node: GraphNode) -> tuple[str, list[object]] | None:
    """``("cat", tensors)`` for a concatenation, ``("add", operands)`` for a sum of two tensors;
    ``None`` for any other node. The fx arguments, in order (a tensor given twice stays twice)."""
    if node.op is None or not node.carries:
        return None
    args = node.fx_node.args
    if node.op.name == "cat" and args and isinstance(args[0], (list, tuple)):
        return "cat", list(args[0])
    if node.op.name == "add" and len(args) >= 2 and sum(isinstance(a, torch.fx.Node) for a in args[:2]) == 2:
        return "add", list(args[:2])
    return None


def _name(dn: Deconvnet, node: GraphNode) -> str:
    """A node as a layer name one can pass back: its alias, else the outermost module whose output it
    is (``inception3b.branch1``, ``layer1.0``), else a name that means this node (a module called
    twice: its name means the last call, ``<module>_0`` the first)."""
    table = dn.layers.table
    alias = next((a for a, t in dn.aliases.items() if t in (node.name, node.module_name) and table.get(t) is node),
                 None)
    if alias is not None:
        return alias
    owners = [m for m, n in dn.graph.module_output.items() if n is node and m]
    if owners:
        return min(owners, key=lambda m: (m.count("."), len(m)))
    if table.get(node.name) is node:
        return node.name
    return next((k for k, n in table.items() if n is node), node.name)


class _Walk:
    """Follows a convolution's input channels down through concatenations and sums."""

    def __init__(self, dn: Deconvnet, layer: str) -> None:
        self.dn, self.layer = dn, layer
        self.of = {n.fx_node: n for n in dn.graph.nodes}

    def refuse(self, node: GraphNode, why: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"connections of layer '{self.layer}': its input comes through '{node.name}' "
                                     f"({node.kind}), {why}")

    def parts(self, top: GraphNode, first: int, kind: str) -> list[Source]:
        """The runs of channels of ``top``'s output, numbered from ``first``."""
        node, _ = _down(self.dn, top)
        found = _operands(node)
        if found is None:
            return [Source(first, self.count(top), (_name(self.dn, top),), 0, kind)]
        op, args = found
        pieces = [self.piece(node, a) for a in args]
        if op == "add":
            return [Source(first, self.count(top), tuple(_name(self.dn, p) for p in pieces), 0, "sum")]
        if self.cat_dim(node) != 1:
            raise self.refuse(node, "a concatenation along another axis than the channels")
        out: list[Source] = []
        for p in pieces:
            out += self.parts(p, first + sum(r.count for r in out), "concat")
        return out

    def piece(self, node: GraphNode, arg: object) -> GraphNode:
        piece = self.of.get(arg) if isinstance(arg, torch.fx.Node) else None
        if piece is None or not piece.carries:
            raise self.refuse(node, "with an operand that does not come from the image (a constant)")
        return piece

    def cat_dim(self, node: GraphNode) -> int:
        fx_node = node.fx_node
        dim = fx_node.args[1] if len(fx_node.args) > 1 else fx_node.kwargs.get("dim", 0)
        if not isinstance(dim, int):
            raise self.refuse(node, "a concatenation along an axis computed at run time")
        return dim % 4

    def count(self, top: GraphNode) -> int:
        """The number of channels of ``top``'s output, from the modules below it."""
        node = top
        while True:
            found = _operands(node)
            if isinstance(node.module, nn.Conv2d):
                return int(node.module.out_channels)
            if isinstance(node.module, nn.BatchNorm2d):
                return int(node.module.num_features)
            if found is not None and found[0] == "cat":
                return sum(self.count(self.piece(node, a)) for a in found[1])
            if found is not None:
                return self.count(self.piece(node, found[1][0]))
            live = [p for p in node.inputs if p.carries]
            if node.op is None or node.op.name not in _BETWEEN or len(live) != 1:
                what = "the input image" if node is self.dn.graph.input else f"'{node.name}' ({node.kind})"
                raise UnsupportedModelError(f"connections of layer '{self.layer}': one of its branches comes from "
                                            f"{what}, whose channels zfvis cannot follow")
            node = live[0]


def _folded(dn: Deconvnet, conv_node: GraphNode, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel: the scale of every term and the bias (a following BatchNorm2d folded in)."""
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                                        device=conv.weight.device)
    scale = torch.ones_like(bias)
    users = conv_node.users
    if len(users) == 1 and isinstance(users[0].module, nn.BatchNorm2d) and not users[0].module.training:
        bn = users[0].module
        std = torch.sqrt(bn.running_var.detach() + bn.eps)  # type: ignore[operator]
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(std)
        scale = gamma / std
        bias = (bias - bn.running_mean.detach()) * scale + beta  # type: ignore[operator]
    return scale, bias


def connections(
    model: nn.Module | Deconvnet,
    layer: str,
    channel: int,
    *,
    images: torch.Tensor | None = None,
    position: tuple[int, int] | None = None,
) -> Connections:
    """The input channels that feed a unit, by weight and, on an image, by contribution.

    Args:
        model: The network, or its :class:`~zfvis.Deconvnet`.
        layer: A convolution or its rectified output (``conv3``).
        channel: The unit's channel.
        images: One preprocessed image (1, C, H, W) to compute contributions on.
        position: (row, column) in the unit's map (default: its strongest pre-activation).

    Returns:
        The :class:`Connections`.

    Raises:
        UnsupportedModelError: The layer is not a convolution fed by a rectified convolution, a
            concatenation of branches or a sum of branches, or its convolution has groups or
            non-zero padding.
        UserInputError: An unknown layer, a channel or position out of range, not one image.
    """
    dn = model if isinstance(model, Deconvnet) else Deconvnet(check_model(model))
    conv_node = _conv_node(dn, layer)
    conv = conv_node.module
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise UnsupportedModelError(f"connections of layer '{layer}': only a Conv2d with groups=1 and zero padding "
                                    "is supported")
    (channel,) = check_channels([channel], conv.out_channels, layer)
    input_node, below, sources = _below(dn, conv_node, layer)
    if sum(r.count for r in sources) != conv.in_channels:
        raise UnsupportedModelError(f"connections of layer '{layer}': its {conv.in_channels} input channels do not "
                                    f"match the {sum(r.count for r in sources)} channels of the layers below "
                                    f"({', '.join(n for r in sources for n in r.layers)})")
    scale, bias = _folded(dn, conv_node, conv)
    w = conv.weight.detach()[channel]
    result = Connections(layer, conv_node.module_name or conv_node.name, channel, below,
                         (w.flatten(1).norm(dim=1) * scale[channel].abs()).float().cpu(), bias=float(bias[channel]),
                         sources=sources)
    if images is None:
        return result
    if images.dim() != 4 or images.shape[0] != 1:
        raise UserInputError(f"images must be one image (1, C, H, W), got shape {tuple(images.shape)}")
    with eval_mode(dn.model), torch.no_grad():
        key = _name(dn, input_node)  # the node itself (a reused module's name means its last call)
        a = dn.forward_outputs(images, [key])[key]
        terms = F.conv2d(a, w.unsqueeze(1).to(a.dtype), None, conv.stride, conv.padding, conv.dilation,
                         groups=a.shape[1]) * scale[channel].to(a.dtype)  # (1, C_in, H', W')
        pre = terms.sum(1)[0] + bias[channel].to(a.dtype)
    y, x = _position(position, pre)
    result.contribution = terms[0, :, y, x].cpu()
    result.preactivation = float(pre[y, x])
    result.position = (y, x)
    return result


def _position(position: tuple[int, int] | None, pre: torch.Tensor) -> tuple[int, int]:
    h, w = pre.shape
    if position is None:
        y, x = divmod(int(pre.argmax()), w)
        return y, x
    y, x = position
    if not (0 <= y < h and 0 <= x < w):
        raise UserInputError(f"position ({y}, {x}) is outside the {h}x{w} feature map (0..{h - 1}, 0..{w - 1})")
    return int(y), int(x)
