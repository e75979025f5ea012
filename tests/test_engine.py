"""Tests for the deconvnet engine (zfvis.core.deconvnet, zfvis.core.reverse, zfvis.core.cone, zfvis.core.record).

The reference for every projection is ``tests/oracle.py``: the deconvnet written as
autograd (value * d act / d x with ReLU backward replaced by ReLU of the gradient and
contrast normalisation's backward by the identity), computed independently of the engine.
Everything runs in float64 so agreement is to ~1e-15; the tolerance is 1e-6 relative.
"""

from __future__ import annotations

import copy
import functools

import memory_guard
import pytest
import torch
import torch.nn.functional as F
import torchvision
from oracle import oracle_backward, oracle_projection
from torch import nn

import zfvis
from zfvis import Deconvnet, Seeds, UnsupportedModelError, load_model
from zfvis.core.reverse import ReverseConv2d

RTOL = 1e-6

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test of this module runs on one intra-op thread."""


# --------------------------------------------------------------------------- helpers


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|; ``ours`` must be exactly zero where ``ref`` is all zero."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def _randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random affine parameters and running statistics for every BatchNorm2d."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
    return model


class Chain(nn.Module):
    """features -> flatten (a module, or torch.flatten in forward) -> head."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential | None = None, *, functional_flatten: bool = False):
        super().__init__()
        self.features = features
        self.functional_flatten = functional_flatten
        if head is not None:
            if not functional_flatten:
                self.flatten = nn.Flatten()
            self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if not hasattr(self, "head"):
            return x
        x = torch.flatten(x, 1) if self.functional_flatten else self.flatten(x)
        return self.head(x)


def odd_net() -> nn.Module:
    """Input (3, 37, 29): ceil-mode pools, stride 2, folded BN, LRN, dilation + groups,
    overlapping 3x3/2 pool, asymmetric 'same' padding, divisible adaptive pool, Flatten
    module, Dropout, Linear head."""
    torch.manual_seed(11)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0: 37x29
        nn.ReLU(),  # 1
        nn.MaxPool2d(2, 2, ceil_mode=True),  # 2: 19x15 (last window half outside)
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),  # 3: 10x8
        nn.BatchNorm2d(8),  # 4 (folded into 3)
        nn.ReLU(inplace=True),  # 5
        nn.LocalResponseNorm(3, alpha=1e-2, beta=0.75, k=1.0),  # 6
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2),  # 7: 10x8
        nn.ReLU(),  # 8
        nn.MaxPool2d(3, 2),  # 9: 4x3, overlapping
        nn.Conv2d(8, 6, (3, 2), padding="same"),  # 10: 4x3, even kernel width: asymmetric padding
        nn.ReLU(),  # 11
        nn.AdaptiveAvgPool2d((2, 3)),  # 12: divisible
    )
    head = nn.Sequential(nn.Dropout(0.3), nn.Linear(6 * 2 * 3, 10), nn.ReLU(), nn.Linear(10, 5))
    return _randomize_bn(Chain(features, head)).eval()


def pool_net() -> nn.Module:
    """Input (3, 33, 30): anisotropic stride/padding, AvgPool2d with padding, a BatchNorm2d
    that follows a pool (not folded), padded ceil-mode max-pool, dilation, a
    non-divisible AdaptiveAvgPool2d, torch.flatten in forward(), Linear head."""
    torch.manual_seed(12)
    features = nn.Sequential(
        nn.Conv2d(3, 6, 5, stride=(2, 1), padding=(2, 1)),  # 0: 17x28
        nn.ReLU(),  # 1
        nn.AvgPool2d(3, stride=2, padding=1),  # 2: 9x14
        nn.BatchNorm2d(6),  # 3: alone
        nn.Conv2d(6, 8, 3, padding=1),  # 4: 9x14
        nn.ReLU(),  # 5
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),  # 6: 5x8
        nn.Conv2d(8, 8, 3, dilation=2, padding=1),  # 7: 3x6
        nn.ReLU(),  # 8
        nn.Dropout(0.5),  # 9
        nn.AdaptiveAvgPool2d((2, 4)),  # 10: not divisible
    )
    head = nn.Sequential(nn.Linear(8 * 2 * 4, 7))
    return _randomize_bn(Chain(features, head, functional_flatten=True)).eval()


def linear_net() -> nn.Module:
    """No ReLU, no max-pool: the reverse pass is linear. Input (3, 21, 19)."""
    torch.manual_seed(13)
    features = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.Conv2d(5, 6, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.Conv2d(6, 4, 3, dilation=2, padding=2),
        nn.LocalResponseNorm(3),
    )
    return _randomize_bn(Chain(features)).eval()


_CUSTOM = {"odd": (odd_net, (3, 37, 29)), "pools": (pool_net, (3, 33, 30))}
_ZOO = {
    "zfnet": 224,
    "alexnet": 224,
    "vgg11": 64,
    "vgg11_bn": 64,
    "zfnet-cifar10": 32,
}


def narrow_classifier(model: nn.Module, width: int = 256) -> nn.Module:
    """The model with its fully connected layers ``width`` wide instead of 4096.

    The ImageNet classifiers hold most of the parameters (VGG11's 133M of 133M less 9M),
    over 1 GB each in float64. Narrowing them keeps every layer type, the adaptive pool,
    the flatten, the aliases (fc6..fc8) and the input and output sizes, so the tests
    through the classifier check the same code.
    """
    classifier = getattr(model, "classifier", None)
    linears = [i for i, m in enumerate(classifier or []) if isinstance(m, nn.Linear)]
    for k, i in enumerate(linears):
        old = classifier[i]
        classifier[i] = nn.Linear(old.in_features if k == 0 else width, old.out_features if k == len(linears) - 1 else width)
    return model


@memory_guard.bounded_model_cache(max_mb=600)
def get_model(key: str) -> nn.Module:
    """A float64 model in eval mode, shared by tests that do not modify it."""
    if key in _CUSTOM:
        return _CUSTOM[key][0]().double()
    model, _ = load_model(key, weights="random")
    return _randomize_bn(narrow_classifier(model)).double().eval()


@functools.lru_cache(maxsize=1)
def shared_deconvnet(model: nn.Module) -> Deconvnet:
    """The deconvnet of the model the previous oracle case used: consecutive cases on one
    model trace it once, not once per case."""
    return Deconvnet(model)


def input_shape(key: str) -> tuple[int, int, int]:
    if key in _CUSTOM:
        return _CUSTOM[key][1]
    return (3, _ZOO[key], _ZOO[key])


def get_images(key: str, n: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *input_shape(key), generator=g, dtype=torch.float64)


def oracle(model: nn.Module, image: torch.Tensor, layer: str, index: tuple[int, ...]) -> torch.Tensor:
    """The oracle; for a layer inside ``model.features`` it differentiates only that part
    (the same function, without deep-copying the large classifier)."""
    if layer.startswith("features.") and hasattr(model, "features"):
        return oracle_projection(model.features, image, layer[len("features.") :], index)
    return oracle_projection(model, image, layer, index)


def strongest_channels(dn: Deconvnet, x: torch.Tensor, layer: str, m: int) -> list[int]:
    """The m channels with the largest activation in image 0 (avoids all-zero maps)."""
    out = dn.record(x, layer).output[0]
    peak = out.flatten(1).amax(1) if out.dim() == 3 else out
    return [int(c) for c in peak.topk(m).indices]


# --------------------------------------------------------------------------- oracle

# (model, layer, number of channels, top_k, batch size)
ORACLE_CASES = [
    ("zfnet", "features.0", 2, 2, 1),  # conv1 before its ReLU
    ("zfnet", "pool1", 1, 2, 1),
    ("zfnet", "features.7", 1, 2, 1),  # the LRN after pool2
    ("zfnet", "conv5", 2, 1, 1),
    ("zfnet", "fc6", 2, None, 1),
    ("alexnet", "features.0", 2, 2, 1),  # stride 4, padding 2
    ("alexnet", "pool2", 1, 2, 1),
    ("alexnet", "conv4", 2, 1, 1),
    ("alexnet", "fc7", 1, None, 1),
    ("vgg11", "features.0", 2, 2, 1),
    ("vgg11", "conv3_2", 2, 2, 1),
    ("vgg11", "pool4", 1, 3, 1),
    ("vgg11", "fc8", 2, None, 1),  # through AdaptiveAvgPool2d 2x2 -> 7x7
    ("vgg11_bn", "features.1", 2, 2, 1),  # BatchNorm2d output (folded), pre-ReLU
    ("vgg11_bn", "features.4", 1, 2, 1),  # conv2_1 output before its BatchNorm2d
    ("vgg11_bn", "conv3_2", 2, 2, 1),
    ("vgg11_bn", "pool5", 2, 1, 1),
    ("zfnet-cifar10", "features.0", 2, 2, 2),
    ("zfnet-cifar10", "conv1", 2, 2, 2),
    ("zfnet-cifar10", "pool2", 2, 2, 2),
    ("zfnet-cifar10", "conv5", 2, 3, 2),
    ("zfnet-cifar10", "fc7", 3, None, 2),
    ("zfnet-cifar10", "fc8", 2, None, 2),
    ("odd", "features.0", 2, 3, 2),
    ("odd", "features.2", 2, 3, 2),  # ceil-mode pool
    ("odd", "features.4", 2, 2, 2),  # folded BN
    ("odd", "features.6", 2, 2, 2),  # LRN
    ("odd", "features.7", 2, 2, 2),  # dilation 2, groups 2
    ("odd", "features.9", 2, 2, 2),  # overlapping pool
    ("odd", "features.10", 2, 2, 2),  # padding='same', even kernel
    ("odd", "features.12", 2, 2, 2),  # adaptive avg pool
    ("odd", "head.2", 3, None, 2),
    ("odd", "head.3", 2, None, 2),
    ("pools", "features.2", 2, 3, 2),  # avg pool with padding
    ("pools", "features.3", 2, 2, 2),  # BN alone
    ("pools", "features.6", 2, 3, 2),  # padded ceil-mode max-pool
    ("pools", "features.8", 2, 2, 2),  # dilation
    ("pools", "features.10", 2, 2, 2),  # non-divisible adaptive pool
    ("pools", "head.0", 3, None, 2),  # after torch.flatten in forward()
]


@pytest.mark.parametrize(("key", "layer", "m", "top_k", "n"), ORACLE_CASES, ids=[f"{c[0]}-{c[1]}" for c in ORACLE_CASES])
def test_projection_matches_oracle(key: str, layer: str, m: int, top_k: int | None, n: int) -> None:
    model = get_model(key)
    dn = shared_deconvnet(model)
    x = get_images(key, n)
    channels = strongest_channels(dn, x, layer, m)
    name = dn.resolve(layer)
    rec = dn.record(x, layer)
    seeds = dn.select(rec, channels, top_k=top_k)
    proj = dn.project(x, layer, channel=channels, top_k=top_k)
    vector = rec.output.dim() == 2
    assert proj.shape == (n, m, *(() if top_k is None else (top_k,)), *x.shape[1:])
    flat = proj.reshape(-1, *x.shape[1:])
    assert len(seeds) == flat.shape[0]
    nonzero = 0
    for i in range(len(seeds)):
        img = int(seeds.image[i])
        index = (int(seeds.channel[i]),) if vector else (int(seeds.channel[i]), int(seeds.y[i]), int(seeds.x[i]))
        ref = oracle(model, x[img : img + 1], name, index)
        assert _rel_err(flat[i], ref) < RTOL, (i, index)
        nonzero += bool(ref.abs().max() > 0)
    assert nonzero > 0, "every projection was zero: the test checks nothing"


def test_projection_at_given_position_matches_oracle_including_negative_values() -> None:
    """A (y, x) seed, including border positions and negative (pre-ReLU) activations."""
    model = get_model("odd")
    dn = Deconvnet(model)
    x = get_images("odd", 1, seed=3)
    rec = dn.record(x, "features.3")  # conv before BN: no ReLU between seed and conv
    h, w = rec.output.shape[-2:]
    negatives = 0
    for y, xx in [(0, 0), (h - 1, w - 1), (0, w - 1), (h // 2, 1)]:
        for c in (0, 5):
            p = dn.project(x, "features.3", channel=c, position=(y, xx))
            ref = oracle(model, x, "features.3", (c, y, xx))
            assert _rel_err(p[0], ref) < RTOL
            negatives += bool(rec.output[0, c, y, xx] < 0)
    assert negatives > 0


# --------------------------------------------------------------------------- windowed == dense


@pytest.mark.parametrize(
    ("key", "layers"),
    [
        ("odd", ["features.0", "features.2", "features.5", "features.7", "features.10", "features.12"]),
        ("pools", ["features.1", "features.3", "features.6", "features.8", "features.10"]),
        ("zfnet-cifar10", ["features.1", "pool1", "conv3", "pool3"]),
        ("vgg11_bn", ["conv2_1", "pool4"]),
    ],
)
def test_windowed_equals_dense(key: str, layers: list[str]) -> None:
    model = get_model(key)
    windowed, dense = Deconvnet(model), Deconvnet(model, windowed=False)
    x = get_images(key, 2, seed=5)
    for layer in layers:
        rec = windowed.record(x, layer)
        out = rec.output
        h, w = out.shape[-2:]
        positions = sorted({(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2), (1 % h, (w - 2) % w)})
        # every position for channels 0 and 1 of both images, corners and borders included
        img, ch, ys, xs = zip(*[(i, c, y, xx) for i in range(2) for c in (0, 1) for y, xx in positions])
        img, ch, ys, xs = (torch.tensor(v) for v in (img, ch, ys, xs))
        seeds = Seeds(img, ch, ys, xs, out[img, ch, ys, xs])
        a = windowed.reverse(rec, seeds).full()
        b = dense.reverse(rec, seeds).full()
        assert a.shape == b.shape == (len(seeds), *x.shape[1:])
        assert (a - b).abs().max().item() <= 1e-12 * max(b.abs().max().item(), 1e-300), layer
        assert b.abs().max() > 0
        top = windowed.select(rec, [0, 2], top_k=3)
        a = windowed.reverse(rec, top).full()
        b = dense.reverse(rec, top).full()
        assert (a - b).abs().max().item() <= 1e-12 * max(b.abs().max().item(), 1e-300), layer
    # and through project()
    a = windowed.project(x, layers[-1], channel=[0, 1], position=(0, 0))
    b = dense.project(x, layers[-1], channel=[0, 1], position=(0, 0))
    assert (a - b).abs().max().item() <= 1e-12 * max(b.abs().max().item(), 1e-300)


def test_patches_are_the_full_projection_cropped() -> None:
    model = get_model("odd")
    dn = Deconvnet(model)
    x = get_images("odd", 2)
    rec = dn.record(x, "features.7")
    seeds = dn.select(rec, [1, 3], top_k=2)
    patches = dn.reverse(rec, seeds)
    full = patches.full()
    assert full.shape == (len(seeds), 3, 37, 29)
    for i in range(len(seeds)):
        t, l_, b, r = (int(v) for v in patches.box[i])
        assert 0 <= t < b <= 37 and 0 <= l_ < r <= 29
        outside = full[i].clone()
        outside[:, t:b, l_:r] = 0
        assert outside.abs().max() == 0
        th, tw = patches.pixels.shape[-2:]
        top, left = int(patches.top[i]), int(patches.left[i])
        r0, c0, r1, c1 = max(top, 0), max(left, 0), min(top + th, 37), min(left + tw, 29)
        assert torch.equal(full[i, :, r0:r1, c0:c1], patches.pixels[i, :, r0 - top : r1 - top, c0 - left : c1 - left])
        ref = oracle(model, x[int(seeds.image[i]) : int(seeds.image[i]) + 1], "features.7", (int(seeds.channel[i]), int(seeds.y[i]), int(seeds.x[i])))
        assert _rel_err(full[i], ref) < RTOL


def test_chunked_reverse_equals_one_chunk() -> None:
    model = get_model("zfnet-cifar10")
    x = get_images("zfnet-cifar10", 2)
    big = Deconvnet(model).project(x, "conv4", channel=list(range(5)), top_k=3)
    small = Deconvnet(model, chunk_size=4).project(x, "conv4", channel=list(range(5)), top_k=3)
    assert _rel_err(small, big) < 1e-12
    big = Deconvnet(model).project(x, "conv2", channel=[0, 1, 2], position="all")
    small = Deconvnet(model, chunk_size=2).project(x, "conv2", channel=[0, 1, 2], position="all")
    assert _rel_err(small, big) < 1e-12


# --------------------------------------------------------------------------- position="all"


def test_whole_map_equals_sum_of_positions_on_linear_net() -> None:
    model = linear_net().double()
    dn = Deconvnet(model)
    x = torch.randn(2, 3, 21, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for layer in ["features.0", "features.2", "features.3", "features.5"]:
        rec = dn.record(x, layer)
        h, w = rec.output.shape[-2:]
        whole = dn.project(x, layer, channel=[0, 3], position="all")
        assert whole.shape == (2, 2, 3, 21, 19)
        every = dn.project(x, layer, channel=[0, 3], top_k=h * w)  # all positions
        assert every.shape == (2, 2, h * w, 3, 21, 19)
        assert _rel_err(whole, every.sum(dim=2)) < 1e-10, layer
        single = dn.project(x, layer, channel=3, position="all")
        assert single.shape == (2, 3, 21, 19)
        assert torch.allclose(single, whole[:, 1], rtol=0, atol=1e-12 * whole.abs().max().item())


def _oracle_whole_map(model: nn.Module, image: torch.Tensor, layer: str, channel: int) -> torch.Tensor:
    """The deconvnet backward (oracle rules) of the whole map ``channel`` of ``layer``."""

    def seed(out: torch.Tensor) -> torch.Tensor:
        s = torch.zeros_like(out)
        s[:, channel] = out[:, channel]
        return s

    return oracle_backward(model, image, layer, seed)


@pytest.mark.parametrize(("key", "layer"), [("odd", "features.8"), ("odd", "features.12"), ("pools", "features.6"), ("zfnet-cifar10", "conv3")])
def test_whole_map_matches_oracle(key: str, layer: str) -> None:
    model = get_model(key)
    dn = Deconvnet(model)
    x = get_images(key, 2, seed=7)
    p = dn.project(x, layer, channel=[0, 1], position="all")
    for img in range(2):
        for j, c in enumerate([0, 1]):
            ref = _oracle_whole_map(model, x[img : img + 1], dn.resolve(layer), c)
            assert _rel_err(p[img, j], ref) < RTOL


def test_whole_map_seed_value_is_the_maximum() -> None:
    dn = Deconvnet(get_model("odd"))
    x = get_images("odd", 2)
    rec = dn.record(x, "features.8")
    seeds = dn.select(rec, [0, 2], position="all")
    assert seeds.whole_map and len(seeds) == 4
    assert torch.equal(seeds.value, rec.output[:, [0, 2]].flatten(2).amax(2).reshape(-1))


# --------------------------------------------------------------------------- shapes


def test_output_shapes() -> None:
    dn = Deconvnet(get_model("odd"))
    x = get_images("odd", 2)
    assert dn.project(x, "features.5", channel=1).shape == (2, 3, 37, 29)
    assert dn.project(x, "features.5", channel=[1, 2, 3]).shape == (2, 3, 3, 37, 29)
    assert dn.project(x, "features.5", channel=1, top_k=4).shape == (2, 4, 3, 37, 29)
    assert dn.project(x, "features.5", channel=[1, 2, 3], top_k=4).shape == (2, 3, 4, 3, 37, 29)
    assert dn.project(x, "features.5", channel=(1,), top_k=1).shape == (2, 1, 1, 3, 37, 29)
    assert dn.project(x, "features.5", channel=range(2), position=(9, 7)).shape == (2, 2, 3, 37, 29)
    assert dn.project(x, "features.5", channel=torch.tensor([0, 4]), position="all").shape == (2, 2, 3, 37, 29)
    assert dn.project(x, "head.1", channel=4).shape == (2, 3, 37, 29)
    assert dn.project(x, "head.3", channel=[0, 4]).shape == (2, 2, 3, 37, 29)
    assert dn.project(x, "head.3", channel=[0, 4], top_k=1).shape == (2, 2, 1, 3, 37, 29)
    # exact map sizes of the odd chain
    sizes = {s.name: s.out_shape for s in dn.trace((3, 37, 29))}
    assert sizes["features.2"] == (8, 19, 15)
    assert sizes["features.4"] == (8, 10, 8)
    assert sizes["features.9"] == (8, 4, 3)
    assert sizes["features.10"] == (6, 4, 3)
    assert sizes["features.12"] == (6, 2, 3)
    # float32 input to a float64 model comes back in the model's dtype
    assert dn.project(x.float(), "features.0", channel=0).dtype == torch.float64


@pytest.mark.parametrize(("h", "w"), [(32, 32), (37, 29), (41, 50), (17, 23)])
def test_odd_input_sizes(h: int, w: int) -> None:
    model = get_model("zfnet-cifar10")
    dn = Deconvnet(model)
    x = torch.randn(1, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w))
    for layer in ["pool1", "conv3"]:
        p = dn.project(x, layer, channel=[0, 1], top_k=2)
        assert p.shape == (1, 2, 2, 3, h, w)
        rec = dn.record(x, layer)
        seeds = dn.select(rec, [0, 1], top_k=2)
        ref = oracle(model, x, dn.resolve(layer), (int(seeds.channel[3]), int(seeds.y[3]), int(seeds.x[3])))
        assert _rel_err(p[0, 1, 1], ref) < RTOL


# --------------------------------------------------------------------------- tied weights


def test_reverse_convolutions_are_tied_to_the_model() -> None:
    model = odd_net().double()
    dn = Deconvnet(model)
    x = get_images("odd", 1)
    rec = dn.record(x, "head.3")
    stack = dn.reverse_stack(rec)
    modules = dict(model.named_modules())
    convs = [layer for layer in stack.layers if isinstance(layer, nn.ConvTranspose2d)]
    assert len(convs) == 4
    for layer in convs:
        assert isinstance(layer, ReverseConv2d)
        assert layer.weight is modules[layer.source].weight
        assert layer.bias is None
    linears = [layer for layer in stack.layers if hasattr(layer, "weight") and not isinstance(layer, nn.ConvTranspose2d)]
    assert {layer.source for layer in linears} == {"head.1", "head.3"}
    for layer in linears:
        assert layer.weight is modules[layer.source].weight
    assert "tied weight" in repr(stack) and "folds BatchNorm2d 'features.4'" in repr(stack)


def test_changing_conv_weights_changes_the_next_projection() -> None:
    model = odd_net().double()
    conv = model.features[0]
    with torch.no_grad():
        conv.bias.zero_()
    dn = Deconvnet(model)
    x = get_images("odd", 1)
    before = dn.project(x, "features.0", channel=[0, 3], position=(10, 7))
    value_before = dn.record(x, "features.0").output[0, [0, 3], 10, 7]
    conv.weight.data.mul_(2)
    after = dn.project(x, "features.0", channel=[0, 3], position=(10, 7))
    value_after = dn.record(x, "features.0").output[0, [0, 3], 10, 7]
    # the seed's value doubles, and so does its reverse filter
    assert torch.allclose(value_after, 2 * value_before, rtol=1e-14, atol=0)
    assert torch.allclose(after, 4 * before, rtol=1e-12, atol=1e-300)
    # per unit of activation, the projection doubles
    assert torch.allclose(after[0] / value_after.view(2, 1, 1, 1), 2 * before[0] / value_before.view(2, 1, 1, 1))
    # replacing the Parameter (not in place) is seen too
    conv.weight = nn.Parameter(-conv.weight.detach())
    negated = dn.project(x, "features.0", channel=[0, 3], position=(10, 7))
    assert torch.allclose(negated, after, rtol=1e-12)  # value and filter both flip sign
    assert _rel_err(negated[0, 1], oracle(model, x, "features.0", (3, 10, 7))) < RTOL
    # a deeper seed sees the change of conv1 through the whole chain
    ref = oracle(model, x, "features.7", (2, 4, 4))
    assert _rel_err(dn.project(x, "features.7", channel=2, position=(4, 4))[0], ref) < RTOL


# --------------------------------------------------------------------------- model untouched

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _snapshot(model: nn.Module) -> dict:
    snap: dict = {}
    for name, m in model.named_modules():
        snap[name] = {
            "training": m.training,
            "inplace": getattr(m, "inplace", None),
            "hooks": {d: list(getattr(m, d, {}).keys()) for d in _HOOK_DICTS},
            "params": {n: (p, p.detach().clone(), p.requires_grad, p.grad) for n, p in m.named_parameters(recurse=False)},
            "buffers": {n: (b, b.detach().clone()) for n, b in m.named_buffers(recurse=False)},
        }
    return snap


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = dict(model.named_modules())
    assert set(now) == set(snap)
    for name, m in now.items():
        before = snap[name]
        assert m.training == before["training"], name
        assert getattr(m, "inplace", None) == before["inplace"], name
        for d in _HOOK_DICTS:
            assert list(getattr(m, d, {}).keys()) == before["hooks"][d], (name, d)
        params = dict(m.named_parameters(recurse=False))
        assert set(params) == set(before["params"]), name
        for n, p in params.items():
            obj, value, req, grad = before["params"][n]
            assert p is obj and torch.equal(p.detach(), value) and p.requires_grad == req and p.grad is grad, (name, n)
        buffers = dict(m.named_buffers(recurse=False))
        assert set(buffers) == set(before["buffers"]), name
        for n, b in buffers.items():
            assert b is before["buffers"][n][0] and torch.equal(b, before["buffers"][n][1]), (name, n)
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks


class _Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def _mixed_mode_model() -> nn.Module:
    """odd_net in train mode with one submodule left in eval mode, inplace ReLUs, and a
    hook of the user's own that must survive."""
    model = odd_net().double()
    model.train()
    model.features[6].eval()
    model.user_calls = 0  # type: ignore[assignment]

    def user_hook(_m, _i, _o):
        model.user_calls += 1  # type: ignore[operator]

    model.features[0].register_forward_hook(user_hook)
    model.head[1].register_forward_pre_hook(lambda _m, _i: None)
    return model


def test_model_unchanged_after_normal_runs() -> None:
    model = _mixed_mode_model()
    snap = _snapshot(model)
    dn = Deconvnet(model)
    x = get_images("odd", 2)
    dn.project(x, "features.7", channel=[0, 1], top_k=2)
    dn.project(x, "features.2", channel=0, position="all")
    dn.project(x, "head.3", channel=[1, 2])
    dn.receptive_window("features.9", (1, 1), (3, 37, 29))
    dn.receptive_field("features.9", (3, 37, 29))
    dn.trace((3, 37, 29))
    rec = dn.record(x, "features.10")
    dn.reverse(rec, dn.select(rec, [0], top_k=3)).full()
    dn.reverse_stack(rec)
    _assert_unchanged(model, snap)
    assert model.user_calls > 0  # the user's hook still ran during the passes
    assert model.training and model.head[0].training and not model.features[6].training


def test_model_unchanged_after_errors() -> None:
    model = _mixed_mode_model()
    snap = _snapshot(model)
    dn = Deconvnet(model)
    x = get_images("odd", 1)
    with pytest.raises(ValueError):
        dn.project(x, "features.99", channel=0)
    with pytest.raises(ValueError):
        dn.project(x, "features.7", channel=8)
    with pytest.raises(ValueError):
        dn.project(x, "features.7", channel=0, position=(10, 0))
    with pytest.raises(TypeError):
        dn.project(x, "features.7", channel="0")
    with pytest.raises(ValueError):
        dn.project(x[0], "features.7", channel=0)
    with pytest.raises(ValueError, match="forward pass failed"):  # wrong channel count: conv1 raises mid-forward
        dn.project(torch.randn(1, 4, 37, 29, dtype=torch.float64), "features.7", channel=0)
    _assert_unchanged(model, snap)


class _Fails(nn.Module):
    """Raises the error it is given when it runs."""

    def __init__(self, err: BaseException) -> None:
        super().__init__()
        self.err = err

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.err


def test_a_failing_forward_pass_is_a_forward_pass_error_but_running_out_of_memory_is_not() -> None:
    x = torch.randn(1, 3, 8, 8)
    mismatch = RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x12 and 9x4)")
    with pytest.raises(zfvis.ForwardPassError, match="forward pass failed") as caught:
        Deconvnet(nn.Sequential(nn.Conv2d(3, 3, 3), _Fails(mismatch))).output(x, "1")
    assert caught.value.__cause__ is mismatch and isinstance(caught.value, ValueError)
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried ...")
    with pytest.raises(RuntimeError) as caught_oom:
        Deconvnet(nn.Sequential(nn.Conv2d(3, 3, 3), _Fails(oom))).output(x, "1")
    assert caught_oom.value is oom  # passed on as it is: the machine's limit, not the input's fault


def test_model_unchanged_when_a_module_raises_mid_forward() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        _Raises(),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).double()
    model.train()
    snap = _snapshot(model)
    dn = Deconvnet(model)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    with pytest.raises((RuntimeError, ValueError), match="boom"):
        dn.project(x, "6", channel=0)
    _assert_unchanged(model, snap)
    bad_linear = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(5, 2)).double()
    snap = _snapshot(bad_linear)
    with pytest.raises((RuntimeError, ValueError)):  # shape mismatch inside the Linear
        Deconvnet(bad_linear).project(x, "3", channel=0)
    _assert_unchanged(bad_linear, snap)
    unsupported = nn.Sequential(nn.Conv2d(3, 4, 3), _Floor(), nn.Conv2d(4, 4, 3)).double().train()
    snap = _snapshot(unsupported)
    with pytest.raises(UnsupportedModelError):
        Deconvnet(unsupported).project(x, "2", channel=0)
    _assert_unchanged(unsupported, snap)


@pytest.mark.parametrize("key", ["alexnet", "vgg11"])
def test_inplace_relu_gives_identical_projections(key: str) -> None:
    torch.manual_seed(0)
    model = narrow_classifier(getattr(torchvision.models, key)(weights=None)).eval()
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(m.inplace for m in relus)
    size = 96 if key == "alexnet" else 48
    x = torch.randn(2, 3, size, size)
    dn = Deconvnet(model)
    layers = ["features.0", "conv2", "pool2", "conv3", "fc6"] if key == "alexnet" else ["features.0", "conv2_1", "features.4", "conv3_2", "pool3"]

    def run() -> list[torch.Tensor]:
        out = []
        for layer in layers:
            out.append(dn.record(x, layer).output)
            kw = {} if out[-1].dim() == 2 else {"top_k": 2}
            out.append(dn.project(x, layer, channel=[0, 5], **kw))
        return out

    with_inplace = run()
    for m in relus:
        m.inplace = False
    without = run()
    for a, b in zip(with_inplace, without):
        assert torch.equal(a, b)
    # a conv output seed keeps its negative (pre-ReLU) values although an inplace ReLU follows
    assert (with_inplace[0] < 0).any()


# --------------------------------------------------------------------------- unsupported models


class _Floor(nn.Module):
    """Rounds down: no gradient, so refused on a projection's path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x)


def test_unsupported_module_names_itself() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _Floor(), nn.Conv2d(4, 4, 3), nn.ReLU()).double()
    dn = Deconvnet(model)
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError) as info:
        dn.project(x, "3", channel=0)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "'2.floor'" in msg and "no gradient" in msg
    # layers before the unsupported module are fine; the forward pass stops in time
    p = dn.project(x, "1", channel=[0, 1], top_k=2)
    assert p.shape == (1, 2, 2, 3, 12, 12)
    rec = dn.record(x, "1")
    seeds = dn.select(rec, [0, 1], top_k=2)
    ref = oracle_projection(model[:2], x, "1", (int(seeds.channel[-1]), int(seeds.y[-1]), int(seeds.x[-1])))
    assert _rel_err(p[0, 1, 1], ref) < RTOL


class _MyReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
def test_subclass_of_a_supported_type_is_traced_into(rule: str) -> None:
    """A subclass may compute something else: its own forward() is traced, not its base type's rule."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _MyReLU(), nn.Conv2d(4, 4, 3)).double().eval()
    dn = Deconvnet(model)
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    assert "1.mul" in dn.layer_names()  # the * 2 inside the subclass is a node
    p = dn.project(x, "2", channel=1, position=(2, 3), rule=rule)
    ref = oracle_projection(model, x, "2", (1, 2, 3), rule)
    assert ref.abs().max() > 0 and _rel_err(p[0], ref) < RTOL


def test_resnet_projects_across_residual_additions() -> None:
    """Crossing ResNet's (in-place, in eager mode) addition ``out += identity`` is exact."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).double().eval()
    _randomize_bn(model)
    dn = Deconvnet(model)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    for layer in ["layer1.0.bn2", "layer1.1.conv1", "layer2.0.downsample.0", "fc"]:
        rec = dn.record(x, layer)
        vector = rec.output.dim() == 2
        seeds = dn.select(rec, [3], top_k=None if vector else 2)
        p = dn.project(x, layer, channel=[3], top_k=None if vector else 2)
        index = (3,) if vector else (3, int(seeds.y[-1]), int(seeds.x[-1]))
        ref = oracle_projection(model, x, layer, index)
        got = p[0, 0] if vector else p[0, 0, -1]
        assert ref.abs().max() > 0 and _rel_err(got, ref) < RTOL, layer


class _Residual(nn.Module):
    def __init__(self, inplace_add: bool) -> None:
        super().__init__()
        self.inplace_add = inplace_add
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.conv1(x))
        y = self.conv2(h)
        if self.inplace_add:
            y += h
        else:
            y = y + h
        return self.conv3(self.relu2(y))


@pytest.mark.parametrize("inplace_add", [False, True])
def test_custom_residual_matches_oracle(inplace_add: bool) -> None:
    torch.manual_seed(1)
    model = _Residual(inplace_add).double().eval()
    dn = Deconvnet(model)
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    for layer in ["conv2", "relu2", "conv3"]:
        rec = dn.record(x, layer)
        seeds = dn.select(rec, [1], top_k=3)
        p = dn.project(x, layer, channel=1, top_k=3)
        for r in range(3):
            ref = oracle_projection(model, x, layer, (1, int(seeds.y[r]), int(seeds.x[r])))
            assert _rel_err(p[0, r], ref) < RTOL, (layer, r)


def test_module_used_twice_means_its_last_call() -> None:
    torch.manual_seed(2)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), relu, nn.Conv2d(4, 4, 3), relu, nn.Conv2d(4, 4, 3)).double()
    dn = Deconvnet(model)
    assert dn.resolve("1") == "1_1" and dn.resolve("1_0") == "1"
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    rec = dn.record(x, "4")
    seeds = dn.select(rec, [2], top_k=2)
    p = dn.project(x, "4", channel=2, top_k=2)
    for r in range(2):
        ref = oracle_projection(model, x, "4", (2, int(seeds.y[r]), int(seeds.x[r])))
        assert _rel_err(p[0, r], ref) < RTOL
    # the first use is its own node
    assert dn.project(x, "1_0", channel=0).shape == (1, 3, 9, 9)


def test_forward_stops_at_the_requested_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), _Raises(), nn.Conv2d(4, 4, 3)).double()
    dn = Deconvnet(model)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    for layer in ["0", "1", "2"]:
        p = dn.project(x, layer, channel=[0, 2], top_k=2)
        assert p.shape == (2, 2, 2, 3, 12, 12)
    assert dn.receptive_window("2", (1, 1), (3, 12, 12)) == (2, 2, 6, 6)
    with pytest.raises((RuntimeError, ValueError), match="boom"):
        dn.project(x, "4", channel=0)


# --------------------------------------------------------------------------- argument errors


def test_unknown_layer_lists_closest_names_and_hint() -> None:
    dn = Deconvnet(get_model("zfnet-cifar10"))
    x = get_images("zfnet-cifar10")
    with pytest.raises(ValueError) as info:
        dn.project(x, "conv6", channel=0)
    msg = str(info.value)
    assert "'conv6'" in msg and "Closest:" in msg and "conv5" in msg and "layer_names()" in msg
    last = [n for n, _ in dn.model.features.named_children()][-1]
    assert dn.resolve("features") == f"features.{last}"  # a container names its output
    with pytest.raises(ValueError, match="Closest: .*features"):
        dn.project(x, "featurez", channel=0)
    with pytest.raises(ValueError, match="Closest: .*features.12"):
        dn.resolve("features.12x")
    assert dn.resolve("conv1") == "features.2" and dn.resolve("features.2") == "features.2"
    assert dn.layer_names()[: len(dn.aliases)] == list(dn.aliases)


def test_out_of_range_arguments_raise_value_error() -> None:
    dn = Deconvnet(get_model("zfnet-cifar10"))
    x = get_images("zfnet-cifar10", 2)
    cases = [
        dict(layer="conv3", channel=128),
        dict(layer="conv3", channel=-1),
        dict(layer="conv3", channel=[0, 200]),
        dict(layer="conv3", channel=[]),
        dict(layer="conv3", channel=0, position=(8, 0)),
        dict(layer="conv3", channel=0, position=(0, -1)),
        dict(layer="conv3", channel=0, position="every"),
        dict(layer="conv3", channel=0, top_k=0),
        dict(layer="conv3", channel=0, top_k=65),
        dict(layer="conv3", channel=0, top_k=2, position=(0, 0)),
        dict(layer="fc8", channel=10),
        dict(layer="fc8", channel=0, position=(0, 0)),
        dict(layer="fc8", channel=0, position="all"),
        dict(layer="fc8", channel=0, top_k=2),
    ]
    for kw in cases:
        layer = kw.pop("layer")
        with pytest.raises(ValueError):
            dn.project(x, layer, **kw)
    with pytest.raises(ValueError, match="outside the 8x8 feature map"):
        dn.project(x, "conv3", channel=0, position=(3, 8))
    with pytest.raises(ValueError, match="has 128 channels"):
        dn.project(x, "conv3", channel=128)
    with pytest.raises(ValueError, match="chunk_size"):
        Deconvnet(get_model("zfnet-cifar10"), chunk_size=0)
    with pytest.raises(ValueError, match="alias"):
        Deconvnet(get_model("zfnet-cifar10"), aliases={"x": "nope"})


def test_wrong_types_raise_type_error() -> None:
    dn = Deconvnet(get_model("zfnet-cifar10"))
    x = get_images("zfnet-cifar10")
    bad = [
        lambda: dn.project(x, "conv3", channel="3"),
        lambda: dn.project(x, "conv3", channel=1.0),
        lambda: dn.project(x, "conv3", channel=True),
        lambda: dn.project(x, "conv3", channel=[0, 1.5]),
        lambda: dn.project(x, "conv3", channel=0, position=(1.0, 2)),
        lambda: dn.project(x, "conv3", channel=0, position=(1, 2, 3)),
        lambda: dn.project(x, "conv3", channel=0, position=3),
        lambda: dn.project(x, 3, channel=0),
        lambda: dn.project(x.tolist(), "conv3", channel=0),
        lambda: dn.project(x.numpy(), "conv3", channel=0),
        lambda: dn.project((x * 100).long(), "conv3", channel=0),
        lambda: Deconvnet("zfnet-cifar10"),
        lambda: Deconvnet(lambda t: t),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(TypeError):
            call()
            pytest.fail(f"case {i} did not raise")


def test_three_dimensional_image_hints_at_unsqueeze() -> None:
    dn = Deconvnet(get_model("zfnet-cifar10"))
    x = get_images("zfnet-cifar10")
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        dn.project(x[0], "conv3", channel=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        dn.project(x[None], "conv3", channel=0)
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        dn.record(x[0], "conv3")


# --------------------------------------------------------------------------- receptive fields


def _positive_net() -> nn.Module:
    """Strictly positive weights, zero biases: every pre-activation of a positive input is
    positive, and a huge perturbation of one pixel raises every activation that sees it
    (through max-pools too)."""
    g = torch.Generator().manual_seed(21)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),  # 0
        nn.ReLU(),  # 1
        nn.MaxPool2d(3, stride=2, padding=1),  # 2
        nn.Conv2d(3, 3, 3, stride=2),  # 3
        nn.ReLU(),  # 4
        nn.Conv2d(3, 3, 3, dilation=2, padding=1),  # 5
        nn.MaxPool2d(2, ceil_mode=True),  # 6
        nn.Conv2d(3, 2, 2, padding=(1, 0)),  # 7
        nn.AvgPool2d(2, stride=1),  # 8
    ).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64) * 0.5 + 0.5)
                m.bias.zero_()
    return model.eval()


def test_receptive_windows_match_brute_force() -> None:
    model = _positive_net()
    dn = Deconvnet(model)
    shape = (2, 27, 31)
    c, h, w = shape
    g = torch.Generator().manual_seed(2)
    base = torch.rand(1, c, h, w, generator=g, dtype=torch.float64) * 0.5 + 0.5
    # one image per pixel (both channels perturbed together), plus the unperturbed one
    batch = base.repeat(h * w + 1, 1, 1, 1)
    idx = torch.arange(h * w)
    batch[1 + idx, :, idx // w, idx % w] += 1e12
    checked_nominal = 0
    for layer in ["0", "2", "3", "5", "6", "7", "8"]:
        out = dn.record(batch, layer).output
        ref, pert = out[0, 0], out[1:, 0]
        changed = (pert - ref).abs() > 1e-6 * ref.abs()  # (h*w, H', W')
        assert (pert >= ref * (1 - 1e-12)).all()
        oh, ow = ref.shape
        rf = dn.receptive_field(layer, shape)
        assert rf is not None
        for y in range(oh):
            for x in range(ow):
                pixels = changed[:, y, x].nonzero().flatten()
                assert pixels.numel() > 0
                ys, xs = pixels // w, pixels % w
                box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
                assert dn.receptive_window(layer, (y, x), shape) == box, (layer, y, x)
                top = rf.offset[0] + y * rf.jump[0]
                left = rf.offset[1] + x * rf.jump[1]
                if top >= 0 and left >= 0 and top + rf.size[0] <= h and left + rf.size[1] <= w:
                    assert rf.window(y, x, (h, w)) == box, (layer, y, x)
                    checked_nominal += 1
                else:
                    # clipped at the image border, the nominal window can only be larger
                    t, l_, b, r = rf.window(y, x, (h, w))
                    assert t <= box[0] and l_ <= box[1] and b >= box[2] and r >= box[3]
    assert checked_nominal > 20


def test_receptive_field_formula() -> None:
    dn = Deconvnet(_positive_net())
    rf = dn.receptive_field("3", (2, 27, 31))
    # conv 3/1 p1: size 3, jump 1, offset -1; pool 3/2 p1: 5, 2, -2; conv 3/2: 9, 4, -2
    assert rf == zfvis.ReceptiveField(size=(9, 9), jump=(4, 4), offset=(-2, -2))
    assert dn.receptive_field("0", (2, 27, 31)) == zfvis.ReceptiveField((3, 3), (1, 1), (-1, -1))
    assert dn.receptive_window("0", (0, 0), (2, 27, 31)) == (0, 0, 2, 2)
    assert Deconvnet(get_model("odd")).receptive_field("head.1", (3, 37, 29)) is None
    assert Deconvnet(get_model("odd")).receptive_window("head.1", (0, 0), (3, 37, 29)) == (0, 0, 37, 29)
    vgg = Deconvnet(get_model("vgg11"))
    assert vgg.receptive_field("conv1_1", (3, 64, 64)).size == (3, 3)
    assert vgg.receptive_field("pool1", (3, 64, 64)) == zfvis.ReceptiveField((4, 4), (2, 2), (-1, -1))


# --------------------------------------------------------------------------- transposed convolution identity

TRANSPOSED_CASES = [
    # (kernel, stride, padding, dilation, groups)
    (3, 1, 0, 1, 1),
    (3, 1, 1, 1, 1),
    (3, 2, 1, 1, 1),
    (5, 2, 2, 1, 1),
    (7, 2, 1, 1, 1),
    (4, 3, 2, 1, 1),
    (3, 2, 0, 2, 1),
    (3, 1, 2, 2, 1),
    (3, 2, 1, 2, 2),
    (5, 3, 4, 1, 3),
    ((3, 5), (2, 1), (1, 2), (1, 2), 2),
]


@pytest.mark.parametrize(("k", "s", "p", "d", "groups"), TRANSPOSED_CASES)
def test_transposed_convolution_is_a_convolution_of_the_dilated_input(k, s, p, d, groups) -> None:
    def pair(v):
        return (v, v) if isinstance(v, int) else v

    k, s, p, d = pair(k), pair(s), pair(p), pair(d)
    g = torch.Generator().manual_seed(sum(k) + 10 * sum(s) + 100 * sum(p))
    c_in, c_out = 3 * groups, 2 * groups  # channels of y and of the transposed conv's output
    y = torch.randn(2, c_in, 7, 6, generator=g, dtype=torch.float64)
    w = torch.randn(c_in, c_out // groups, *k, generator=g, dtype=torch.float64)  # conv_transpose2d layout
    expected = F.conv_transpose2d(y, w, stride=s, padding=p, dilation=d, groups=groups)
    # insert s-1 zeros between pixels
    n, _, hy, wy = y.shape
    dilated = y.new_zeros(n, c_in, (hy - 1) * s[0] + 1, (wy - 1) * s[1] + 1)
    dilated[:, :, :: s[0], :: s[1]] = y
    pad = [d[i] * (k[i] - 1) - p[i] for i in range(2)]
    assert min(pad) >= 0
    padded = F.pad(dilated, (pad[1], pad[1], pad[0], pad[0]))
    # flip the kernel spatially and swap its in/out channels (within each group)
    wg = w.reshape(groups, c_in // groups, c_out // groups, *k).transpose(1, 2).reshape(c_out, c_in // groups, *k)
    flipped = wg.flip(-1, -2)
    if groups == 1:
        assert torch.equal(flipped, w.transpose(0, 1).flip(-1, -2))
    got = F.conv2d(padded, flipped, dilation=d, groups=groups)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    cpu_model = get_model("odd")
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x = get_images("odd", 2)
    for layer, kw in [("features.7", {"top_k": 2}), ("features.12", {"position": "all"}), ("head.3", {})]:
        a = Deconvnet(cpu_model).project(x, layer, channel=[0, 1], **kw)
        b = Deconvnet(gpu_model).project(x.cuda(), layer, channel=[0, 1], **kw)
        assert b.device.type == "cuda"
        assert _rel_err(b.cpu(), a) < 1e-9, layer


# --------------------------------------------------------------------------- graphs: tracing and refusals


class _Branchy(nn.Module):
    """Tensor-dependent control flow in a submodule (kept whole) and at the top."""

    def __init__(self, top_level_branch: bool = False) -> None:
        super().__init__()
        self.top_level_branch = top_level_branch
        self.a = nn.Conv2d(3, 4, 3)
        self.b = _DataDependent()
        self.c = nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        if self.top_level_branch and x.sum() > 0:
            x = x * 2
        return self.c(self.b(x))


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.conv(x)
        return x


def test_untraceable_submodule_is_kept_whole_and_refused_only_through_it() -> None:
    torch.manual_seed(4)
    model = _Branchy().double().eval()
    dn = Deconvnet(model)
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    assert "b" in dn.graph.opaque and "b.conv" not in dn.layer_names()
    rec = dn.record(x, "relu")
    seeds = dn.select(rec, [1], top_k=1)
    # the strongest activation is positive: the ReLU passes a unit seed unchanged, so the
    # projection equals that of the convolution's output at the same position
    assert float(seeds.value[0]) > 0
    ref = oracle_projection(model, x, "a", (1, int(seeds.y[0]), int(seeds.x[0])))
    assert ref.abs().max() > 0 and _rel_err(dn.project(x, "relu", channel=1)[0], ref) < RTOL
    # through the module kept whole: its gradient at the recorded input, named in the stack
    for rule in ("deconvnet", "gradient"):
        p = dn.project(x, "c", channel=2, position=(3, 4), rule=rule)
        ref = oracle_projection(model, x, "c", (2, 3, 4), rule)
        assert ref.abs().max() > 0 and _rel_err(p[0], ref) < RTOL
    stack = str(dn.reverse_stack(dn.record(x, "c")))
    assert "VectorJacobian" in stack and "'b'" in stack
    with pytest.raises(ValueError, match="inside module 'b'"):
        dn.resolve("b.conv")
    with pytest.raises(UnsupportedModelError, match=r"cannot trace.*test_engine.py:\d+.*Hint"):
        Deconvnet(_Branchy(top_level_branch=True))


class _Functional(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.op == "floor":
            y = torch.floor(y)
        elif self.op == "floor_div":
            y = torch.div(y, 2, rounding_mode="floor")
        elif self.op == "dropout":
            y = F.dropout(y, 0.5)  # training=True by default: random in eval mode
        elif self.op == "flatten_all":
            return torch.flatten(self.conv2(y))
        elif self.op == "view_merge":
            return self.conv2(y).view(-1, 8, 8)
        elif self.op == "alias":
            F.relu(y[:, :2], inplace=True)  # overwrites part of y, which is read below
        return self.conv2(y)


@pytest.mark.parametrize(("op", "message"), [
    ("floor", r"node 'floor' \(floor\) at .*test_engine.py:\d+: .*torch.floor.*no gradient"),
    ("floor_div", r"node 'div' .*rounding_mode has no gradient"),
    ("dropout", r"node 'dropout' .*training=True.*Hint"),
    ("flatten_all", r"node 'flatten' .*batch.*torch.flatten\(x, 1\)"),
    ("view_merge", r"node 'view' .*batch"),
    ("alias", r"node 'relu' .*overwrites in place memory that 'conv' shares"),
])
def test_unsupported_operations_name_the_node_and_line(op: str, message: str) -> None:
    model = _Functional(op).double().eval()
    snap = _snapshot(model)
    dn = Deconvnet(model)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    layer = {"flatten_all": "flatten", "view_merge": "view"}.get(op, "conv2")
    with pytest.raises(UnsupportedModelError, match=message):
        dn.project(x, layer, channel=0)
    assert dn.project(x, "conv", channel=0).shape == (1, 3, 8, 8)  # before it: fine
    _assert_unchanged(model, snap)
    assert torch._C._len_torch_function_stack() == 0


def test_trace_gives_receptive_fields_through_residual_blocks() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    dn = Deconvnet(model)
    steps = {s.name: s for s in dn.trace((3, 64, 64))}
    assert steps["layer1.0.add"].out_shape == (64, 16, 16)
    # conv1 7x7/2 p3, maxpool 3x3/2 p1, two 3x3 convs: the addition holds the conv path's field
    assert steps["layer1.0.add"].receptive_field == dn.receptive_field("layer1.0.add", (3, 64, 64))
    rf = steps["layer1.0.add"].receptive_field
    assert rf is not None and rf.jump == (4, 4) and rf.size == (27, 27)
    assert steps["fc"].receptive_field is None and steps["fc"].out_shape == (1000,)
    outs = dn.forward_outputs(torch.randn(2, 3, 64, 64), ["layer2", "layer1.0.relu_0", "conv1"])
    assert outs["layer2"].shape == (2, 128, 8, 8) and outs["layer1.0.relu_0"].shape == (2, 64, 16, 16)
    assert "layer1.0.add" in dn.layer_names() and "layer1" in dn.layer_names()
    assert dn.layer_names()[: len(dn.aliases)] == list(dn.aliases)
