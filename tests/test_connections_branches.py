"""Connections through branches: a convolution fed by a concatenation (Inception, DenseNet) or a sum
(ResNet). Per input channel the layer below it comes from (and its channel there) is checked against
autograd and the model's own tensors, and the contributions with the bias sum to the pre-activation
(float64), on torchvision's GoogLeNet, ResNet-18 and DenseNet-121 (random weights) and on generated
small models."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import zfvis
from zfvis.analysis.connections import Source

pytestmark = pytest.mark.usefixtures("single_thread")


def _module(dn: zfvis.Deconvnet, name: str) -> nn.Module | None:
    return dict(dn.model.named_modules()).get(dn.aliases.get(name, name))


def _run(dn: zfvis.Deconvnet, conv_name: str, sources: list[str], x: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:  # fmt: skip
    """From the model's own forward (hooks, autograd on): the convolution's input, its pre-activation
    (the batch norm's output when one follows and is folded) and each source layer's output (the
    tensor itself, for autograd, and a copy of its values before an in-place op changes them)."""
    model = dn.model
    conv = dict(model.named_modules())[conv_name]
    users = dn.graph.module_output[conv_name].users
    after = users[0].module if len(users) == 1 and isinstance(users[0].module, nn.BatchNorm2d) else conv
    got: dict[str, torch.Tensor] = {}
    handles = [conv.register_forward_pre_hook(lambda m, a: got.__setitem__("input", a[0])),
               after.register_forward_hook(lambda m, a, out: got.__setitem__("pre", out.detach().clone()))]
    for name in sources:
        if _module(dn, name) is None:  # not a module's output (a concatenation): zfvis's forward gives it
            value = dn.output(x, name)
            got[name] = (value, value)
            continue
        handles.append(_module(dn, name).register_forward_hook(
            lambda m, a, out, name=name: got.__setitem__(name, (out, out.detach().clone()))))
    try:
        model(x.clone().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    return got["input"], got["pre"], {n: got[n] for n in sources}


def _check(dn: zfvis.Deconvnet, layer: str, x: torch.Tensor, channels: list[int],
           between: Callable[[torch.Tensor], torch.Tensor] = F.relu) -> zfvis.Connections:
    """The identity at three positions per channel, and the sources: a concatenation's input channel
    depends, of its branch's output, on exactly the channel named; a sum's is the ReLU of its addends'
    named channels through ``between`` (ResNet: a ReLU); a chain's is the named layer's channel."""
    c = zfvis.connections(dn, layer, channels[0])
    names = sorted({n for r in c.sources for n in r.layers if r.kind != "chain"})
    a, pre, outs = _run(dn, c.conv, names, x)
    assert [r.first for r in c.sources] == [0, *[r.first + r.count for r in c.sources][:-1]]
    assert sum(r.count for r in c.sources) == a.shape[1]
    for ch in channels:
        for pos in [None, (0, 0), (pre.shape[2] - 1, pre.shape[3] // 2)]:
            got = zfvis.connections(dn, layer, ch, images=x.detach(), position=pos)
            y, xx = got.position
            assert float(got.contribution.double().sum()) + got.bias == pytest.approx(
                float(pre[0, ch, y, xx]), rel=1e-12, abs=1e-12)
    g = torch.Generator().manual_seed(1)
    seen = 0
    for i in torch.randint(a.shape[1], (8,), generator=g).tolist():
        pairs = c.source(i)
        run = next(r for r in c.sources if r.first <= i < r.first + r.count)
        if run.kind == "chain":  # the layer named below is the convolution's input itself
            torch.testing.assert_close(dn.output(x.detach(), pairs[0][0])[:, pairs[0][1]], a[:, i].detach(),
                                       rtol=0, atol=0)
            continue
        if run.kind == "sum":
            total = sum(outs[n][1][:, j] for n, j in pairs)
            torch.testing.assert_close(a[:, i].detach(), between(total), rtol=0, atol=1e-12)
            continue
        ((name, j),) = pairs
        (grad,) = torch.autograd.grad(a[:, i].sum(), outs[name][0], retain_graph=True)
        hit = grad[0].abs().flatten(1).sum(1).nonzero().flatten().tolist()
        assert hit in ([j], []), (layer, i, name, hit)  # none: a ReLU below is off over the whole map
        seen += len(hit)
    assert seen or not any(r.kind == "concat" for r in c.sources)
    return c


@pytest.fixture(scope="module")
def googlenet() -> zfvis.Deconvnet:
    torch.manual_seed(0)
    return zfvis.Deconvnet(torchvision.models.googlenet(weights=None, init_weights=False,
                                                        aux_logits=False).double().eval())


@pytest.fixture(scope="module")
def resnet18() -> zfvis.Deconvnet:
    torch.manual_seed(0)
    return zfvis.Deconvnet(torchvision.models.resnet18(weights=None).double().eval())


@pytest.fixture(scope="module")
def densenet121() -> zfvis.Deconvnet:
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None).double().eval()
    with torch.no_grad():  # random running statistics: the batch norms are folded, not identities
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return zfvis.Deconvnet(model)


def _image(size: int = 64) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def test_googlenet_concatenation(googlenet: zfvis.Deconvnet) -> None:
    c = _check(googlenet, "inception4a.branch1.conv", _image(), [0, 100, 191])
    assert [(r.first, r.count, r.layers, r.kind) for r in c.sources] == [
        (0, 128, ("inception3b.branch1",), "concat"), (128, 192, ("inception3b.branch2",), "concat"),
        (320, 96, ("inception3b.branch3",), "concat"), (416, 64, ("inception3b.branch4",), "concat")]
    assert c.source(130) == [("inception3b.branch2", 2)] and c.below == "pool3"
    _check(googlenet, "inception3b.branch3.0.conv", _image(), [0, 31])


def test_resnet18_sum(resnet18: zfvis.Deconvnet) -> None:
    c = _check(resnet18, "layer1.1.conv1", _image(), [0, 63])
    assert c.sources == [Source(0, 64, ("layer1.0.bn2", "pool1"), 0, "sum")] and c.below == "layer1.0"
    assert c.source(5) == [("layer1.0.bn2", 5), ("pool1", 5)]
    _check(resnet18, "layer2.0.downsample.0", _image(), [3])
    chain = _check(resnet18, "layer1.0.conv2", _image(), [7])  # a plain chain keeps its answer
    assert chain.sources == [Source(0, 64, (chain.below,), 0, "chain")]


def test_densenet121_concatenation(densenet121: zfvis.Deconvnet) -> None:
    c = _check(densenet121, "features.denseblock1.denselayer3.conv1", _image(32), [0, 127])
    assert [(r.first, r.count, r.layers) for r in c.sources] == [
        (0, 64, ("pool1",)), (64, 32, ("features.denseblock1.denselayer1",)),
        (96, 32, ("features.denseblock1.denselayer2",))]
    c = _check(densenet121, "features.transition1.conv", _image(32), [5])
    assert len(c.sources) == 7 and c.source(255) == [("features.denseblock1.denselayer6", 31)]


# --------------------------------------------------------------------------- generated models


class _Branchy(nn.Module):
    """A stem, then blocks: a concatenation of 2-3 branches (conv, maybe batch norm, ReLU, maybe a
    pool) or a residual sum ``relu(body(x) + x)``; then a head convolution (maybe a batch norm),
    maybe after a pool."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        width = rng.randint(2, 4)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.kinds: list[str] = []
        self.widths: list[list[int]] = []
        blocks = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.5:
                outs = [rng.randint(1, 4) for _ in range(rng.randint(2, 3))]
                blocks.append(nn.ModuleList([self._branch(rng, width, n) for n in outs]))
                self.kinds.append("cat")
                self.widths.append(outs)
                width = sum(outs)
            else:
                body = [nn.Conv2d(width, width, 3, padding=1)] + ([nn.BatchNorm2d(width)] if rng.random() < 0.5 else [])
                blocks.append(nn.Sequential(*body))
                self.kinds.append("add")
                self.widths.append([width])
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2) if rng.random() < 0.5 else nn.Identity()
        self.head = nn.Conv2d(width, 3, 3, stride=rng.choice([1, 2]), padding=rng.choice([0, 1]),
                              bias=rng.random() < 0.5)
        self.head_bn = nn.BatchNorm2d(3) if rng.random() < 0.5 else nn.Identity()

    @staticmethod
    def _branch(rng: random.Random, width: int, n: int) -> nn.Sequential:
        parts: list[nn.Module] = [nn.Conv2d(width, n, rng.choice([1, 3]), padding="same")]
        parts += [nn.BatchNorm2d(n)] if rng.random() < 0.5 else []
        parts += [nn.ReLU()] + ([nn.MaxPool2d(3, 1, 1)] if rng.random() < 0.3 else [])
        return nn.Sequential(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for kind, block in zip(self.kinds, self.blocks):
            x = torch.cat([b(x) for b in block], 1) if kind == "cat" else F.relu(block(x) + x)
        return F.relu(self.head_bn(self.head(self.pool(x))))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.3, 0.3), (m.running_mean, -0.3, 0.3),
                                  (m.running_var, 0.5, 2.0)):
                    t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)
    return model.double().eval()


@pytest.mark.parametrize("seed", range(12))
def test_generated_models(seed: int) -> None:
    rng = random.Random(seed)
    model = _randomize(_Branchy(rng), seed)
    dn = zfvis.Deconvnet(model)
    last, kind, widths = len(model.blocks) - 1, model.kinds[-1], model.widths[-1]
    c = _check(dn, "head", _image(12), [0, 1, 2], lambda t: model.pool(F.relu(t)))
    if kind == "cat":
        assert [r.layers for r in c.sources] == [(f"blocks.{last}.{k}",) for k in range(len(widths))]
        assert [r.count for r in c.sources] == widths and {r.kind for r in c.sources} == {"concat"}
    else:
        (run,) = c.sources
        assert run.kind == "sum" and run.count == widths[0] and run.layers[0] == f"blocks.{last}"
        assert dn.resolve(run.layers[1])  # the other addend is a layer one can pass back
    with pytest.raises(zfvis.UserInputError, match="out of range"):
        c.source(sum(r.count for r in c.sources))


# --------------------------------------------------------------------------- refused


class _Difference(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.a(x) - self.b(x)))


class _WidthCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(torch.cat([self.a(x), self.b(x)], 3)))


class _Upsampled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(8, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(F.relu(self.b(x)), scale_factor=1.0)
        return self.c(torch.cat([F.relu(self.a(x)), up], 1))


@pytest.mark.parametrize(("model", "match"), [
    (_Difference(), "layer 'c'.*'sub'"),
    (_WidthCat(), "layer 'c'.*another axis"),
    (_Upsampled(), "layer 'c'.*branches comes from .*interpolate"),
])
def test_unsupported_branches_are_refused_by_name(model: nn.Module, match: str) -> None:
    with pytest.raises(zfvis.UnsupportedModelError, match=match):
        zfvis.connections(model, "c", 0)
