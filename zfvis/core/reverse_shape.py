"""Reverse layers of operations that move values without mixing channels at a position:
resampling (``interpolate``, ``Upsample``), taking one part of a split, reshaping and
transposing dimensions before the map.

Both work on each seed's windows (:mod:`zfvis.core.cone`): a resampling sends the signal
back through the transposes of its row and column weights (:mod:`zfvis.core.resampling`)
restricted to the seed's output and input windows; a part of a split puts the signal back
into its slice of the channels, zero elsewhere.
"""

from __future__ import annotations

import torch

from .resampling import Resampling
from .reverse import Frame, ReverseLayer

__all__ = ["Resample", "Reshape", "Transposed", "Unsplit"]


def _block(weights: torch.Tensor, out_first: torch.Tensor, in_first: torch.Tensor, n_out: int,
           n_in: int) -> torch.Tensor:
    """Per-seed (B, n_out, n_in) blocks of ``weights`` starting at (out_first[b], in_first[b])."""
    o = out_first[:, None] + torch.arange(n_out, device=out_first.device)
    i = in_first[:, None] + torch.arange(n_in, device=in_first.device)
    return weights.to(out_first.device)[o[:, :, None], i[:, None, :]]


class Resample(ReverseLayer):
    """The transpose of a separable interpolation, on windows.

    Args:
        weights: Its row and column weights.
        source: The forward module's (or node's) name.
        kind: What the node is (``interpolate``, ``Upsample``, ...).
        mode: Its mode.
    """

    def __init__(self, weights: Resampling, source: str, kind: str, mode: str) -> None:
        super().__init__()
        self.weights, self.source, self.kind, self.mode = weights, source, kind, mode

    def extra_repr(self) -> str:
        (ho, hi), (wo, wi) = self.weights.rows.shape, self.weights.cols.shape
        return f"{self.kind} '{self.source}' ({self.mode}, {hi}x{wi} -> {ho}x{wo}) transposed, on windows"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        out_win, in_win = frame.out_win, frame.in_wins[0]
        if out_win is None or in_win is None:
            raise RuntimeError(f"reverse resampling '{self.source}' needs map windows")
        (ho, wo), (hi, wi) = out_win.size, in_win.size
        rows = _block(self.weights.rows, out_win.top, in_win.top, ho, hi).to(signal.dtype)  # (B, ho, hi)
        cols = _block(self.weights.cols, out_win.left, in_win.left, wo, wi).to(signal.dtype)  # (B, wo, wi)
        t = signal @ cols[:, None]  # (B, C, ho, wi)
        return [rows.transpose(1, 2)[:, None] @ t]


class Unsplit(ReverseLayer):
    """One part of ``split`` / ``chunk`` / ``unbind`` along a dimension before the map: the
    signal goes back to its slice, zero elsewhere.

    Args:
        dim: The dimension split (of the input, without batch).
        start: The part's first index along it.
        length: Its length (``None``: one index, the dimension dropped, as ``unbind``).
        source: The splitting node's name.
        kind: What the node is.
    """

    def __init__(self, dim: int, start: int, length: int | None, source: str, kind: str) -> None:
        super().__init__()
        self.dim, self.start, self.length, self.source, self.kind = dim, start, length, source, kind

    def extra_repr(self) -> str:
        part = f"index {self.start}" if self.length is None else f"{self.start}:{self.start + self.length}"
        return f"{self.kind} '{self.source}' part {part} of dim {self.dim + 1}: back to its slice, zero elsewhere"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        d = self.dim + 1  # with the batch
        part = signal.unsqueeze(d) if self.length is None else signal
        shape = list(part.shape)
        shape[d] = frame.in_shapes[0][self.dim]
        out = part.new_zeros(shape)
        out.narrow(d, self.start, part.shape[d]).copy_(part)
        return [out]


class Reshape(ReverseLayer):
    """Flatten / view / reshape / (un)squeeze: the signal is reshaped back."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def extra_repr(self) -> str:
        return f"from '{self.source}'"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        shape = frame.in_shapes[0]
        if frame.out_win is not None:  # a windowed map: only the dimensions before the map change
            shape = (*shape[:-2], *frame.out_win.size)
        return [signal.reshape(signal.shape[0], *shape)]


class Transposed(ReverseLayer):
    """``transpose`` of two dimensions between the batch and the map: the signal is transposed
    back (the same two dimensions swapped), on windows.

    Args:
        dims: The two dimensions (with the batch).
        source: The node's name.
        kind: What the node is.
    """

    def __init__(self, dims: tuple[int, int], source: str, kind: str) -> None:
        super().__init__()
        self.dims, self.source, self.kind = dims, source, kind

    def extra_repr(self) -> str:
        return f"{self.kind} '{self.source}' of dims {self.dims}: transposed back, on windows"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        return [signal.transpose(*self.dims)]
