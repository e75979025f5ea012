"""Explicit reverse layers that windows pass through: interpolation, split parts, LayerNorm.

Each is exact against the autograd oracle in float64 for every rule, equals the dense
computation on windows, shows by name in the reverse stack, and keeps a seed's windows
below it smaller than the maps (the work a windowed pass saves).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import RULES, oracle_projection
from test_engine import _rel_err
from torch import nn

from zfvis import Deconvnet
from zfvis.core.cone import Window

RTOL = 1e-6


def _ready(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
    return model.double().eval()


def _exact_everywhere(model: nn.Module, x: torch.Tensor, layer: str, positions: list[tuple[int, int]],
                      dense_rules: tuple[str, ...] = RULES) -> Deconvnet:
    """Oracle-exact at ``positions`` of channel 0 for every rule; windows equal whole maps
    (for the strongest activations of two channels, in ``dense_rules``)."""
    dn = Deconvnet(model)
    dense = Deconvnet(model, windowed=False)
    for rule in RULES:
        for y, x_ in positions:
            got = dn.project(x, layer, 0, position=(y, x_), rule=rule)[0]
            ref = oracle_projection(model, x, layer, (0, y, x_), rule)
            assert _rel_err(got, ref) < RTOL, (layer, rule, y, x_)
    for rule in dense_rules:
        a = dn.project(x, layer, [0, 1], top_k=4, rule=rule)
        b = dense.project(x, layer, [0, 1], top_k=4, rule=rule)
        assert _rel_err(a, b) < 1e-12, rule
    return dn


def _windows(dn: Deconvnet, x: torch.Tensor, layer: str, position: tuple[int, int]) -> dict:
    """The planned windows of a one-seed reverse pass from ``position`` of ``layer``."""
    rec = dn.record(x, layer)
    stack = dn.reverse_stack(rec)
    y, x_ = torch.tensor([position[0]]), torch.tensor([position[1]])
    top = Window.points(y, x_, tuple(rec.output.shape[-2:]))
    return dn._plan(rec, stack, top, 1, torch.device("cpu"))


def _area(win: Window) -> tuple[int, int]:
    """(window pixels, map pixels)."""
    return win.size[0] * win.size[1], win.map_size[0] * win.map_size[1]


def _corners(h: int, w: int) -> list[tuple[int, int]]:
    return [(0, 0), (h - 1, w - 1), (h // 2, w // 3), (1, w - 2)]


# --------------------------------------------------------------------------- interpolate


class _Upsampler(nn.Module):
    """conv -> relu -> resample -> conv -> relu -> conv: the resampling in the middle."""

    def __init__(self, resample: nn.Module | None, call=None, act=F.relu) -> None:
        super().__init__()
        self.act = act
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 3, 3, padding=1)
        self.resample, self.call = resample, call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.resample(y) if self.resample is not None else self.call(y)
        return self.conv3(self.act(self.conv2(y)))


INTERPOLATIONS = {
    "nearest_x2": lambda y: F.interpolate(y, scale_factor=2),
    "nearest_1.6": lambda y: F.interpolate(y, scale_factor=1.6, mode="nearest"),
    "nearest_size": lambda y: F.interpolate(y, size=(17, 10)),
    "nearest_down": lambda y: F.interpolate(y, scale_factor=0.55),
    "nearest_exact": lambda y: F.interpolate(y, scale_factor=(1.5, 2.25), mode="nearest-exact"),
    "bilinear_x2": lambda y: F.interpolate(y, scale_factor=2, mode="bilinear"),
    "bilinear_1.7_recompute": lambda y: F.interpolate(y, scale_factor=1.7, mode="bilinear",
                                                      recompute_scale_factor=True),
    "bilinear_corners_x3": lambda y: F.interpolate(y, scale_factor=3, mode="bilinear", align_corners=True),
    "bilinear_corners_size": lambda y: F.interpolate(y, size=(13, 21), mode="bilinear", align_corners=True),
    "bilinear_size_down": lambda y: F.interpolate(y, size=(10, 11), mode="bilinear"),
    "bicubic_1.5": lambda y: F.interpolate(y, scale_factor=1.5, mode="bicubic"),
    "upsample_module": nn.Upsample(scale_factor=2.5, mode="bilinear"),
    "upsample_nearest2d": nn.UpsamplingNearest2d(scale_factor=2),
    "upsample_bilinear2d": nn.UpsamplingBilinear2d(size=(15, 19)),
}


def _upsampler(name: str, act=F.relu) -> nn.Module:
    how = INTERPOLATIONS[name]
    return _ready(_Upsampler(how, None, act) if isinstance(how, nn.Module) else _Upsampler(None, how, act), seed=4)


@pytest.mark.parametrize("name", list(INTERPOLATIONS))
def test_interpolation_is_exact_named_and_windowed(name: str) -> None:
    model = _upsampler(name)
    x = torch.randn(1, 3, 14, 16, dtype=torch.float64)
    h, w = model(x).shape[-2:]
    dn = _exact_everywhere(model, x, "conv3", _corners(h, w))
    text = str(dn.reverse_stack(dn.record(x, "conv3")))
    assert "Resample(" in text and "VectorJacobian" not in text
    # a seed of conv3 reaches 5x5 of conv2's input, hence only a few rows of conv1's output
    wins = _windows(dn, x, "conv3", (h // 2, w // 2))
    seen, whole = _area(wins["conv1"])
    assert seen < 0.6 * whole, (wins["conv1"].size, wins["conv1"].map_size)


@pytest.mark.parametrize("name", ["nearest_1.6", "bilinear_1.7_recompute", "bilinear_corners_size", "bicubic_1.5",
                                  "nearest_down"])
def test_interpolation_windows_are_the_exact_receptive_boxes(name: str) -> None:
    """Each activation's receptive window is the box of pixels its gradient is non-zero on
    (all weights positive and no rectifier, so nothing cancels)."""
    model = _upsampler(name, act=torch.nn.Identity())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.uniform_(0.1, 1.0)
    x = torch.randn(1, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    out = model(x)
    dn = Deconvnet(model)
    h, w = out.shape[-2:]
    for y, x_ in [(0, 0), (h - 1, w - 1), (h // 2, w // 2), (1, w - 2)]:
        (g,) = torch.autograd.grad(out[0, 0, y, x_], x, retain_graph=True)
        ys, xs = (g[0].abs().sum(0) != 0).nonzero(as_tuple=True)
        box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        assert dn.receptive_window("conv3", (y, x_), (3, 9, 11)) == box, (y, x_)


def test_interpolation_in_float32_matches_autograd() -> None:
    model = _upsampler("bilinear_1.7_recompute").float()
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    out = model.conv3(F.relu(model.conv2(model.call(F.relu(model.conv1(x))))))
    got = Deconvnet(model, rule="gradient").project(x.detach(), "conv3", 1, position=(5, 7))
    (g,) = torch.autograd.grad(out[:, 1, 5, 7].sum(), x)
    assert _rel_err(got, g * out[:, 1, 5, 7, None, None, None].detach()) < 1e-4


def test_unsupported_interpolation_mode_stays_generic_and_exact() -> None:
    model = _ready(_Upsampler(None, lambda y: F.interpolate(y, scale_factor=2, mode="area")), seed=4)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    dn = _exact_everywhere(model, x, "conv3", [(3, 4)])
    assert "VectorJacobian" in str(dn.reverse_stack(dn.record(x, "conv3")))


# --------------------------------------------------------------------------- split, chunk, unbind


class _Splitter(nn.Module):
    """conv (6 channels) -> relu -> parts of a split recombined -> conv -> relu -> conv."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        if self.how == "chunk_method":
            p = y.chunk(3, 1)
            z = torch.cat([p[2], p[0] * p[1]], 1)
        elif self.how == "torch_chunk_neg_dim":
            p = torch.chunk(y, 2, dim=-3)
            z = torch.cat([p[0], p[1][:, 2:]], 1) - torch.cat([p[1], p[0][:, :1]], 1)
        elif self.how == "split_sizes":
            p = torch.split(y, [2, 4], dim=1)
            z = torch.cat([p[1][:, 2:], p[0]], 1)
        elif self.how == "split_method":
            p = y.split(2, 1)
            z = torch.cat([p[0] + p[1], p[2]], 1)
        elif self.how == "unbind":
            p = torch.unbind(y, 1)
            z = torch.cat([p[1][:, None], p[2][:, None], p[4].unsqueeze(1), p[3].unsqueeze(1)], 1)
        else:
            z = torch.cat([y[:, :3], y.unbind(1)[5][:, None]], 1)
        return self.conv3(F.relu(self.conv2(z)))


SPLITS = ["chunk_method", "torch_chunk_neg_dim", "split_sizes", "split_method", "unbind", "unbind_item"]


@pytest.mark.parametrize("how", SPLITS)
def test_channel_split_parts_are_exact_named_and_windowed(how: str) -> None:
    model = _ready(_Splitter(how), seed=5)
    x = torch.randn(1, 3, 14, 16, dtype=torch.float64)
    dn = _exact_everywhere(model, x, "conv3", _corners(14, 16))
    text = str(dn.reverse_stack(dn.record(x, "conv3")))
    assert "Unsplit(" in text and "VectorJacobian" not in text, text
    wins = _windows(dn, x, "conv3", (7, 8))
    seen, whole = _area(wins["conv1"])  # 5x5 of conv1's 14x16 map, through the split
    assert seen == 25 and whole == 14 * 16, wins["conv1"].size


def test_split_of_the_map_stays_generic_and_exact() -> None:
    class Rows(_Splitter):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            top, bottom = F.relu(self.conv1(x)).split(7, dim=2)
            return self.conv3(F.relu(self.conv2(torch.cat([bottom, top], 2)[:, :4])))

    model = _ready(Rows("rows"), seed=5)
    x = torch.randn(1, 3, 14, 16, dtype=torch.float64)
    dn = _exact_everywhere(model, x, "conv3", [(2, 3), (10, 12)])
    text = str(dn.reverse_stack(dn.record(x, "conv3")))
    assert "VectorJacobian" in text and "Unsplit" not in text


# --------------------------------------------------------------------------- channels-last stretches


class _ChannelsLast(nn.Module):
    """conv -> a channels-last stretch -> conv -> relu -> conv."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 3, 3, padding=1)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(6), nn.Linear(6, 8), nn.Linear(8, 6)
        self.act = nn.GELU()
        self.prelu = nn.PReLU(10)  # on (N, H, W, C) maps of height 10: one slope per row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        t = y.permute(0, 2, 3, 1)
        if self.how == "block":  # ConvNeXt's: LayerNorm, Linear, GELU, Linear
            t = self.fc2(self.act(self.fc1(self.norm(t))))
        elif self.how == "functional":  # no affine weights, pointwise ops, a product, a residual
            u = F.layer_norm(t, (6,), eps=1e-3)
            u = torch.tanh(u * 2.0) * F.silu(u) + torch.exp(-u.square())
            t = F.linear(u, self.fc2.weight.T.contiguous()[:6, :6]) - t
        elif self.how == "seen_outside":  # the stretch's value is also read channels last
            t = self.norm(t) + t.mean(-1, keepdim=True)
        elif self.how == "map_norm":  # a LayerNorm over (W, C): it mixes positions
            t = F.layer_norm(t, t.shape[-2:])
        elif self.how == "prelu":  # pointwise, but its weights broadcast along dim 1 (rows here)
            t = self.prelu(self.norm(t))
        z = torch.permute(t, [0, 3, 1, 2])
        return self.conv3(F.relu(self.conv2(z)))


@pytest.mark.parametrize("how", ["block", "functional"])
def test_channels_last_stretch_is_exact_named_and_windowed(how: str) -> None:
    model = _ready(_ChannelsLast(how), seed=6)
    x = torch.randn(1, 3, 14, 16, dtype=torch.float64)
    dn = _exact_everywhere(model, x, "conv3", _corners(14, 16))
    text = str(dn.reverse_stack(dn.record(x, "conv3")))
    assert "ChannelNorm(" in text and "Permuted(" in text and "on whole maps" not in text, text
    if how == "block":
        assert "ChannelLinear(" in text
    wins = _windows(dn, x, "conv3", (7, 8))
    seen, whole = _area(wins["conv1"])  # 5x5 of conv1's 14x16 map, through the stretch
    assert seen == 25 and whole == 14 * 16, wins["conv1"].size


@pytest.mark.parametrize("how", ["seen_outside", "map_norm", "prelu"])
def test_other_channels_last_uses_stay_generic_and_exact(how: str) -> None:
    model = _ready(_ChannelsLast(how), seed=6)
    x = torch.randn(1, 3, 10, 12, dtype=torch.float64)
    dn = _exact_everywhere(model, x, "conv3", [(2, 3), (7, 9)])
    text = str(dn.reverse_stack(dn.record(x, "conv3")))
    assert "VectorJacobian" in text and "ChannelNorm" not in text and "Permuted" not in text, text


def test_a_seed_inside_a_stretch_is_exact() -> None:
    model = _ready(_ChannelsLast("block"), seed=6)
    x = torch.randn(1, 3, 10, 12, dtype=torch.float64)
    dn = Deconvnet(model)
    for layer, index in [("fc1", (4, 5, 2)), ("norm", (3, 3, 1))]:  # (y, x, c): maps with channels last
        for rule in RULES:
            got = dn.project(x, layer, index[0], position=index[1:], rule=rule)[0]
            ref = oracle_projection(model, x, layer, index, rule)
            assert _rel_err(got, ref) < RTOL, (layer, rule)


def _convnext(cut: int) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    model = nn.Sequential(*torchvision.models.convnext_tiny(weights=None, num_classes=10).features[:cut])
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "layer_scale"):
                m.layer_scale.uniform_(0.5, 1.0)  # (1e-6 by default: the blocks would add nothing)
    return _ready(model, seed=7)


def test_convnext_blocks_and_layernorm2d_are_exact_named_and_windowed() -> None:
    model = _convnext(4)  # stem (conv, LayerNorm2d), stage 1, downsampling (LayerNorm2d, conv), stage 2
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    dn = _exact_everywhere(model, x, "3.0", [(1, 2)], dense_rules=("guided",))
    stack = dn.reverse_stack(dn.record(x, "3.0"))
    text = str(stack)
    assert "VectorJacobian" not in text, text
    assert text.count("ChannelNorm(") == 6 and text.count("Permuted(") == 12 and text.count("ChannelLinear(") == 8
    assert all(s.cone != "full" for s in stack.steps)
    # a seed of stage 1's first block reaches 7x7 of the stem's 12x12 maps (its depthwise 7x7
    # convolution), through the stem's LayerNorm2d too; one of its second block 7x7 of the first's
    wins = _windows(dn, x, "1.0", (6, 6))
    assert _area(wins["0.0"]) == (49, 144) and _area(wins["0.1.layer_norm"]) == (49, 144)
    assert _area(_windows(dn, x, "1.1", (6, 6))["1.0.block.3"]) == (49, 144)


def test_timm_convnext_is_windowed_through_its_blocks() -> None:
    timm = pytest.importorskip("timm", reason="timm is not installed")
    model = _ready(timm.create_model("convnext_atto", pretrained=False, num_classes=10), seed=8)
    for m in model.modules():
        if getattr(m, "gamma", None) is not None:
            with torch.no_grad():
                m.gamma.uniform_(0.5, 1.0)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    dn = _exact_everywhere(model, x, "stages.1", [(1, 2)], dense_rules=("guided",))
    text = str(dn.reverse_stack(dn.record(x, "stages.1")))
    assert "VectorJacobian" not in text and "ChannelNorm(" in text, text  # its LayerNorm2d (1x1 convs: conv_mlp)
    assert _area(_windows(dn, x, "stages.0.blocks.0", (4, 4))["stem.0"]) == (49, 64)
