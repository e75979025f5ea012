"""zfvis's reverse convolution is Cᵀ, with C the forward convolution's matrix (its Jacobian).

A convolution is a linear map y = C x + b. Row c_i of C holds the weights with which
activation i sees the input, so the input that drives a set of activations y most is
x' = Σ_i y_i c_i = Cᵀ y: the deconvnet's reverse step. These tests build C from the
forward convolution alone (``torch.autograd.functional.jacobian``: nothing of zfvis) and
check, through the public engine on ``nn.Sequential(conv)`` (no ReLU, so the reverse
pass is linear), that

- projecting the single activation (c, i, j) gives y[c, i, j] · row (c, i, j) of C, for
  every channel and position: each row of Cᵀ;
- projecting channel c's whole map gives Cᵀ applied to that map (zero elsewhere);

across strides, paddings, dilations, groups and rectangular kernels. The bias is large
so that no activation is near zero (a zero seed would test nothing) and it must not
enter the reverse pass. A last test puts a wrong reverse convolution in the place of
zfvis's own (kernel flipped, padding cropped on the wrong side, bias added, groups
swapped) and checks that these comparisons fail (and that a faithful copy passes).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zfvis
from zfvis.core import reverse as deconv

# (in, out, kernel, stride, padding, dilation, groups, input H, W)
CASES = {
    "plain 3x3": (1, 2, 3, 1, 0, 1, 1, 6, 7),
    "stride 2, pad 1": (2, 3, 3, 2, 1, 1, 1, 7, 8),
    "dilation 2, pad 2": (2, 2, 3, 1, 2, 2, 1, 7, 6),
    "groups 2, stride 2": (4, 6, 3, 2, 1, 1, 2, 8, 7),
    "depthwise, stride 3 > kernel 2": (3, 3, 2, 3, 0, 1, 3, 8, 9),
    "rectangular everything": (2, 4, (3, 2), (2, 1), (1, 0), (1, 2), 2, 7, 8),
    "5x5 stride 2 pad 2 (ZF conv2-like)": (3, 2, 5, 2, 2, 1, 1, 9, 9),
}


def _conv(case: tuple, seed: int) -> tuple[nn.Conv2d, torch.Tensor]:
    cin, cout, k, stride, pad, dil, groups, h, w = case
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
        conv.bias.copy_(20.0 + torch.rand(cout, generator=gen, dtype=torch.float64))  # values far from 0
    x = torch.rand(1, cin, h, w, generator=gen, dtype=torch.float64) * 0.2
    return conv, x


def conv_matrix(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """C: the Jacobian of the forward convolution at ``x``, (C_out·H_out·W_out, C_in·H·W)."""
    jac = torch.autograd.functional.jacobian(lambda t: conv(t), x)  # (1, Co, Ho, Wo, 1, Ci, H, W)
    out, inp = jac.shape[1:4], jac.shape[5:]
    return jac.reshape(int(torch.tensor(out).prod()), int(torch.tensor(inp).prod()))


Reverse = Callable[[torch.Tensor, int, tuple[int, int] | str], torch.Tensor]


def _mismatches(reverse: Reverse, conv: nn.Conv2d, x: torch.Tensor, *, first: bool = False) -> list[str]:
    """Where ``reverse(x, channel, position)`` differs from the rows of Cᵀ (empty: it is Cᵀ);
    with ``first``, only the first place found."""
    matrix = conv_matrix(conv, x)
    with torch.no_grad():
        y = conv(x)[0]  # (Co, Ho, Wo), the seeds' values
    co, ho, wo = y.shape
    bad = []
    for c in range(co):
        for i in range(ho):
            for j in range(wo):
                row = matrix[(c * ho + i) * wo + j].reshape(x.shape[1:])
                got = reverse(x, c, (i, j))[0]
                if not torch.allclose(got, y[c, i, j] * row, rtol=1e-10, atol=1e-10):
                    bad.append(f"channel {c} at ({i}, {j})")
                    if first:
                        return bad
        mask = torch.zeros_like(y)
        mask[c] = y[c]
        want = (matrix.T @ mask.reshape(-1)).reshape(x.shape[1:])  # Cᵀ (map of channel c)
        if not torch.allclose(reverse(x, c, "all")[0], want, rtol=1e-10, atol=1e-10):
            bad.append(f"channel {c}, whole map")
    return bad


def _zfvis_reverse(conv: nn.Conv2d) -> Reverse:
    dn = zfvis.Deconvnet(nn.Sequential(conv))
    return lambda x, channel, position: dn.project(x, "0", channel=channel, position=position)


@pytest.mark.parametrize("name", sorted(CASES))
def test_zfvis_reverse_convolution_is_conv_matrix_transposed(name: str) -> None:
    conv, x = _conv(CASES[name], seed=len(name))
    assert conv_matrix(conv, x).abs().sum() > 0
    assert _mismatches(_zfvis_reverse(conv), conv, x) == []


def test_conv_matrix_rows_are_the_filters() -> None:
    """Row (c, i, j) of C is filter c placed at the window of (i, j): C x + b is the convolution."""
    conv, x = _conv(CASES["stride 2, pad 1"], seed=0)
    matrix = conv_matrix(conv, x)
    with torch.no_grad():
        y = conv(x)[0]
    assert torch.allclose(matrix @ x.reshape(-1) + conv.bias.repeat_interleave(y[0].numel()), y.reshape(-1))
    padded = F.pad(torch.zeros(1, 2, 7, 8, dtype=torch.float64), (1, 1, 1, 1))
    padded[0, :, 2 * 1 : 2 * 1 + 3, 2 * 2 : 2 * 2 + 3] = conv.weight[2]  # filter 2 at output (1, 2)
    row = matrix[(2 * y.shape[1] + 1) * y.shape[2] + 2].reshape(2, 7, 8)
    assert torch.equal(row, padded[0, :, 1:-1, 1:-1])


class _Mutant:
    """zfvis's own reverse convolution (:meth:`zfvis.core.reverse.ReverseConv2d.reverse`) with
    one classic mistake, put in its place for one test: the comparison must catch it."""

    KINDS = ("kernel flipped", "padding cropped at the wrong side", "bias added", "groups swapped")
    FAITHFUL = "none: a faithful copy"  # the harness itself changes nothing

    def __init__(self, kind: str, bias: torch.Tensor) -> None:
        self.kind, self.bias = kind, bias

    def weight(self, layer: deconv.ReverseConv2d) -> torch.Tensor:
        w = layer.weight
        if self.kind == "kernel flipped":
            return w.flip(-1, -2)
        if self.kind == "groups swapped":
            g = layer.groups
            return w.reshape(g, w.shape[0] // g, *w.shape[1:]).flip(0).reshape(w.shape)
        return w

    def reverse_of(self, layer: deconv.ReverseConv2d, signal: torch.Tensor, frame: object) -> list[torch.Tensor]:
        """The mutant's ``reverse`` of ``layer`` (it stands in for the method)."""
        full = F.conv_transpose2d(signal, self.weight(layer), None, layer.stride, 0, 0, layer.groups, layer.dilation)
        out_win, in_win = frame.out_win, frame.in_wins[0]  # type: ignore[attr-defined]
        pad = (0, 0) if self.kind == "padding cropped at the wrong side" else layer._pre_pad
        shift_y = in_win.top - (out_win.top * layer.stride[0] - pad[0])
        shift_x = in_win.left - (out_win.left * layer.stride[1] - pad[1])
        out = deconv.crop_windows(full, None, shift_y, shift_x, *in_win.size)
        return [out + self.bias.mean() if self.kind == "bias added" else out]


#: (case, mutant): every mistake on every case it can happen in (groups swap only where
#: there are several groups)
MUTANT_CASES = [
    (name, kind)
    for name in ["stride 2, pad 1", "groups 2, stride 2", "rectangular everything"]
    for kind in [*_Mutant.KINDS, _Mutant.FAITHFUL]
    if kind != "groups swapped" or CASES[name][6] > 1
]


@pytest.mark.parametrize(("name", "kind"), MUTANT_CASES)
def test_the_comparison_fails_when_zfvis_reverse_convolution_is_wrong(
    name: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv, x = _conv(CASES[name], seed=1)
    mutant = _Mutant(kind, conv.bias.detach())

    def reverse(layer: deconv.ReverseConv2d, signal: torch.Tensor, frame: object) -> list[torch.Tensor]:
        return mutant.reverse_of(layer, signal, frame)

    monkeypatch.setattr(deconv.ReverseConv2d, "reverse", reverse)
    bad = _mismatches(_zfvis_reverse(conv), conv, x, first=True)
    if kind == _Mutant.FAITHFUL:
        assert bad == []  # so each failure below comes from its one mistake
    else:
        assert bad, f"zfvis with its reverse convolution's {kind} passed"
