"""One op table for both engines: the deconvnet and occlusion's incremental inference read
an op's geometry, its cone, its forward on windows, its folding and its cost from one entry.

- :mod:`zfvis.core.geometry` is checked against enumerating every kernel tap;
- a model written with functions (``F.conv2d``, ``F.max_pool2d``, ``F.avg_pool2d``,
  ``F.adaptive_avg_pool2d``) and activations without an explicit reverse (PReLU, Softplus,
  clamp, exp) is occluded incrementally, window by window, and exactly; before the table
  held occlusion's rules, only modules of three types had one;
- the same nodes are reversed on windows by the deconvnet, exactly;
- every op whose cone can be spatial has occlusion's rule, and batch norm folds into the
  convolution before it by its entry.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_projection
from test_engine import _rel_err
from test_occlusion import assert_matches, brute_force
from torch import nn

from zfvis import Deconvnet
from zfvis.analysis.incremental import PATCH, IncrementalOcclusion
from zfvis.analysis.occlusion import occluder_positions, occlusion
from zfvis.core.geometry import Axis
from zfvis.core.ops import OPS

# ----------------------------------------------------------------------------- geometry


def _taps(axis: Axis, o: int) -> list[int]:
    return [o * axis.s - axis.p + j * axis.d for j in range(axis.k)]


AXES = [Axis(k, s, p, d) for k, s, p, d in itertools.product((1, 2, 3), (1, 2, 3), (0, 1, 2), (1, 2))]


@pytest.mark.parametrize("axis", AXES, ids=str)
def test_geometry_equals_enumerating_the_taps(axis: Axis) -> None:
    """``reads``, ``reached`` and ``changed`` against the taps themselves, on every interval
    of a 9-wide map (borders, padding and dilation's skipped rows included)."""
    n_in = 9
    n_out = (n_in + 2 * axis.p - axis.extent) // axis.s + 1
    if n_out < 1:
        pytest.skip("the kernel does not fit this map")
    for a, b in itertools.combinations(range(n_out + 1), 2):
        taps = sorted({t for o in range(a, b) for t in _taps(axis, o)})
        assert axis.reads(a, b) == (taps[0], taps[-1] + 1)
        inside = [t for t in taps if 0 <= t < n_in]
        lo, hi = axis.reached(torch.tensor([a]), torch.tensor([b]), n_in)
        if inside:
            assert (int(lo), int(hi)) == (inside[0], inside[-1] + 1)
    for a, b in itertools.combinations(range(n_in + 1), 2):
        outs = [o for o in range(n_out) if any(a <= t < b for t in _taps(axis, o))]
        lo, hi = axis.changed(torch.tensor([a]), torch.tensor([b]), n_out)
        if outs and axis.d == 1:
            assert (int(lo), int(hi)) == (outs[0], outs[-1] + 1)
        elif outs:  # a bound: dilated taps may straddle the run
            assert int(lo) <= outs[0] and int(hi) >= outs[-1] + 1
        elif axis.d == 1:
            assert int(hi) <= int(lo)


# ----------------------------------------------------------------------------- a functional model


class Functional(nn.Module):
    """Convolutions and pools as functions, activations the table reverses by their gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.4)
        self.b1 = nn.Parameter(torch.randn(6) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 6, 3, 3) * 0.3)
        self.prelu = nn.PReLU(6, init=0.2)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.prelu(F.conv2d(x, self.w1, self.b1, padding=1))
        y = F.max_pool2d(y, 3, 2, 1)
        y = (F.softplus(y) - 0.5).clamp(-1.0, 2.0)
        y = F.conv2d(y, self.w2, None, 1, 2, 2)
        y = F.avg_pool2d(torch.exp(-y.abs()), 3, 1, 1, count_include_pad=False)
        return self.fc(F.adaptive_avg_pool2d(y, 2).flatten(1))


def _functional() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Functional().double().eval(), torch.randn(3, 24, 24, dtype=torch.float64)


def test_functional_ops_are_occluded_on_windows_and_exactly() -> None:
    model, x = _functional()
    res = occlusion(model, x, patch=5, stride=3, layer="prelu", channel=2)
    assert res.method == "incremental"
    assert_matches(res, *brute_force(model, x, (5, 5), (3, 3), torch.zeros(3, dtype=torch.float64), "prelu", 2))
    tops, lefts = occluder_positions(x.shape, 5, 3)
    grid = torch.cartesian_prod(tops, lefts)
    engine = IncrementalOcclusion(Deconvnet(model).graph, x, None, grid, (5, 5), torch.zeros(3, dtype=torch.float64))
    work = engine.work()
    windowed = {name for name, (mode, _) in work.items() if mode == PATCH}
    # every spatial function and every activation of one position, on windows
    for name in ("conv2d", "prelu", "max_pool2d", "softplus", "clamp", "conv2d_1", "exp", "avg_pool2d"):
        assert name in windowed, (name, work)


@pytest.mark.parametrize("layer", ["clamp", "avg_pool2d"])
def test_functional_ops_are_reversed_on_windows_and_exactly(layer: str) -> None:
    model, x = _functional()
    dn = Deconvnet(model)
    out = dn.output(x[None], layer)[0]
    c, y, x0 = (int(i) for i in torch.unravel_index(out.abs().argmax(), out.shape))
    for rule in ("deconvnet", "guided", "gradient"):
        got = dn.project(x[None], layer, c, position=(y, x0), rule=rule)[0]
        ref = oracle_projection(model, x[None], layer, (c, y, x0), rule)
        assert _rel_err(got, ref) < 1e-6, rule
    stack = repr(dn.reverse_stack(dn.record(x[None], layer)))
    assert "on windows" in stack and "on whole maps" not in stack


# ----------------------------------------------------------------------------- the entries


def test_every_op_that_can_slide_has_occlusion_rule_and_geometry() -> None:
    spatial = [op for op in OPS.values() if op.params is not None]
    assert {op.name for op in spatial} == {"conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d"}
    assert all(op.window is not None for op in spatial)
    assert OPS["batch_norm"].folds_into == "conv2d" and OPS["conv2d"].work is not None


def test_batch_norm_folds_into_the_convolution_by_its_entry() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double().eval()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    dn = Deconvnet(model)
    assert "folds BatchNorm2d '1'" in repr(dn.reverse_stack(dn.record(x, "2")))
    ref = oracle_projection(model, x, "2", (1, 3, 3), "deconvnet")
    assert _rel_err(dn.project(x, "2", 1, position=(3, 3))[0], ref) < 1e-6


def test_an_op_of_whole_maps_is_recomputed_whole() -> None:
    """A GroupNorm near the input, where the occluder's window is still small: its statistics
    span the whole map, so occlusion recomputes it whole (the table gives it no rule)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    x = torch.randn(3, 20, 20, dtype=torch.float64)
    res = occlusion(model, x, patch=3, stride=4, layer="3", channel=1)
    assert res.method == "incremental"
    assert_matches(res, *brute_force(model, x, (3, 3), (4, 4), torch.zeros(3, dtype=torch.float64), "3", 1))
    tops, lefts = occluder_positions(x.shape, 3, 4)
    engine = IncrementalOcclusion(Deconvnet(model).graph, x, None, torch.cartesian_prod(tops, lefts), (3, 3),
                                  torch.zeros(3, dtype=torch.float64))
    work = engine.work()
    assert work["0"][0] == PATCH and work["1"] == ("full", 1.0)
