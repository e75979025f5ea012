"""What each operation means to both engines (deconvnet and occlusion): the one table.

Every node of a traced model (:mod:`zfvis.core.graph`) that carries the signal is matched,
by module type, function or tensor method, to one :class:`Op` of :data:`OPS`. An op
says, for both engines (the deconvnet and occlusion's incremental inference):

- **record**: what the forward pass must keep for the reverse pass (max-pool switches,
  the masks of ReLUs for the guided and gradient rules);
- **cone**: how a window of its output maps to the windows of its inputs (``"same"``: the
  same rectangle, ``"spatial"``: through a kernel of size k, stride s, padding p, dilation
  d, read by ``params`` and computed in :mod:`zfvis.core.geometry`, ``"resample"``: through
  an interpolation's row and column weights, recorded (:mod:`zfvis.core.resampling`),
  ``"full"``: the whole input). The deconvnet reverses a node on the windows its cone gives; occlusion
  recomputes a ``"same"`` node on windows as it is, a ``"spatial"`` one by its ``window``
  rule (:mod:`zfvis.core.ops.incremental_rules`), any other whole;
- **reverse**: the reverse layer (:mod:`zfvis.core.reverse`) that runs the signal back,
  the op it may be folded into (``folds_into``: batch norm into the convolution before
  it) and its cost (``work``), by which seeds are batched.

In-place calls are the same for every op: a new version of the tensor they write
(:mod:`zfvis.core.graph`), refused where another value shares its memory
(:mod:`zfvis.core.inplace`), in both engines.

=========================  ==========================================================
op                         reverse
=========================  ==========================================================
conv2d                     transposed convolution with the same (tied) weights, no bias
                           (padding by reflection, replication or wrapping: vjp)
linear                     multiplication by W^T, no bias (in a channels-last stretch: at
                           each position, on windows)
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
                           Zeiler & Fergus), contiguous, clone, torchvision's stochastic
                           depth in eval mode: passed through
rectifier                  LeakyReLU, ELU, SiLU, GELU, Hardswish, Mish: the rule with
                           f' the activation's derivative at the forward input:
                           deconvnet relu(g), guided f'(x) relu(g), gradient f'(x) g
gate                       sigmoid, hard sigmoid, tanh: f'(x) g (their true backward)
scale (two factors)        x * y of input-dependent tensors: the product rule
pointwise                  the other functions of one position (PReLU, SELU, Softplus,
                           clamp, exp, pow, ...): their vector-Jacobian product, on windows
interpolate                F.interpolate, nn.Upsample (nearest, nearest-exact, bilinear,
                           bicubic): the transpose of its row and column weights, on
                           windows (other modes: vjp)
split                      torch.split, chunk, unbind along a dimension before the map
                           (channels): each part's signal goes back to its slice, zero
                           elsewhere, on windows (other splits: vjp)
permute                    into or out of a channels-last stretch (permute(0, 2, 3, 1),
                           ops on each position's channels, permute(0, 3, 1, 2); a
                           ConvNeXt block, a LayerNorm2d), whose maps the reverse pass
                           holds channels first (:mod:`zfvis.core.layouts`): passed
                           through, on windows; any other permute: vjp
transpose                  of two dimensions between the batch and the map (a channel
                           shuffle): swapped back, on windows; any other transpose: vjp
layer_norm                 over the channels in such a stretch: its Jacobian (statistics
                           included) at each position, on windows; any other: vjp
vjp                        everything else differentiable (a LayerNorm over the map, a
                           submodule fx cannot trace, ...): the node's local
                           vector-Jacobian product at its recorded inputs
=========================  ==========================================================

Refused: operations without a gradient (rounding, integer results, ``argmax``) and
operations that are random in eval mode (``F.dropout`` with ``training=True``).
"""


from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...io.errors import UnsupportedModelError
from .. import reverse as deconv
from ..reverse_shape import Reshape
from .args import _adaptive_params, _conv_args, _conv_params, _pool_params, target_name
from .build import (
    _build_add,
    _build_batch_norm_function,
    _build_cat,
    _build_conv,
    _build_scale,
    _linear_map,
    _record_batch_norm_function,
    _record_relu,
    _record_relu6,
    _record_scale,
    _record_switches,
    _source,
)
from .channels_last import build_any_linear, build_layer_norm, build_permute, linear_work, prepare_whole
from .checks import (
    _prepare_adaptive,
    _prepare_batch_norm_function,
    _prepare_bn,
    _prepare_cat,
    _prepare_conv,
    _prepare_elementwise,
    _prepare_getitem,
    _prepare_hardtanh,
    _prepare_identity,
    _prepare_maxpool,
    _prepare_reshape,
    _prepare_scale,
)
from .grad import build_gate, build_rectifier, build_vjp, build_whole_batch, prepare_pointwise, record_gate, record_rectifier, record_vjp
from .incremental_rules import adaptive_window, avg_pool_window, conv_window, max_pool_window
from .resample import build_interpolate, prepare_interpolate, record_interpolate
from .site import RULES, Live, Op, Pair, Site
from .split import build_part, prepare_part, record_part
from .transpose import build_transpose, prepare_transpose, record_transpose

__all__ = ["Op", "Site", "Live", "OPS", "SUPPORTED_TYPES", "RULES", "MODULE_OPS", "METHOD_OPS", "FUNCTION_OPS",
           "REFUSED", "refuse_volumes", "SHAPE_ONLY", "GENERIC", "WHOLE_BATCH", "POINTWISE", "target_name", "Pair",
           "NAMED_FUNCTION_OPS"]

# --------------------------------------------------------------------------- the table

#: The op of every differentiable node that has no entry of its own.
GENERIC = "vjp"
#: The op of a stretch of nodes where the batch is not the first dimension (:mod:`zfvis.core.record`).
WHOLE_BATCH = "vjp_whole_batch"

#: The op of the other functions that act on each (y, x) position on its own (in eval mode):
#: reversed by their vector-Jacobian product too, but on windows.
POINTWISE = "pointwise"


def _conv_work(site: Site) -> float:
    """A transposed convolution's multiply-adds per output position: its weight's size."""
    return float(_conv_args(site)["weight"].numel())


OPS: dict[str, Op] = {
    op.name: op
    for op in [
        Op("conv2d", "transposed convolution with the same (tied) weights, bias not applied", "spatial",
           _build_conv, _prepare_conv, params=_conv_params, window=conv_window, work=_conv_work),
        Op("linear", "multiplication by the transposed (tied) weight, bias not applied", "full", build_any_linear,
           work=linear_work),
        Op("batch_norm", "its per-channel scale gamma / sqrt(running_var + eps)", "same",
           lambda site: deconv.Scale(site.node.module, _source(site)), _prepare_bn, folds_into="conv2d"),
        Op("max_pool2d", "unpooling with the recorded switches (overlapping windows add up)", "spatial",
           lambda site: deconv.Unpool2d(_source(site), _pool_params(site)), _prepare_maxpool,
           record=_record_switches, params=_pool_params, window=max_pool_window),
        Op("avg_pool2d", "its transpose", "spatial", _linear_map("avg_pool2d"), params=_pool_params,
           window=avg_pool_window),
        Op("adaptive_avg_pool2d", "its transpose", "spatial", _linear_map("adaptive_avg_pool2d"),
           _prepare_adaptive, params=_adaptive_params, window=adaptive_window),
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
        Op("scale", "multiplication by a constant: the same constant; of two input-dependent factors: the "
           "product rule", "same", _build_scale, _prepare_scale, record=_record_scale, reads_inputs=True),
        Op("cat", "the signal is split between the inputs", "same", _build_cat, _prepare_cat),
        Op("reshape", "reshaped back", "same", lambda site: Reshape(_source(site)), _prepare_reshape),
        Op("transpose", "of two dimensions between the batch and the map: swapped back, on windows; any other: "
           "its vector-Jacobian product", "same", build_transpose, prepare_transpose, record=record_transpose,
           reads_inputs=True),
        Op("getitem", "the signal goes back to the slice, zero elsewhere", "same", _linear_map("getitem"),
           _prepare_getitem),
        Op("identity", "passed through unchanged", "same", lambda site: deconv.PassThrough(_source(site), site.node.kind),
           _prepare_identity),
        Op("batch_norm_function", "its per-channel scale weight / sqrt(running_var + eps)", "same",
           _build_batch_norm_function, _prepare_batch_norm_function, record=_record_batch_norm_function),
        Op("rectifier", "the rule: deconvnet relu(signal), guided f'(x) relu(signal), gradient f'(x) signal",
           "same", build_rectifier, record=record_rectifier, reads_inputs=True),
        Op("gate", "its derivative: f'(x) signal", "same", build_gate, record=record_gate, reads_inputs=True),
        Op(POINTWISE, "its local vector-Jacobian product at the recorded inputs, position by position (exact; "
           "on windows)", "same", build_vjp, prepare_pointwise, record=record_vjp, reads_inputs=True),
        Op("interpolate", "the transpose of its row and column weights, on windows (separable modes)", "resample",
           build_interpolate, prepare_interpolate, record=record_interpolate, reads_inputs=True),
        Op("split", "each part: the signal back to its slice, zero elsewhere, on windows (a split of channels)",
           "bundle", build_part, prepare_part, record=record_part),
        Op("permute", "into or out of a channels-last stretch held channels first: passed through, on windows; "
           "else its vector-Jacobian product", "full", build_permute, prepare_whole, record=record_vjp,
           reads_inputs=True),
        Op("layer_norm", "over the channels of a channels-last stretch: its Jacobian at each position, on "
           "windows; else its vector-Jacobian product", "full", build_layer_norm, prepare_whole, record=record_vjp,
           reads_inputs=True),
        Op(GENERIC, "its local vector-Jacobian product at the recorded inputs (exact; whole maps)", "full",
           build_vjp, record=record_vjp, reads_inputs=True),
        Op(WHOLE_BATCH, "a stretch where the batch is not the first dimension (windows or heads folded into it, an "
           "axis permuted before it): its vector-Jacobian product over the whole recorded batch, per seed (exact; "
           "refused where images mix)", "full", build_whole_batch, reads_inputs=True),
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
    nn.LeakyReLU: "rectifier",
    nn.ELU: "rectifier",
    nn.SiLU: "rectifier",
    nn.GELU: "rectifier",
    nn.Hardswish: "rectifier",
    nn.Mish: "rectifier",
    nn.Sigmoid: "gate",
    nn.Hardsigmoid: "gate",
    nn.Tanh: "gate",
    nn.AlphaDropout: "identity",
    nn.LayerNorm: "layer_norm",
    nn.Upsample: "interpolate",
    nn.UpsamplingNearest2d: "interpolate",
    nn.UpsamplingBilinear2d: "interpolate",
    **{t: POINTWISE for t in (nn.PReLU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)},
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
    F.dropout1d: "identity",
    F.dropout3d: "identity",
    F.alpha_dropout: "identity",
    F.feature_alpha_dropout: "identity",
    F.batch_norm: "batch_norm_function",
    F.leaky_relu: "rectifier",
    F.leaky_relu_: "rectifier",
    F.elu: "rectifier",
    F.elu_: "rectifier",
    F.silu: "rectifier",
    F.gelu: "rectifier",
    F.hardswish: "rectifier",
    F.mish: "rectifier",
    torch.sigmoid: "gate",
    torch.sigmoid_: "gate",
    F.sigmoid: "gate",
    F.hardsigmoid: "gate",
    torch.tanh: "gate",
    torch.tanh_: "gate",
    F.tanh: "gate",
    F.interpolate: "interpolate",
    F.upsample: "interpolate",
    F.layer_norm: "layer_norm",
    torch.layer_norm: "layer_norm",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.swapdims: "transpose",
    torch.split: "split",
    torch.chunk: "split",
    torch.unbind: "split",
    **{f: POINTWISE for f in (
        torch.clamp, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.pow, operator.pow, torch.erf,
        torch.square, torch.sin, torch.cos, F.softplus, F.softsign, F.logsigmoid, F.selu, F.celu)},
}

#: Functions of other libraries, by module and name (zfvis does not import those libraries).
NAMED_FUNCTION_OPS: dict[str, str] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": "identity",  # with training=False
}

#: Operations refused on a projection's path: no gradient, or random in eval mode. Keys are
#: functions and method names. (An index, ``argmax``, is integers: the check finds that it
#: carries no signal, as its true backward sends nothing back.)
REFUSED: dict[Any, str] = {
    **{f: "it has no gradient (rounding is flat almost everywhere)" for f in (
        torch.floor, torch.ceil, torch.round, torch.trunc, torch.sign, torch.floor_divide, operator.floordiv,
        operator.ifloordiv, operator.mod, torch.remainder, torch.fmod, "floor", "ceil", "round", "trunc", "sign",
        "floor_", "ceil_", "round_", "trunc_", "floor_divide", "remainder", "fmod")},
    **{f: "it draws random numbers, also in eval mode" for f in (
        torch.bernoulli, torch.rand_like, torch.randn_like, torch.randint_like, torch.multinomial, torch.normal,
        "bernoulli", "bernoulli_", "normal_", "uniform_", "random_", "exponential_")},
}

_VOLUME_TYPES = (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool3d, nn.BatchNorm3d)


def refuse_volumes(model: nn.Module) -> None:
    """Refuses video and volume models (3D convolutions and pools), by their modules."""
    for name, m in model.named_modules():
        if isinstance(m, _VOLUME_TYPES):
            raise UnsupportedModelError(
                f"module '{name}' is a {type(m).__name__}: zfvis visualizes image CNNs of 2D maps (N, C, H, W); "
                "video and volume models (3D convolutions) are not supported")


#: Functions and methods that make a tensor from another one's shape only (no signal).
SHAPE_ONLY: frozenset[Any] = frozenset({
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, "new_zeros", "new_ones", "new_full",
    "new_empty", "new_tensor",
})  # fmt: skip

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
    "sigmoid": "gate",
    "sigmoid_": "gate",
    "tanh": "gate",
    "tanh_": "gate",
    "neg": "scale",
    "permute": "permute",
    "transpose": "transpose",
    "swapaxes": "transpose",
    "swapdims": "transpose",
    "split": "split",
    "chunk": "split",
    "unbind": "split",
    **{m: POINTWISE for m in ("clamp", "clamp_", "exp", "log", "sqrt", "rsqrt", "abs", "pow", "square", "erf")},
}

#: Module types the deconvnet can reverse, with what it does with each.
SUPPORTED_TYPES: dict[type[nn.Module], str] = {t: OPS[name].summary for t, name in MODULE_OPS.items()}

