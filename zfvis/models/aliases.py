"""The zoo's layer aliases: the papers' names of each architecture's layers (``conv3``, ``conv5_3``,
``layer3``, ``inception4c``, ``stage3``, ...), registered per model class with
:func:`zfvis.core.aliases.register_aliases` when the zoo is imported."""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from ..core.aliases import register_aliases
from .zfnet import ZFNet

__all__: list[str] = []


def _chain_aliases(style: str) -> Callable[[nn.Module], dict[str, str]]:
    return lambda model: _paper_aliases(model, style)


def _paper_aliases(model: nn.Module, style: str) -> dict[str, str]:
    """Paper names of a chain model's layers, mapped to ``named_modules()`` names.

    ``convN`` (or ``convB_i`` for VGG) and ``fcN`` name the rectified output of that layer
    (the ReLU that follows it; fc8 has none and names the Linear); ``poolN`` names the
    N-th max-pool.
    """
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    aliases: dict[str, str] = {}
    conv = pool = 0
    block, within = 1, 0
    fc = 5
    pending: str | None = None
    for name, mod in leaves:
        if isinstance(mod, nn.Conv2d):
            conv += 1
            within += 1
            pending = f"conv{block}_{within}" if style == "vgg" else f"conv{conv}"
            aliases[pending] = name
        elif isinstance(mod, nn.Linear):
            fc += 1
            pending = f"fc{fc}"
            aliases[pending] = name
        elif isinstance(mod, nn.ReLU) and pending is not None:
            aliases[pending] = name
            pending = None
        elif isinstance(mod, nn.MaxPool2d):
            pool += 1
            aliases[f"pool{pool}"] = name
            block, within = block + 1, 0
            pending = None
        elif not isinstance(mod, nn.BatchNorm2d):
            pending = None
    return aliases


def _resnet_aliases(model: nn.Module) -> dict[str, str]:
    # stem: the rectified output of conv1 (the name conv1 itself is the convolution's output);
    # pool1: the stem's max-pool; layer1..4 and fc are module names already
    return {"stem": "relu", "pool1": "maxpool", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}, "fc": "fc"}


def _googlenet_aliases(model: nn.Module) -> dict[str, str]:
    names = ["conv1", "pool1", "conv2", "conv3", "pool2", "inception3a", "inception3b", "pool3", "inception4a",
             "inception4b", "inception4c", "inception4d", "inception4e", "pool4", "inception5a", "inception5b", "fc"]
    renamed = {"pool1": "maxpool1", "pool2": "maxpool2", "pool3": "maxpool3", "pool4": "maxpool4"}
    return {n: renamed.get(n, n) for n in names}


def _densenet_aliases(model: nn.Module) -> dict[str, str]:
    out = {"conv1": "features.relu0", "pool1": "features.pool0"}
    for name, _ in model.features.named_children():
        if name.startswith(("denseblock", "transition")):
            out[name] = f"features.{name}"
    out["fc"] = "classifier"
    return out


def _mobilenet_aliases(model: nn.Module) -> dict[str, str]:
    # block0 is the stem convolution, block1..17 the inverted residual blocks, block18 the 1x1 head
    out = {"conv1": "features.0", **{f"block{i}": f"features.{i}" for i in range(len(model.features))}}
    out["fc"] = "classifier.1"
    return out


register_aliases(torchvision.models.VGG, _chain_aliases("vgg"))
register_aliases(ZFNet, _chain_aliases("flat"))
register_aliases(torchvision.models.AlexNet, _chain_aliases("flat"))
register_aliases(torchvision.models.ResNet, _resnet_aliases)
register_aliases(torchvision.models.GoogLeNet, _googlenet_aliases)
register_aliases(torchvision.models.DenseNet, _densenet_aliases)
register_aliases(torchvision.models.MobileNetV2, _mobilenet_aliases)


def _efficientnet_aliases(model: nn.Module) -> dict[str, str]:
    # stem: the first convolution block; stage1..7 the MBConv stages; head the last 1x1 convolution
    n = len(model.features)
    return {"stem": "features.0", **{f"stage{i}": f"features.{i}" for i in range(1, n - 1)},
            "head": f"features.{n - 1}", "fc": "classifier.1"}


def _mobilenet_v3_aliases(model: nn.Module) -> dict[str, str]:
    # block0 is the stem, block1..15 the inverted residual blocks, block16 the 1x1 head (as MobileNetV2's)
    return {"conv1": "features.0", **{f"block{i}": f"features.{i}" for i in range(len(model.features))},
            "fc": "classifier.3"}


def _convnext_aliases(model: nn.Module) -> dict[str, str]:
    # features.0 is the stem; stages at the odd indices, each after a downsampling layer
    return {"stem": "features.0", **{f"stage{i}": f"features.{2 * i - 1}" for i in range(1, 5)}, "fc": "classifier.2"}


def _regnet_aliases(model: nn.Module) -> dict[str, str]:
    return {"stem": "stem", **{f"stage{i}": f"trunk_output.block{i}" for i in range(1, 5)}, "fc": "fc"}


def _squeezenet_aliases(model: nn.Module) -> dict[str, str]:
    # conv1 (rectified), its pools, and fire2..fire9 as in the SqueezeNet paper
    out = {"conv1": "features.1"}
    fire, pool = 2, 1
    for name, child in model.features.named_children():
        if type(child).__name__ == "Fire":
            out[f"fire{fire}"] = f"features.{name}"
            fire += 1
        elif isinstance(child, nn.MaxPool2d):
            out[f"pool{pool}"] = f"features.{name}"
            pool += 1
    return out


register_aliases(torchvision.models.EfficientNet, _efficientnet_aliases)
register_aliases(torchvision.models.MobileNetV3, _mobilenet_v3_aliases)
register_aliases(torchvision.models.ConvNeXt, _convnext_aliases)
register_aliases(torchvision.models.RegNet, _regnet_aliases)
register_aliases(torchvision.models.SqueezeNet, _squeezenet_aliases)
