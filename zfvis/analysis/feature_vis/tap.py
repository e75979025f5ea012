"""A layer's output with gradients: the model's ordinary forward, stopped at the layer.

Layer names are zfvis's (:class:`zfvis.core.layers.LayerNames`: graph node names, module
names, the zoo's paper names such as ``conv3``). Where the layer is the output of a module
called once, a forward hook on that module catches its output and stops the forward there
(the hook is removed in a ``finally``); any other node (a function call such as
``layer1.0.add``, a module called several times) runs through a copy of the traced graph
cut after that node, a ``torch.fx.GraphModule`` sharing the model's modules.

A layer that is a ReLU (``conv3`` of the zoo's models names the ReLU after the third
convolution) is computed as the ReLU of its input, caught before the ReLU runs: so the
optimisation may pass the gradient of a unit that is still off (:func:`redirected_relu`,
Lucid's trick for the first steps), and an in-place ReLU never writes into the caught tensor.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ...core.deconvnet import Deconvnet
from ...core.graph import GraphNode

__all__ = ["LayerTap", "redirected_relu"]


class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose gradient also passes where the input is negative, if it would raise the input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - autograd's interface
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102 - autograd's interface
        (x,) = ctx.saved_tensors
        return torch.where((x > 0) | (grad < 0), grad, torch.zeros_like(grad))


def redirected_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)``, with a gradient that also flows into negative inputs where following it (descending
    the loss) raises them: a unit that is off everywhere can still be turned on."""
    return _RedirectedReLU.apply(x)


class _Reached(Exception):
    """Raised by the hook to stop the forward once the layer's output is known."""


class LayerTap:
    """Computes a layer's output (with gradients) for a batch.

    Args:
        dn: The model's deconvnet (its traced graph and layer names).
        layer: A layer name or alias; ``None`` means the model's output.

    Raises:
        UserInputError: Unknown layer (the message lists the closest names).
    """

    def __init__(self, dn: Deconvnet, layer: str | None) -> None:
        self.model: nn.Module = dn.model
        self.layer = layer
        self.node: GraphNode | None = None if layer is None else dn.layers.node(layer)
        self.module: nn.Module | None = None
        self.graph_module: fx.GraphModule | None = None
        #: Whether the tap returns the input of the layer's ReLU (the caller rectifies it).
        self.rectify = False
        node = self.node
        if node is None:
            return
        live = [p for p in node.inputs if p.carries]
        if node.op is not None and node.op.name == "relu" and len(live) == 1 and live[0] is not dn.graph.input:
            node, self.rectify = live[0], True
        if node.module is not None and node.module_name is not None and node.module_name not in dn.graph.first_call:
            self.module = node.module
        else:
            self.graph_module = _cut_graph(dn, node)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``x``."""
        if self.node is None:
            return self.model(x)
        if self.graph_module is not None:
            return self.graph_module(x)
        caught: list[torch.Tensor] = []

        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:  # noqa: ARG001 - hook signature
            caught.append(output)
            raise _Reached

        handle = self.module.register_forward_hook(hook)  # type: ignore[union-attr]
        try:
            self.model(x)
        except _Reached:
            pass
        finally:
            handle.remove()
        if not caught:  # pragma: no cover - the traced graph says the module runs
            raise RuntimeError(f"the forward pass did not run the module of layer '{self.layer}'")
        return caught[0]


def _cut_graph(dn: Deconvnet, node: GraphNode) -> fx.GraphModule:
    """A copy of the traced graph that returns ``node``'s value (every later node removed)."""
    graph = copy.deepcopy(node.fx_node.graph)
    target = next(n for n in graph.nodes if n.name == node.fx_node.name)
    later: list[fx.Node] = []
    seen = False
    for n in graph.nodes:
        if seen:
            later.append(n)
        seen = seen or n is target
    for n in reversed(later):
        graph.erase_node(n)
    graph.output(target)
    return fx.GraphModule(dn.model, graph)
