"""The deconvnet (and its sibling rules) written as autograd, independently of zfvis's engine.

The projection of an activation a equals a * d a / d x when the backward of every
*rectifier* is replaced by the rule's and contrast normalisation's backward by the
identity; every other operation keeps its true backward (max-pooling's gradient is
unpooling with switches, a convolution's the transposed convolution with its own weights,
a sigmoid gate's product ``x * sigmoid(...)`` sends the signal into both factors, a
LayerNorm's is its full Jacobian, ...), and a value used twice gets the sum of its
consumers' signals, as autograd accumulates gradients.

Rectifiers: ReLU, ReLU6, LeakyReLU, ELU, SiLU, GELU (both approximations), Hardswish, Mish.
With ``x`` the rectifier's forward input, ``g`` the incoming signal and ``f'`` the
activation's own derivative:

=========== ============================================================
rule        backward
=========== ============================================================
deconvnet   relu(g)                 (ReLU6: relu(g) where x < 6, else 0)
guided      f'(x) * relu(g)
gradient    f'(x) * g               (plain autograd)
=========== ============================================================

The swap is a ``TorchFunctionMode`` that replaces the functional calls (``F.relu``,
``torch.relu``, ``Tensor.relu``, their in-place forms, ``F.relu6``, ``F.hardtanh(x, 0, 6)``,
``F.leaky_relu``, ``F.elu``, ``F.silu``, ``F.gelu``, ``F.hardswish``, ``F.mish``,
``F.local_response_norm``) by custom autograd Functions, so modules (which call these) and
functional calls in ``forward()`` are covered alike. An in-place call stays in place (the
Function writes its input and marks it dirty), so a model whose ``forward()`` reads a
tensor after an in-place call on it is run as written.

A layer is a ``named_modules()`` name (a leaf or a container; its output, captured with a
forward hook; for a module that runs several times, its last call unless ``call`` says
otherwise) or a torch.fx node name as ``torchvision.models.feature_extraction.
get_graph_node_names`` writes it (``layer1.0.relu_1``, ``layer1.0.add``), captured with
``create_feature_extractor``. Module names take precedence where both exist.

This file must never import zfvis.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

RULES = ("deconvnet", "guided", "gradient")


# --------------------------------------------------------------------------- backward rules


def _slope(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f'(x) of a pointwise function, by autograd on a detached copy."""
    with torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        (d,) = torch.autograd.grad(fn(leaf), leaf, torch.ones_like(leaf))
    return d


class _RuleFn(torch.autograd.Function):
    """A rectifier's forward ``fn`` (out of place); the rule's backward. ``cap``: ReLU6's 6."""

    @staticmethod
    def forward(ctx, x, fn, rule, cap, inplace):  # type: ignore[override]
        y = fn(x)
        slope = _slope(fn, x)
        below = (x < cap) if cap is not None else None
        ctx.rule = rule
        ctx.save_for_backward(slope, below if below is not None else slope)
        ctx.has_cap = below is not None
        if inplace:
            x.copy_(y)
            ctx.mark_dirty(x)
            return x
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        slope, below = ctx.saved_tensors
        if ctx.rule == "deconvnet":
            out = grad.clamp(min=0)
            if ctx.has_cap:
                out = torch.where(below, out, torch.zeros((), dtype=grad.dtype, device=grad.device))
        elif ctx.rule == "guided":
            out = slope * grad.clamp(min=0)
        elif ctx.rule == "gradient":
            out = slope * grad
        else:  # pragma: no cover - checked on entry
            raise AssertionError(ctx.rule)
        return out, None, None, None, None


class _IdentityBackwardLRNFn(torch.autograd.Function):
    """LocalResponseNorm forward; identity backward."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):  # type: ignore[override]
        with torch.no_grad():
            return F.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None, None, None


def _arg(args: tuple, kwargs: dict, i: int, name: str, default):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


_RELU = {F.relu: False, torch.relu: False, torch.Tensor.relu: False, torch.relu_: True, torch.Tensor.relu_: True,
         F.relu_: True}
_HARDTANH = {F.hardtanh: False, F.hardtanh_: True}
_LRN = {F.local_response_norm}


def _rectifier(func, args: tuple, kwargs: dict):
    """(out-of-place function, cap, in place) for a rectifier call, or ``None``."""
    if func in _RELU:
        inplace = _RELU[func] or bool(_arg(args, kwargs, 1, "inplace", False))
        return torch.relu, None, inplace
    if func is F.relu6:
        return (lambda t: torch.clamp(t, 0.0, 6.0)), 6.0, bool(_arg(args, kwargs, 1, "inplace", False))
    if func in _HARDTANH:
        lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
        if float(lo) != 0.0 or float(hi) != 6.0:
            raise NotImplementedError(f"oracle: hardtanh({lo}, {hi}) is not ReLU6; no rule for it")
        return (lambda t: torch.clamp(t, 0.0, 6.0)), 6.0, _HARDTANH[func] or bool(_arg(args, kwargs, 3, "inplace", False))
    if func in (F.leaky_relu, F.leaky_relu_):
        slope = float(_arg(args, kwargs, 1, "negative_slope", 0.01))
        inplace = func is F.leaky_relu_ or bool(_arg(args, kwargs, 2, "inplace", False))
        return (lambda t: torch.where(t > 0, t, t * slope)), None, inplace
    if func in (F.elu, F.elu_):
        alpha = float(_arg(args, kwargs, 1, "alpha", 1.0))
        inplace = func is F.elu_ or bool(_arg(args, kwargs, 2, "inplace", False))
        return (lambda t: torch.where(t > 0, t, alpha * torch.expm1(t))), None, inplace
    if func is F.silu:
        return (lambda t: t * torch.sigmoid(t)), None, bool(_arg(args, kwargs, 1, "inplace", False))
    if func is F.gelu:
        if _arg(args, kwargs, 1, "approximate", "none") == "tanh":
            c = (2.0 / torch.pi) ** 0.5
            return (lambda t: 0.5 * t * (1 + torch.tanh(c * (t + 0.044715 * t**3)))), None, False
        return (lambda t: 0.5 * t * (1 + torch.erf(t / 2**0.5))), None, False
    if func is F.hardswish:
        return (lambda t: t * torch.clamp(t + 3, 0, 6) / 6), None, bool(_arg(args, kwargs, 1, "inplace", False))
    if func is F.mish:
        return (lambda t: t * torch.tanh(F.softplus(t))), None, bool(_arg(args, kwargs, 1, "inplace", False))
    return None


class _RuleMode(TorchFunctionMode):
    """Replaces every rectifier and LocalResponseNorm by the oracle's Functions. Counts the
    swaps so that a test can check that the swap happened at all."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule
        self.swapped = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = _rectifier(func, args, kwargs)
        if found is not None:
            fn, cap, inplace = found
            self.swapped += 1
            return _RuleFn.apply(args[0], fn, self.rule, cap, inplace)
        if func in _LRN:
            size = _arg(args, kwargs, 1, "size", None)
            alpha = _arg(args, kwargs, 2, "alpha", 1e-4)
            beta = _arg(args, kwargs, 3, "beta", 0.75)
            k = _arg(args, kwargs, 4, "k", 1.0)
            self.swapped += 1
            return _IdentityBackwardLRNFn.apply(args[0], size, alpha, beta, k)
        return func(*args, **kwargs)


# Backward nodes that mean a rectifier escaped the swap (the oracle would then silently
# use the plain gradient there).
_LEAKED = ("ReluBackward", "HardtanhBackward", "Relu6Backward", "ThresholdBackward", "LeakyReluBackward",
           "EluBackward", "SiluBackward", "GeluBackward", "HardswishBackward", "MishBackward")


def _assert_no_leaked_relu(out: torch.Tensor) -> None:
    seen = set()
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        name = type(fn).__name__
        if name.startswith(_LEAKED):
            raise AssertionError(f"oracle: a {name} node escaped the rule swap")
        stack.extend(f for f, _ in fn.next_functions)


# --------------------------------------------------------------------------- working copies

# The oracle never runs the caller's model itself: it runs a float64 deep copy in eval mode.
# The copy keeps the model's forward hooks and pre-hooks (deepcopy copies the hook dicts), so
# the oracle's ground truth includes their effect, as the model's own output does.
# Deep-copying a DenseNet costs more than its forward pass, so a copy is kept per model and
# reused while the model still matches it exactly: the same modules, the same plain
# attributes (stride, eps, inplace, ...), and bit-identical parameters and buffers. Any
# change to the model (in place or not) makes a fresh copy.


class _Copy:
    def __init__(self, model: nn.Module) -> None:
        self.ref = weakref.ref(model)
        self.fingerprint = _fingerprint(model)
        self.net = copy.deepcopy(model).double().eval()
        self.extractors: dict[str, nn.Module] = {}


_COPIES: dict[int, _Copy] = {}


def _plain(v: object) -> bool:
    if isinstance(v, tuple):
        return all(_plain(e) for e in v)
    return v is None or isinstance(v, (bool, int, float, str))


def _hooks(m: nn.Module) -> tuple:
    """A module's hooks (every ``_*hooks*`` dict: keys and hook objects), so that a hook added
    or removed makes a fresh copy: a model's true output includes its hooks' effect."""
    return tuple(
        (k, tuple((hk, id(hv)) for hk, hv in v.items())) for k, v in sorted(vars(m).items())
        if "hook" in k and isinstance(v, dict)
    )


def _fingerprint(model: nn.Module) -> tuple:
    return tuple(
        (
            name,
            type(m),
            _hooks(m),
            tuple(sorted((k, v) for k, v in vars(m).items() if k != "training" and not k.startswith("_") and _plain(v))),
            tuple((n, tuple(t.shape), t.dtype) for n, t in m.named_parameters(recurse=False)),
            tuple((n, None if t is None else (tuple(t.shape), t.dtype)) for n, t in m._buffers.items()),
        )
        for name, m in model.named_modules()
    )


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and plain tensor attributes (constants a forward() may use)."""
    out: list[torch.Tensor] = []
    for m in model.modules():
        out.extend(p for p in m._parameters.values() if p is not None)
        out.extend(b for b in m._buffers.values() if b is not None)
        out.extend(v for _, v in sorted(vars(m).items()) if isinstance(v, torch.Tensor))
    return out


def _same_values(model: nn.Module, net: nn.Module) -> bool:
    a, b = _tensors(model), _tensors(net)
    return len(a) == len(b) and all(
        s.shape == t.shape and torch.equal(s.detach().to(t.dtype), t.detach()) for s, t in zip(a, b)
    )


def _working_copy(model: nn.Module) -> _Copy:
    """A float64 eval-mode deep copy of ``model`` (reused while the model is unchanged)."""
    entry = _COPIES.get(id(model))
    if (
        entry is not None
        and entry.ref() is model
        and entry.fingerprint == _fingerprint(model)
        and _same_values(model, entry.net)
    ):
        return entry
    entry = _Copy(model)
    _COPIES[id(model)] = entry
    weakref.finalize(model, _COPIES.pop, id(model), None)
    return entry


# --------------------------------------------------------------------------- capture


def _capture(work: _Copy, x: torch.Tensor, layer: str, call: int, rule: str) -> tuple[torch.Tensor, int]:
    """Runs the working copy on ``x`` under the rule's mode and returns the output of
    ``layer`` and the number of swapped calls."""
    net = work.net
    modules = dict(net.named_modules())
    mode = _RuleMode(rule)
    if layer in modules:
        outputs: list[torch.Tensor] = []

        def hook(_m, _i, out):
            # a clone: later in-place ops (``out += identity``) must not change the capture
            outputs.append(out.clone() if isinstance(out, torch.Tensor) else out)

        handle = modules[layer].register_forward_hook(hook)
        try:
            with mode:
                net(x)
        finally:
            handle.remove()
        if not outputs:
            raise ValueError(f"oracle: module {layer!r} did not run")
        try:
            out = outputs[call]
        except IndexError:
            raise ValueError(f"oracle: module {layer!r} ran {len(outputs)} times, no call {call}") from None
        return out, mode.swapped
    if call != -1:
        raise ValueError("oracle: call= applies only to module names")
    extractor = work.extractors.get(layer)
    if extractor is None:
        from torchvision.models.feature_extraction import create_feature_extractor

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
            extractor = create_feature_extractor(net, return_nodes=[layer]).eval()
        work.extractors[layer] = extractor
    with mode:
        out = extractor(x)[layer]
    return out, mode.swapped


def oracle_activation(model: nn.Module, image: torch.Tensor, layer: str, *, call: int = -1) -> torch.Tensor:
    """The forward value of ``layer`` for ``image`` (N, C, H, W), float64, model in eval mode."""
    with torch.no_grad():
        out, _ = _capture(_working_copy(model), image.detach().double(), layer, call, "gradient")
    return out


def oracle_backward(
    model: nn.Module,
    image: torch.Tensor,
    layer: str,
    seed_of: Callable[[torch.Tensor], torch.Tensor],
    rule: str = "deconvnet",
    *,
    call: int = -1,
) -> torch.Tensor:
    """Backpropagates ``seed_of(output)`` from ``layer``'s output to ``image`` (1, C, H, W)
    under ``rule``'s backward. Returns (C, H, W), float64."""
    if rule not in RULES:
        raise ValueError(f"oracle: unknown rule {rule!r}")
    x = image.detach().double().clone().requires_grad_(True)
    out, _ = _capture(_working_copy(model), x, layer, call, rule)
    _assert_no_leaked_relu(out)
    seed = seed_of(out.detach())
    if not out.requires_grad:  # the layer does not depend on the image
        return torch.zeros_like(x[0])
    (grad,) = torch.autograd.grad(out, x, seed, allow_unused=True)
    if grad is None:
        return torch.zeros_like(x[0])
    return grad[0]


def oracle_projection(
    model: nn.Module,
    image: torch.Tensor,
    layer: str,
    index: tuple[int, ...],
    rule: str = "deconvnet",
    *,
    call: int = -1,
) -> torch.Tensor:
    """value * rule-backward of activation ``output[0][index]`` of ``layer`` w.r.t.
    ``image`` (1, C, H, W). ``index`` is (channel, y, x) for a map, (unit,) for a vector.
    Returns (C, H, W)."""
    value = None

    def unit(out: torch.Tensor) -> torch.Tensor:
        nonlocal value
        value = out[(0, *index)]
        s = torch.zeros_like(out)
        s[(0, *index)] = 1.0
        return s

    grad = oracle_backward(model, image, layer, unit, rule, call=call)
    return value * grad


def oracle_whole_map(
    model: nn.Module,
    image: torch.Tensor,
    layer: str,
    channel: int,
    rule: str = "deconvnet",
    *,
    call: int = -1,
) -> torch.Tensor:
    """The rule-backward of the whole map ``channel`` of ``layer`` (the seed is the map
    itself, i.e. every unit times its own value). Returns (C, H, W)."""

    def seed(out: torch.Tensor) -> torch.Tensor:
        s = torch.zeros_like(out)
        s[:, channel] = out[:, channel]
        return s

    return oracle_backward(model, image, layer, seed, rule, call=call)
