"""The model's own code is reversed by replaying what it ran (zfvis.core.program), not by running it.

A submodule fx cannot trace, or a leaf with hooks, runs once per forward pass; its ATen
calls are recorded then and replayed for its gradient. Each test is against the float64
oracle (``tests/oracle.py``, no zfvis code), on a module whose Python would answer
differently if the reverse pass ran it again (at another batch size, or a second time).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zfvis

from capture_contract import Query, check_projection


CALLS = [0]  # runs of _BatchShaped.forward (outside the model: the model must not change)


class _BatchShaped(nn.Module):
    """Untraceable (branches on a value); computes something else on a batch of one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS[0] += 1
        y = self.conv(x)
        if float(y.detach().sum()) > -1e30 and x.shape[0] == 1:
            y[:, :2] = F.relu(y[:, :2], inplace=False) * 2  # written in place, into its own tensor
            return F.relu(y)
        return torch.tanh(y)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.inner = _BatchShaped()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.inner(F.relu(self.conv1(x)))))


def _net(seed: int) -> _Net:
    torch.manual_seed(seed)
    return _Net().double().eval()


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
@pytest.mark.parametrize("seed", range(2))
def test_an_untraceable_submodule_is_reversed_as_it_ran(seed: int, rule: str) -> None:
    """Six seeds from one image: running the submodule again on the seeds (a batch of 6)
    would take its other branch; the replay of what ran on the one image does not."""
    model = _net(seed)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    outcome = check_projection(zfvis.Deconvnet(model), model, x, Query("conv2", seed % 5, top_k=6, rule=rule))
    assert outcome.status == "exact", outcome.message


def test_the_reverse_pass_never_runs_the_model_code() -> None:
    """After the capture check (cached per input key), each projection runs the submodule
    exactly once: in its forward pass."""
    model = _net(0)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    dn = zfvis.Deconvnet(model)
    dn.project(x, "conv2", 0, top_k=4)
    before = CALLS[0]
    dn.project(x, "conv2", 1, top_k=4)
    assert CALLS[0] - before == 1


class _Random(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.detach().sum()) > -1e30:  # untraceable
            return x * torch.rand_like(x)
        return x


def test_a_submodule_that_does_not_replay_is_refused_naming_it() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Random(), nn.ReLU(), nn.Conv2d(4, 2, 3)).double().eval()
    with pytest.raises(zfvis.ZfvisError, match=r"'1': it calls aten\.\w+.*, random in eval mode"):
        zfvis.Deconvnet(model).project(torch.rand(1, 3, 8, 8, dtype=torch.float64), "3", 0)


class _Blend(nn.Module):
    """Untraceable (branches on a value); rectifiers inside, a write into its own tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if float(y.detach().abs().sum()) > 0:
            y[:, 1:3] = F.silu(y[:, 1:3]) + F.relu(x[:, :2])
        return F.gelu(y) * torch.sigmoid(x)


class _Double(nn.Module):
    """Untraceable; doubles its input in place (or, as the oracle's twin, out of place)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.detach().sum()) > -1e30:
            return x.mul_(2.0) if self.inplace else x * 2.0
        return x


class _BlendNet(nn.Module):
    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.inner = _Blend()
        self.twice = _Double(inplace)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        y = self.inner(h)
        h = self.twice(h)  # writes into what the submodule read
        return self.conv2(F.relu(h + y))


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
@pytest.mark.parametrize("batch", [1, 2])
def test_later_passes_differentiate_the_graph_of_the_run(batch: int, rule: str) -> None:
    """Once a submodule reversed on its own has been replayed against its output for an input
    key, later passes run it with gradients on, under the rule, and differentiate the graph of
    that run: every later projection is still exact (several seeds per image, so the graph is
    differentiated once per seed, and the forward pass writes into the submodule's input after
    it ran), and reversing one recording twice gives the same."""
    torch.manual_seed(batch)
    model = (_net(batch) if batch == 1 else _BlendNet().double()).eval()
    ref = model if batch == 1 else _BlendNet(inplace=False).double().eval()
    ref.load_state_dict(model.state_dict())
    x = torch.rand(batch, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
    dn = zfvis.Deconvnet(model)
    for channel in range(3):  # the first pass records the calls; the later ones keep the graph
        outcome = check_projection(dn, model, x, Query("conv2", channel, top_k=3, rule=rule), ref=ref)
        assert outcome.status == "exact", outcome.message
    rec = dn.record(x, "conv2", rule=rule)
    assert getattr(rec.sites["inner"].state, "graph", None) is not None  # the path under test ran
    seeds = dn.select(rec, [0, 4], top_k=2)
    assert torch.equal(dn.reverse(rec, seeds).full(), dn.reverse(rec, seeds).full())


@pytest.mark.parametrize("made_inside", [False, True])
@pytest.mark.parametrize("model_name", ["untraceable submodule", "group norm"])
def test_a_projection_under_inference_mode_equals_one_outside(model_name: str, made_inside: bool) -> None:
    """zfvis's own autograd (a kept graph, a vector-Jacobian product) works when the caller
    runs under ``torch.inference_mode()``, also on images made there (inference tensors)."""
    torch.manual_seed(0)
    if model_name == "group norm":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.GELU(), nn.Conv2d(4, 5, 3)).double()
    else:
        model = _BlendNet().double()
    model.eval()
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dn = zfvis.Deconvnet(model)
    layer = "3" if model_name == "group norm" else "conv2"
    expected = [dn.project(x, layer, c, top_k=2) for c in range(2)]
    with torch.inference_mode():
        images = x.clone() if made_inside else x
        got = [dn.project(images, layer, c, top_k=2) for c in range(2)]
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
