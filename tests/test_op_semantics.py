"""Ops of the table that no other test pins down, each against the oracle or a refusal.

Written to kill the mutants of ``scripts/mutants.py`` that survived the rest of the suite:
``alpha`` of addition and subtraction, negation, indexing a map's rows, ``F.batch_norm``'s
positional eps, ``F.hardtanh``'s default limits, floor division, and an in-place call on a
tensor that a view at an offset still shares. Projections are compared in float64 with
the autograd oracle (``tests/oracle.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import RULES
from test_engine import _rel_err
from test_every_cnn import _assert_exact, _ready
from torch import nn

from zfvis import Deconvnet, UnsupportedModelError


class _Two(nn.Module):
    """Two maps of the image combined by the operation under test, then a convolution."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_row = nn.Conv2d(1, 4, 3, padding=1)
        self.register_buffer("mean", torch.linspace(-0.2, 0.3, 4))
        self.register_buffer("var", torch.linspace(0.5, 1.5, 4))
        self.register_buffer("gamma", torch.linspace(0.5, 2.0, 4))
        self.register_buffer("beta", torch.linspace(-1.0, 1.0, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.conv1(x)), self.conv2(x)
        if self.how == "add_alpha":
            return self.conv3(torch.add(a, b, alpha=2.5))
        if self.how == "sub_alpha":
            return self.conv3(torch.sub(a, b, alpha=0.5))
        if self.how == "method_alpha":
            return self.conv3(a.sub(b, alpha=-3.0))
        if self.how == "neg":
            return self.conv3(-a + 0.25 * b)
        if self.how == "batch_norm":  # eval statistics, eps given positionally (7th argument)
            return self.conv3(F.batch_norm(a - b, self.mean, self.var, self.gamma, self.beta, False, 0.1, 0.05))
        if self.how == "getitem_row":  # a map with as many channels as rows (4 x 4): row 1 of each channel
            return self.conv_row(a[:, :, 1].unsqueeze(1))
        if self.how == "getitem_slice":
            return self.conv3(a[:, :, 1:, :3] + b[:, :, :3, 1:])
        raise ValueError(self.how)


CASES = ["add_alpha", "sub_alpha", "method_alpha", "neg", "batch_norm", "getitem_row", "getitem_slice"]


@pytest.mark.parametrize("how", CASES)
def test_arithmetic_matches_the_oracle(how: str) -> None:
    model = _ready(_Two(how), seed=11)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    layer = "conv_row" if how == "getitem_row" else "conv3"
    dn = Deconvnet(model)
    _assert_exact(model, x, layer, dn=dn)
    # every seed of a channel, on windows and on whole maps
    want = Deconvnet(model, windowed=False).project(x, layer, [0, 3], top_k=4)
    assert _rel_err(dn.project(x, layer, [0, 3], top_k=4), want) < 1e-12


# --------------------------------------------------------------------------- refusals


class _After(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if self.how == "hardtanh_default":
            y = F.hardtanh(y)  # limits -1 and 1: not a rectifier zfvis knows
        elif self.how == "hardtanh_relu6":
            y = F.hardtanh(y, 0.0, 6.0)
        elif self.how == "floordiv":
            y = y // 2
        return self.conv2(y)


def test_hardtanh_is_refused_unless_it_is_relu6() -> None:
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match=r"hardtanh\(-1.0, 1.0\) is not supported"):
        Deconvnet(_ready(_After("hardtanh_default"))).project(x, "conv2", 0)
    _assert_exact(_ready(_After("hardtanh_relu6")), 4 * x, "conv2")


def test_floordiv_is_refused_as_rounding() -> None:
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match=r"node 'floordiv' .*rounding is flat"):
        Deconvnet(_ready(_After("floordiv"))).project(x, "conv2", 0)


class _ViewAtOffset(nn.Module):
    """A view of the channels 2: (it starts past the tensor's first element) read after an
    in-place call on the whole tensor: it sees the call's result, which the deconvnet's
    versions cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        v = a[:, 2:]
        a.relu_()
        return self.conv2(torch.cat([v, a], dim=1))


def test_in_place_write_under_a_view_at_an_offset_is_refused() -> None:
    model = _ready(_ViewAtOffset())
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="overwrites in place memory that .* shares"):
        Deconvnet(model).project(x, "conv2", 0, rule=RULES[0])
