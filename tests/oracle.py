"""The deconvnet written as autograd, independently of zfvis's engine.

The projection of an activation a equals a * d a / d x when every ReLU's backward is
replaced by ReLU of the incoming gradient and contrast normalisation's backward by the
identity; max-pooling's ordinary gradient is exactly unpooling with switches (overlaps
summed), a convolution's is the transposed convolution with its own weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class _DeconvReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.clamp(min=0)


class _DeconvReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DeconvReLUFn.apply(x)


class _IdentityBackwardFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):  # type: ignore[override]
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


class _IdentityBackward(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _IdentityBackwardFn.apply(x, self.inner)


def _swap(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(model, name, _DeconvReLU())
        elif isinstance(child, nn.LocalResponseNorm):
            setattr(model, name, _IdentityBackward(child))
        else:
            _swap(child)


def oracle_backward(model: nn.Module, image: torch.Tensor, layer: str, seed_of) -> torch.Tensor:
    """Backpropagates ``seed_of(output)`` from module ``layer``'s output to ``image``
    (1, C, H, W) under the deconvnet's backward rules. Returns (C, H, W)."""
    net = copy.deepcopy(model).eval()
    _swap(net)
    captured: dict[str, torch.Tensor] = {}

    class _Done(Exception):
        pass

    def hook(_m, _i, out):
        captured["out"] = out
        raise _Done

    handle = dict(net.named_modules())[layer].register_forward_hook(hook)
    x = image.clone().requires_grad_(True)
    try:
        net(x)
    except _Done:
        pass
    finally:
        handle.remove()
    out = captured["out"]
    (grad,) = torch.autograd.grad(out, x, seed_of(out.detach()))
    return grad[0]


def oracle_projection(model: nn.Module, image: torch.Tensor, layer: str, index: tuple[int, ...]) -> torch.Tensor:
    """value * gradient of activation ``output[0][index]`` of module ``layer`` w.r.t.
    ``image`` (1, C, H, W), under the deconvnet's backward rules. Returns (C, H, W)."""

    def seed(out: torch.Tensor) -> torch.Tensor:
        s = torch.zeros_like(out)
        s[(0, *index)] = 1.0
        return s

    value = None

    def unit(out: torch.Tensor) -> torch.Tensor:
        nonlocal value
        value = out[(0, *index)]
        return seed(out)

    grad = oracle_backward(model, image, layer, unit)
    return value * grad
