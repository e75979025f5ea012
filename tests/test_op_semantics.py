"""Ops of the table that no other test pins down, each against the oracle, a count or a refusal.

Written to kill the mutants of ``scripts/mutants.py`` that survived the rest of the suite:
``alpha`` of addition and subtraction, negation, indexing a map's rows, concatenation of
inputs of different sizes, ``F.batch_norm``'s eps, a residual block's windows, unpooling on
windows that start below the first row, ``F.hardtanh`` other than ReLU6, floor division, an
in-place call on a tensor that a view at an offset still shares, and occlusion's changed
region behind a strided convolution, transposes (a channel shuffle on windows, others by
their vector-Jacobian product). Projections are compared in float64 with the autograd
oracle (``tests/oracle.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import RULES, oracle_projection
from test_engine import _rel_err
from test_every_cnn import _assert_exact, _ready
from test_occlusion import conv_work, ready
from torch import nn

from zfvis import Deconvnet, UnsupportedModelError

RTOL = 1e-6


class _Two(nn.Module):
    """Two maps of the image combined by the operation under test, then a convolution."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(6 if how == "cat_width" else 4, 4, 3, padding=1)
        self.head_row = nn.Conv2d(1, 4, 3, padding=1)
        self.register_buffer("mean", torch.linspace(-0.2, 0.3, 4))
        self.register_buffer("var", torch.linspace(0.5, 1.5, 4))
        self.register_buffer("gamma", torch.linspace(0.5, 2.0, 4))
        self.register_buffer("beta", torch.linspace(-1.0, 1.0, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.conv1(x)), self.conv2(x)
        if self.how == "getitem_row":  # a map with as many channels as rows (4 x 4): row 1 of each channel
            return self.head_row(a[:, :, 1].unsqueeze(1))
        z = {
            "add_alpha": lambda: torch.add(a, b, alpha=2.5),
            "sub_alpha": lambda: torch.sub(a, b, alpha=0.5),
            "method_alpha": lambda: a.sub(b, alpha=-3.0),
            "neg": lambda: -a + 0.25 * b,
            # eval statistics, eps given positionally (torch.fx records it as a keyword)
            "batch_norm": lambda: F.batch_norm(a - b, self.mean, self.var, self.gamma, self.beta, False, 0.1, 0.05),
            "getitem_slice": lambda: a[:, :, 1:, :5] + b[:, :, :7, 3:],
            "cat_channels": lambda: torch.cat([a[:, :1], b[:, 1:]], dim=1),  # live inputs of 1 and 3 channels
            "cat_width": lambda: torch.cat([a, b[:, :2]], dim=1),
            "residual": lambda: a + self.conv3(a),  # a's window holds both readers' cones
        }[self.how]()
        return self.head(z)


#: Each case's input size (a map of 4 rows for the row index, which must equal the channels).
CASES = {"add_alpha": 8, "sub_alpha": 8, "method_alpha": 8, "neg": 8, "batch_norm": 8, "getitem_row": 4,
         "getitem_slice": 8, "cat_channels": 8, "cat_width": 8, "residual": 12}


@pytest.mark.parametrize("how", list(CASES))
def test_arithmetic_matches_the_oracle(how: str) -> None:
    model = _ready(_Two(how), seed=11)
    x = torch.randn(1, 3, CASES[how], CASES[how], dtype=torch.float64)
    layer = "head_row" if how == "getitem_row" else "head"
    dn = Deconvnet(model)
    _assert_exact(model, x, layer, dn=dn)
    # every seed of two channels, on windows and on whole maps
    k = min(16, CASES[how] ** 2)
    want = Deconvnet(model, windowed=False).project(x, layer, [0, 3], top_k=k)
    assert _rel_err(dn.project(x, layer, [0, 3], top_k=k), want) < 1e-12


class _Shuffle(nn.Module):
    """A map's channels regrouped by a transpose (ShuffleNet's channel shuffle), or a transpose
    that moves a map dimension, between two convolutions."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv1(x))
        n, c, h, w = a.shape
        if self.how in ("rows and columns", "channels and rows"):
            dims = (2, 3) if self.how == "rows and columns" else (1, 2)
            return self.conv2(F.relu(a.transpose(*dims).contiguous()))
        g = a.view(n, 2, c // 2, h, w)
        g = {"method": lambda: g.transpose(1, 2), "function": lambda: torch.transpose(g, 1, 2),
             "negative dims": lambda: g.transpose(-3, -4), "swapaxes": lambda: torch.swapaxes(g, 2, 1)}[self.how]()
        return self.conv2(g.contiguous().view(n, c, h, w))


#: Each transpose, and whether it swaps dimensions between the batch and the map (on windows).
SHUFFLES = {"method": True, "function": True, "negative dims": True, "swapaxes": True, "rows and columns": False,
            "channels and rows": False}


@pytest.mark.parametrize("how", list(SHUFFLES))
def test_transpose_matches_the_oracle_on_windows_where_it_keeps_the_map(how: str) -> None:
    model = _ready(_Shuffle(how), seed=5)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    dn = Deconvnet(model)
    _assert_exact(model, x, "conv2", dn=dn)
    want = Deconvnet(model, windowed=False).project(x, "conv2", [0, 3], top_k=12)
    assert _rel_err(dn.project(x, "conv2", [0, 3], top_k=12), want) < 1e-12
    kinds = {type(s.layer).__name__ for s in dn.reverse_stack(dn.record(x, "conv2")).steps}
    assert ("Transposed" in kinds) is SHUFFLES[how] and ("VectorJacobian" in kinds) is not SHUFFLES[how]


class _TallPool(nn.Module):
    """Max-pooling of a tall, narrow map: a window of its output spans the whole width but
    starts below the first row."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))


def test_unpooling_on_windows_below_the_first_row_matches_the_oracle() -> None:
    model = _ready(_TallPool(), seed=4)
    x = torch.randn(1, 3, 24, 4, dtype=torch.float64)
    dn = Deconvnet(model)
    for y in (0, 5, 11):
        for rule in RULES:
            got = dn.project(x, "conv2", 1, position=(y, 1), rule=rule)[0]
            assert _rel_err(got, oracle_projection(model, x, "conv2", (1, y, 1), rule)) < RTOL, (y, rule)
    want = Deconvnet(model, windowed=False).project(x, "conv2", [0, 1], top_k=24)
    assert _rel_err(dn.project(x, "conv2", [0, 1], top_k=24), want) < 1e-12


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
        elif self.how == "hardtanh_cap_1":
            y = F.hardtanh(y, 0.0, 1.0)  # a ReLU capped at 1, not 6
        elif self.how == "hardtanh_relu6":
            y = F.hardtanh(y, 0.0, 6.0)
        elif self.how == "floordiv":
            y = y // 2
        return self.conv2(y)


def test_hardtanh_is_refused_unless_it_is_relu6() -> None:
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match=r"hardtanh\(-1.0, 1.0\) is not supported"):
        Deconvnet(_ready(_After("hardtanh_default"))).project(x, "conv2", 0)
    with pytest.raises(UnsupportedModelError, match=r"hardtanh\(0.0, 1.0\) is not supported"):
        Deconvnet(_ready(_After("hardtanh_cap_1"))).project(x, "conv2", 0)
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


# --------------------------------------------------------------------------- occlusion


def test_incremental_occlusion_recomputes_exactly_the_strided_cone() -> None:
    """Counted, not timed: a 4x4 occluder at row t changes the outputs ceil((t - 1) / 2) to
    floor((t + 4) / 2) of a 3x3 convolution with stride 2 and padding 1: 3 rows (and
    columns) wherever it stands, which is all the incremental pass recomputes there."""
    model = ready(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                                nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 5)))
    x = torch.randn(3, 23, 21, dtype=torch.float64)
    full, ref = conv_work(model, x, "full", 4, 3)
    inc, res = conv_work(model, x, "incremental", 4, 3)
    assert res.method == "incremental" and ref.shape == (7, 6)
    torch.testing.assert_close(res.class_prob, ref.class_prob, rtol=0, atol=1e-10)
    assert inc[0] == 7 * 6 * 4 * 3 * 3
    assert full[0] == 7 * 6 * 4 * 12 * 11
