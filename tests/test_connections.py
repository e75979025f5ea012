"""Connections of a unit: the input channels' terms and the bias sum to the pre-activation (float64,
exactly up to rounding), the weight norms are the filters', and other layers are refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zfvis

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def shipped64() -> tuple[nn.Module, torch.Tensor]:
    model, pre = zfvis.load_model("zfnet-cifar10")
    x = pre(zfvis.load_image(zfvis.default_image())).unsqueeze(0)
    return model.double(), x.double()


def _preactivation(model: nn.Module, module_name: str, x: torch.Tensor) -> torch.Tensor:
    """The output of a module (the BN after a convolution), from the ordinary forward."""
    caught = []
    module = dict(model.named_modules())[module_name]
    handle = module.register_forward_hook(lambda m, a, out: caught.append(out.clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return caught[0][0]


@pytest.mark.parametrize(("layer", "bn", "below"), [("conv2", "features.6", "conv1"), ("conv3", "features.11", "conv2"),
                                                    ("conv5", "features.17", "conv4")])
def test_contributions_and_bias_sum_to_the_preactivation(shipped64, layer: str, bn: str, below: str) -> None:
    model, x = shipped64
    pre = _preactivation(model, bn, x)
    g = torch.Generator().manual_seed(0)
    for channel in torch.randint(pre.shape[0], (4,), generator=g).tolist():
        best = zfvis.connections(model, layer, channel, images=x)
        y, xx = best.position
        assert pre[channel, y, xx] == pre[channel].max() and best.below == below
        for pos in [best.position, (0, 0), (pre.shape[1] - 1, 1)]:
            c = zfvis.connections(model, layer, channel, images=x, position=pos)
            total = float(c.contribution.sum()) + c.bias
            assert total == pytest.approx(float(pre[channel, pos[0], pos[1]]), rel=0, abs=1e-10)
            assert c.preactivation == pytest.approx(total, abs=1e-10)


class _Chain(nn.Module):
    """VGG-like: convolutions with biases, no batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 5, 3, stride=2, padding=2, dilation=2), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_a_chain_with_biases_and_the_weight_norms() -> None:
    model = _Chain().double().eval()
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    conv = model.features[3]
    with torch.no_grad():
        z = conv(model.features[2](model.features[1](model.features[0](x))))[0]
    for channel in range(5):
        c = zfvis.connections(model, "features.4", channel, images=x, position=(1, 2))
        assert c.conv == "features.3" and c.below == "features.1"
        assert float(c.contribution.sum()) + c.bias == pytest.approx(float(z[channel, 1, 2]), abs=1e-12)
        torch.testing.assert_close(c.by_weight, conv.weight[channel].flatten(1).norm(dim=1).float())
        top = c.top(3, by="weight")
        assert [v for _, v in top] == sorted(c.by_weight.tolist(), reverse=True)[:3]


def test_weights_only_without_an_image(shipped64) -> None:
    model, _ = shipped64
    c = zfvis.connections(model, "conv4", 3)
    assert c.contribution is None and c.by_weight.shape == (128,)
    with pytest.raises(zfvis.UserInputError, match="by='weight'"):
        c.top()


class _Product(nn.Module):
    """A gate (a product of branches): not a chain, a concatenation or a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        return self.c(F.relu(self.b(y) * y))


@pytest.mark.parametrize(("model", "layer", "error", "match"), [
    (_Chain(), "features.0", zfvis.UnsupportedModelError, "layer 'features.0'.*the input image"),
    (_Product(), "c", zfvis.UnsupportedModelError, "layer 'c'.*'mul'"),
    (_Chain(), "features.2", zfvis.UserInputError, "not a convolution"),
    (_Chain(), "features.3", zfvis.UserInputError, "out of range"),
])
def test_other_layers_are_refused_by_name(model: nn.Module, layer: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        zfvis.connections(model, layer, 9 if match == "out of range" else 0)


def test_position_and_images_are_checked(shipped64) -> None:
    model, x = shipped64
    with pytest.raises(zfvis.UserInputError, match="outside"):
        zfvis.connections(model, "conv3", 0, images=x, position=(8, 0))
    with pytest.raises(zfvis.UserInputError, match="one image"):
        zfvis.connections(model, "conv3", 0, images=torch.cat([x, x]))




@pytest.mark.parametrize("module", ["zfvis.analysis.connections", "zfvis.analysis.feature_vis.optimize"])
def test_paper_names_are_known_without_the_zoo(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """``zfvis.connections(vgg, "conv3_1")`` and ``zfvis.feature_vis(vgg, "conv2_1")`` on a VGG built by
    torchvision, where the zoo was never loaded: importing each module registers the zoo's layer names."""
    import importlib
    import sys

    import zfvis.core.aliases as aliases

    importlib.import_module(module)  # (loaded once, so that everything below is put back afterwards)
    registry: list = []
    monkeypatch.setattr(aliases, "_REGISTRY", registry)
    for name in ("zfvis.models.aliases", module):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(zfvis.models, "aliases", raising=False)
    parent, _, leaf = module.rpartition(".")
    monkeypatch.setattr(sys.modules[parent], leaf, getattr(sys.modules[parent], leaf))  # restored afterwards
    importlib.import_module(module)
    assert any(cls.__name__ == "VGG" for cls, _ in registry)
