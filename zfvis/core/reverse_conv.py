"""The kernels behind a reverse (transposed) convolution, chosen per kind of convolution.

:class:`zfvis.core.reverse.ReverseConv2d` decides which rows and columns of the transposed
convolution each seed needs; these functions compute it. A 1x1 convolution with stride 1
(the expansions and projections of MobileNet / EfficientNet blocks, the squeeze-and-excitation
layers) is a matrix product over the channels of every pixel: one ``matmul`` on the signal's
channels-last memory, without the convolution library's setup. Every other convolution
(depthwise ones included) runs ``F.conv_transpose2d`` on channels-last memory, where
mkldnn's kernels are fastest on CPUs. Both equal the transposed convolution exactly (up to
the order of floating-point sums). A BatchNorm folded into the convolution before it scales
its weight by :func:`bn_scale`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from .geometry import Axis

__all__ = ["bn_scale", "conv_axes", "dense_transpose", "transpose_conv"]

Pair = tuple[int, int]


def _pointwise(signal: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The transpose of a 1x1, stride-1 convolution of one group: per pixel, ``s @ W``."""
    b, o, h, w = signal.shape
    flat = signal.permute(0, 2, 3, 1).reshape(b * h * w, o)  # a view when channels-last
    out = flat @ weight.reshape(o, -1)
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)  # channels-last (N, C, H, W)


def transpose_conv(signal: torch.Tensor, weight: torch.Tensor, conv: nn.ConvTranspose2d, pads: Pair,
                   extra: Pair = (0, 0)) -> torch.Tensor:
    """``F.conv_transpose2d(signal, weight)`` with ``conv``'s stride, dilation and groups,
    padding ``pads`` (rows and columns not computed on each side) and output padding
    ``extra`` (rows and columns computed past the end), by the fastest kernel.

    Args:
        signal: (B, C_out, H, W).
        weight: The forward convolution's weight (C_out, C_in / groups, kh, kw).
        conv: Gives stride, dilation, groups and kernel size.
        pads: The transposed convolution's padding.
        extra: Its output padding (each below the stride or the dilation).

    Returns:
        (B, C_in, H', W'), in channels-last memory.
    """
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and pads == (0, 0) == extra:
        return _pointwise(signal, weight)
    signal = signal.contiguous(memory_format=torch.channels_last)  # mkldnn is up to 4x faster on it
    return F.conv_transpose2d(signal, weight, None, conv.stride, pads, extra, conv.groups, conv.dilation)


def conv_axes(conv: nn.ConvTranspose2d, pre_pad: Pair) -> tuple[Axis, Axis]:
    """The forward convolution's geometry (:mod:`zfvis.core.geometry`) along rows and columns."""
    return (Axis(conv.kernel_size[0], conv.stride[0], pre_pad[0], conv.dilation[0]),
            Axis(conv.kernel_size[1], conv.stride[1], pre_pad[1], conv.dilation[1]))


def dense_transpose(signal: torch.Tensor, weight: torch.Tensor, conv: nn.ConvTranspose2d, pre_pad: Pair,
                    in_size: Pair) -> torch.Tensor | None:
    """The reverse convolution of a dense signal (whole maps in, whole maps out), or ``None``
    where the transposed output does not cover the input map (then zeros must be pasted: the
    windowed path does it).

    Args:
        signal: (B, C_out, H, W), whole output maps.
        weight: The (folded) weight.
        conv: Gives stride, dilation, groups and kernel size.
        pre_pad: The forward convolution's padding before the first row and column.
        in_size: The forward input's height and width.
    """
    pads, starts, extra = [], [], []
    exact = True  # whether padding and output padding give exactly the input's rows and columns
    for i, axis in enumerate(conv_axes(conv, pre_pad)):
        length = axis.span(signal.shape[2 + i])
        spare = length - pre_pad[i] - in_size[i]
        if spare < 0:  # rows past the transposed output's end: zeros (the windowed path)
            return None
        # the input's rows are rows pre_pad .. pre_pad + in_size of the transposed output: not
        # computing the first pre_pad (padding) leaves length - 2 pre_pad rows; output padding
        # computes the missing ones (past an odd input's end, with a stride of 2)
        missing = in_size[i] - (length - 2 * pre_pad[i])
        exact = exact and 0 <= missing < max(conv.stride[i], conv.dilation[i])
        extra.append(missing)
        pad = min(pre_pad[i], spare)
        pads.append(pad)
        starts.append(pre_pad[i] - pad)  # the input's first row in the computed output
    if exact:
        return transpose_conv(signal, weight, conv, (pre_pad[0], pre_pad[1]), (extra[0], extra[1]))
    full = transpose_conv(signal, weight, conv, (pads[0], pads[1]))
    if full.shape[2:] == in_size:
        return full
    return full[:, :, starts[0] : starts[0] + in_size[0], starts[1] : starts[1] + in_size[1]]


#: running variance -> (the numbers the scale was computed from, the weight, the scale), see :func:`bn_scale`
_SCALES = WeakTensorKeyDictionary()


def bn_scale(bn: Any, dtype: torch.dtype) -> torch.Tensor:
    """An eval-mode batch norm's scale per channel, ``weight / sqrt(running_var + eps)``, in
    ``dtype`` (``bn``: a BatchNorm module, or the statistics of a functional one). Kept per
    running variance (without gradients) while it and the weight are the same tensors at the same
    versions and memory (``t.data = ...`` swaps the memory without a new version), with the same
    eps, since a reverse pass folds dozens of them."""
    var, weight = bn.running_var, bn.weight
    if var is None:
        return _scale(torch.ones(bn.num_features, device=weight.device if weight is not None else None), weight,
                      bn.eps, dtype)
    key = (dtype, bn.eps, var._version, var.data_ptr(),
           None if weight is None else (weight._version, weight.data_ptr()))
    hit = _SCALES.get(var)
    if hit is not None and hit[0] == key and hit[1] is weight:  # the weight held: its id is not reused
        return hit[2]
    scale = _scale(var, weight, bn.eps, dtype)
    if not torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        _SCALES[var] = (key, weight, scale)
    return scale


def _scale(var: torch.Tensor, weight: torch.Tensor | None, eps: float, dtype: torch.dtype) -> torch.Tensor:
    scale = torch.rsqrt(var + eps)
    return (scale if weight is None else scale * weight).to(dtype)
