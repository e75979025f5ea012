"""What each operation becomes in the deconvnet: the one table.

Every node of a traced model (:mod:`zfvis.core.graph`) that carries the signal is matched,
by module type, function or tensor method, to one :class:`Op` of :data:`OPS`. An op
says three things:

- **record**: what the forward pass must keep for the reverse pass (max-pool switches,
  the masks of ReLUs for the guided and gradient rules);
- **cone**: how a window of its output maps to the windows of its inputs that the
  reverse pass can reach (``"same"``: the same rectangle, ``"spatial"``: through a
  kernel of size k, stride s, padding p, dilation d, ``"full"``: the whole input);
- **reverse**: the reverse layer (:mod:`zfvis.core.reverse`) that runs the signal back.

=========================  ==========================================================
op                         reverse
=========================  ==========================================================
conv2d                     transposed convolution with the same (tied) weights, no bias
linear                     multiplication by W^T, no bias
batch_norm                 its per-channel scale gamma / sqrt(var + eps) (running stats)
max_pool2d                 unpooling with the recorded switches (overlaps add up)
avg_pool2d, adaptive_...,  their transpose
mean
relu, relu6                the rule: deconvnet rectifies the signal; guided also masks
                           where the forward input was not positive; gradient only masks;
                           ReLU6 passes nothing where the forward input was >= 6
add, sub                   the signal goes to each operand (negated for the subtrahend)
scale                      multiplication (or division) by a constant
cat                        the signal is split between the inputs
reshape                    flatten / view / reshape / (un)squeeze: reshaped back
getitem                    slicing: the signal goes back to the slice, zero elsewhere
identity                   Dropout, Identity, LocalResponseNorm (not inverted, as in
                           Zeiler & Fergus), contiguous, clone: passed through
=========================  ==========================================================
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..io.errors import UnsupportedModelError
from . import reverse as deconv

if TYPE_CHECKING:
    from .graph import GraphNode

__all__ = ["Op", "Site", "Live", "OPS", "SUPPORTED_TYPES", "LEAF_TYPES", "RULES", "MODULE_OPS", "METHOD_OPS", "FUNCTION_OPS"]

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
        cone: How windows map through it (``"same"``, ``"spatial"``, ``"full"``).
    """

    node: GraphNode
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    live: list[GraphNode]
    in_shapes: list[tuple[int, ...]]
    out_shape: tuple[int, ...]
    state: Any = None
    cone: str = "same"

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
    """

    name: str
    summary: str
    cone: str
    build: Callable[[Site], deconv.ReverseLayer]
    prepare: Callable[[Site], None] | None = None
    record: Callable[[Site, list[torch.Tensor], torch.Tensor, str], Any] | None = None
    params: Callable[[Site], tuple[Pair, Pair, Pair, Pair]] | None = None


# --------------------------------------------------------------------------- arguments


def _pair(v: Any) -> Pair:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if len(v) else (1, 1)
    return (int(v), int(v))


def _conv_args(site: Site) -> dict[str, Any]:
    m = site.node.module
    if m is not None:
        return dict(weight=m.weight, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                    padding_mode=m.padding_mode)
    return dict(weight=site.arg(1, "weight"), stride=site.arg(3, "stride", 1), padding=site.arg(4, "padding", 0),
                dilation=site.arg(5, "dilation", 1), groups=site.arg(6, "groups", 1), padding_mode="zeros")


def _conv_params(site: Site) -> tuple[Pair, Pair, Pair, Pair]:
    a = _conv_args(site)
    k = (int(a["weight"].shape[-2]), int(a["weight"].shape[-1]))
    s, d = _pair(a["stride"]), _pair(a["dilation"])
    if isinstance(a["padding"], str):
        p = (0, 0) if a["padding"] == "valid" else (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    else:
        p = _pair(a["padding"])
    return k, s, p, d


def _pool_args(site: Site) -> dict[str, Any]:
    m = site.node.module
    if m is not None:
        return dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=getattr(m, "dilation", 1), ceil_mode=m.ceil_mode,
                    return_indices=getattr(m, "return_indices", False))
    return dict(kernel_size=site.arg(1, "kernel_size"), stride=site.arg(2, "stride", None),
                padding=site.arg(3, "padding", 0), dilation=site.arg(4, "dilation", 1),
                ceil_mode=site.arg(5, "ceil_mode", False), return_indices=site.arg(6, "return_indices", False))


def _pool_params(site: Site) -> tuple[Pair, Pair, Pair, Pair]:
    a = _pool_args(site)
    k = _pair(a["kernel_size"])
    stride = a["stride"]
    s = k if stride is None or (isinstance(stride, (list, tuple)) and not stride) else _pair(stride)
    d = (1, 1) if site.node.op is OPS["avg_pool2d"] else _pair(a["dilation"])
    return k, s, _pair(a["padding"]), d


def _adaptive_params(site: Site) -> tuple[Pair, Pair, Pair, Pair]:
    (h_in, w_in), (h_out, w_out) = site.in_shapes[0][-2:], site.out_shape[-2:]
    k = (h_in // h_out, w_in // w_out)
    return k, k, (0, 0), (1, 1)


def _live_only(site: Site, k: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The node's own operation as a function of its k-th live input (other arguments fixed)."""
    fxn = site.node.fx_node
    module = site.node.module

    def fill(v: Any, t: torch.Tensor) -> Any:
        if isinstance(v, Live):
            return t
        if isinstance(v, (list, tuple)):
            return type(v)(fill(e, t) for e in v)
        return v

    def fn(t: torch.Tensor) -> torch.Tensor:
        args = fill(site.args, t)
        kwargs = {key: fill(v, t) for key, v in site.kwargs.items()}
        if module is not None:  # its forward alone: the reverse pass runs no hooks of the model
            return module.forward(*args, **kwargs)
        if fxn.op == "call_method":
            return getattr(args[0], fxn.target)(*args[1:], **kwargs)
        return fxn.target(*args, **kwargs)

    return fn


# --------------------------------------------------------------------------- checks


def _prepare_conv(site: Site) -> None:
    if _conv_args(site)["padding_mode"] != "zeros":
        raise site.fail("only zero padding is supported (padding_mode='zeros')")


def _prepare_bn(site: Site) -> None:
    bn = site.node.module
    if bn is None or bn.running_var is None or bn.running_mean is None:
        raise site.fail(
            "BatchNorm2d without running statistics (track_running_stats=False) normalises with each batch's "
            "statistics even in eval mode, which is not a linear map of one image; zfvis cannot reverse it"
        )


def _prepare_maxpool(site: Site) -> None:
    if _pool_args(site)["return_indices"]:
        raise site.fail("max-pooling that returns its indices is not supported")


def _prepare_adaptive(site: Site) -> None:
    (h_in, w_in), (h_out, w_out) = site.in_shapes[0][-2:], site.out_shape[-2:]
    site.cone = "spatial" if h_in % h_out == 0 and w_in % w_out == 0 else "full"


def _spatial_same(site: Site) -> bool:
    """Whether every live input has the output's last two dims (a map window passes through)."""
    return len(site.out_shape) >= 2 and all(
        len(s) >= 2 and s[-2:] == site.out_shape[-2:] for s in site.in_shapes
    )


def _prepare_elementwise(site: Site) -> None:
    site.cone = "same" if all(s == site.out_shape for s in site.in_shapes) else "full"


def _prepare_scale(site: Site) -> None:
    name = target_name(site.node)
    lives = [i for i, a in enumerate(site.args[:2]) if isinstance(a, Live)]
    if len(site.live) != 1 or len(lives) != 1:
        raise site.fail("a product or quotient of two input-dependent tensors has no deconvnet rule")
    if name in ("truediv", "div", "itruediv") and lives[0] != 0:
        raise site.fail("division by an input-dependent tensor has no deconvnet rule")
    other = site.args[1 - lives[0]] if name not in ("neg",) else -1.0
    if isinstance(other, torch.Tensor) and other.dim() >= 2 and other.shape[-2:] != (1, 1):
        site.cone = "full"
    else:
        site.cone = "same"


def _prepare_cat(site: Site) -> None:
    tensors = site.arg(0, "tensors")
    dim = site.arg(1, "dim", 0)
    ndim = len(site.out_shape) + 1
    dim = dim % ndim
    if dim == 0:
        raise site.fail("concatenation along the batch dimension is not supported")
    if any(not isinstance(t, Live) for t in tensors):
        site.cone = "full"
    else:
        site.cone = "same" if dim < ndim - 2 and _spatial_same(site) else "full"


def _prepare_reshape(site: Site) -> None:
    site.cone = "same" if _spatial_same(site) and len(site.in_shapes[0]) >= 2 else "full"


def _prepare_getitem(site: Site) -> None:
    index = site.args[1]
    index = index if isinstance(index, tuple) else (index,)
    for e in index:
        if not (e is None or e is Ellipsis or isinstance(e, (int, slice))):
            raise site.fail("indexing with tensors or lists is not supported (use slices)")
    if not index or index[0] != slice(None):
        raise site.fail("indexing the batch dimension is not supported; index with [:, ...]")
    explicit = [e for e in index if e is not None and e is not Ellipsis]
    in_dims = len(site.in_shapes[0]) + 1
    touches_map = Ellipsis in index or len(explicit) > in_dims - 2
    site.cone = "full" if touches_map or not _spatial_same(site) else "same"


def _prepare_hardtanh(site: Site) -> None:
    lo, hi = site.arg(1, "min_val", -1.0), site.arg(2, "max_val", 1.0)
    if (float(lo), float(hi)) != (0.0, 6.0):
        raise site.fail(f"hardtanh({lo}, {hi}) is not supported (only ReLU6 = hardtanh(0, 6))")


# --------------------------------------------------------------------------- records


def _record_switches(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> torch.Tensor:
    a = _pool_args(site)
    stride = a["stride"]
    if isinstance(stride, (list, tuple)) and not stride:
        stride = None
    return F.max_pool2d(inputs[0], a["kernel_size"], stride, a["padding"], a["dilation"], ceil_mode=a["ceil_mode"],
                        return_indices=True)[1]


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
    name = target_name(site.node)
    if name == "neg":
        return deconv.Multiply(-1.0, _source(site))
    k = 0 if isinstance(site.args[0], Live) else 1
    other = site.args[1 - k]
    if name in ("truediv", "div", "itruediv"):
        return deconv.Multiply(1.0 / other, _source(site))
    return deconv.Multiply(other, _source(site))


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
    return lambda site: deconv.LinearMap(_live_only(site), _source(site), kind, site.cone)


# --------------------------------------------------------------------------- the table

OPS: dict[str, Op] = {
    op.name: op
    for op in [
        Op("conv2d", "transposed convolution with the same (tied) weights, bias not applied", "spatial",
           _build_conv, _prepare_conv, params=_conv_params),
        Op("linear", "multiplication by the transposed (tied) weight, bias not applied", "full", _build_linear),
        Op("batch_norm", "its per-channel scale gamma / sqrt(running_var + eps)", "same",
           lambda site: deconv.Scale(site.node.module, _source(site)), _prepare_bn),
        Op("max_pool2d", "unpooling with the recorded switches (overlapping windows add up)", "spatial",
           lambda site: deconv.Unpool2d(_source(site), _pool_params(site)), _prepare_maxpool,
           record=_record_switches, params=_pool_params),
        Op("avg_pool2d", "its transpose", "spatial", _linear_map("avg_pool2d"), params=_pool_params),
        Op("adaptive_avg_pool2d", "its transpose", "spatial", _linear_map("adaptive_avg_pool2d"),
           _prepare_adaptive, params=_adaptive_params),
        Op("mean", "its transpose (the signal spread evenly)", "full", _linear_map("mean")),
        Op("relu", "the rule (deconvnet: ReLU of the signal)", "same",
           lambda site: deconv.Rectify(_source(site), relu6=False), record=_record_relu),
        Op("relu6", "the rule, and nothing where the forward input was >= 6", "same",
           lambda site: deconv.Rectify(_source(site), relu6=True), record=_record_relu6),
        Op("hardtanh", "as ReLU6 (hardtanh(0, 6) only)", "same",
           lambda site: deconv.Rectify(_source(site), relu6=True), _prepare_hardtanh, record=_record_relu6),
        Op("add", "the signal goes to each operand", "same", _build_add, _prepare_elementwise),
        Op("sub", "the signal goes to each operand, negated for the subtrahend", "same", _build_add,
           _prepare_elementwise),
        Op("scale", "multiplication by the same constant", "same", _build_scale, _prepare_scale),
        Op("cat", "the signal is split between the inputs", "same", _build_cat, _prepare_cat),
        Op("reshape", "reshaped back", "same", lambda site: deconv.Reshape(_source(site)), _prepare_reshape),
        Op("getitem", "the signal goes back to the slice, zero elsewhere", "same", _linear_map("getitem"),
           _prepare_getitem),
        Op("identity", "passed through unchanged", "same", lambda site: deconv.PassThrough(_source(site), site.node.kind)),
    ]
}

#: Module types and their op. Matched by exact type: a subclass may compute something else.
MODULE_OPS: dict[type[nn.Module], str] = {
    nn.Conv2d: "conv2d",
    nn.Linear: "linear",
    nn.BatchNorm2d: "batch_norm",
    nn.MaxPool2d: "max_pool2d",
    nn.AvgPool2d: "avg_pool2d",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Flatten: "reshape",
    nn.LocalResponseNorm: "identity",
    nn.Dropout: "identity",
    nn.Dropout2d: "identity",
    nn.Identity: "identity",
}

FUNCTION_OPS: dict[Any, str] = {
    F.conv2d: "conv2d",
    torch.conv2d: "conv2d",
    F.linear: "linear",
    F.max_pool2d: "max_pool2d",
    torch.max_pool2d: "max_pool2d",
    F.avg_pool2d: "avg_pool2d",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
    torch.mean: "mean",
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    operator.mul: "scale",
    operator.imul: "scale",
    torch.mul: "scale",
    operator.truediv: "scale",
    operator.itruediv: "scale",
    torch.div: "scale",
    operator.neg: "scale",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.flatten: "reshape",
    torch.reshape: "reshape",
    torch.squeeze: "reshape",
    torch.unsqueeze: "reshape",
    operator.getitem: "getitem",
    F.dropout: "identity",
    F.dropout2d: "identity",
    F.local_response_norm: "identity",
}

METHOD_OPS: dict[str, str] = {
    "relu": "relu",
    "relu_": "relu",
    "add": "add",
    "add_": "add",
    "sub": "sub",
    "sub_": "sub",
    "mul": "scale",
    "mul_": "scale",
    "div": "scale",
    "div_": "scale",
    "flatten": "reshape",
    "view": "reshape",
    "reshape": "reshape",
    "squeeze": "reshape",
    "unsqueeze": "reshape",
    "mean": "mean",
    "contiguous": "identity",
    "clone": "identity",
}

#: Module types kept whole when tracing (subclasses too, so they are refused, not traced).
LEAF_TYPES: tuple[type[nn.Module], ...] = tuple(MODULE_OPS)

#: Module types the deconvnet can reverse, with what it does with each.
SUPPORTED_TYPES: dict[type[nn.Module], str] = {t: OPS[name].summary for t, name in MODULE_OPS.items()}


def target_name(node: GraphNode) -> str:
    """The name of what a node calls (a function's ``__name__``, a method's name)."""
    target = node.fx_node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))
