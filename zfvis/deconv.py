"""The reverse layers: what each forward module becomes in the deconvnet.

=======================  =============================================================
forward module           reverse layer
=======================  =============================================================
Conv2d (+ BatchNorm2d)   :class:`ReverseConv2d`, a ``ConvTranspose2d`` whose weight *is*
                         the convolution's Parameter (tied, never copied); the bias is
                         not applied; a BatchNorm2d right after the convolution is folded
                         in as its per-channel scale gamma / sqrt(var + eps)
MaxPool2d                :class:`Unpool2d`: each value goes back to where the forward
                         pass took its maximum from (the switches); where windows overlap
                         and two pick the same location, their values add up, as in
                         max-pool's gradient (``nn.MaxUnpool2d`` would overwrite)
ReLU                     :class:`Rectify` (ReLU)
AvgPool2d, Adaptive...   :class:`TransposedPool`: the pooling's transpose (its gradient)
Linear                   :class:`ReverseLinear`: multiplication by W^T, no bias
Flatten                  :class:`Unflatten`
BatchNorm2d (alone)      :class:`Scale`: its per-channel scale
LocalResponseNorm,       :class:`PassThrough`: the signal is passed on unchanged (contrast
Dropout, Identity        normalisation is not inverted, as in Zeiler & Fergus)
=======================  =============================================================

Every layer works on *windows*: per-seed rectangles of its output map (see
:mod:`zfvis.receptive`), so a reverse pass started at one activation computes only over
the region that activation can reach. A window as large as the map is the ordinary dense
computation.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .receptive import Window, spatial_params
from .recording import Step

__all__ = [
    "Frame",
    "ReverseLayer",
    "ReverseConv2d",
    "Unpool2d",
    "Rectify",
    "PassThrough",
    "Scale",
    "TransposedPool",
    "ReverseLinear",
    "Unflatten",
    "ReverseStack",
    "build_reverse_stack",
    "crop_windows",
]


def crop_windows(
    src: torch.Tensor,
    index: torch.Tensor | None,
    top: torch.Tensor,
    left: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Cuts per-item windows out of a batch of maps, with zeros outside the map.

    Args:
        src: Maps (N, C, H, W).
        index: For each output item, which map to cut from (B,); ``None``: item b is cut
            from map b.
        top: First row of each window (B,), may be negative or run past the map.
        left: First column of each window (B,).
        height: Window height.
        width: Window width.

    Returns:
        (B, C, height, width): ``out[b, :, i, j] = src[index[b], :, top[b] + i, left[b] + j]``,
        zero where that lies outside the map. With negative offsets and a larger size this
        pastes windows into a larger canvas.
    """
    n, _, h, w = src.shape
    b = top.shape[0]
    same_src = index is None and b == n
    if same_src and b > 0:
        t0, l0 = int(top[0]), int(left[0])
        uniform = bool((top == t0).all()) and bool((left == l0).all())
        if uniform:
            pad = (max(0, -l0), max(0, l0 + width - w), max(0, -t0), max(0, t0 + height - h))
            x = F.pad(src, pad) if any(pad) else src
            r0, c0 = t0 + pad[2], l0 + pad[0]
            return x[:, :, r0 : r0 + height, c0 : c0 + width]
    if index is None:
        index = torch.arange(b, device=src.device)
    rows = top[:, None] + torch.arange(height, device=src.device)
    cols = left[:, None] + torch.arange(width, device=src.device)
    rows_ok = (rows >= 0) & (rows < h)
    cols_ok = (cols >= 0) & (cols < w)
    picked = src[index[:, None, None], :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    picked = picked.permute(0, 3, 1, 2)
    if not (bool(rows_ok.all()) and bool(cols_ok.all())):
        mask = (rows_ok[:, :, None] & cols_ok[:, None, :])[:, None]
        picked = picked * mask.to(picked.dtype)
    return picked


@dataclasses.dataclass
class Frame:
    """What one reverse layer needs besides the signal.

    Attributes:
        out_win: Windows of the forward module's output (``None``: a vector).
        in_win: Windows of the forward module's input, which the layer must return.
        in_shape: Full shape of the forward module's input, without batch.
        image: For each seed, its image's index in the recorded batch (B,).
        switches: The max-pool's recorded argmax indices (N, C, H_out, W_out), or ``None``.
    """

    out_win: Window | None
    in_win: Window | None
    in_shape: tuple[int, ...]
    image: torch.Tensor
    switches: torch.Tensor | None = None


class ReverseLayer(nn.Module):
    """Base of the reverse layers; ``source`` is the forward module's dotted name."""

    source: str

    def reverse(self, signal: torch.Tensor, frame: Frame) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, signal: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.reverse(signal, frame)


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    return scale


class ReverseConv2d(nn.ConvTranspose2d):
    """Transposed convolution tied to a forward ``Conv2d``: its ``weight`` is that
    convolution's Parameter, so later changes to the convolution show here too.

    Args:
        conv: The forward convolution.
        source: Its dotted name.
        bn: A BatchNorm2d that follows the convolution, folded in as a per-channel scale.
    """

    def __init__(self, conv: nn.Conv2d, source: str, bn: nn.BatchNorm2d | None = None) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError(f"convolution '{source}' pads with '{conv.padding_mode}'; only zero padding is supported")
        super().__init__(
            conv.out_channels,
            conv.in_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=False,
            device="meta",
        )
        self.weight = conv.weight
        self.source = source
        self._folded: list[tuple[nn.BatchNorm2d, str]] = [(bn, "")] if bn is not None else []
        self._pre_pad = spatial_params(Step(source, conv, (), ()))[2]  # type: ignore[index]

    def fold(self, bn: nn.BatchNorm2d, name: str) -> None:
        """Folds the BatchNorm2d ``name`` that follows the convolution into this layer."""
        self._folded = [(bn, name)]

    def extra_repr(self) -> str:
        folded = "".join(f", folds BatchNorm2d '{name}'" for _, name in self._folded)
        return f"{super().extra_repr()}, from '{self.source}', tied weight{folded}"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> torch.Tensor:  # type: ignore[override]
        for bn, _ in self._folded:
            signal = signal * _bn_scale(bn).to(signal.dtype).view(1, -1, 1, 1)
        full = F.conv_transpose2d(signal, self.weight, None, self.stride, 0, 0, self.groups, self.dilation)
        out_win, in_win = frame.out_win, frame.in_win
        assert out_win is not None and in_win is not None
        shift_y = in_win.top - (out_win.top * self.stride[0] - self._pre_pad[0])
        shift_x = in_win.left - (out_win.left * self.stride[1] - self._pre_pad[1])
        return crop_windows(full, None, shift_y, shift_x, *in_win.size)

    def forward(self, signal: torch.Tensor, frame: Frame) -> torch.Tensor:  # type: ignore[override]
        return self.reverse(signal, frame)


class Unpool2d(ReverseLayer):
    """Unpooling with switches: each value returns to its maximum's location; values that
    meet at one location (overlapping windows) add up."""

    def __init__(self, pool: nn.MaxPool2d, source: str) -> None:
        super().__init__()
        self.source = source
        self._desc = f"kernel_size={pool.kernel_size}, stride={pool.stride}, padding={pool.padding}"

    def extra_repr(self) -> str:
        return f"{self._desc}, from '{self.source}', switches recorded in the forward pass"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> torch.Tensor:
        out_win, in_win, switches = frame.out_win, frame.in_win, frame.switches
        assert out_win is not None and in_win is not None and switches is not None
        b, c, h, w = signal.shape
        idx = crop_windows(switches, frame.image, out_win.top, out_win.left, h, w)
        width_in = frame.in_shape[-1]
        rows = idx // width_in - in_win.top.view(-1, 1, 1, 1)
        cols = idx % width_in - in_win.left.view(-1, 1, 1, 1)
        hi, wi = in_win.size
        valid = (rows >= 0) & (rows < hi) & (cols >= 0) & (cols < wi)
        flat = torch.where(valid, rows * wi + cols, torch.zeros_like(rows)).view(b, c, -1)
        values = torch.where(valid, signal, torch.zeros_like(signal)).reshape(b, c, -1)
        out = signal.new_zeros(b, c, hi * wi)
        out.scatter_add_(2, flat, values)
        return out.view(b, c, hi, wi)


class Rectify(ReverseLayer):
    """ReLU of the reverse signal."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def extra_repr(self) -> str:
        return f"from '{self.source}'"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> torch.Tensor:
        return F.relu(signal)


class PassThrough(ReverseLayer):
    """Passes the signal on unchanged (LocalResponseNorm, Dropout, Identity)."""

    def __init__(self, source: str, kind: str) -> None:
        super().__init__()
        self.source, self.kind = source, kind

    def extra_repr(self) -> str:
        return f"{self.kind} '{self.source}' passed through"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> torch.Tensor:
        return signal


class Scale(ReverseLayer):
    """A BatchNorm2d's per-channel scale (its linear part) for a BatchNorm2d that does not
    follow a convolution."""

    def __init__(self, bn: nn.BatchNorm2d, source: str) -> None:
        super().__init__()
        self.source = source
        self._bn = [bn]

    def extra_repr(self) -> str:
        return f"from '{self.source}'"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> torch.Tensor:
        return signal * _bn_scale(self._bn[0]).to(signal.dtype).view(1, -1, 1, 1)


class TransposedPool(ReverseLayer):
    """The transpose of an average pooling (AvgPool2d, AdaptiveAvgPool2d), computed as
    the pooling's gradient over the whole map."""

    def __init__(self, pool: nn.Module, source: str) -> None:
        super().__init__()
        self.source = source
        self._pool = [pool]

    def extra_repr(self) -> str:
        return f"{type(self._pool[0]).__name__} '{self.source}' transposed"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> torch.Tensor:
        out_win, in_win = frame.out_win, frame.in_win
        assert out_win is not None and in_win is not None
        c, h, w = frame.in_shape
        full_out = crop_windows(signal, None, -out_win.top, -out_win.left, *out_win.map_size)
        with torch.enable_grad():
            z = signal.new_zeros(signal.shape[0], c, h, w, requires_grad=True)
            (grad,) = torch.autograd.grad(self._pool[0](z), z, full_out)
        return crop_windows(grad, None, in_win.top, in_win.left, *in_win.size)


class ReverseLinear(ReverseLayer):
    """Multiplication by the transposed weight of a Linear layer (tied; no bias)."""

    def __init__(self, linear: nn.Linear, source: str) -> None:
        super().__init__()
        self.source = source
        self.weight = linear.weight

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"{out_f} -> {in_f}, from '{self.source}', tied weight"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> torch.Tensor:
        return signal @ self.weight


class Unflatten(ReverseLayer):
    """Reshapes a vector back to the (C, H, W) map it was flattened from."""

    def __init__(self, source: str, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.source, self.shape = source, shape

    def extra_repr(self) -> str:
        return f"to {self.shape}, from '{self.source}'"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> torch.Tensor:
        return signal.reshape(signal.shape[0], *frame.in_shape)


class ReverseStack(nn.Module):
    """The reverse layers for one recorded chain, from the seed layer down to the pixels.

    Printing it shows each reverse layer with the forward module it mirrors. Its
    ``steps`` are the forward steps each reverse layer undoes (a folded BatchNorm2d's
    layer undoes two).
    """

    def __init__(self, layers: list[nn.Module], spans: list[tuple[int, int]]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.spans = spans

    def run(self, signal: torch.Tensor, frames: list[Frame]) -> torch.Tensor:
        """Runs the signal through every layer, frame i going with layer i."""
        for layer, frame in zip(self.layers, frames):
            signal = layer(signal, frame)
        return signal

    def forward(self, signal: torch.Tensor, frames: list[Frame]) -> torch.Tensor:
        return self.run(signal, frames)


def build_reverse_stack(steps: list[Step]) -> ReverseStack:
    """Builds the reverse layers of a recorded chain, top (last step) first.

    Each entry of ``spans`` is the (first, last) step index a layer undoes.
    """
    layers: list[nn.Module] = []
    spans: list[tuple[int, int]] = []
    i = len(steps) - 1
    while i >= 0:
        step = steps[i]
        m = step.module
        first = i
        if m is None or isinstance(m, nn.Flatten):
            layer: nn.Module = Unflatten(step.name, step.in_shape)
        elif isinstance(m, nn.Conv2d):
            layer = ReverseConv2d(m, step.name)
        elif isinstance(m, nn.BatchNorm2d):
            before = steps[i - 1] if i > 0 else None
            if before is not None and isinstance(before.module, nn.Conv2d):
                layer = ReverseConv2d(before.module, before.name)
                layer.fold(m, step.name)
                first = i - 1
            else:
                layer = Scale(m, step.name)
        elif isinstance(m, nn.MaxPool2d):
            layer = Unpool2d(m, step.name)
        elif isinstance(m, nn.ReLU):
            layer = Rectify(step.name)
        elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            layer = TransposedPool(m, step.name)
        elif isinstance(m, nn.Linear):
            layer = ReverseLinear(m, step.name)
        else:
            layer = PassThrough(step.name, step.kind)
        layers.append(layer)
        spans.append((first, i))
        i = first - 1
    return ReverseStack(layers, spans)
