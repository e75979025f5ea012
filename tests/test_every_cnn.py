"""Every CNN researchers use: the rule at every rectifier, exact gradients elsewhere.

Each projection is compared in float64 with the autograd oracle (``tests/oracle.py``),
which swaps only the rectifiers' backward; models with in-place calls are also compared
with plain autograd (the gradient rule) and their recorded activations with forward hooks.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from oracle import RULES, oracle_projection
from test_engine import _rel_err
from torch import nn

import zfvis
from zfvis import Deconvnet, UnsupportedModelError
from zfvis.analysis.occlusion import occlusion

RTOL = 1e-6

#: The slow tests (every torchvision classification model, the whole timm list with every
#: rule: about 20 minutes on 2 cores) are opt-in.
slow = pytest.mark.skipif(os.environ.get("ZFVIS_SLOW") != "1", reason="slow (minutes): run with ZFVIS_SLOW=1")


def _ready(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights, non-trivial batch-norm statistics, float64, eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


def _strongest(dn: Deconvnet, x: torch.Tensor, layer: str) -> tuple[int, ...]:
    """(channel, y, x) of the largest activation of ``layer`` (or (unit,) for a vector)."""
    out = dn.output(x, layer)[0]
    flat = int(out.abs().argmax())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), out.shape))


def _assert_exact(model: nn.Module, x: torch.Tensor, layer: str, rules=RULES, dn: Deconvnet | None = None) -> None:
    dn = dn or Deconvnet(model)
    index = _strongest(dn, x, layer)
    nonzero = 0
    for rule in rules:
        if len(index) == 3:
            got = dn.project(x, layer, index[0], position=index[1:], rule=rule)[0]
        else:
            got = dn.project(x, layer, index[0], rule=rule)[0]
        ref = oracle_projection(model, x, layer, index, rule)
        nonzero += bool(ref.abs().max() > 0)
        assert _rel_err(got, ref) < RTOL, (layer, rule)  # exactly zero where the reference is
    assert nonzero, layer  # (the deconvnet rule may rectify a deep seed's signal away entirely)


def _plain_gradient(model: nn.Module, x: torch.Tensor, layer: str, index: tuple[int, ...]) -> torch.Tensor:
    """value * d activation / d x by plain autograd on the model as written (in place included)."""
    net = copy.deepcopy(model)
    outs: list[torch.Tensor] = []
    handle = net.get_submodule(layer).register_forward_hook(lambda _m, _i, o: outs.append(o.clone()))
    xg = x.clone().requires_grad_(True)
    try:
        net(xg)
    finally:
        handle.remove()
    value = outs[-1][(0, *index)]
    (g,) = torch.autograd.grad(value, xg)
    return value.detach() * g[0]


# --------------------------------------------------------------------------- in place


class _Statement(nn.Module):
    """In-place calls whose result is unused: they still change what later nodes read."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if self.how == "relu_":
            y.relu_()
        elif self.how == "F.relu_":
            F.relu_(y)
        elif self.how == "silu_inplace":
            F.silu(y, inplace=True)
        elif self.how == "iadd":
            keep = y
            y += x.mean(dim=1, keepdim=True)
            y = keep  # keep is y: it reads the sum
        elif self.how == "imul":
            keep = y
            y *= 2
            y = F.relu(keep)
        return self.conv2(y)


@pytest.mark.parametrize("how", ["relu_", "F.relu_", "silu_inplace", "iadd", "imul"])
def test_in_place_statement_is_a_new_version(how: str) -> None:
    model = _ready(_Statement(how))
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    dn = Deconvnet(model)
    with torch.no_grad():
        want = model(x)
    assert torch.equal(dn.output(x, "conv2"), want)  # the in-place call runs, although nothing reads its result
    index = _strongest(dn, x, "conv2")
    ref = _plain_gradient(model, x, "conv2", index)
    got = dn.project(x, "conv2", index[0], position=index[1:], rule="gradient")[0]
    assert ref.abs().max() > 0 and _rel_err(got, ref) < RTOL
    _assert_exact(model, x, "conv2", dn=dn)


class _ViewThenInplace(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        if self.how == "view_read_later":
            v = a[:, :2]
            a.relu_()  # v sees this too
            return self.conv2(torch.cat([v, a], dim=1)).mean(dim=(2, 3))
        F.relu(a[:, :2], inplace=True)  # writes into a, which is read below
        return self.conv2(torch.cat([a[:, 2:], a], dim=1)).mean(dim=(2, 3))


@pytest.mark.parametrize("how", ["view_read_later", "write_through_view"])
def test_in_place_write_to_shared_memory_is_refused_by_both_engines(how: str) -> None:
    model = _ready(_ViewThenInplace(how))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="overwrites in place memory that .* shares"):
        Deconvnet(model).project(x, "conv2", 0)
    with pytest.raises(zfvis.UserInputError, match="in place"):
        occlusion(model, x[0], patch=3, stride=3, method="incremental")
    res = occlusion(model, x[0], patch=3, stride=3)  # auto: the full method, exact
    assert res.method == "full"


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, F.relu(y)


class _UsesPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair, self.conv = _Pair(), nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(x)
        return self.conv(a * b)


def test_a_layer_returning_a_tuple_names_its_tensors() -> None:
    model = _ready(_UsesPair())
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    dn = Deconvnet(model)
    with pytest.raises(UnsupportedModelError, match=r"'pair' does not output one tensor.*tensors: pair.conv, pair.relu"):
        dn.project(x, "pair", 0)
    _assert_exact(model, x, "conv", dn=dn)


def test_recorded_activations_equal_forward_hooks_on_in_place_models() -> None:
    """ResNet's in-place ReLUs and ``out += identity``: every module's recorded output is
    what a forward hook sees when the module returns."""
    model = _ready(torchvision.models.resnet18(weights=None, num_classes=10))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    names = [n for n, m in model.named_modules() if n and not list(m.children()) and "relu" not in n]
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: seen.__setitem__(n, o.detach().clone())) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    outs = Deconvnet(model).forward_outputs(x, names)
    for n in names:
        assert torch.equal(outs[n], seen[n]), n


# --------------------------------------------------------------------------- arithmetic


class _Arithmetic(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("row", torch.linspace(-1.0, 2.0, 10))  # (W,)
        self.register_buffer("plane", torch.randn(4, 10, 10))  # (C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        z = {
            "row": lambda: y * self.row,
            "plane": lambda: y * self.plane,
            "mul_kw": lambda: torch.mul(y, other=2.0),
            "sub": lambda: y - F.relu(-y) * 0.5,
            "div": lambda: y / 3.0 - 1.0 / (y + 2.0),
            "relu6": lambda: F.relu6(y * 4.0),
            "broadcast_add": lambda: y + y.mean(dim=(2, 3), keepdim=True),
            "gate": lambda: y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True)),
            "layer_norm": lambda: F.layer_norm(y.permute(0, 2, 3, 1), (4,)).permute(0, 3, 1, 2),
            "upsample": lambda: F.interpolate(F.max_pool2d(y, 2), scale_factor=2.0, mode="bilinear"),
            "split": lambda: torch.cat(torch.split(y, [1, 3], dim=1)[::-1], dim=1),
        }[self.how]()
        return self.conv2(z)


ARITHMETIC = ["row", "plane", "mul_kw", "sub", "div", "relu6", "broadcast_add", "gate", "layer_norm", "upsample",
              "split"]


@pytest.mark.parametrize("how", ARITHMETIC)
def test_arithmetic_and_true_backward_ops_match_the_oracle(how: str) -> None:
    model = _ready(_Arithmetic(how), seed=3)
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    dn = Deconvnet(model)
    _assert_exact(model, x, "conv2", dn=dn)
    # windows and whole maps agree, for every seed of a channel
    p = dn.project(x, "conv2", [0, 2], top_k=5)
    dense = Deconvnet(model, windowed=False).project(x, "conv2", [0, 2], top_k=5)
    assert _rel_err(p, dense) < 1e-12


def test_relu6_saturation_passes_nothing() -> None:
    model = _ready(_Arithmetic("relu6"), seed=3)
    x = 5 * torch.randn(1, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        pre = model.conv1(x).relu() * 4.0
    assert (pre >= 6).float().mean() > 0.2  # many inputs saturate
    _assert_exact(model, x, "conv2")


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_convolutions_padding_by_other_modes_match_the_oracle(mode: str) -> None:
    """Reversed by their true backward on whole maps (the padding's transpose folds the border
    back in); a BatchNorm after one stays a layer of its own."""
    model = _ready(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode=mode), nn.ReLU(),
                                 nn.Conv2d(4, 5, 3, padding=1)), seed=3)
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    dn = Deconvnet(model)
    _assert_exact(model, x, "5", dn=dn)
    want = Deconvnet(model, windowed=False).project(x, "5", [0, 3], top_k=5)
    assert _rel_err(dn.project(x, "5", [0, 3], top_k=5), want) < 1e-12


def test_occlusion_refuses_batch_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                          nn.LazyLinear(3)).double()
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(UnsupportedModelError, match="batch_size"):
        occlusion(model.eval(), torch.randn(3, 8, 8, dtype=torch.float64), patch=3, stride=3, method="full")


# --------------------------------------------------------------------------- rectifiers


ACTIVATIONS = {
    "ReLU": lambda: nn.ReLU(),
    "ReLU6_inplace": lambda: nn.ReLU6(inplace=True),
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "ELU_inplace": lambda: nn.ELU(inplace=True),
    "SiLU": lambda: nn.SiLU(),
    "SiLU_inplace": lambda: nn.SiLU(inplace=True),
    "GELU": lambda: nn.GELU(),
    "GELU_tanh": lambda: nn.GELU(approximate="tanh"),
    "Hardswish": lambda: nn.Hardswish(),
    "Mish": lambda: nn.Mish(),
    "Sigmoid": lambda: nn.Sigmoid(),
    "Hardsigmoid": lambda: nn.Hardsigmoid(),
    "Tanh": lambda: nn.Tanh(),
}


class _Functional(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.fn(self.conv1(x)))


FUNCTIONALS = {
    "F.silu": lambda t: F.silu(t),
    "F.gelu": lambda t: F.gelu(t, approximate="tanh"),
    "F.leaky_relu_": lambda t: F.leaky_relu_(t, 0.2),
    "F.elu": lambda t: F.elu(t, 0.7),
    "F.hardswish_inplace": lambda t: F.hardswish(t, inplace=True),
    "F.mish": lambda t: F.mish(t),
    "Tensor.relu_": lambda t: t.relu_(),
    "Tensor.sigmoid": lambda t: t.sigmoid(),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS) + list(FUNCTIONALS))
def test_every_activation_follows_the_rule_or_its_derivative(name: str) -> None:
    if name in ACTIVATIONS:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), ACTIVATIONS[name](), nn.Conv2d(4, 4, 3))
        layer = "2"
    else:
        model = _Functional(FUNCTIONALS[name])
        layer = "conv2"
    model = _ready(model, seed=5)
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    dn = Deconvnet(model)
    _assert_exact(model, x, layer, dn=dn)
    index = _strongest(dn, x, layer)
    got = {r: dn.project(x, layer, index[0], position=index[1:], rule=r)[0] for r in RULES}
    if name.split("_")[0] in ("Sigmoid", "Hardsigmoid", "Tanh", "Tensor.sigmoid"):  # gates: the rules agree
        assert _rel_err(got["deconvnet"], got["gradient"]) < 1e-12
    else:  # rectifiers: the rules differ
        assert _rel_err(got["deconvnet"], got["gradient"]) > 1e-3
        assert _rel_err(got["guided"], got["gradient"]) > 1e-3


# --------------------------------------------------------------------------- generic layers


class _Opaque(nn.Module):
    """Shape-dependent control flow fx cannot trace (as timm's VGG head): kept whole."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # rectifiers inside still follow the rule
            return F.relu(torch.tanh(x) * x - 0.1) + F.silu(x)
        return x


class _WithGeneric(nn.Module):
    """A pointwise op with no layer of its own (softplus) low in the network, an opaque
    module above: both reversed by their gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.odd = _Opaque()
        self.conv4 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.softplus(self.conv1(x))
        y = F.max_pool2d(F.relu(self.conv2(y)), 2)
        y = F.relu(self.conv3(y))
        return self.conv4(self.odd(y))


def test_generic_layers_are_exact_named_and_windowed_below() -> None:
    torch.manual_seed(7)
    model = _ready(_WithGeneric(), seed=7)
    x = torch.randn(1, 3, 24, 24, dtype=torch.float64)
    dn = Deconvnet(model)
    for layer in ("conv3", "conv4"):
        _assert_exact(model, x, layer, dn=dn)
    rec = dn.record(x, "conv3")
    stack = dn.reverse_stack(rec)
    text = str(stack)
    assert "VectorJacobian" in text and "softplus" in text  # the generic layer shows by name
    # a seed of conv3 reaches a 5x5 window of conv2's output, not its 12x12 map... and below
    # the generic softplus the windows stay smaller than the maps
    seeds = dn.select(rec, [1], position=(5, 6))
    wins = dn._plan(rec, stack, zfvis.core.cone.Window.points(seeds.y, seeds.x, (12, 12)), 1, torch.device("cpu"))
    assert wins["conv1"].size[0] < 24 and wins["softplus"].size[0] < 24
    assert "VectorJacobian" in str(dn.reverse_stack(dn.record(x, "conv4")))


# --------------------------------------------------------------------------- model families

# torchvision's newer families at reduced input size, cut after the layer tested (the
# whole networks are in the slow test): one mid layer, each rule
FAMILIES = {
    "efficientnet_b0": ("4.0.block.2.fc2", 32, 5),  # inside the squeeze-and-excitation block
    "mobilenet_v3_small": ("4", 32, 5),
    "convnext_tiny": ("3.1", 32, 4),
    "regnet_y_400mf": ("trunk_output.block2", 32, None),
    "shufflenet_v2_x0_5": ("stage2", 32, None),
    "squeezenet1_1": ("6", 48, 7),
}


def _family(name: str, cut: int | None) -> nn.Module:
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    return _ready(model if cut is None else nn.Sequential(*model.features[:cut]))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_torchvision_families_match_the_oracle(name: str) -> None:
    layer, size, cut = FAMILIES[name]
    model = _family(name, cut)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    dn = Deconvnet(model)
    _assert_exact(model, x, layer, dn=dn)
    k = min(3, int(dn.output(x, layer)[0, 0].numel()))
    a = dn.project(x, layer, [0, 3], top_k=k)
    b = Deconvnet(model, windowed=False).project(x, layer, [0, 3], top_k=k)
    assert _rel_err(a, b) < 1e-10


# --------------------------------------------------------------------------- timm

TIMM_FAST = {"seresnet18": 32, "hrnet_w18_small": 64}  # res2net50_26w_4s and the rest: TIMM_ALL (slow)
TIMM_ALL = {
    "resnet50d": 64, "seresnet18": 32, "efficientnet_b0": 32, "mobilenetv3_small_100": 32, "regnetx_002": 32,
    "densenet121": 32, "vgg11": 32, "cspresnet50": 64, "res2net50_26w_4s": 32, "hrnet_w18_small": 64,
    "convnext_atto": 32, "ghostnet_100": 32, "dla34": 64,
}


def _timm_check(name: str, size: int, rules=RULES) -> None:
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install zfvis[timm])")
    model = _ready(timm.create_model(name, pretrained=False, num_classes=10))
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    dn = Deconvnet(model)
    for layer in _mid_and_last(dn, model, x):
        _assert_exact(model, x, layer, rules, dn=dn)


@pytest.mark.parametrize("name", list(TIMM_FAST))
def test_timm_models_match_the_oracle(name: str) -> None:
    _timm_check(name, TIMM_FAST[name], rules=("deconvnet", "gradient"))


@pytest.mark.slow
@slow
@pytest.mark.parametrize("name", list(TIMM_ALL))
def test_timm_models_match_the_oracle_every_rule(name: str) -> None:
    _timm_check(name, TIMM_ALL[name])


#: Models too large for float64 on a test machine (over 100M parameters), and input sizes.
_TOO_LARGE = ("vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf")
_SIZES = {"inception_v3": 96, "maxvit_t": 224, "vit_b_32": 64}
_KWARGS = {"inception_v3": {"aux_logits": False, "init_weights": False}, "googlenet": {"aux_logits": False,
           "init_weights": False}, "vit_b_16": {"image_size": 32}, "vit_b_32": {"image_size": 64}}


def _classification_models() -> list[str]:
    return [n for n in torchvision.models.list_models(module=torchvision.models) if n not in _TOO_LARGE]


def _mid_and_last(dn: Deconvnet, model: nn.Module, x: torch.Tensor) -> list[str]:
    """A layer from the middle with a non-zero map or vector output, and the last layer."""
    names = [n for n in dn.layer_names(aliases=False) if n in dict(model.named_modules())]
    for mid in names[len(names) // 2:]:
        try:
            out = dn.output(x, mid)
        except UnsupportedModelError:  # a module returning a tuple (attention)
            continue
        if out.dim() in (2, 4) and out.abs().max() > 0:
            break
    return [mid, names[-1]]


@pytest.mark.slow
@slow
@pytest.mark.parametrize("name", _classification_models())
def test_every_torchvision_classification_model_matches_the_oracle(name: str) -> None:
    """Random weights, reduced input where the model allows it; a mid and the last layer, each rule."""
    model = _ready(getattr(torchvision.models, name)(weights=None, num_classes=10, **_KWARGS.get(name, {})))
    if name.startswith("vit_"):  # its head starts at zero: no gradient at all
        nn.init.normal_(model.heads.head.weight, 0, 0.02)
    size = _SIZES.get(name, 32 if name.startswith("vit_") else 64)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    dn = Deconvnet(model)
    for layer in _mid_and_last(dn, model, x):
        _assert_exact(model, x, layer, dn=dn)
    del model, dn
