#!/usr/bin/env python
"""Draws the two figures of docs/explanation/transposed-convolution.md ("Why a transposed convolution").

- ``why.png``: a transposed convolution is a plain convolution of the signal with
  (stride - 1) zeros inserted between its pixels, padded by d*(k-1) - p, kernel flipped.
- ``why_matrix.png``: the vectorised form. A small convolution (5x5 input, 3x3 kernel,
  stride 2, padding 1) written as its matrix C (the Jacobian of the forward convolution),
  its rows c_i drawn as input-sized patches, and Cᵀy = Σ y_i c_i beside zfvis's own
  reverse of the same activations y (``Deconvnet.project(..., position="all")``).

    python scripts/make_why_figure.py [OUT_DIR]        # default: docs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import zfvis  # noqa: E402
from zfvis.io.atomic import atomic_open  # noqa: E402

CMAP = "coolwarm"


def _save(fig: Figure, out: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_open(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, facecolor="white")
    print(f"wrote {out}")


def _cells(ax: Axes, a: torch.Tensor, *, vmax: float | None = None, fontsize: float = 11,
           blank_zeros: bool = False, title: str = "") -> None:
    """Draws a 2-D tensor as coloured cells with its values written in them."""
    vmax = float(a.abs().max()) + 1e-9 if vmax is None else vmax
    ax.imshow(a.numpy(), cmap=CMAP, vmin=-vmax, vmax=vmax)
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            v = float(a[r, c])
            if blank_zeros and v == 0:
                continue
            dark = abs(v) > 0.7 * vmax  # the darkest reds and blues of the colour map: white text
            ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=11)


def why_transposed(out: Path) -> None:
    """docs/why.png: a transposed convolution is a convolution of the zero-inserted padded signal."""
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
    if not torch.equal(direct, transposed):
        raise SystemExit("the identity does not hold: check torch")
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
        _cells(ax, t[0, 0], fontsize=8 if t.shape[-1] > 5 else 11)
        ax.set_title(title, fontsize=10)
    fig.suptitle("A transposed convolution (the deconvnet's reverse filter) is an ordinary convolution in disguise",
                 fontsize=12)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.78, bottom=0.02, wspace=0.15)
    _save(fig, out)


def tiny_convolution() -> tuple[nn.Conv2d, torch.Tensor]:
    """The worked example: one 3x3 filter with small integer weights, stride 2, padding 1, on a 5x5 input."""
    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 2.0, 0.0], [-1.0, 1.0, 2.0], [0.0, -2.0, 1.0]]]]))
    x = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 0, 0, 1], [1, 1, 0, 1, 1], [0, 0, 1, 1, 0], [1, 0, 0, 1, 0]],
                     dtype=torch.float64).reshape(1, 1, 5, 5)
    return conv, x


def conv_matrix(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """C, (outputs, inputs): the Jacobian of the forward convolution (no bias here, so y = C x)."""
    jac = torch.autograd.functional.jacobian(lambda t: conv(t), x)
    n_out = jac[0, ..., 0, 0, 0, 0].numel()
    return jac.reshape(n_out, x.numel())


def why_matrix(out: Path) -> None:
    """docs/why_matrix.png: C, its rows as patches, and Cᵀy beside zfvis's reverse of y."""
    conv, x = tiny_convolution()
    c = conv_matrix(conv, x)  # (9, 25)
    with torch.no_grad():
        y = conv(x)[0, 0]  # (3, 3)
    ct_y = (c.T @ y.reshape(-1)).reshape(5, 5)
    dn = zfvis.Deconvnet(nn.Sequential(conv))
    ours = dn.project(x, "0", channel=0, position="all")[0, 0].detach()
    if not torch.allclose(ours, ct_y, atol=1e-9):
        raise SystemExit(f"zfvis's reverse differs from C^T y:\n{ours}\n{ct_y}")
    if not torch.allclose(c @ x.reshape(-1), y.reshape(-1)):
        raise SystemExit("C x is not the convolution")

    fig = Figure(figsize=(14.5, 10.6))
    fig.suptitle("The deconvnet's reverse convolution is Cᵀ: it adds up the rows of the convolution matrix, "
                 "each weighted by its activation", fontsize=13, fontweight="bold", y=0.985)
    vmax = float(c.abs().max())

    # top: the kernel and the matrix C
    ax = fig.add_axes((0.03, 0.62, 0.13, 0.24))
    _cells(ax, conv.weight[0, 0].detach(), vmax=vmax, title="the 3x3 filter\n(stride 2, padding 1)")
    ax = fig.add_axes((0.22, 0.60, 0.76, 0.30))
    _cells(ax, c, vmax=vmax, fontsize=9, blank_zeros=True)
    ax.set_title("C: 9 activations x 25 input pixels (the Jacobian of the convolution; blank = 0).  "
                 "Row i holds the filter where activation i looks:  y_i = c_i · x", fontsize=11)
    ax.set_yticks(range(9), [f"c_({i // 3},{i % 3})" for i in range(9)], fontsize=9)
    ax.set_xticks([5 * r + 2 for r in range(5)], [f"input row {r}" for r in range(5)], fontsize=9)
    ax.tick_params(length=0)
    for k in range(1, 5):  # input rows of 5 pixels
        ax.axvline(5 * k - 0.5, color="#888888", linewidth=0.8)

    # middle: every row reshaped to the input's 5x5, with its activation
    fig.text(0.5, 0.535, "each row c_i reshaped to the input's 5x5: the filter placed at activation i's window "
             "(cut where the window covers the padding), and the activation y_i = c_i · x",
             ha="center", fontsize=11)
    for i in range(9):
        ax = fig.add_axes((0.03 + i * 0.106, 0.36, 0.09, 0.15))
        _cells(ax, c[i].reshape(5, 5), vmax=vmax, fontsize=8, blank_zeros=True)
        ax.set_title(f"c_({i // 3},{i % 3}),  y = {float(y.reshape(-1)[i]):.0f}", fontsize=10)

    terms = " + ".join(f"{float(v):.0f}·c_({i // 3},{i % 3})" for i, v in enumerate(y.reshape(-1)))
    fig.text(0.5, 0.305, f"Cᵀ y  =  {terms.replace('+ -', '− ')}", ha="center", fontsize=11.5)

    # bottom: x, y, C^T y and zfvis
    bottom = [
        ("input x (5x5)", x[0, 0], None),
        ("y = C x  (3x3 activations)", y, None),
        ("Cᵀ y = Σ_i y_i c_i", ct_y, None),
        ("zfvis: Deconvnet(conv).project(x,\nchannel=0, position=\"all\")  (identical)", ours, None),
    ]
    vmax_b = float(ct_y.abs().max())
    for k, (title, t, _) in enumerate(bottom):
        ax = fig.add_axes((0.05 + k * 0.24, 0.015, 0.17, 0.24))
        _cells(ax, t, vmax=vmax_b if k >= 2 else float(t.abs().max()) + 1e-9, fontsize=11, title=title)
    for k, sign in enumerate(("→  C  →", "→  Cᵀ  →", "=")):
        fig.text(0.05 + k * 0.24 + 0.205, 0.135, sign, ha="center", va="center", fontsize=15, fontweight="bold")
    _save(fig, out)


def get_args_parser() -> argparse.ArgumentParser:
    """The script's options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", default="docs", metavar="OUT_DIR",
                   help="folder to write why.png and why_matrix.png to (default docs)")
    return p


def main(out_dir: str = "docs") -> int:
    """Draws both figures into ``out_dir``; returns the exit status."""
    folder = Path(out_dir)
    if not folder.is_dir():
        print(f"make_why_figure.py: error: '{folder}' is not a folder; pass an existing OUT_DIR", file=sys.stderr)
        return 2
    why_transposed(folder / "why.png")
    why_matrix(folder / "why_matrix.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args().out_dir))
