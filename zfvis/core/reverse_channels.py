"""Reverse layers of a channels-last stretch (a ConvNeXt block: permute, LayerNorm, Linear,
GELU, Linear, permute back), held channels first so that windows pass through.

A map with channels last, (N, H, W, C), is held by the reverse pass as (N, C, H, W) with
its windows on (H, W) (:mod:`zfvis.core.layouts`): the permutes into and out of the stretch
then move nothing, a LayerNorm over the channels is its Jacobian at each position of the
window, and a Linear over the channels is the transposed weight at each position.
"""

from __future__ import annotations

import torch

from .reverse import Frame, ReverseLayer
from .windows import crop_windows

__all__ = ["ChannelLinear", "ChannelNorm", "Permuted"]


class Permuted(ReverseLayer):
    """A permute between channels-first and channels-last: the reverse pass holds both
    channels first, so the signal passes unchanged.

    Args:
        dims: The permutation (with the batch dimension).
        source: The node's name.
        kind: What the node is.
    """

    def __init__(self, dims: tuple[int, ...], source: str, kind: str) -> None:
        super().__init__()
        self.dims, self.source, self.kind = dims, source, kind

    def extra_repr(self) -> str:
        return f"{self.kind} '{self.source}' {self.dims}: maps held channels first on both sides, passed through"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        return [signal]


class ChannelNorm(ReverseLayer):
    """A LayerNorm over the channels at each position: its full Jacobian (statistics included)
    at the recorded input, on each seed's window.

    With x̂ = (x - μ) / σ over the channels and ĝ = g·γ: dx = (ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)) / σ.

    Args:
        weight: γ (C,), or ``None``.
        eps: The ε added to the variance.
        source: The forward module's (or node's) name.
        kind: What the node is.
    """

    def __init__(self, weight: torch.Tensor | None, eps: float, source: str, kind: str) -> None:
        super().__init__()
        self.weight, self.eps, self.source, self.kind = weight, eps, source, kind

    def extra_repr(self) -> str:
        return f"{self.kind} '{self.source}' over the channels: its Jacobian at the recorded input, on windows"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        (x,) = frame.state
        win = frame.out_win
        if win is None:
            x = x[frame.image]
        else:
            x = crop_windows(x, frame.image, win.top, win.left, *win.size)
        x = x.to(signal.dtype)
        mu = x.mean(1, keepdim=True)
        sigma = torch.sqrt((x - mu).square().mean(1, keepdim=True) + self.eps)
        xhat = (x - mu) / sigma
        g = signal if self.weight is None else signal * self.weight.to(signal.dtype).view(1, -1, 1, 1)
        return [(g - g.mean(1, keepdim=True) - xhat * (g * xhat).mean(1, keepdim=True)) / sigma]


class ChannelLinear(ReverseLayer):
    """A Linear over the channels at each position: the transposed (tied) weight, no bias.

    Args:
        weight: Its weight (out, in).
        source: The forward module's (or node's) name.
    """

    def __init__(self, weight: torch.Tensor, source: str) -> None:
        super().__init__()
        self.weight, self.source = weight, source

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"{out_f} -> {in_f} over the channels at each position, from '{self.source}', tied weight"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        return [(signal.movedim(1, -1) @ self.weight.to(signal.dtype)).movedim(-1, 1)]
