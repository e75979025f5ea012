"""Ops reversed by true derivatives: pointwise activations and the generic vector-Jacobian product.

A rectifier's reverse follows the rule (deconvnet: relu(signal); guided: f'(x) relu(signal);
gradient: f'(x) signal), a gate's (sigmoid, hard sigmoid, tanh) is always f'(x) signal, with
f' the activation's own derivative at the recorded forward input. Any other differentiable
node is reversed by its local vector-Jacobian product at its recorded inputs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...io.errors import is_out_of_memory
from .. import reverse as deconv
from ..reverse_grad import VectorJacobian, WholeBatchVectorJacobian
from ..rule_mode import RuleMode
from .args import live_call
from .site import Site

__all__ = ["derivative", "record_rectifier", "record_gate", "build_rectifier", "build_gate", "record_vjp",
           "build_vjp", "prepare_pointwise", "recorded_inputs", "RULES_WITHOUT_INPUTS", "IDENTITY"]


def derivative(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f'(x) of a pointwise function, elementwise, by autograd."""
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = fn(leaf.clone())  # a copy: the call may be in place
        (grad,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
    return grad.detach()


def _one_input(site: Site) -> Callable[[torch.Tensor], torch.Tensor]:
    call = live_call(site)
    return lambda t: call(t)


def record_rectifier(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> torch.Tensor | None:
    """The deconvnet rule needs nothing; guided and gradient need f'(x)."""
    return None if rule == "deconvnet" else derivative(_one_input(site), inputs[0])


def _is_sigmoid(site: Site) -> bool:
    fxn = site.node.fx_node
    if fxn.op == "call_module":
        return type(site.node.module) is nn.Sigmoid
    if fxn.op == "call_method":
        return fxn.target in ("sigmoid", "sigmoid_")
    return fxn.op == "call_function" and fxn.target in (torch.sigmoid, torch.sigmoid_, F.sigmoid)


def record_gate(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> torch.Tensor:
    """f'(x), for every rule; a sigmoid's from its output y, as its backward computes it:
    (1 - y) y (the gate of every squeeze-and-excitation block, without running autograd)."""
    if site.fn is None and isinstance(out, torch.Tensor) and _is_sigmoid(site):
        return (1 - out) * out
    return derivative(_one_input(site), inputs[0])


def _source(site: Site) -> str:
    return site.node.module_name or site.node.name


def build_rectifier(site: Site) -> deconv.ReverseLayer:
    return deconv.Rectify(_source(site), relu6=False, kind=site.node.kind, by_rule=True)


def build_gate(site: Site) -> deconv.ReverseLayer:
    return deconv.Rectify(_source(site), relu6=False, kind=site.node.kind, by_rule=False)


def recorded_inputs(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The live inputs, detached; they share memory with the forward pass's values, and the
    pass (:mod:`zfvis.core.record`) copies them before anything may write into that memory."""
    return [t.detach() for t in inputs]


#: Record functions that do not read the inputs under some rules (an in-place call's inputs
#: then need no copy before it runs).
RULES_WITHOUT_INPUTS: dict[Callable[..., Any], tuple[str, ...]] = {record_rectifier: ("deconvnet",)}


class _Identity:
    """The state of a node that returned its input untouched (reversed by passing through)."""

    def __repr__(self) -> str:
        return "IDENTITY"


#: What :func:`record_vjp` records for a node that is the identity at the recorded input.
IDENTITY = _Identity()


def _is_identity(fn: Callable[..., Any], inputs: list[torch.Tensor], out: Any) -> bool:
    """Whether the node returned its one input itself, unchanged (as ``StochasticDepth`` or a
    disabled branch does in eval mode): checked again on a copy of one image, which must come
    back as the very same tensor, not written in place. Its gradient is then the identity."""
    if len(inputs) != 1 or out is not inputs[0] or inputs[0].shape[0] == 0:
        return False
    probe = inputs[0][:1].detach().clone()
    version = probe._version
    return fn(probe) is probe and probe._version == version


class RecordedInputs(list):  # type: ignore[type-arg]
    """A node's recorded live inputs; ``graph``, where kept: the node's autograd graph at them,
    built by the check under the rule (:class:`RecordedGraph`), which the reverse pass of one
    seed of a one-image recording differentiates without running the node again."""

    graph: RecordedGraph | None = None


class RecordedGraph:
    """The leaves, output and rule of a node's autograd graph at its recorded inputs."""

    def __init__(self, leaves: list[torch.Tensor], out: torch.Tensor, rule: str) -> None:
        self.leaves, self.out, self.rule = leaves, out, rule


def _check_gradient(site: Site, fn: Callable[..., Any], inputs: list[torch.Tensor], out: torch.Tensor,
                    rule: str | None = None, per_image: bool = False) -> RecordedGraph | None:
    """Refuses a node without a gradient, or whose output for one image is not a function of
    that image alone (random in eval mode, or mixing the images of the batch). With ``rule``
    (one recorded image), the check runs under the rule (rectifiers inside pass the signal back
    by it) and returns its autograd graph, exactly what the reverse pass would build again."""
    leaves = [t[:1].detach().requires_grad_(True) for t in inputs]
    if per_image:  # its other tensor arguments with a batch: the first image's (live_call's image=)
        first = torch.zeros(1, dtype=torch.long, device=inputs[0].device)
        fn = functools.partial(fn, image=first)
    with torch.enable_grad(), RuleMode(rule) if rule is not None else contextlib.nullcontext():
        try:
            y = fn(*(t.clone() for t in leaves))
        except RuntimeError as err:  # it ran on the batch, not on one image of it
            if is_out_of_memory(err):
                raise
            raise site.fail(f"run on one image of the batch, it fails ({str(err).splitlines()[0][:160]}): what it "
                            "computes depends on the batch size (explicit sizes or strides, as_strided), which zfvis "
                            "cannot reverse per image. Hint: write it with sizes taken from its input") from err
    if not isinstance(y, torch.Tensor) or not y.requires_grad:
        raise site.fail("it has no gradient (a non-differentiable operation), so nothing can be sent back "
                        "through it")
    graph = RecordedGraph(leaves, y, rule) if rule is not None else None
    y = y.detach()
    if y.shape != out[:1].shape:
        raise site.fail(f"run on one image, its output has {y.shape[0]} items: what it computes depends on the "
                        "batch size (a size spelled out as numbers, as_strided) or mixes the images of the batch, "
                        "which zfvis cannot reverse per image. Hint: write it with sizes taken from its input "
                        "(t.expand(x.shape))")
    if y.dtype == out.dtype and torch.equal(y, out[:1]):  # the same values (the usual case, and a tenth of allclose's cost)
        return graph
    finite = out[torch.isfinite(out)]  # a NaN or infinity the model makes (and later cleans) is compared as itself
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    if not torch.allclose(y, out[:1], rtol=1e-4, atol=1e-5 * scale + 1e-30, equal_nan=True):
        raise site.fail("its output for one image depends on the other images of the batch or is random in eval "
                        "mode, which zfvis cannot reverse")
    return graph


def prepare_pointwise(site: Site) -> None:
    """A function of one position, of one input of the output's shape, is reversed on
    windows; otherwise (broadcasting, several inputs) on whole maps."""
    same = len(site.live) == 1 and all(s == site.out_shape for s in site.in_shapes) and len(site.out_shape) >= 2
    site.cone = "same" if same and site.fn is None and not _varies_over_map(site) else "full"


def _varies_over_map(site: Site) -> bool:
    """Whether a constant tensor argument has a map of its own (``clamp(t, min=buf)`` with
    ``buf`` of shape (1, 1, H, W)): cutting the signal's window would not cut it."""
    found: list[torch.Tensor] = []
    for v in (*site.args, *site.kwargs.values()):
        for t in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(t, torch.Tensor):
                found.append(t)
    return any(t.dim() >= 2 and (t.shape[-1] > 1 or t.shape[-2] > 1) for t in found)


#: The ops whose whole-map reverse is always :class:`VectorJacobian` (a permute or a layer norm
#: may become a channels-last stretch's, on windows, after the pass: no graph is kept for them).
_KEEPS_GRAPH = ("vjp", "pointwise", "split", "transpose")


def record_vjp(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> Any:
    """The live inputs, after checking that the node has a per-image gradient; for a node
    that returned its input untouched, :data:`IDENTITY`."""
    fn = site.fn or live_call(site)
    if _is_identity(fn, inputs, out):  # passed through, on windows
        site.cone = "same"
        return IDENTITY
    # one image, reversed on whole maps by VectorJacobian: its graph is kept for the reverse pass
    keep = (site.cone == "full" and site.op.name in _KEEPS_GRAPH and not site.node.writes and len(inputs) > 0
            and all(isinstance(t, torch.Tensor) and t.shape[0] == 1 for t in inputs))
    state = RecordedInputs(recorded_inputs(inputs))
    if keep or not site.checked:  # checked once per input key where only the code decides (one image)
        state.graph = _check_gradient(site, fn, inputs, out, rule if keep else None, per_image=site.fn is None)
        site.checked = True
    return state


def build_vjp(site: Site) -> deconv.ReverseLayer:
    if site.state is IDENTITY:
        return deconv.PassThrough(_source(site), site.node.kind)
    return VectorJacobian(site.fn or live_call(site), _source(site), site.node.kind, windowed=site.cone == "same",
                          writes=site.node.writes, per_image=site.fn is None)


def build_whole_batch(site: Site) -> deconv.ReverseLayer:
    """A stretch where the batch is not the first dimension, ending at ``site``'s node
    (its ``fn`` and ``live`` are the stretch's, its state the stretch's recorded inputs)."""
    start = site.start.name if site.start is not None else site.node.name
    return WholeBatchVectorJacobian(site.fn, _source(site), site.node.kind, start)  # type: ignore[arg-type]
