"""How seeds are batched for the reverse pass, and the reverse layers' fast paths.

Seeds whose cones differ in size (a seed at a border, one in the middle) are reversed
in separate batches (:func:`zfvis.core.cone.group_seeds`), and the results come back in
the seeds' own order, equal to reversing each seed on its own. The transposed
convolutions run on channels-last signals with the border rows they would crop off left
uncomputed, and unpooling scatters into the region its pooling windows cover; the oracle
(``tests/oracle.py``) checks both on strided, dilated and overlapping layers.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from oracle import oracle_projection
from torch import nn

from zfvis import Deconvnet, Seeds
from zfvis.core.cone import StepCost, Window, group_seeds


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test of this module runs on one intra-op thread."""


def _cones(sizes: list[tuple[int, int]], map_size: tuple[int, int] = (64, 64)) -> Window:
    """A window whose seeds' cones have the given (height, width), at the map's corner."""
    h = torch.tensor([s[0] for s in sizes])
    w = torch.tensor([s[1] for s in sizes])
    z = torch.zeros_like(h)
    return Window((int(h.max()), int(w.max())), z, z, (z, z, h, w), map_size)


def test_alike_seeds_share_one_batch() -> None:
    steps = [StepCost(_cones([(10, 10)] * 5), 100.0, 8)]
    assert group_seeds(5, steps, overhead=1.0, max_elements=10**9, max_size=64) == [[0, 1, 2, 3, 4]]


def test_seeds_with_small_cones_are_not_batched_with_large_ones() -> None:
    sizes = [(4, 4), (40, 40), (4, 4), (40, 38), (4, 4)]
    steps = [StepCost(_cones(sizes), 100.0, 8)]
    groups = group_seeds(5, steps, overhead=10000.0, max_elements=10**9, max_size=64)
    assert sorted(map(sorted, groups)) == [[0, 2, 4], [1, 3]]
    assert groups[0] == [1, 3]  # the largest cones first
    # when a batch costs much to start, everything goes into one
    assert group_seeds(5, steps, overhead=1e9, max_elements=10**9, max_size=64) == [[0, 1, 2, 3, 4]]


def test_batches_respect_size_and_memory_limits() -> None:
    steps = [StepCost(_cones([(10, 10)] * 7), 100.0, 8)]  # 800 elements a seed
    assert [len(g) for g in group_seeds(7, steps, overhead=1e9, max_elements=10**9, max_size=3)] == [3, 3, 1]
    assert [len(g) for g in group_seeds(7, steps, overhead=1e9, max_elements=2000, max_size=64)] == [2, 2, 2, 1]
    # a seed larger than the limit on its own still gets a batch
    two = [StepCost(_cones([(10, 10)] * 2), 100.0, 8)]
    assert group_seeds(2, two, overhead=1e9, max_elements=10, max_size=64) == [[0], [1]]
    assert group_seeds(3, [], overhead=1.0, max_elements=10, max_size=2) == [[0, 1], [2]]


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval().double()


def test_batched_reverse_equals_each_seed_alone_in_the_seeds_order() -> None:
    model = _resnet()
    x = torch.randn(1, 3, 128, 128, dtype=torch.float64)
    dn = Deconvnet(model)
    rec = dn.record(x, "layer3")
    out = rec.output
    h, w = out.shape[-2:]
    # corners (small cones, clipped) interleaved with central positions (large cones)
    pos = [(0, 0), (h // 2, w // 2), (h - 1, w - 1), (h // 2 - 1, w // 2), (0, w - 1), (h // 2, w // 2 + 1)]
    ch = torch.tensor([3, 5, 3, 7, 1, 2])
    ys, xs = torch.tensor([p[0] for p in pos]), torch.tensor([p[1] for p in pos])
    zero = torch.zeros_like(ys)
    seeds = Seeds(zero, ch, ys, xs, out[0, ch, ys, xs])
    batches = dn._batches(rec, dn.reverse_stack(rec), seeds)
    assert len(batches) > 1, batches  # the corners are not batched with the centre
    assert sorted(i for b in batches for i in b) == list(range(len(seeds)))
    together = dn.reverse(rec, seeds)
    alone = [dn.reverse(rec, seeds[i : i + 1]) for i in range(len(seeds))]
    full = together.full()
    for i, a in enumerate(alone):
        assert torch.equal(together.box[i], a.box[0])
        assert torch.allclose(full[i], a.full()[0], rtol=0, atol=1e-12 * float(a.full().abs().max()))
    # a shuffled order of the same seeds gives the same projections, shuffled
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    shuffled = dn.reverse(rec, seeds[perm]).full()
    assert torch.allclose(shuffled, full[perm], rtol=0, atol=1e-12 * float(full.abs().max()))


class _Pools(nn.Module):
    """Strided, dilated and overlapping convolutions and max-pools, ceil mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 5, stride=2, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1, dilation=2),
            nn.Conv2d(6, 8, 3, padding=2, dilation=2), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            nn.Conv2d(8, 8, 1, stride=2), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
def test_dilated_and_overlapping_pools_match_the_oracle(rule: str) -> None:
    torch.manual_seed(1)
    model = _Pools().eval().double()
    x = torch.randn(1, 3, 45, 39, dtype=torch.float64)
    dn = Deconvnet(model, rule=rule)
    for layer in ["body.2", "body.5", "body.7"]:
        out = dn.record(x, layer).output
        h, w = out.shape[-2:]
        for y, xx in [(0, 0), (h - 1, w - 1), (h // 2, w // 3)]:
            c = int(out[0, :, y, xx].argmax())
            got = dn.project(x, layer, c, position=(y, xx))[0]
            ref = oracle_projection(model, x, layer, (c, y, xx), rule)
            assert ref.abs().max() > 0
            assert (got - ref).abs().max() <= 1e-10 * ref.abs().max(), (layer, y, xx)
