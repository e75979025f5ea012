"""The fast paths of the reverse pass equal what they replace, in float64.

Each path (a 1x1 transposed convolution as a matrix product, a dense transposed convolution
without windows, a BatchNorm scale folded into the weight, block averages transposed without
autograd, a node that returns its input passed through, a sigmoid's derivative from its
output, recorded inputs copied only before a write, signals summed and rectified in place
where the pass owns them, one seed's windows planned in Python numbers) is compared with the
plain computation or with the autograd oracle (``tests/oracle.py``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from oracle import RULES, oracle_projection
from test_engine import _rel_err
from torch import nn

from zfvis import Deconvnet
from zfvis.core import cone
from zfvis.core.cone import Window
from zfvis.core.ops.grad import IDENTITY, derivative
from zfvis.core.reverse import Frame, PassThrough, ReverseConv2d
from zfvis.core.reverse_average import AverageUnpool
from zfvis.core.reverse_grad import WholeBatchVectorJacobian

RTOL = 1e-6

# (in channels, out channels, kernel, stride, padding, dilation, groups, input size)
CONVS = {
    "1x1 (matrix product)": (6, 10, 1, 1, 0, 1, 1, 9),
    "depthwise 3x3": (8, 8, 3, 1, 1, 1, 8, 9),
    "depthwise 5x5 stride 2": (8, 8, 5, 2, 2, 1, 8, 11),
    "depthwise 3x3 stride 2 even": (6, 6, 3, 2, 1, 1, 6, 10),
    "2x2 stride 2 odd input": (4, 5, 2, 2, 0, 1, 1, 9),
    "1x1 stride 2": (4, 6, 1, 2, 0, 1, 1, 9),
    "grouped dilated": (6, 4, 3, 1, 2, 2, 2, 10),
}


def _conv_vjp(conv: nn.Conv2d, x: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """The transposed convolution of ``signal``, by autograd on the forward convolution."""
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.conv2d(leaf, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                                           conv.groups), leaf, signal)
    return grad


def _full(b: int, size: tuple[int, int]) -> Window:
    return Window.whole(b, size, torch.device("cpu"))


def _reverse_conv(conv: nn.Conv2d) -> ReverseConv2d:
    return ReverseConv2d(conv.weight, "conv", stride=conv.stride, dilation=conv.dilation, groups=conv.groups,
                         pre_pad=conv.padding)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(CONVS))
def test_dense_reverse_convolution_equals_the_transposed_convolution(name: str) -> None:
    c_in, c_out, k, s, p, d, g, n = CONVS[name]
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, s, p, d, g, bias=False).double()
    x = torch.randn(3, c_in, n, n, dtype=torch.float64)
    out_size = tuple(F.conv2d(x, conv.weight, None, s, p, d, g).shape[2:])
    signal = torch.randn(3, c_out, *out_size, dtype=torch.float64)
    layer = _reverse_conv(conv)
    frame = Frame(_full(3, out_size), [_full(3, (n, n))], [(c_in, n, n)], (c_out, *out_size), torch.zeros(3))
    with torch.no_grad():
        (got,) = layer(signal, frame)
    assert _rel_err(got, _conv_vjp(conv, x, signal)) < 1e-12
    # and on windows: each seed's window of the transposed convolution of its window
    dn_model = nn.Sequential(conv).eval()
    dn = Deconvnet(dn_model)
    for y0 in (0, out_size[0] // 2, out_size[0] - 1):
        got = dn.project(x[:1], "0", channel=1, position=(y0, out_size[1] - 1))[0]
        ref = oracle_projection(dn_model, x[:1], "0", (1, y0, out_size[1] - 1), "deconvnet")
        assert _rel_err(got, ref) < RTOL


def test_folded_batch_norm_scales_the_weight_as_it_scaled_the_signal() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=False).double()
    bn = nn.BatchNorm2d(7).double().eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(-2.0, 2.0)
    layer = _reverse_conv(conv)
    layer.fold(bn, "bn")
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    signal = torch.randn(2, 7, 8, 8, dtype=torch.float64)
    frame = Frame(_full(2, (8, 8)), [_full(2, (8, 8))], [(5, 8, 8)], (7, 8, 8), torch.zeros(2))
    with torch.no_grad():
        (got,) = layer(signal, frame)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    ref = _conv_vjp(conv, x, signal * scale.view(1, -1, 1, 1))
    assert _rel_err(got, ref) < 1e-12
    assert "folds BatchNorm2d 'bn'" in repr(layer) and "bias=False" in repr(layer)


@pytest.mark.parametrize(("size", "out"), [((8, 6), (1, 1)), ((8, 6), (2, 3)), ((8, 6), (4, 2))])
def test_block_averages_transposed_equal_autograd(size: tuple[int, int], out: tuple[int, int]) -> None:
    torch.manual_seed(2)
    signal = torch.randn(3, 4, *out, dtype=torch.float64)
    x = torch.randn(3, 4, *size, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(F.adaptive_avg_pool2d(x, out), x, signal)
    layer = AverageUnpool("pool", (size[0] // out[0], size[1] // out[1]))
    (got,) = layer(signal, Frame(_full(3, out), [_full(3, size)], [(4, *size)], (4, *out), torch.zeros(3)))
    assert _rel_err(got, ref) < 1e-12


class _SE(nn.Module):
    """A squeeze-and-excitation block between convolutions, with in-place SiLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.SiLU(inplace=True)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.act2 = nn.SiLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.gate = nn.Sigmoid()
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        d = self.act2(self.dw(h))
        g = self.gate(self.fc2(F.silu(self.fc1(self.pool(d)))))
        return self.conv2(d * g) + h.mean(1, keepdim=True)


def _double(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


@pytest.mark.parametrize("rule", RULES)
def test_squeeze_and_excitation_paths_match_the_oracle(rule: str) -> None:
    model = _double(_SE(), 3)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    dn = Deconvnet(model)
    text = str(dn.reverse_stack(dn.record(x, "conv2")))
    assert "AverageUnpool" in text and "LinearMap" not in text
    for channel, position in ((0, (4, 5)), (3, (0, 9))):
        got = dn.project(x, "conv2", channel=channel, position=position, rule=rule)
        for i in range(2):
            ref = oracle_projection(model, x[i : i + 1], "conv2", (channel, *position), rule)
            assert ref.abs().max() > 0 and _rel_err(got[i], ref) < RTOL
    # several seeds in one batch, and the dense pass, agree with one seed at a time
    many = dn.project(x, "conv2", channel=[0, 1, 2], rule=rule)
    dense = Deconvnet(model, windowed=False).project(x, "conv2", channel=[0, 1, 2], rule=rule)
    for c in range(3):
        assert _rel_err(many[:, c], dn.project(x, "conv2", channel=c, rule=rule)) < 1e-12
        assert _rel_err(dense[:, c], many[:, c]) < 1e-12


def test_sigmoid_derivative_from_its_output_is_autograds() -> None:
    model = _double(_SE(), 4)
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    rec = Deconvnet(model).record(x, "conv2")
    site = rec.sites["gate"]
    pre = model.fc2(F.silu(model.fc1(model.pool(model.act2(model.dw(model.act(model.bn1(model.conv1(x)))))))))
    assert torch.equal(site.state, derivative(torch.sigmoid, pre))


def _passes_through(x: torch.Tensor) -> torch.Tensor:
    return x


def _rectifies_in_place(x: torch.Tensor) -> torch.Tensor:
    return x.relu_()


torch.fx.wrap("_passes_through")
torch.fx.wrap("_rectifies_in_place")


class _Opaque(nn.Module):
    """Functions fx keeps whole (as StochasticDepth in eval mode): one returns its input,
    one writes into it and returns it (nothing reads that input afterwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        return self.conv2(_rectifies_in_place(_passes_through(h)))


def test_a_node_returning_its_input_passes_through_and_one_writing_it_does_not() -> None:
    model = _double(_Opaque(), 5)
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    dn = Deconvnet(model)
    rec = dn.record(x, "conv2")
    assert rec.sites["_passes_through"].state is IDENTITY and rec.sites["_passes_through"].cone == "same"
    layers = {s.node: s.layer for s in dn.reverse_stack(rec).steps}
    assert isinstance(layers["_passes_through"], PassThrough)
    assert isinstance(layers["_rectifies_in_place"], WholeBatchVectorJacobian)  # replayed as it ran
    for rule in RULES:
        got = dn.project(x, "conv2", channel=1, position=(4, 4), rule=rule)[0]
        ref = oracle_projection(model, x, "conv2", (1, 4, 4), rule)
        assert ref.abs().max() > 0 and _rel_err(got, ref) < RTOL


class _WrittenAfterProduct(nn.Module):
    """A product of two input-dependent factors (the first the input itself or a
    convolution's output), both overwritten afterwards, in place or (for the reference,
    which autograd can differentiate) out of place."""

    def __init__(self, on_input: bool, in_place: bool) -> None:
        super().__init__()
        self.on_input, self.in_place = on_input, in_place
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x if self.on_input else self.conv1(x)
        g = torch.sigmoid(self.conv1(x))
        y = a * g
        if self.in_place:  # the product's recorded factors must keep their values
            a.mul_(3.0)
            g.add_(1.0)
        else:
            a, g = a * 3.0, g + 1.0
        return self.conv2(y + a * g)


@pytest.mark.parametrize("on_input", [False, True])
def test_recorded_factors_are_copied_before_a_later_write(on_input: bool) -> None:
    model = _double(_WrittenAfterProduct(on_input, in_place=True), 6)
    reference = _double(_WrittenAfterProduct(on_input, in_place=False), 6)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    dn = Deconvnet(model)
    for rule in RULES:
        got = dn.project(x.clone(), "conv2", channel=2, position=(3, 4), rule=rule)[0]
        ref = oracle_projection(reference, x.clone(), "conv2", (2, 3, 4), rule)
        assert ref.abs().max() > 0 and _rel_err(got, ref) < RTOL


class _GatedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(x * torch.sigmoid(self.conv1(x)))


def test_a_recording_does_not_share_the_callers_images() -> None:
    model = _double(_GatedInput(), 8)
    images = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    dn = Deconvnet(model)
    rec = dn.record(images, "conv2")
    before = dn.reverse(rec, dn.select(rec, 2, (3, 4))).full()
    ref = oracle_projection(model, images.clone(), "conv2", (2, 3, 4), "deconvnet")
    assert _rel_err(before[0], ref) < RTOL
    images.mul_(-5.0)  # the caller writes its images: the recording keeps the recorded values
    assert torch.equal(dn.reverse(rec, dn.select(rec, 2, (3, 4))).full(), before)


class _Shared(nn.Module):
    """Signals that meet (sums, a value used twice) and rectifiers after them: what the
    reverse pass sums or rectifies in place must not be shared with another branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        a = F.relu(h)
        b = F.silu(h)  # h feeds two rectifiers: the sum's signal is the same tensor for both
        s = a + b
        t = F.relu(s) + F.gelu(s) + s
        return self.conv3(F.relu(self.conv2(t)) + t)


@pytest.mark.parametrize("rule", RULES)
def test_signals_summed_and_rectified_in_place_match_the_oracle(rule: str) -> None:
    model = _double(_Shared(), 7)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    for windowed in (True, False):
        dn = Deconvnet(model, windowed=windowed)
        for position in ((0, 0), (4, 3)):
            got = dn.project(x, "conv3", channel=1, position=position, rule=rule)[0]
            ref = oracle_projection(model, x, "conv3", (1, *position), rule)
            assert ref.abs().max() > 0 and _rel_err(got, ref) < RTOL


@pytest.mark.parametrize("rule", [((3, 3), (1, 1), (1, 1), (1, 1)), ((5, 2), (2, 1), (2, 0), (1, 1)),
                                  ((2, 2), (2, 2), (0, 0), (1, 1)), ((1, 1), (1, 1), (0, 0), (1, 1))])
def test_one_seed_windows_planned_in_numbers_equal_the_tensor_plan(rule: tuple) -> None:
    in_size = (13, 11)
    out_size = ((13 + 2 * rule[2][0] - rule[0][0]) // rule[1][0] + 1, (11 + 2 * rule[2][1] - rule[0][1]) // rule[1][1] + 1)
    for y0 in range(out_size[0]):
        for y1 in range(y0 + 1, out_size[0] + 1, 2):
            t = torch.tensor([y0])
            out = Window((y1 - y0, 1), t, torch.tensor([1]), (t, torch.tensor([1]), torch.tensor([y1]), torch.tensor([2])),
                          out_size)
            two = Window((y1 - y0, 1), t.repeat(2), torch.tensor([1, 1]),
                         (t.repeat(2), torch.tensor([1, 1]), torch.tensor([y1, y1]), torch.tensor([2, 2])), out_size)
            one, ref = cone._back(rule, out, in_size), cone._back(rule, two, in_size)  # the second by tensors
            assert one.size == ref.size
            for a, b in zip((one.top, one.left, *one.cone), (ref.top, ref.left, *ref.cone)):
                assert a.dtype == b.dtype and a.tolist() == b[:1].tolist()


def _seed_window(cone_: list[int], map_size: tuple[int, int]) -> Window:
    """A one-seed window holding a cone, placed as a plan places it (its numbers known)."""
    h, w = max(1, cone_[2] - cone_[0]), max(1, cone_[3] - cone_[1])
    top, left = max(0, min(cone_[0], map_size[0] - h)), max(0, min(cone_[1], map_size[1] - w))
    return Window.one((h, w), (top, left, *cone_), map_size, torch.device("cpu"))


@pytest.mark.parametrize("seed", range(4))
def test_one_seed_unions_in_numbers_equal_the_tensor_union(seed: int) -> None:
    """Where several nodes read one map, the union of one seed's windows in Python numbers
    equals the union of the same windows as tensors (their numbers unknown), and every
    window's numbers are its tensors'."""
    gen = torch.Generator().manual_seed(seed)
    map_size = (int(torch.randint(1, 12, (1,), generator=gen)), int(torch.randint(1, 12, (1,), generator=gen)))
    for _ in range(60):
        k = int(torch.randint(2, 5, (1,), generator=gen))
        wins = []
        for _ in range(k):
            r = sorted(torch.randint(0, map_size[0] + 1, (2,), generator=gen).tolist())
            c = sorted(torch.randint(0, map_size[1] + 1, (2,), generator=gen).tolist())
            wins.append(_seed_window([r[0], c[0], max(r[1], r[0] + 1), max(c[1], c[0] + 1)], map_size))
        if int(torch.randint(0, 3, (1,), generator=gen)) == 0:
            wins = [wins[0]] * k  # all the same
        got = cone.union(wins, map_size)
        ref = cone.union([dataclasses.replace(w, ints=None) for w in wins], map_size)
        assert got.ints is not None and got.size == ref.size
        for a, b in zip((got.top, got.left, *got.cone), (ref.top, ref.left, *ref.cone)):
            assert a.tolist() == b.tolist()
        assert list(got.ints) == [int(t) for t in (got.top, got.left, *got.cone)]


def test_switches_from_channels_last_memory_equal_the_contiguous_kernels() -> None:
    """Max-pooling runs on channels-last memory (vectorized on CPUs): with ties, NaN, -inf,
    padding, dilation and ceil mode, its output and switches are the contiguous kernel's."""
    from zfvis.core.ops.build import pool_with_switches

    gen = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(200):
        k, s, d = (torch.randint(1, 4, (2,), generator=gen) for _ in range(3))
        k, s, d = tuple(k.tolist()), tuple(s.clamp(max=3).tolist()), tuple(d.clamp(max=2).tolist())
        p = tuple(int(torch.randint(0, kk // 2 + 1, (1,), generator=gen)) for kk in k)
        ceil = bool(torch.randint(0, 2, (1,), generator=gen))
        c = int(torch.randint(1, 20, (1,), generator=gen))
        x = torch.randint(-2, 3, (2, c, 11, 9), generator=gen).double()  # many ties
        x[torch.rand(x.shape, generator=gen) < 0.05] = float("nan")
        x[torch.rand(x.shape, generator=gen) < 0.2] = float("-inf")
        try:
            want, want_idx = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil, return_indices=True)
        except RuntimeError:  # padding over half the dilated kernel
            continue
        out, idx = pool_with_switches(x, k, s, p, d, ceil)
        assert torch.equal(idx, want_idx) and out.is_contiguous() and idx.is_contiguous()
        assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("hooked", [False, True])
def test_a_max_pool_run_with_its_switches_keeps_the_models_output_and_hooks(hooked: bool) -> None:
    """A plain MaxPool2d is run with its switches at once; one with a hook runs as the model
    runs it (the hook's change is in the recorded output, and in the projection)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                          nn.Conv2d(6, 5, 3), nn.ReLU()).double().eval()
    if hooked:
        model[2].register_forward_hook(lambda m, i, o: o * 3)
    x = torch.randn(2, 3, 13, 12, dtype=torch.float64)
    dn = Deconvnet(model)
    rec = dn.record(x, "4")
    with torch.no_grad():
        want = model(x)
    assert torch.equal(rec.output, want)
    for rule in RULES:
        channel = int(rec.output.amax(dim=(2, 3)).amin(dim=0).argmax())  # alive in both images
        got = dn.project(x, "4", channel=channel, rule=rule)
        seeds = dn.select(rec, channel)
        for i in range(2):
            position = (int(seeds.y[i]), int(seeds.x[i]))
            ref = oracle_projection(model, x[i : i + 1], "4", (channel, *position), rule)
            assert ref.abs().max() > 0 and _rel_err(got[i], ref) < RTOL


class _Splits(nn.Module):
    """Parts of splits: by constants (their slices found once per input shape), by a size the
    model computes (found on every call), and of the map (reversed by autograd)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        a, b = h.chunk(2, dim=1)
        c, d = torch.split(h, [h.shape[1] // 4, 3 * h.shape[1] // 4], dim=1)
        top, bottom = h.split(h.shape[2] // 2, dim=2)
        mixed = torch.cat([b, a], 1) + torch.cat([d, c], 1) + torch.cat([bottom, top], 2)
        return F.relu(self.conv2(mixed))


@pytest.mark.parametrize("rule", RULES)
def test_split_parts_found_once_per_shape_match_the_oracle(rule: str) -> None:
    """The slices of a split's parts are kept per input shape: projections at two sizes, in
    turn, each equal the oracle's."""
    model = _double(_Splits(), 5)
    dn = Deconvnet(model)
    for size in (10, 8, 10, 8):
        x = torch.randn(1, 3, size, size, dtype=torch.float64)
        rec = dn.record(x, "conv2")
        channel = int(rec.output.amax(dim=(0, 2, 3)).argmax())
        seeds = dn.select(rec, channel)
        got = dn.project(x, "conv2", channel=channel, rule=rule)[0]
        ref = oracle_projection(model, x, "conv2", (channel, int(seeds.y[0]), int(seeds.x[0])), rule)
        assert ref.abs().max() > 0 and _rel_err(got, ref) < RTOL
    kept = [n.fx_node.meta.get("zfvis_part_of") for n in dn.graph.nodes]
    assert any(k and len(k) == 2 for k in kept)  # the chunk's parts: one slice per input shape


@pytest.mark.parametrize("seed", range(3))
def test_one_seed_windows_moved_in_numbers_equal_the_tensor_path(seed: int) -> None:
    """Cutting, pasting and moving one seed's windows by their numbers equals the same windows
    as tensors (their numbers unknown), windows running past the map's borders included."""
    from zfvis.core.windows import cut, move, paste

    gen = torch.Generator().manual_seed(seed)
    map_size = (int(torch.randint(1, 10, (1,), generator=gen)), int(torch.randint(1, 10, (1,), generator=gen)))
    full = torch.randn(1, 3, *map_size, dtype=torch.float64, generator=gen)

    def window() -> Window:
        r = sorted(torch.randint(0, map_size[0] + 1, (2,), generator=gen).tolist())
        c = sorted(torch.randint(0, map_size[1] + 1, (2,), generator=gen).tolist())
        return _seed_window([r[0], c[0], max(r[1], r[0] + 1), max(c[1], c[0] + 1)], map_size)

    for _ in range(40):
        a, b = window(), window()
        ta, tb = dataclasses.replace(a, ints=None), dataclasses.replace(b, ints=None)
        sig = torch.randn(1, 3, *a.size, dtype=torch.float64, generator=gen)
        assert torch.equal(cut(full, a), cut(full, ta))
        assert torch.equal(paste(sig, a), paste(sig, ta))
        assert torch.equal(move(sig, a, b), move(sig, ta, tb))
        assert torch.equal(move(sig, a, a), sig)


@pytest.mark.parametrize("change", ["in place", "new tensor", "memory swapped", "eps", "dtype"])
def test_a_folded_batch_norm_followed_after_it_changes(change: str) -> None:
    """The scale kept per BatchNorm between reverse passes is made again when the BatchNorm
    changes: its running variance written in place, a new weight, ``.data`` swapped, eps."""
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    bn = nn.BatchNorm2d(6).double().eval()
    layer = _reverse_conv(conv)
    layer.fold(bn, "bn")
    signal = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    frame = Frame(_full(1, (7, 7)), [_full(1, (7, 7))], [(4, 7, 7)], (6, 7, 7), torch.zeros(1))

    def reverse(dtype: torch.dtype = torch.float64) -> torch.Tensor:
        with torch.no_grad():
            return layer(signal.to(dtype), frame)[0].double()

    before = reverse()
    with torch.no_grad():
        if change == "in place":
            bn.running_var.mul_(4.0)
        elif change == "new tensor":
            bn.weight = nn.Parameter(torch.full((6,), 0.5, dtype=torch.float64))
        elif change == "memory swapped":
            bn.running_var.data = torch.full((6,), 9.0, dtype=torch.float64)
        elif change == "eps":
            bn.eps = 0.5
    dtype = torch.float32 if change == "dtype" else torch.float64
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    ref = _conv_vjp(conv, torch.zeros(1, 4, 7, 7, dtype=torch.float64), signal * scale.view(1, -1, 1, 1))
    got = reverse(dtype)
    assert _rel_err(got, ref) < (1e-6 if change == "dtype" else 1e-12)
    assert change == "dtype" or _rel_err(before, ref) > 0.01  # the change mattered


class _FunctionalNorm(nn.Module):
    """A convolution, then a batch norm called as a function (timm's BatchNormAct2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 4, 3, padding=1)
        self.register_buffer("mean", torch.linspace(-0.2, 0.2, 5))
        self.register_buffer("var", torch.linspace(0.5, 1.5, 5))
        self.weight = nn.Parameter(torch.linspace(0.5, 2.0, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.batch_norm(self.conv1(x), self.mean, self.var, self.weight, None, False, 0.1, 1e-5)
        return self.conv2(F.relu(a))


def test_a_functional_batch_norm_folded_twice_follows_its_statistics() -> None:
    torch.manual_seed(3)
    model = _FunctionalNorm().double().eval()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    dn = Deconvnet(model)
    for step in range(3):
        if step == 2:
            with torch.no_grad():
                model.var.mul_(3.0)  # written in place: the kept scale is made again
        seeds = dn.select(dn.record(x, "conv2"), 1)
        got = dn.project(x, "conv2", 1)[0]
        ref = oracle_projection(model, x, "conv2", (1, int(seeds.y[0]), int(seeds.x[0])))
        assert ref.abs().max() > 0 and _rel_err(got, ref) < RTOL
