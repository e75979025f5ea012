"""Resampling as matrices: which input rows and columns each output row and column of an
interpolation reads, and with what weights.

The interpolations of ``F.interpolate`` in modes nearest, nearest-exact, bilinear and
bicubic are separable: output ``out[c, o, p] = sum_ij rows[o, i] * x[c, i, j] * cols[p, j]``,
where the weights along one dimension depend only on that dimension's input size, output
size and scale. :func:`probe` measures these matrices by running the very call on one-hot
inputs along one dimension (the index arithmetic is PyTorch's own, floating point
included), so the reverse pass can apply their transposes on windows, and the cone of an
output window is the exact set of input rows and columns with a non-zero weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

__all__ = ["Resampling", "probe"]


@dataclasses.dataclass(frozen=True)
class Resampling:
    """The weights of a separable resampling of (H, W) maps.

    Attributes:
        rows: (H_out, H_in) weights of the input rows for each output row.
        cols: (W_out, W_in) weights of the input columns for each output column.
    """

    rows: torch.Tensor
    cols: torch.Tensor

    def reach(self, dim: int, first: torch.Tensor, stop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input interval that output rows (``dim`` 0) or columns (1) ``first .. stop - 1`` read.

        Args:
            dim: 0 for rows, 1 for columns.
            first: Per-seed first output index (B,).
            stop: Per-seed one-past-last output index (B,).

        Returns:
            Per-seed (first, one-past-last) input index with a non-zero weight; an empty
            output interval reaches an empty input interval at its start.
        """
        weights = self.rows if dim == 0 else self.cols
        n_out, n_in = weights.shape
        nz = (weights != 0).to(first.device)
        idx = torch.arange(n_in, device=first.device)
        lo = torch.where(nz, idx, n_in).amin(1)  # (n_out,)
        hi = torch.where(nz, idx + 1, 0).amax(1)
        o = torch.arange(n_out, device=first.device)
        inside = (o >= first[:, None]) & (o < stop[:, None])  # (B, n_out)
        a = torch.where(inside, lo, n_in).amin(1)
        b = torch.where(inside, hi, 0).amax(1)
        empty = a >= b
        return torch.where(empty, a.clamp(max=n_in - 1), a), torch.where(empty, a.clamp(max=n_in - 1), b)


def probe(call: Callable[..., torch.Tensor], n_in: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """The (n_out, n_in) weights of one dimension of a separable resampling.

    Args:
        call: The resampling of a (N, 1, H, W) batch along both dimensions, with the other
            dimension's size mapped to 1 (its arguments for that dimension set accordingly).
        n_in: The input size along ``dim``.
        dim: 0 (rows) or 1 (columns).
        like: A tensor of the dtype and device to probe in.

    Returns:
        ``weights[o, i]``: output ``o``'s weight of input ``i``.
    """
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device)
    x = eye.view(n_in, 1, n_in, 1) if dim == 0 else eye.view(n_in, 1, 1, n_in)
    out = call(x)
    return out.reshape(n_in, -1).T.contiguous()
