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

Supported: a unit that is a ``Conv2d`` output (groups 1, zero padding), whose input comes from
a rectified convolution through ReLU, max- or average-pooling, local response normalisation
or dropout (ZF Net, AlexNet, VGG). Anything else is refused with an
:class:`~zfvis.UnsupportedModelError` naming the layer.
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

__all__ = ["Connections", "connections"]

#: Ops that may stand between the layer below's convolution and the unit's convolution.
_BETWEEN = ("relu", "max_pool2d", "avg_pool2d", "identity", "batch_norm")  # identity: LRN, dropout, ...


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


def _below(dn: Deconvnet, conv: GraphNode, layer: str) -> tuple[GraphNode, str]:
    """The convolution's input node and the name of the layer below (checked: a rectified convolution)."""
    live = [p for p in conv.inputs if p.carries]
    node, relu = live[0], None
    while node is not dn.graph.input and node.op is not None and node.op.name in _BETWEEN:
        if relu is None and node.op.name == "relu":
            relu = node
        live = [p for p in node.inputs if p.carries]
        if len(live) != 1:
            break
        node = live[0]
    if relu is None or not isinstance(node.module, nn.Conv2d):
        what = "the input image" if node is dn.graph.input else f"'{node.name}' ({node.kind})"
        raise UnsupportedModelError(f"connections of layer '{layer}': its convolution is fed by {what}, not by a "
                                    "rectified convolution; supported are chains like ZF Net and VGG")
    alias = next((a for a, t in dn.aliases.items() if t in (relu.name, relu.module_name)), None)
    return [p for p in conv.inputs if p.carries][0], alias or relu.name


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
        UnsupportedModelError: The layer is not a convolution fed by a rectified convolution,
            or its convolution has groups or non-zero padding.
        UserInputError: An unknown layer, a channel or position out of range, not one image.
    """
    dn = model if isinstance(model, Deconvnet) else Deconvnet(check_model(model))
    conv_node = _conv_node(dn, layer)
    conv = conv_node.module
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise UnsupportedModelError(f"connections of layer '{layer}': only a Conv2d with groups=1 and zero padding "
                                    "is supported")
    (channel,) = check_channels([channel], conv.out_channels, layer)
    input_node, below = _below(dn, conv_node, layer)
    scale, bias = _folded(dn, conv_node, conv)
    w = conv.weight.detach()[channel]
    result = Connections(layer, conv_node.module_name or conv_node.name, channel, below,
                         (w.flatten(1).norm(dim=1) * scale[channel].abs()).float().cpu(), bias=float(bias[channel]))
    if images is None:
        return result
    if images.dim() != 4 or images.shape[0] != 1:
        raise UserInputError(f"images must be one image (1, C, H, W), got shape {tuple(images.shape)}")
    with eval_mode(dn.model), torch.no_grad():
        a = dn.forward_outputs(images, [input_node.name])[input_node.name]
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
