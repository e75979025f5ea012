"""Reverse layers that run the true backward of an operation at its recorded inputs.

:class:`VectorJacobian` is the generic one: any differentiable node without a layer of its
own (a LayerNorm, a permute, an upsampling, a submodule fx cannot trace, ...) sends the
signal back as its local vector-Jacobian product at the inputs the forward pass recorded,
computed by autograd: exact by construction, over whole maps. :class:`Product` is the
product rule of ``x * y`` with both factors input-dependent (the gate of a
squeeze-and-excitation block), on windows where the factors have the same shape.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

from ..io.errors import UnsupportedModelError, is_out_of_memory
from .reverse import Frame, ReverseLayer
from .rule_mode import RuleMode
from .windows import crop_windows

__all__ = ["VectorJacobian", "Product", "WholeBatchVectorJacobian"]


def _per_seed(value: torch.Tensor, frame: Frame, windowed: bool) -> torch.Tensor:
    """A recorded (N, ...) value for each seed: its image's, cut to the output window.

    With one recorded image and nothing to cut, the value itself (1, ...), which
    broadcasts over the seeds without a copy per seed."""
    win = frame.out_win
    if value.shape[0] == 1 and (not windowed or win is None or win.is_full):
        return value
    if windowed and win is not None:
        return crop_windows(value, frame.image, win.top, win.left, *win.size)
    return value[frame.image]


def _saved_copies(writes: bool) -> Any:
    """For a node that writes into tensors it was given (``y[:, :2] = f(y)``), autograd keeps
    copies of what the backward needs, as they were when saved; else nothing changes."""
    if not writes:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


class VectorJacobian(ReverseLayer):
    """The local vector-Jacobian product of one node at its recorded inputs.

    Args:
        fn: The node's operation as a function of its live inputs.
        source: The forward module's (or node's) name.
        kind: What the node does (module type or function name).
        windowed: Whether the operation acts on each position on its own (then it runs on
            each seed's window of the map).
    """

    def __init__(self, fn: Callable[..., Any], source: str, kind: str, *, windowed: bool = False,
                 writes: bool = False, per_image: bool = False) -> None:
        super().__init__()
        self.source, self.kind, self.windowed, self.writes = source, kind, windowed, writes
        self.per_image = per_image  # fn takes image=: its tensor arguments with a batch taken per seed
        self._fn = fn

    def extra_repr(self) -> str:
        where = "on windows (pointwise)" if self.windowed else "on whole maps"
        return f"{self.kind} '{self.source}': its gradient at the recorded inputs (vector-Jacobian product), {where}"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        b = signal.shape[0]
        kept = getattr(frame.state, "graph", None)  # built by the recording's check (zfvis.core.ops.grad)
        if kept is not None and b == 1 and not self.windowed and not self.writes and kept.rule == frame.rule:
            grads = self._grad(kept.out, kept.leaves, signal, retain_graph=True)
            return [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(kept.leaves, grads)]
        inputs = [_per_seed(t, frame, self.windowed).detach() for t in frame.state]
        inputs = [(t if t.shape[0] == b else t.expand(b, *t.shape[1:])).requires_grad_(True) for t in inputs]
        with torch.enable_grad(), RuleMode(frame.rule), _saved_copies(self.writes):  # rectifiers inside: the rule
            # fresh copies: an in-place operation must not write into the leaves
            fn = functools.partial(self._fn, image=frame.image) if self.per_image else self._fn
            try:
                out = fn(*(t.clone() for t in inputs))
            except RuntimeError as err:  # it ran on the recorded batch, not on these seeds
                if is_out_of_memory(err):
                    raise
                raise self._per_seed_error(b, f" (run on them, it fails: {str(err).splitlines()[0][:160]})") from err
            if not isinstance(out, torch.Tensor) or out.shape[:1] != signal.shape[:1]:
                raise self._per_seed_error(b, ", its output does not have one item per seed")
            grads = self._grad(out, inputs, signal)
        return [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(inputs, grads)]


    def _grad(self, out: torch.Tensor, inputs: list[torch.Tensor], signal: torch.Tensor,
              retain_graph: bool = False) -> tuple[torch.Tensor | None, ...]:
        try:
            return torch.autograd.grad(out, inputs, signal.to(out.dtype), retain_graph=retain_graph, allow_unused=True)
        except RuntimeError as err:  # an op whose derivative PyTorch does not implement (torch.heaviside)
            if is_out_of_memory(err):
                raise
            raise UnsupportedModelError(
                f"{self.kind} '{self.source}': its backward fails in PyTorch ({str(err).splitlines()[0][:160]}), so "
                "nothing can be sent back through it. Hint: layers before it can still be projected") from err

    def _per_seed_error(self, b: int, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{self.kind} '{self.source}': for {b} seeds{what}: what it computes depends on the batch size "
            "(explicit sizes or strides, as_strided), which zfvis cannot reverse per seed. Hint: write it with "
            "sizes taken from its input (t.expand(x.shape), x.new_zeros(x.shape)), or project one seed at a time")


class Product(ReverseLayer):
    """``x * y`` with both factors input-dependent: each factor receives the signal times
    the other factor's recorded value (summed over the dimensions it was broadcast along).

    Args:
        ks: The live input behind each factor (both the same for ``x * x``).
        source: The forward module's (or node's) name.
        windowed: Whether the factors have the output's shape (then it works on windows).
    """

    fresh = True

    def __init__(self, ks: tuple[int, int], n_live: int, source: str, *, windowed: bool) -> None:
        super().__init__()
        self.ks, self.n_live, self.source, self.windowed = ks, n_live, source, windowed

    def extra_repr(self) -> str:
        return f"product '{self.source}': each factor gets the signal times the other (product rule)"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        values = [_per_seed(v, frame, self.windowed).to(signal.dtype) for v in frame.state]
        b = signal.shape[0]
        shapes = [(b, *v.shape[1:]) for v in values]  # a value may be one image's, broadcast
        out: list[torch.Tensor | None] = [None] * self.n_live
        for pos, k in enumerate(self.ks):
            other = values[self.ks[1 - pos]]
            g = signal * other
            if tuple(g.shape) != shapes[k]:
                g = g.sum_to_size(shapes[k])
            prev = out[k]
            out[k] = g if prev is None else prev + g
        return [o if o is not None else signal.new_zeros(shapes[k]) for k, o in enumerate(out)]


class WholeBatchVectorJacobian(ReverseLayer):
    """The vector-Jacobian product of a stretch of nodes where the batch is not the first
    dimension (windows or attention heads folded into it, an axis permuted before it), at
    the inputs recorded for the whole batch: each seed's signal is placed at its image in
    an otherwise zero signal of the stretch's output, and sent back through the stretch's
    true backward. Exact whatever the folding; a stretch through which one image's signal
    reaches another image's input (the images mix) is refused.

    Args:
        fn: The stretch as a function of its batch-first inputs.
        source: The node where the stretch ends.
        kind: What that node does.
        start: The node where the batch left the first dimension.
    """

    fresh = True

    def __init__(self, fn: Callable[..., Any], source: str, kind: str, start: str) -> None:
        super().__init__()
        self.source, self.kind, self.start = source, kind, start
        self._fn = fn

    def extra_repr(self) -> str:
        return (f"'{self.start}' .. '{self.source}' ({self.kind}), the batch folded: their gradient over the whole "
                "recorded batch, per seed")

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        kept = getattr(frame.state, "graph", None)  # the autograd graph of the node's own run (zfvis.core.program)
        if kept is not None and kept.rule == frame.rule:
            roots, out, keep = kept.leaves, kept.out, True
        else:
            roots = [t.detach().requires_grad_(True) for t in frame.state]
            with torch.enable_grad(), RuleMode(frame.rule):
                out = self._fn(*(t.clone() for t in roots))
            keep = False
        results = [torch.zeros(signal.shape[0], *t.shape[1:], dtype=signal.dtype, device=signal.device) for t in roots]
        images = frame.image.tolist()
        for j, i in enumerate(images):
            seed = torch.zeros_like(out)
            seed[i] = signal[j].to(out.dtype)
            grads = torch.autograd.grad(out, roots, seed, retain_graph=keep or j < len(images) - 1, allow_unused=True)
            for result, g in zip(results, grads):
                if g is None:
                    continue
                _check_own_image(g, i, self.start, self.source)
                result[j] = g[i]
        return results


def _check_own_image(grad: torch.Tensor, i: int, start: str, end: str) -> None:
    """Refuses a signal that reached another image's input (the stretch mixes images)."""
    if grad.shape[0] == 1:
        return
    own = float(grad[i].abs().max())
    others = torch.cat([grad[:i], grad[i + 1:]])
    if float(others.abs().max()) > 1e-6 * own + 1e-30 * (own == 0):
        raise UnsupportedModelError(
            f"nodes '{start}' .. '{end}' mix the images of the batch (one image's signal reaches another's input), "
            "which zfvis cannot reverse per image. Hint: project one image at a time")
