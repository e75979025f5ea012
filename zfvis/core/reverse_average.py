"""The transpose of block averaging (an adaptive average pooling whose output divides its input).

Such a pooling averages disjoint k_h x k_w blocks (a global average pooling, as in the
squeeze-and-excitation gate, is one block). Its transpose gives every pixel of a block
the block's signal divided by k_h k_w: a broadcast, computed without autograd and, for a
global average, without copying the signal per pixel.
"""

from __future__ import annotations

import torch

from .reverse import Frame, ReverseLayer
from .windows import cut, paste

__all__ = ["AverageUnpool"]


class AverageUnpool(ReverseLayer):
    """Block averaging transposed: each block's signal, divided by its size, spread over it.

    Args:
        source: The forward module's (or node's) name.
        block: The block's height and width (the input's size over the output's).
    """

    def __init__(self, source: str, block: tuple[int, int]) -> None:
        super().__init__()
        self.source = source
        self.block = block

    def extra_repr(self) -> str:
        return f"adaptive_avg_pool2d '{self.source}' transposed: blocks of {self.block[0]}x{self.block[1]}"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        signal = paste(signal, frame.out_win)  # whole output maps
        kh, kw = self.block
        b, c, h, w = signal.shape
        share = signal / (kh * kw)
        if (h, w) == (1, 1):  # a global average: one value per map, a broadcast view
            spread = share.expand(b, c, kh, kw)
        else:
            spread = share.reshape(b, c, h, 1, w, 1).expand(b, c, h, kh, w, kw).reshape(b, c, h * kh, w * kw)
        return [cut(spread, frame.in_wins[0])]
