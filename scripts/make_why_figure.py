#!/usr/bin/env python
"""Draws docs/why.png: a transposed convolution is a plain convolution of the signal with
(stride - 1) zeros inserted between its pixels, padded by d*(k-1) - p, kernel flipped."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zfvis._io import atomic_open  # noqa: E402


def main(out: str = "docs/why.png") -> int:
    torch.manual_seed(3)
    y = torch.randint(1, 6, (1, 1, 3, 3)).float()
    w = torch.randint(-2, 3, (1, 1, 3, 3)).float()
    stride, pad = 2, 1
    dilated = torch.zeros(1, 1, (3 - 1) * stride + 1, (3 - 1) * stride + 1)
    dilated[..., ::stride, ::stride] = y
    border = (3 - 1) - pad
    padded = F.pad(dilated, (border,) * 4)
    flipped = w.flip(-1, -2)
    direct = F.conv2d(padded, flipped)
    transposed = F.conv_transpose2d(y, w, stride=stride, padding=pad)
    assert torch.equal(direct, transposed)
    panels = [
        ("Y: 3x3 activations", y),
        (f"zeros between pixels (stride {stride})\nand padded by k-1-p = {border}", padded),
        ("kernel C (the forward filter)", w),
        ("kernel flipped", flipped),
        ("plain convolution of the two", direct),
        ("conv_transpose2d(Y, C): identical", transposed),
    ]
    fig = Figure(figsize=(15, 3.4))
    for i, (title, t) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        a = t[0, 0]
        ax.imshow(a, cmap="coolwarm", vmin=-a.abs().max() - 1e-9, vmax=a.abs().max() + 1e-9)
        for (r, c), v in zip(torch.cartesian_prod(torch.arange(a.shape[0]), torch.arange(a.shape[1])).tolist(), a.flatten()):
            ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=8 if a.shape[0] > 5 else 11)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("A transposed convolution (the deconvnet's reverse filter) is an ordinary convolution in disguise", fontsize=12)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.78, bottom=0.02, wspace=0.15)
    with atomic_open(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
