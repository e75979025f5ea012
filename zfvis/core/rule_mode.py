"""The rule inside code the reverse pass runs by autograd (a submodule fx could not trace).

A generic reverse layer (:class:`zfvis.core.reverse_grad.VectorJacobian`) differentiates a
node by autograd. Where that node is a whole submodule, rectifiers inside it must still
pass the signal back by the rule: :class:`RuleMode` swaps every rectifier call
(``F.relu``, ``torch.relu``, ``Tensor.relu``, their in-place forms, ``F.relu6``,
``F.hardtanh(x, 0, 6)``, ``F.leaky_relu``, ``F.elu``, ``F.silu``, ``F.gelu``,
``F.hardswish``, ``F.mish``) for a Function whose backward is the rule, and local response
normalisation for one whose backward is the identity, as the op table does elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["RuleMode", "follows_rule", "is_aten_rectifier"]


class _Rectifier(torch.autograd.Function):
    """A rectifier's forward; the rule's backward (``cap``: ReLU6's saturation)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[..., torch.Tensor], rule: str, cap: float | None,
                inplace: bool) -> torch.Tensor:  # fmt: skip
        if rule == "deconvnet":  # its backward does not read the slope
            with torch.no_grad():
                y = fn(x.detach())
            slope = torch.ones((), dtype=x.dtype, device=x.device)
        else:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                y = fn(leaf)
                (slope,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
        below = x < cap if cap is not None else torch.ones((), dtype=torch.bool, device=x.device)
        ctx.rule = rule
        ctx.save_for_backward(slope, below)
        y = y.detach()
        if inplace:
            x.copy_(y)
            ctx.mark_dirty(x)
            return x
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        slope, below = ctx.saved_tensors
        if ctx.rule == "deconvnet":
            out = F.relu(grad) * below.to(grad.dtype)
        elif ctx.rule == "guided":
            out = slope * F.relu(grad)
        else:
            out = slope * grad
        return out, None, None, None, None


class _IdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[..., torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return grad, None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _relu6(t: torch.Tensor) -> torch.Tensor:
    return torch.clamp(t, 0.0, 6.0)


#: Rectifier functions: (out-of-place function of (x, args, kwargs), ReLU6 cap, always in place,
#: position of the ``inplace`` argument).
_RECTIFIERS: dict[Any, tuple[Callable[..., torch.Tensor], float | None, bool, int | None]] = {
    F.relu: (lambda t, a, k: torch.relu(t), None, False, 1),
    torch.relu: (lambda t, a, k: torch.relu(t), None, False, None),
    torch.Tensor.relu: (lambda t, a, k: torch.relu(t), None, False, None),
    torch.relu_: (lambda t, a, k: torch.relu(t), None, True, None),
    torch.Tensor.relu_: (lambda t, a, k: torch.relu(t), None, True, None),
    F.relu_: (lambda t, a, k: torch.relu(t), None, True, None),
    F.relu6: (lambda t, a, k: _relu6(t), 6.0, False, 1),
    F.leaky_relu: (lambda t, a, k: F.leaky_relu(t, _arg(a, k, 1, "negative_slope", 0.01)), None, False, 2),
    F.leaky_relu_: (lambda t, a, k: F.leaky_relu(t, _arg(a, k, 1, "negative_slope", 0.01)), None, True, None),
    F.elu: (lambda t, a, k: F.elu(t, _arg(a, k, 1, "alpha", 1.0)), None, False, 2),
    F.elu_: (lambda t, a, k: F.elu(t, _arg(a, k, 1, "alpha", 1.0)), None, True, None),
    F.silu: (lambda t, a, k: F.silu(t), None, False, 1),
    F.gelu: (lambda t, a, k: F.gelu(t, approximate=_arg(a, k, 1, "approximate", "none")), None, False, None),
    F.hardswish: (lambda t, a, k: F.hardswish(t), None, False, 1),
    F.mish: (lambda t, a, k: F.mish(t), None, False, 1),
}


def _is_relu6(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if func not in (F.hardtanh, F.hardtanh_):
        return False
    lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    return (float(lo), float(hi)) == (0.0, 6.0)


def follows_rule(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether :class:`RuleMode` changes this call's backward (a rectifier, or LRN)."""
    return func in _RECTIFIERS or func is F.local_response_norm or _is_relu6(func, args, kwargs)


def _aten(name: str) -> tuple[Any, ...]:
    packet = getattr(torch.ops.aten, name)
    return (packet, getattr(torch.ops.aten, name + "_"))


#: The same rectifiers as ATen ops (what a TorchScript module or ``torch.ops.aten.relu`` runs
#: without a ``torch`` call that :class:`RuleMode` could swap); hardtanh only as ReLU6, elu only
#: with unit scales (as ``F.elu`` calls it).
_ATEN_RECTIFIERS = frozenset(p for n in ("relu", "leaky_relu", "silu", "gelu", "hardswish", "mish") for p in _aten(n))
_HARDTANH, _ELU = _aten("hardtanh"), _aten("elu")


def is_aten_rectifier(func: Any, args: tuple[Any, ...]) -> bool:
    """Whether an ATen call is a rectifier (the rule applies to its backward)."""
    packet = getattr(func, "overloadpacket", None)
    if packet in _ATEN_RECTIFIERS:
        return True
    if packet in _HARDTANH:
        return tuple(float(a) for a in args[1:3]) == (0.0, 6.0)
    if packet in _ELU:
        return all(float(a) == 1.0 for a in args[2:4])
    return False


class RuleMode(TorchFunctionMode):
    """Inside it, rectifiers pass the signal back by ``rule`` and LRN by the identity."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _is_relu6(func, args, kwargs):
            inplace = func is F.hardtanh_ or bool(_arg(args, kwargs, 3, "inplace", False))
            return _Rectifier.apply(args[0], _relu6, self.rule, 6.0, inplace)
        entry = _RECTIFIERS.get(func)
        if entry is not None:
            fn, cap, always, at = entry
            inplace = always or (at is not None and bool(_arg(args, kwargs, at, "inplace", False)))
            return _Rectifier.apply(args[0], lambda t: fn(t, args, kwargs), self.rule, cap, inplace)
        if func is F.local_response_norm:
            return _IdentityBackward.apply(args[0], lambda t: func(t, *args[1:], **kwargs))
        return func(*args, **kwargs)
