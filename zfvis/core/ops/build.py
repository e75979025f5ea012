"""What the forward pass records for an op, and the reverse layer it becomes."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import reverse as deconv
from ..reverse_average import AverageUnpool
from ..reverse_grad import Product, VectorJacobian
from .args import _adaptive_params, _conv_args, _conv_params, _live_only, _pool_args, live_call, target_name
from .checks import DIVISIONS, scale_operands
from .grad import recorded_inputs
from .site import Live, Site

# --------------------------------------------------------------------------- records


def pool_with_switches(x: torch.Tensor, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
                       ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.max_pool2d(..., return_indices=True)``, its output and switches contiguous.

    On CPUs the kernel for channels-last maps is vectorized over the channels, up to 10x faster
    than the one for contiguous maps; both scan each window in the same order and keep its first
    maximum (a NaN wins), so output and switches are the same, value for value."""
    if x.dim() == 4 and x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    out, idx = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
    return out.contiguous(), idx.contiguous()


def plain_max_pool(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a node's call of ``module`` is an ``nn.MaxPool2d`` call that
    :func:`pool_with_switches` may run in its place, giving the same output and the switches
    at once: no hooks (its own or global), one contiguous CPU map as its only argument."""
    m = module
    if type(m) is not nn.MaxPool2d or m.return_indices or kwargs:
        return False
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return False
    if _global_module_hooks():
        return False
    x = args[0] if len(args) == 1 else None
    return (isinstance(x, torch.Tensor) and type(x) is torch.Tensor and x.dim() == 4 and x.device.type == "cpu"
            and x.is_floating_point() and x.is_contiguous() and not x.requires_grad)


def pool_arguments(m: nn.MaxPool2d) -> tuple[Any, ...]:
    """The arguments ``nn.MaxPool2d.forward`` passes to ``F.max_pool2d`` after the input."""
    return m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as mod

    return any(getattr(mod, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                      "_global_backward_hooks", "_global_backward_pre_hooks"))


def _record_switches(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> torch.Tensor:
    a = _pool_args(site)
    stride = a["stride"]
    if isinstance(stride, (list, tuple)) and not stride:
        stride = None
    return pool_with_switches(inputs[0], a["kernel_size"], stride, a["padding"], a["dilation"], a["ceil_mode"])[1]


def _record_relu(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> torch.Tensor | None:
    return None if rule == "deconvnet" else out > 0


def _record_relu6(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> torch.Tensor:
    # the output is 6 exactly where the input was >= 6, and 0 where it was <= 0
    return out < 6 if rule == "deconvnet" else (out > 0) & (out < 6)


# --------------------------------------------------------------------------- builders


def _build_conv(site: Site) -> deconv.ReverseLayer:
    a = _conv_args(site)
    _, s, p, d = _conv_params(site)
    return deconv.ReverseConv2d(a["weight"], _source(site), stride=s, dilation=d, groups=int(a["groups"]), pre_pad=p)


def _build_linear(site: Site) -> deconv.ReverseLayer:
    m = site.node.module
    weight = m.weight if m is not None else site.arg(1, "weight")
    return deconv.ReverseLinear(weight, _source(site))


def _build_scale(site: Site) -> deconv.ReverseLayer:
    a, b = scale_operands(site)
    division = target_name(site.node) in DIVISIONS
    if isinstance(b, Live) and division:
        return VectorJacobian(live_call(site), _source(site), site.node.kind)
    if isinstance(a, Live) and isinstance(b, Live):
        return Product((a.k, b.k), len(site.live), _source(site), windowed=site.cone == "same")
    other = b if isinstance(a, Live) else a
    per_image = isinstance(other, torch.Tensor) and id(other) in site.batched
    return deconv.Multiply(1.0 / other if division else other, _source(site), per_image=per_image)


def _record_scale(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> list[torch.Tensor] | None:
    """A product or quotient of input-dependent tensors needs their values."""
    return recorded_inputs(inputs) if len(site.live) > 1 or isinstance(scale_operands(site)[1], Live) else None


def _record_batch_norm_function(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> Any:
    return None


def _build_batch_norm_function(site: Site) -> deconv.ReverseLayer:
    stats = types.SimpleNamespace(running_var=site.arg(2, "running_var"), eps=float(site.arg(7, "eps", 1e-5)),
                                  weight=site.arg(3, "weight"))
    return deconv.Scale(stats, _source(site))  # type: ignore[arg-type]


def _build_add(site: Site) -> deconv.ReverseLayer:
    sign = -1.0 if target_name(site.node) in ("sub", "isub", "rsub") else 1.0
    alpha = float(site.kwargs.get("alpha", 1.0))
    coef = [0.0] * len(site.live)
    for pos, a in enumerate(site.args[:2]):
        if isinstance(a, Live):
            coef[a.k] += 1.0 if pos == 0 else sign * alpha
    return deconv.Distribute(coef, _source(site))


def _build_cat(site: Site) -> deconv.ReverseLayer:
    tensors = site.arg(0, "tensors")
    if site.cone == "full" and any(not isinstance(t, Live) for t in tensors):
        return deconv.LinearMap(_live_only(site), _source(site), "cat", site.cone)
    ndim = len(site.out_shape) + 1
    dim = site.arg(1, "dim", 0) % ndim
    sizes = [site.in_shapes[t.k][dim - 1] for t in tensors]
    return deconv.Split(dim, sizes, [t.k for t in tensors], len(site.live), _source(site))


def _source(site: Site) -> str:
    return site.node.module_name or site.node.name


def _linear_map(kind: str) -> Callable[[Site], deconv.ReverseLayer]:
    """The builder of a linear op's transpose (adaptive average pooling: see :func:`_build_adaptive`)."""
    if kind == "adaptive_avg_pool2d":
        return _build_adaptive
    return lambda site: deconv.LinearMap(_live_only(site), _source(site), kind, site.cone)




def _build_adaptive(site: Site) -> deconv.ReverseLayer:
    """An adaptive average pooling whose output divides its input averages blocks: their
    transpose directly; any other, by autograd."""
    if site.cone == "spatial" and len(site.out_shape) == 3:
        return AverageUnpool(_source(site), _adaptive_params(site)[0])
    return deconv.LinearMap(_live_only(site), _source(site), "adaptive_avg_pool2d", site.cone)
