"""Tests for the graph engine: residual, branching, concatenating and functional models,
and the three backward rules (deconvnet, guided, gradient).

Every projection is compared with ``tests/oracle.py``, the rules written as autograd (a
``TorchFunctionMode`` swaps the ReLU family's backward, so functional calls are covered),
independently of the engine, in float64; the tolerance is 1e-6 relative. Models are small
random torchvision networks (seeded, batch-norm statistics randomised) on 64x64 images.
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from oracle import RULES as ORACLE_RULES
from oracle import (
    _assert_no_leaked_relu,
    oracle_activation,
    oracle_projection,
    oracle_whole_map,
)
from test_engine import _assert_unchanged, _randomize_bn, _rel_err, _snapshot
from torch import nn
from torchvision.models.feature_extraction import (
    create_feature_extractor,
    get_graph_node_names,
)

import zfvis
from zfvis import Deconvnet, Seeds, UnsupportedModelError

RTOL = 1e-6
EXACT = 1e-12

pytestmark = [
    pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet:UserWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test of this module runs on one intra-op thread."""


# --------------------------------------------------------------------------- models


class Custom(nn.Module):
    """F.relu, F.max_pool2d, torch.cat, ``+`` (twice: a projection shortcut and an
    identity shortcut), torch.flatten, a value with three consumers, and one nn.ReLU
    module (``act``, in place) that runs twice. Input (3, 30, 34)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.conv_a = nn.Conv2d(8, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 5, 1)
        self.conv2 = nn.Conv2d(11, 8, 3, stride=2, padding=1)
        self.short = nn.Conv2d(8, 8, 1, stride=2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))  # act: first call        30x34
        x = F.max_pool2d(x, 3, stride=2, padding=1)  # max_pool2d       15x17
        a = F.relu(self.conv_a(x))  # relu
        b = self.conv_b(x)
        y = torch.cat([a, b], 1)  # cat
        y = self.conv2(y) + self.short(x)  # add                          8x9
        y = self.act(y)  # act_1: second call
        y = F.relu(self.conv3(y)) + y  # relu_1, add_1
        y = F.max_pool2d(y, 2)  # max_pool2d_1                             4x4
        return self.fc(torch.flatten(y, 1))  # flatten, fc


_SIZES = {"custom": (3, 30, 34)}


def _build(key: str) -> nn.Module:
    torch.manual_seed(0)
    if key == "custom":
        model: nn.Module = Custom()
    elif key == "googlenet":
        model = torchvision.models.googlenet(weights=None)
    elif key == "googlenet_ti":
        model = torchvision.models.googlenet(weights=None, transform_input=True, aux_logits=False, init_weights=True)
    else:
        model = getattr(torchvision.models, key)(weights=None)
    return _randomize_bn(model).double().eval()


@functools.cache
def get_model(key: str) -> nn.Module:
    """A float64 model in eval mode, shared by the tests that do not change it."""
    return _build(key)


@functools.cache
def get_deconvnet(key: str, rule: str | None = None) -> Deconvnet:
    """A deconvnet of :func:`get_model` (``rule`` given to the constructor, else the default),
    shared by the oracle cases: the model is traced once, not once per case."""
    return Deconvnet(get_model(key)) if rule is None else Deconvnet(get_model(key), rule=rule)


def get_image(key: str, n: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *_SIZES.get(key, (3, 64, 64)), generator=g, dtype=torch.float64)


def _oracle_layer(model: nn.Module, layer: str) -> tuple[str, int]:
    """The oracle's (layer, call) for an engine layer name: ``<module>_0`` is the first call
    of a module; any other name means the same to both."""
    modules = dict(model.named_modules())
    m = re.fullmatch(r"(.+)_0", layer)
    if m and m.group(1) in modules and layer not in modules:
        return m.group(1), 0
    return layer, -1


def _strongest(out: torch.Tensor, m: int) -> list[int]:
    """The m channels (units) of image 0 with the largest activation."""
    peak = out[0].flatten(1).amax(1) if out.dim() == 4 else out[0]
    return [int(c) for c in peak.topk(m).indices]


# --------------------------------------------------------------------------- the oracle itself


class _TwoConv(nn.Module):
    """y = v * rect(w * x) + b with 1x1 convolutions on one channel; ``rect`` is called
    in the way ``how`` says."""

    def __init__(self, how: str, w: float, v: float, b: float) -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(1, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(1, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6(inplace=True)
        with torch.no_grad():
            self.conv1.weight.fill_(w)
            self.conv2.weight.fill_(v)
            self.conv2.bias.fill_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = {
            "module": lambda t: self.relu(t),
            "F.relu": lambda t: F.relu(t),
            "F.relu_inplace": lambda t: F.relu(t, inplace=True),
            "torch.relu": lambda t: torch.relu(t),
            "torch.relu_": lambda t: torch.relu_(t),
            "Tensor.relu": lambda t: t.relu(),
            "Tensor.relu_": lambda t: t.relu_(),
            "relu6_module": lambda t: self.relu6(t),
            "F.relu6": lambda t: F.relu6(t),
            "F.hardtanh": lambda t: F.hardtanh(t, 0.0, 6.0),
        }[self.how](h)
        return self.conv2(h)


_RELU_CALLS = ["module", "F.relu", "F.relu_inplace", "torch.relu", "torch.relu_", "Tensor.relu", "Tensor.relu_"]
_RELU6_CALLS = ["relu6_module", "F.relu6", "F.hardtanh"]


@pytest.mark.parametrize("how", _RELU_CALLS)
def test_oracle_relu_rules_by_hand(how: str) -> None:
    """Image [-1, 2], w = 1: the ReLU's input is [-1, 2]."""
    x = torch.tensor([[[[-1.0, 2.0]]]], dtype=torch.float64)
    # positive signal (v = 2) into a negative input (-1): value = 2 * 0 + 3 = 3; only the
    # deconvnet passes it: projection = 3 * (2 * w) = 6 at pixel 0
    model = _TwoConv(how, w=1.0, v=2.0, b=3.0).double()
    expected = {"deconvnet": 6.0, "guided": 0.0, "gradient": 0.0}
    for rule in ORACLE_RULES:
        p = oracle_projection(model, x, "conv2", (0, 0, 0), rule)
        assert torch.equal(p, torch.tensor([[[expected[rule], 0.0]]], dtype=torch.float64)), (rule, p)
    # negative signal (v = -2) into a positive input (2): value = -4; only the gradient
    # passes it: projection = -4 * (-2) = 8 at pixel 1
    model = _TwoConv(how, w=1.0, v=-2.0, b=0.0).double()
    expected = {"deconvnet": 0.0, "guided": 0.0, "gradient": 8.0}
    for rule in ORACLE_RULES:
        p = oracle_projection(model, x, "conv2", (0, 0, 1), rule)
        assert torch.equal(p, torch.tensor([[[0.0, expected[rule]]]], dtype=torch.float64)), (rule, p)
    # positive signal into a positive input: every rule passes it: 4 * 2 = 8
    model = _TwoConv(how, w=1.0, v=2.0, b=0.0).double()
    for rule in ORACLE_RULES:
        p = oracle_projection(model, x, "conv2", (0, 0, 1), rule)
        assert torch.equal(p, torch.tensor([[[0.0, 8.0]]], dtype=torch.float64)), (rule, p)
    # the model is untouched (the oracle works on a copy)
    assert model.relu.inplace and model.conv2.weight.item() == 2.0


@pytest.mark.parametrize("how", _RELU6_CALLS)
def test_oracle_relu6_rules_by_hand(how: str) -> None:
    """Image [-1, 3, 7], w = 1: the ReLU6's input is [-1, 3, 7], its output [0, 3, 6]."""
    x = torch.tensor([[[[-1.0, 3.0, 7.0]]]], dtype=torch.float64)
    model = _TwoConv(how, w=1.0, v=2.0, b=1.0).double()
    # pixel 0: value 1, input below 0: deconvnet passes relu(2) = 2
    # pixel 1: value 7, inside (0, 6): every rule passes 2 -> 14
    # pixel 2: value 13, input >= 6: nothing flows back, in any rule
    expected = {
        "deconvnet": [2.0, 14.0, 0.0],
        "guided": [0.0, 14.0, 0.0],
        "gradient": [0.0, 14.0, 0.0],
    }
    for rule in ORACLE_RULES:
        for px in range(3):
            p = oracle_projection(model, x, "conv2", (0, 0, px), rule)
            want = torch.zeros(1, 1, 3, dtype=torch.float64)
            want[0, 0, px] = expected[rule][px]
            assert torch.equal(p, want), (rule, px, p)
    # negative signal (v = -2) at pixel 1: value -6; only the gradient passes it: 12
    model = _TwoConv(how, w=1.0, v=-2.0, b=0.0).double()
    for rule in ORACLE_RULES:
        p = oracle_projection(model, x, "conv2", (0, 0, 1), rule)
        assert p[0, 0, 1].item() == {"deconvnet": 0.0, "guided": 0.0, "gradient": 12.0}[rule], rule


def test_oracle_lrn_backward_is_identity_and_forward_is_lrn() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LocalResponseNorm(3, alpha=0.5, beta=0.75, k=1.0)).double()
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = oracle_activation(model, x, "1")
    assert torch.allclose(out, model(x), rtol=1e-14, atol=0)
    # unit (2, 1, 3) of the LRN: its backward to the conv output is the unit itself, so the
    # projection is value * conv weight column
    p = oracle_projection(model, x, "1", (2, 1, 3))
    want = torch.zeros(3, 5, 6, dtype=torch.float64)
    want[:, 1, 3] = out[0, 2, 1, 3] * model[0].weight[2, :, 0, 0]
    assert _rel_err(p, want) < 1e-14


def test_oracle_gradient_rule_is_plain_autograd() -> None:
    """rule='gradient' equals torch's own gradient (in-place ReLU/ReLU6, residual adds)."""

    def plain(model: nn.Module, x: torch.Tensor, layer: str, index: tuple[int, ...]) -> torch.Tensor:
        net = copy.deepcopy(model).eval()
        outs = []
        handle = dict(net.named_modules())[layer].register_forward_hook(lambda _m, _i, o: outs.append(o.clone()))
        xg = x.clone().requires_grad_(True)
        net(xg)
        handle.remove()
        out = outs[-1]
        (g,) = torch.autograd.grad(out[(0, *index)], xg)
        return out[(0, *index)].detach() * g[0]

    for key, layer, index in [
        ("resnet18", "layer2", (3, 2, 5)),
        ("mobilenet_v2", "features.4", (1, 4, 4)),
        ("custom", "fc", (2,)),
        ("custom", "act", (1, 3, 0)),
    ]:
        model, x = get_model(key), get_image(key)
        ref = plain(model, x, layer, index)
        assert ref.abs().max() > 0
        assert _rel_err(oracle_projection(model, x, layer, index, "gradient"), ref) < 1e-12, (key, layer)
        # and the other rules do differ from it on these networks
        assert _rel_err(oracle_projection(model, x, layer, index, "deconvnet"), ref) > 1e-3, (key, layer)


def test_oracle_captures_are_not_overwritten_in_place() -> None:
    """``out += identity`` in a BasicBlock and in-place ReLUs must not change the captured
    bn2 output; module names mean the last call, fx names each call."""
    model, x = get_model("resnet18"), get_image("resnet18")
    with torch.no_grad():
        m = model
        h = m.maxpool(F.relu(m.bn1(m.conv1(x))))
        b = m.layer1[0]
        bn2 = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h)))))
        relu_1 = F.relu(bn2 + h)
    assert torch.allclose(oracle_activation(model, x, "layer1.0.bn2"), bn2, rtol=1e-14, atol=1e-14)
    assert torch.allclose(oracle_activation(model, x, "layer1.0.relu"), relu_1, rtol=1e-14, atol=1e-14)  # last call
    assert torch.allclose(oracle_activation(model, x, "layer1.0.relu_1"), relu_1, rtol=1e-14, atol=1e-14)  # fx name
    assert torch.allclose(oracle_activation(model, x, "layer1.0.add"), bn2 + h, rtol=1e-14, atol=1e-14)
    first = F.relu(b.bn1(b.conv1(h))).detach()
    assert torch.allclose(oracle_activation(model, x, "layer1.0.relu", call=0), first, rtol=1e-14, atol=1e-14)
    # module name (last call) and fx name give the same projection
    flat = int(relu_1[0, 5].argmax())
    index = (5, flat // relu_1.shape[-1], flat % relu_1.shape[-1])
    a = oracle_projection(model, x, "layer1.0.relu", index, "guided")
    c = oracle_projection(model, x, "layer1.0.relu_1", index, "guided")
    assert a.abs().max() > 0 and torch.equal(a, c)


def test_oracle_resnet50_calls_and_leak_guard() -> None:
    model, x = get_model("resnet50"), get_image("resnet50")
    names = get_graph_node_names(model)[1]
    assert {"layer1.0.relu", "layer1.0.relu_1", "layer1.0.relu_2"} <= set(names)
    last = oracle_activation(model, x, "layer1.0.relu")
    assert torch.equal(last, oracle_activation(model, x, "layer1.0.relu_2"))
    ext = create_feature_extractor(copy.deepcopy(model), return_nodes=["layer1.0.relu"]).eval()
    with torch.no_grad():
        assert torch.equal(oracle_activation(model, x, "layer1.0.relu", call=0), ext(x)["layer1.0.relu"])
    # a ReLU outside the oracle's mode is caught by the guard
    t = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(AssertionError, match="escaped"):
        _assert_no_leaked_relu(torch.relu(t) * 2)
    with pytest.raises(AssertionError, match="escaped"):
        _assert_no_leaked_relu(F.relu6(t) * 2)
    _assert_no_leaked_relu(t.clamp(min=0) * 2)


# --------------------------------------------------------------------------- API basics


def test_rules_are_listed_and_checked() -> None:
    assert tuple(zfvis.RULES) == ("deconvnet", "guided", "gradient")
    with pytest.raises(ValueError, match="rule"):
        Deconvnet(get_model("custom"), rule="backprop")
    dn = Deconvnet(get_model("custom"))
    with pytest.raises(ValueError, match="rule"):
        dn.project(get_image("custom"), "conv1", 0, rule="Guided")


def test_resolve_and_layer_names() -> None:
    dn50 = Deconvnet(get_model("resnet50"))
    assert dn50.resolve("layer1.0.relu") == "layer1.0.relu_2"  # a Bottleneck calls relu three times
    assert dn50.resolve("layer1.0.relu_2") == "layer1.0.relu_2"
    assert dn50.resolve("layer1.0.relu_1") == "layer1.0.relu_1"
    assert dn50.resolve("layer1.0.relu_0") == "layer1.0.relu"
    dn18 = Deconvnet(get_model("resnet18"))
    assert dn18.resolve("layer1.0.relu") == "layer1.0.relu_1"
    assert dn18.resolve("layer1.0.add") == "layer1.0.add"
    assert dn18.resolve("layer2") == "layer2.1.relu_1"  # a container: its output
    assert dn18.resolve("layer2.1") == "layer2.1.relu_1"
    assert dn18.resolve("fc") == "fc" and dn18.resolve("flatten") == "flatten"
    assert dn18.resolve("layer1.0.conv1") == "layer1.0.conv1"
    names = dn18.layer_names()
    assert len(names) == len(set(names))
    for n in ["conv1", "layer1", "layer2.1", "layer1.0.relu", "layer1.0.relu_1", "layer1.0.add", "flatten", "fc", "avgpool"]:
        assert n in names, n
    # every graph node name torchvision gives (but the input) is a layer, resolving to itself
    # where it is not also a module name
    modules = dict(get_model("resnet18").named_modules())
    for n in get_graph_node_names(get_model("resnet18"))[1][1:]:
        assert n in names, n
        if n not in modules:
            assert dn18.resolve(n) == n
    dnc = Deconvnet(get_model("custom"))
    assert dnc.resolve("act") == "act_1" and dnc.resolve("act_0") == "act" and dnc.resolve("act_1") == "act_1"
    for n in ["cat", "add", "add_1", "relu", "relu_1", "max_pool2d", "max_pool2d_1", "flatten", "fc"]:
        assert dnc.resolve(n) == n and n in dnc.layer_names()
    dnd = Deconvnet(get_model("densenet121"))
    for n in ["features.denseblock2", "features.transition1", "features.denseblock1.denselayer1.cat", "relu", "classifier"]:
        assert n in dnd.layer_names()
    dnd.resolve("features.denseblock2")


# --------------------------------------------------------------------------- (a) oracle

# (model, layer, kind, rule, how the rule is given)
#   kind: "top" (strongest channel, top_k=2), "pos" (given positions, borders),
#         "all" (two whole-map seeds), "vec" (two units of a vector layer)
#   how:  "ctor" (Deconvnet(model, rule=...)) or "call" (project/record(rule=...))
ORACLE_CASES = [
    # resnet18: every rule
    ("resnet18", "layer2", "top", "deconvnet", "ctor"),
    ("resnet18", "layer3.1", "top", "guided", "call"),
    ("resnet18", "layer1.0.add", "pos", "gradient", "ctor"),
    ("resnet18", "layer1.0.relu_1", "all", "deconvnet", "call"),
    ("resnet18", "layer1.0.relu", "top", "guided", "ctor"),  # the module's last call = relu_1
    ("resnet18", "layer2.0.conv1", "pos", "deconvnet", "call"),  # a conv before its BN
    ("resnet18", "layer2.0.downsample", "top", "gradient", "call"),
    ("resnet18", "layer4", "all", "guided", "call"),
    ("resnet18", "flatten", "vec", "deconvnet", "ctor"),
    ("resnet18", "fc", "vec", "deconvnet", "ctor"),
    ("resnet18", "fc", "vec", "guided", "call"),
    ("resnet18", "fc", "vec", "gradient", "call"),
    # resnet50: a relu module that runs three times
    ("resnet50", "layer1.0.relu", "top", "deconvnet", "ctor"),
    ("resnet50", "layer1.0.relu_0", "pos", "deconvnet", "ctor"),
    ("resnet50", "layer1.0.relu_1", "top", "guided", "call"),
    ("resnet50", "layer2", "top", "deconvnet", "ctor"),
    ("resnet50", "layer3.0.conv1", "pos", "deconvnet", "ctor"),
    ("resnet50", "fc", "vec", "deconvnet", "ctor"),
    # googlenet: branches joined by cat
    ("googlenet", "inception4a", "top", "deconvnet", "ctor"),
    ("googlenet", "inception3b.branch2", "top", "deconvnet", "ctor"),
    ("googlenet", "inception3a", "all", "guided", "call"),
    ("googlenet", "inception4c.cat", "pos", "deconvnet", "ctor"),
    ("googlenet", "conv1.conv", "pos", "deconvnet", "ctor"),
    ("googlenet", "fc", "vec", "deconvnet", "ctor"),
    # googlenet with transform_input: channel slices, unsqueeze, affine constants, cat
    ("googlenet_ti", "conv1", "top", "deconvnet", "ctor"),
    ("googlenet_ti", "maxpool2", "all", "gradient", "call"),
    ("googlenet_ti", "fc", "vec", "deconvnet", "ctor"),
    # densenet121: concatenation everywhere
    ("densenet121", "features.denseblock2", "top", "deconvnet", "ctor"),
    ("densenet121", "features.transition1", "all", "deconvnet", "ctor"),
    ("densenet121", "features.denseblock1.denselayer2", "top", "guided", "call"),
    ("densenet121", "features.denseblock1.denselayer1.cat", "pos", "deconvnet", "ctor"),
    ("densenet121", "features.conv0", "pos", "deconvnet", "ctor"),
    ("densenet121", "relu", "top", "deconvnet", "ctor"),
    ("densenet121", "classifier", "vec", "deconvnet", "ctor"),
    # mobilenet_v2: ReLU6, depthwise convolutions, inverted residuals; every rule
    ("mobilenet_v2", "features.5", "top", "deconvnet", "ctor"),
    ("mobilenet_v2", "features.5", "top", "guided", "call"),
    ("mobilenet_v2", "features.5", "top", "gradient", "call"),
    ("mobilenet_v2", "features.3", "all", "deconvnet", "ctor"),
    ("mobilenet_v2", "features.3.add", "all", "guided", "ctor"),
    ("mobilenet_v2", "features.2.conv.0", "pos", "gradient", "call"),
    ("mobilenet_v2", "features.1.conv.0.0", "pos", "deconvnet", "ctor"),  # depthwise conv before its BN
    ("mobilenet_v2", "features.0.2", "pos", "guided", "ctor"),  # the first ReLU6
    ("mobilenet_v2", "classifier.1", "vec", "deconvnet", "ctor"),
    ("mobilenet_v2", "classifier", "vec", "guided", "call"),
    ("mobilenet_v2", "classifier.1", "vec", "gradient", "call"),
    # custom functional model: every rule
    ("custom", "conv1", "pos", "deconvnet", "ctor"),
    ("custom", "act_0", "top", "guided", "call"),
    ("custom", "cat", "top", "deconvnet", "ctor"),
    ("custom", "cat", "all", "gradient", "call"),
    ("custom", "add", "pos", "deconvnet", "ctor"),
    ("custom", "act", "top", "deconvnet", "ctor"),  # the module's last call = act_1
    ("custom", "act_1", "top", "guided", "ctor"),
    ("custom", "add_1", "all", "guided", "call"),
    ("custom", "max_pool2d_1", "top", "gradient", "ctor"),
    ("custom", "flatten", "vec", "gradient", "ctor"),
    ("custom", "fc", "vec", "deconvnet", "ctor"),
    ("custom", "fc", "vec", "guided", "call"),
    ("custom", "fc", "vec", "gradient", "call"),
]


@pytest.mark.parametrize(("key", "layer", "kind", "rule", "how"), ORACLE_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in ORACLE_CASES])
def test_projection_matches_oracle(key: str, layer: str, kind: str, rule: str, how: str) -> None:
    model, x = get_model(key), get_image(key)
    dn = get_deconvnet(key, rule) if how == "ctor" else get_deconvnet(key)
    kw = {} if how == "ctor" else {"rule": rule}
    oname, call = _oracle_layer(model, layer)
    rec = dn.record(x, layer, **kw)
    out = rec.output
    assert (out.dim() == 2) == (kind == "vec")
    refs: list[torch.Tensor] = []
    if kind == "top":
        (c,) = _strongest(out, 1)
        proj = dn.project(x, layer, c, top_k=2, **kw)
        assert proj.shape == (1, 2, *x.shape[1:])
        seeds = dn.select(rec, c, top_k=2)
        assert len(seeds) == 2 and torch.equal(seeds.value[0], out[0, c].max())
        got = list(proj[0])
        for i in range(2):
            index = (int(seeds.channel[i]), int(seeds.y[i]), int(seeds.x[i]))
            refs.append(oracle_projection(model, x, oname, index, rule, call=call))
    elif kind == "pos":
        (c,) = _strongest(out, 1)
        h, w = out.shape[-2:]
        got = []
        for y, xx in [(0, 0), (h - 1, w - 1), (0, w - 1)]:
            proj = dn.project(x, layer, c, position=(y, xx), **kw)
            assert proj.shape == x.shape
            got.append(proj[0])
            refs.append(oracle_projection(model, x, oname, (c, y, xx), rule, call=call))
    elif kind == "all":
        chans = _strongest(out, 2)
        proj = dn.project(x, layer, chans, position="all", **kw)
        assert proj.shape == (1, 2, *x.shape[1:])
        got = list(proj[0])
        refs = [oracle_whole_map(model, x, oname, c, rule, call=call) for c in chans]
    else:
        units = _strongest(out, 2)
        proj = dn.project(x, layer, units, **kw)
        assert proj.shape == (1, 2, *x.shape[1:])
        got = list(proj[0])
        refs = [oracle_projection(model, x, oname, (u,), rule, call=call) for u in units]
    for i, (a, ref) in enumerate(zip(got, refs)):
        assert _rel_err(a, ref) < RTOL, (i, _rel_err(a, ref))
    assert any(r.abs().max() > 0 for r in refs), "every projection was zero: the test checks nothing"


@pytest.mark.parametrize("key", ["resnet18", "googlenet_ti", "densenet121", "mobilenet_v2", "custom"])
def test_recorded_activations_match_the_model(key: str) -> None:
    model, x = get_model(key), get_image(key, 2)
    dn = Deconvnet(model)
    layers = {
        "resnet18": ["layer1.0.bn2", "layer1.0.add", "layer1.0.relu", "layer3", "fc"],
        "googlenet_ti": ["cat", "inception3a", "fc"],
        "densenet121": ["features.denseblock1.denselayer1.cat", "features.transition1", "classifier"],
        "mobilenet_v2": ["features.0.2", "features.3", "classifier"],
        "custom": ["act_0", "act", "cat", "add_1", "fc"],
    }[key]
    for layer in layers:
        oname, call = _oracle_layer(model, layer)
        ref = oracle_activation(model, x, oname, call=call)
        assert _rel_err(dn.record(x, layer).output, ref) < 1e-12, layer


def test_rules_differ_and_keep_their_signs() -> None:
    """On a ReLU network the three rules give different projections; guided is zero
    wherever either deconvnet or gradient is (it is their intersection)."""
    model, x = get_model("resnet18"), get_image("resnet18")
    dn = Deconvnet(model)
    p = {r: dn.project(x, "layer2.0.bn1", 3, top_k=1, rule=r)[0, 0] for r in zfvis.RULES}
    assert _rel_err(p["deconvnet"], p["gradient"]) > 1e-3
    assert _rel_err(p["guided"], p["gradient"]) > 1e-3
    assert _rel_err(p["guided"], p["deconvnet"]) > 1e-3
    # the rule given to the constructor is the default of every call
    q = Deconvnet(model, rule="guided").project(x, "layer2.0.bn1", 3, top_k=1)[0, 0]
    assert torch.equal(q, p["guided"])
    assert torch.equal(Deconvnet(model, rule="guided").project(x, "layer2.0.bn1", 3, top_k=1, rule="deconvnet")[0, 0], p["deconvnet"])


# --------------------------------------------------------------------------- (b) windowed == dense

WINDOW_CASES = [
    ("resnet18", ["conv1", "layer1.0.conv1", "layer1.0.add", "layer2.0.downsample.0", "layer2", "layer3.0.relu", "layer4"]),
    ("googlenet", ["maxpool1", "inception3a.branch3", "inception3a", "inception4a", "inception5b"]),
    ("densenet121", ["features.pool0", "features.denseblock1.denselayer2", "features.transition1", "features.denseblock2"]),
    ("mobilenet_v2", ["features.0", "features.2", "features.3", "features.7.conv.1", "features.10"]),
    ("custom", ["conv_a", "cat", "add", "act", "add_1", "max_pool2d_1"]),
]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = EXACT) -> bool:
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-300)


@pytest.mark.parametrize(("key", "layers"), WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_windowed_equals_dense(key: str, layers: list[str]) -> None:
    model = get_model(key)
    windowed, dense = Deconvnet(model), Deconvnet(model, windowed=False)
    x = get_image(key, 2, seed=5)
    for layer in layers:
        rec = windowed.record(x, layer)
        out = rec.output
        h, w = out.shape[-2:]
        positions = sorted({(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2), (1 % h, (w - 2) % w)})
        chans = (0, _strongest(out, 1)[0])
        img, ch, ys, xs = zip(*[(i, c, y, xx) for i in range(2) for c in chans for y, xx in positions])
        img, ch, ys, xs = (torch.tensor(v) for v in (img, ch, ys, xs))
        seeds = Seeds(img, ch, ys, xs, out[img, ch, ys, xs])
        a = windowed.reverse(rec, seeds).full()
        b = dense.reverse(rec, seeds).full()
        assert a.shape == b.shape == (len(seeds), *x.shape[1:])
        assert b.abs().max() > 0, layer
        assert _close(a, b), layer
        top = windowed.select(rec, list(chans), top_k=2)
        assert _close(windowed.reverse(rec, top).full(), dense.reverse(rec, top).full()), layer
    # and through project(), with the other rules and whole maps
    last = layers[-1]
    for rule in ("guided", "gradient"):
        a = windowed.project(x, last, [0, 1], position=(0, 0), rule=rule)
        b = dense.project(x, last, [0, 1], position=(0, 0), rule=rule)
        assert _close(a, b), rule
    a = windowed.project(x, layers[1], [0, 1], position="all")
    b = dense.project(x, layers[1], [0, 1], position="all")
    assert _close(a, b)


# --------------------------------------------------------------------------- (c) windowing is on


def _record_transposed_convs(monkeypatch: pytest.MonkeyPatch, model: nn.Module) -> list[tuple[str, tuple[int, int]]]:
    """Wraps F.conv_transpose2d (and torch.conv_transpose2d, the same function) to record
    which model convolution (by its tied weight, or by its shape where the weight comes
    scaled by a folded batch norm) ran on what signal size."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    by_weight = {id(m.weight): name for name, m in convs}
    shapes = [tuple(m.weight.shape) for _, m in convs]
    by_shape = {tuple(m.weight.shape): name for name, m in convs if shapes.count(tuple(m.weight.shape)) == 1}
    calls: list[tuple[str, tuple[int, int]]] = []
    original = F.conv_transpose2d

    def wrapper(*args, **kwargs):
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        fallback = by_shape.get(tuple(weight.shape), f"<not a model conv weight: {tuple(weight.shape)}>")
        name = by_weight.get(id(weight), fallback)
        calls.append((name, tuple(args[0].shape[-2:])))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv_transpose2d", wrapper)
    monkeypatch.setattr(torch, "conv_transpose2d", wrapper)
    return calls


def _conv_output_sizes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    sizes: dict[str, tuple[int, int]] = {}
    net = copy.deepcopy(model)
    handles = [
        m.register_forward_hook(lambda _m, _i, o, name=name: sizes.__setitem__(name, tuple(o.shape[-2:])))
        for name, m in net.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return sizes


def _windowing_violations(calls, full_sizes) -> list[str]:
    """The transposed convolutions that ran on their convolution's whole output map (or
    larger), or on a weight that is not the model's."""
    bad = []
    for name, (h, w) in calls:
        if name not in full_sizes:
            bad.append(f"{name}: unknown convolution")
            continue
        fh, fw = full_sizes[name]
        if not (h <= fh and w <= fw and h * w < fh * fw):
            bad.append(f"{name}: signal {h}x{w}, map {fh}x{fw}")
    return bad


def test_reverse_pass_is_windowed(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = get_model("resnet18"), get_image("resnet18")
    full_sizes = _conv_output_sizes(model, x)
    assert full_sizes["conv1"] == (32, 32) and full_sizes["layer1.0.conv1"] == (16, 16)
    layer = "layer1.0.conv1"
    windowed, dense = Deconvnet(model), Deconvnet(model, windowed=False)
    rec = windowed.record(x, layer)
    (c,) = _strongest(rec.output, 1)
    seeds = windowed.select(rec, c, top_k=2)
    mid = windowed.select(rec, c, position=(8, 8))

    calls = _record_transposed_convs(monkeypatch, model)
    patches = windowed.reverse(rec, seeds)
    windowed.reverse(rec, mid)
    windowed.project(x, layer, c, position=(5, 9))
    assert {name for name, _ in calls} == {"conv1", "layer1.0.conv1"}, calls
    assert _windowing_violations(calls, full_sizes) == []
    assert patches.pixels.shape[-2] < x.shape[-2] and patches.pixels.shape[-1] < x.shape[-1]
    # the same check fails on the dense engine: its transposed convolutions see whole maps
    calls.clear()
    dense_patches = dense.reverse(rec, seeds)
    dense.project(x, layer, c, position=(5, 9))
    assert {name for name, _ in calls} == {"conv1", "layer1.0.conv1"}, calls
    violations = _windowing_violations(calls, full_sizes)
    assert len(violations) == len(calls), violations
    assert all(size == full_sizes[name] for name, size in calls)
    # both give the same projection
    assert _close(patches.full(), dense_patches.full())


# --------------------------------------------------------------------------- (d) model untouched


class _WithSigmoid(nn.Module):
    """An unsupported op (rounding the image: no gradient) in front of a supported network."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 4) / 4)


def _mixed_mode(key: str) -> nn.Module:
    """A fresh model in train mode with one submodule in eval mode and user hooks."""
    model = _build(key)
    model.train()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[1].eval()
    model.user_calls = 0  # type: ignore[assignment]

    def user_hook(_m, _i, _o):
        model.user_calls += 1  # type: ignore[operator]

    convs[0].register_forward_hook(user_hook)
    convs[2].register_forward_pre_hook(lambda _m, _i: None)
    return model


UNTOUCHED = {
    # model: (a deep layer, a vector layer, a layer to seed whole maps)
    "resnet18": ("layer2.1", "fc", "layer1.0.add"),
    "googlenet": ("inception3b", "fc", "inception3a.branch2"),
    "densenet121": ("features.transition1", "classifier", "features.denseblock1.denselayer1.cat"),
    "mobilenet_v2": ("features.4", "classifier", "features.3.add"),
}


# a convolution before each model's deep layer, replaced by a mismatched one
BROKEN = {
    "resnet18": "layer2.0.conv2",
    "googlenet": "inception3b.branch3.1.conv",
    "densenet121": "features.denseblock1.denselayer3.conv2",
    "mobilenet_v2": "features.4.conv.1.0",
}


@pytest.mark.parametrize("key", list(UNTOUCHED))
def test_model_unchanged_after_runs_and_errors(key: str) -> None:
    deep, vector, whole = UNTOUCHED[key]
    model = _mixed_mode(key)
    flags = {name: m.training for name, m in model.named_modules()}
    snap = _snapshot(model)
    x = get_image(key)
    dn = Deconvnet(model)
    # normal runs
    dn.project(x, deep, [0, 1], top_k=2)
    dn.project(x, whole, 0, position="all", rule="guided")
    dn.project(x, vector, [1, 2], rule="gradient")
    rec = dn.record(x, deep)
    dn.reverse(rec, dn.select(rec, [0], top_k=2)).full()
    dn.reverse_stack(rec)
    dn.layer_names()
    dn.resolve(deep)
    assert torch._C._len_torch_function_stack() == 0
    _assert_unchanged(model, snap)
    assert model.user_calls > 0  # the user's hook still runs
    # errors
    with pytest.raises(ValueError):
        dn.project(x, deep, 100000)  # bad channel
    with pytest.raises(ValueError):
        dn.project(x, deep + "x", 0)  # bad layer
    with pytest.raises(ValueError):
        dn.project(x, deep, 0, rule="nope")
    with pytest.raises((RuntimeError, ValueError)):  # conv1 raises mid-forward: 4 channels
        dn.project(torch.randn(1, 4, 64, 64, dtype=torch.float64), deep, 0)
    assert torch._C._len_torch_function_stack() == 0
    _assert_unchanged(model, snap)
    # a supported module deep inside raises mid-forward: a convolution given one input
    # channel too many (fx traces it; only running it fails)
    broken = _mixed_mode(key)
    parent_name, _, child = BROKEN[key].rpartition(".")
    parent = broken.get_submodule(parent_name)
    conv = getattr(parent, child)
    bad = nn.Conv2d(conv.in_channels + 1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    setattr(parent, child, bad.double())
    bsnap = _snapshot(broken)
    with pytest.raises((RuntimeError, ValueError)):
        Deconvnet(broken).project(x, deep, 0)
    assert torch._C._len_torch_function_stack() == 0
    _assert_unchanged(broken, bsnap)
    # an unsupported op in front of the model
    wrapped = _WithSigmoid(model)
    wsnap = _snapshot(wrapped)
    with pytest.raises(UnsupportedModelError):
        Deconvnet(wrapped).project(x, "inner." + deep, 0)
    assert torch._C._len_torch_function_stack() == 0
    _assert_unchanged(wrapped, wsnap)
    _assert_unchanged(model, snap)
    assert {name: m.training for name, m in model.named_modules()} == flags


class _RaisesAfter(nn.Module):
    """resnet18's stem, then a module that raises."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.boom = _Boom()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner.layer1(self.inner.maxpool(self.inner.relu(self.inner.bn1(self.inner.conv1(x)))))
        return self.inner.layer2(self.boom(h) + h)


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_model_unchanged_when_a_module_raises_mid_forward() -> None:
    model = _RaisesAfter(_build("resnet18")).train()
    snap = _snapshot(model)
    x = get_image("resnet18")
    with pytest.raises((RuntimeError, ValueError), match="boom"):
        Deconvnet(model).project(x, "inner.layer2", 0)
    assert torch._C._len_torch_function_stack() == 0
    _assert_unchanged(model, snap)
    assert model.training and model.inner.layer1[0].bn1.training


# --------------------------------------------------------------------------- (e) tied weights


def test_reverse_convolutions_are_tied_to_resnet18() -> None:
    from zfvis.core.reverse import ReverseConv2d

    model, x = get_model("resnet18"), get_image("resnet18")
    dn = Deconvnet(model)
    rec = dn.record(x, "layer2")
    stack = dn.reverse_stack(rec)
    assert isinstance(stack, nn.Module)
    modules = dict(model.named_modules())
    convs = [layer for layer in stack.layers if isinstance(layer, ReverseConv2d)]
    expected = {n for n, m in modules.items() if isinstance(m, nn.Conv2d) and n.split(".")[0] in ("conv1", "layer1", "layer2")}
    assert {layer.source for layer in convs} == expected
    for layer in convs:
        assert layer.weight is modules[layer.source].weight
    # no copy of any weight among the stack's parameters
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in stack.parameters())


def test_changing_resnet18_conv_weights_changes_the_next_projection() -> None:
    model, x = _build("resnet18"), get_image("resnet18")
    dn = Deconvnet(model)
    layer = "layer1.0.conv1"  # (not "conv1": a resnet alias may name its rectified output)
    before = dn.project(x, layer, [0, 3], position=(10, 7))
    value_before = dn.record(x, layer).output[0, [0, 3], 10, 7]
    assert (value_before != 0).all()
    model.layer1[0].conv1.weight.data.mul_(2)  # no bias: its output doubles
    after = dn.project(x, layer, [0, 3], position=(10, 7))
    assert torch.allclose(dn.record(x, layer).output[0, [0, 3], 10, 7], 2 * value_before, rtol=1e-14, atol=0)
    assert torch.allclose(after, 4 * before, rtol=1e-12, atol=1e-300)  # value and filter both double
    assert _rel_err(after[0, 1], oracle_projection(model, x, layer, (3, 10, 7))) < RTOL
    # a deeper conv changed in place: the next deep projection sees it, through the residual
    model.layer1[0].conv2.weight.data.neg_()
    deep_after = dn.project(x, "layer1", 2, position=(4, 4))
    assert _rel_err(deep_after[0], oracle_projection(model, x, "layer1", (2, 4, 4))) < RTOL
    for layer in dn.reverse_stack(dn.record(x, "layer1")).layers:
        if getattr(layer, "source", None) == "layer1.0.conv2":
            assert layer.weight is model.layer1[0].conv2.weight
            break
    else:
        pytest.fail("no reverse layer for layer1.0.conv2")


# --------------------------------------------------------------------------- (f) errors


def test_unknown_layer_lists_closest_names() -> None:
    dn = Deconvnet(get_model("resnet18"))
    x = get_image("resnet18")
    with pytest.raises(ValueError) as info:
        dn.project(x, "layer5", 0)
    msg = str(info.value)
    assert "'layer5'" in msg and "layer4" in msg
    with pytest.raises(ValueError, match="layer1.0.relu_1"):
        dn.resolve("layer1.0.relu_7")
    with pytest.raises(ValueError, match="layer1.0.add"):
        dn.resolve("layer1.0.ad")
    dn50 = Deconvnet(get_model("resnet50"))
    with pytest.raises(ValueError):
        dn50.resolve("layer1.0.relu_3")  # it runs three times: relu_0 .. relu_2


class _Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        return self.conv2(torch.sigmoid(h))


class _Product(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv1(x) * self.conv2(x))


@pytest.mark.parametrize(("cls", "node"), [(_Sigmoid, "sigmoid"), (_Product, "mul")])
@pytest.mark.parametrize("rule", ORACLE_RULES)
def test_gate_and_product_keep_their_true_backward(cls, node: str, rule: str) -> None:
    """A sigmoid passes f'(x) * signal and a product of two input-dependent tensors sends
    the signal into both factors, under every rule: as the oracle's autograd does."""
    model = cls().double().eval()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    layer = "conv3" if cls is _Product else "conv2"
    dn = Deconvnet(model)
    p = dn.project(x, layer, 1, position=(4, 6), rule=rule)
    ref = oracle_projection(model, x, layer, (1, 4, 6), rule)
    assert ref.abs().max() > 0 and _rel_err(p[0], ref) < RTOL
    stack = str(dn.reverse_stack(dn.record(x, layer)))
    assert node in stack and "VectorJacobian" not in stack  # an explicit layer, not the generic one


def test_batchnorm_without_running_stats_is_refused() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.BatchNorm2d(4, track_running_stats=False)
            self.conv2 = nn.Conv2d(4, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(F.relu(self.norm(self.conv(x))))

    model = M().double().eval()
    snap = _snapshot(model)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError) as info:
        Deconvnet(model).project(x, "conv2", 0)
    assert "norm" in str(info.value)
    _assert_unchanged(model, snap)
    assert torch._C._len_torch_function_stack() == 0
