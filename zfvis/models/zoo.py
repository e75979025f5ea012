"""Model zoo: architectures, weights, preprocessing and friendly layer names.

Every entry bundles a builder, its preprocessing, where its weights come from and how
its layers are called in the papers (``conv1``, ``conv3_3``, ``fc6``, ...). Weights are
``"random"`` (seeded initialisation), a torchvision weights name fetched and cached by
torchvision's own mechanism (``TORCH_HOME``), ``"packaged"`` (shipped inside zfvis), or
the path of a local state dict or checkpoint, always read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from ..core.aliases import layer_aliases, register_aliases
from ..io.checks import check_device, check_input_size, check_int
from ..io.errors import InputTypeError, UserInputError, first_line
from ..io.images import to_rgb
from .checkpoints import apply_state_dict, read_checkpoint

__all__ = [
    "ZFNet",
    "Preprocess",
    "ModelSpec",
    "WeightsDownloadError",
    "list_models",
    "get_spec",
    "load_model",
    "load_weights",
    "layer_aliases",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class WeightsDownloadError(OSError):
    """Raised when torchvision weights are not cached and cannot be downloaded."""


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Turns a PIL image into the model-ready (C, H, W) float tensor.

    The image is converted to RGB (:func:`zfvis.io.images.to_rgb`), its shorter side resized to
    ``resize``, centre-cropped to ``crop`` x ``crop`` and normalised with ``mean``/``std``.

    Attributes:
        resize: Length of the shorter side after resizing (``None``: keep the size).
        crop: Side of the centre crop (``None``: no crop).
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided by.
    """

    resize: int | None
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise InputTypeError(f"preprocess takes a PIL image (zfvis.load_image(path)), got {type(image).__name__}")
        image = to_rgb(image)
        if self.resize is not None:
            image = TF.resize(image, self.resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if self.crop is not None:
            image = TF.center_crop(image, [self.crop, self.crop])
        x = TF.pil_to_tensor(image).float().div_(255.0)
        return TF.normalize(x, list(self.mean), list(self.std))

    def with_size(self, size: int) -> Preprocess:
        """Returns the same preprocessing for square inputs of side ``size``."""
        check_input_size(size, "input size")
        return dataclasses.replace(self, resize=size, crop=size)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undoes the normalisation: model input (..., 3, H, W) back to [0, 1] RGB."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)


class ZFNet(nn.Module):
    """The network of Zeiler & Fergus (2014), Fig. 3, and its 32x32 variant.

    ImageNet version (224x224 input): conv1 96 7x7/2, 3x3/2 max-pool, contrast
    normalisation, conv2 256 5x5/2, pool, normalisation, conv3 384 3x3, conv4 384 3x3,
    conv5 256 3x3, pool, fc6 4096, fc7 4096, fc8 ``num_classes``; pools use
    ``ceil_mode`` so the map sizes are the paper's 110, 55, 26, 13, 13, 13, 6.

    Args:
        num_classes: Number of outputs of fc8.
        widths: Output channels of conv1..conv5.
        kernels: Kernel sizes of conv1..conv5.
        strides: Strides of conv1 and conv2.
        fc_width: Width of fc6 and fc7.
        batch_norm: Put a BatchNorm2d after every convolution (the 32x32 variant trains
            with it; the deconvnet folds it into the convolution).
        small_input: The 32x32 layout: "same" padding, 3x3 stride-2 pools padded by 1,
            so conv5's pool leaves 4x4 maps for a 32x32 input.
        dropout: Dropout probability before fc7 and fc8.
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        widths: tuple[int, int, int, int, int] = (96, 256, 384, 384, 256),
        kernels: tuple[int, int, int, int, int] = (7, 5, 3, 3, 3),
        strides: tuple[int, int] = (2, 2),
        fc_width: int = 4096,
        batch_norm: bool = False,
        small_input: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        pool_after = {0, 1, 4}
        for i, (out_ch, k) in enumerate(zip(widths, kernels)):
            stride = strides[i] if i < 2 else 1
            if small_input:
                pad = k // 2
            else:
                pad = 1 if i == 0 else (0 if i == 1 else 1)
            layers.append(nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=pad, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
            if i in pool_after:
                if small_input:
                    layers.append(nn.MaxPool2d(3, stride=2, padding=1))
                else:
                    layers.append(nn.MaxPool2d(3, stride=2, ceil_mode=True))
                if i < 2:
                    layers.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        spatial = 4 if small_input else 6
        self.classifier = nn.Sequential(
            nn.Linear(widths[-1] * spatial * spatial, fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_width, fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def _zfnet(num_classes: int = 1000) -> nn.Module:
    return ZFNet(num_classes=num_classes)


def _zfnet_cifar10(num_classes: int = 10) -> nn.Module:
    return ZFNet(
        num_classes=num_classes,
        widths=(32, 64, 128, 128, 128),
        kernels=(5, 5, 3, 3, 3),
        strides=(1, 1),
        fc_width=512,
        batch_norm=True,
        small_input=True,
    )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A zoo entry.

    Attributes:
        name: The zoo name (``zfnet-cifar10``, ``vgg16``, ...).
        build: Returns the architecture with freshly initialised weights; takes an
            optional ``num_classes``.
        preprocess: The matching preprocessing.
        default_weights: What ``weights=None`` means for this model.
        weights_enum: torchvision's weights enum, where published weights exist.
        packaged: File name of the weights shipped in ``zfvis/weights``.
        classes: Output class names, where known here.
    """

    name: str
    build: Callable[..., nn.Module]
    preprocess: Preprocess
    default_weights: str
    weights_enum: Any = None
    packaged: str | None = None
    classes: tuple[str, ...] | None = None


_IMAGENET_PRE = Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_CIFAR_PRE = Preprocess(resize=32, crop=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)

_REGISTRY: dict[str, ModelSpec] = {}


def _register(spec: ModelSpec) -> None:
    _REGISTRY[spec.name] = spec


_register(ModelSpec("zfnet", _zfnet, _IMAGENET_PRE, "random"))
_register(
    ModelSpec(
        "zfnet-cifar10",
        _zfnet_cifar10,
        _CIFAR_PRE,
        "packaged",
        packaged="zfnet_cifar10.pt",
        classes=CIFAR10_CLASSES,
    )
)


def _tv(name: str, enum_name: str) -> ModelSpec:
    builder = getattr(torchvision.models, name)
    return ModelSpec(
        name,
        lambda num_classes=1000: builder(weights=None, num_classes=num_classes),
        _IMAGENET_PRE,
        "DEFAULT",
        weights_enum=getattr(torchvision.models, enum_name),
    )


_register(_tv("alexnet", "AlexNet_Weights"))
for _depth in (11, 13, 16, 19):
    _register(_tv(f"vgg{_depth}", f"VGG{_depth}_Weights"))
    _register(_tv(f"vgg{_depth}_bn", f"VGG{_depth}_BN_Weights"))
for _depth in (18, 34, 50, 101, 152):
    _register(_tv(f"resnet{_depth}", f"ResNet{_depth}_Weights"))
_register(_tv("densenet121", "DenseNet121_Weights"))
_register(_tv("mobilenet_v2", "MobileNet_V2_Weights"))


def _googlenet(num_classes: int = 1000) -> nn.Module:
    # as torchvision builds it for its ImageNet weights: no auxiliary heads (they only run
    # in training), and transform_input on, which maps ImageNet normalisation to the
    # original network's
    return torchvision.models.googlenet(weights=None, num_classes=num_classes, aux_logits=False,
                                        transform_input=True, init_weights=True)


_register(ModelSpec("googlenet", _googlenet, _IMAGENET_PRE, "DEFAULT",
                    weights_enum=torchvision.models.GoogLeNet_Weights))


def list_models() -> list[str]:
    """Returns the names of all zoo models."""
    return sorted(_REGISTRY)


def _unknown(kind: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} '{name}'.{hint} Valid: {', '.join(valid)}"


def get_spec(name: str) -> ModelSpec:
    """Returns the zoo entry called ``name``.

    Raises:
        ValueError: No such model; the message lists the valid names.
    """
    if not isinstance(name, str):
        raise InputTypeError(f"model name must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserInputError(_unknown("model", name, list_models())) from None


def _download(spec: ModelSpec, weights_name: str) -> dict[str, torch.Tensor]:
    enum = spec.weights_enum
    try:
        weights = enum[weights_name]
    except KeyError:
        names = ["DEFAULT", *enum.__members__]
        raise UserInputError(_unknown(f"weights name for {spec.name}", weights_name, names)) from None
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cache.exists():  # torchvision would hand a damaged cached file to torch.load as it is
        try:
            return read_checkpoint(cache)
        except UserInputError as err:
            raise UserInputError(f"the cached {spec.name} weights are unusable ({first_line(err)}); delete "
                                 f"'{cache}' and retry, or pass --weights random") from None
    said = io.StringIO()  # torch.hub's "Downloading: ..." line: shown once the download worked, not before an error
    try:
        with contextlib.redirect_stdout(said):
            state = torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True, weights_only=True)
        sys.stdout.write(said.getvalue())
        return state
    except OSError as err:  # no network (URLError), refused connection, unwritable cache
        raise WeightsDownloadError(
            f"cannot download {spec.name} weights {weights_name} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no network'}); without a network, place the "
            f"file at '{cache}', pass --weights PATH to a local state dict, or try zfvis with --weights random "
            "(weights=\"random\" in Python: untrained, it shows the architecture, not learned features)"
        ) from None
    except Exception as err:  # bad hash, a corrupt or unsafe file: pickle raises many types
        raise UserInputError(
            f"the {spec.name} weights file '{cache}' is unusable ({first_line(err)}); delete it and retry, or pass "
            "--weights random"
        ) from None


def load_weights(model: nn.Module, spec: ModelSpec, weights: str | os.PathLike[str]) -> str:
    """Loads ``weights`` into ``model`` and returns a description of their source.

    Args:
        model: A freshly built architecture of ``spec``.
        spec: Its zoo entry.
        weights: ``"random"``, ``"packaged"``, a torchvision weights name or a file path.

    Raises:
        FileNotFoundError: A weights file does not exist.
        ValueError: Unknown weights name, or a file that does not fit or would run code.
        WeightsDownloadError: torchvision weights not cached and not downloadable.
    """
    if isinstance(weights, os.PathLike) or (
        isinstance(weights, str) and (os.sep in weights or "/" in weights or weights.endswith((".pt", ".pth", ".ckpt")))
    ):
        path = Path(weights)
        apply_state_dict(model, read_checkpoint(path), str(path))
        return str(path)
    if not isinstance(weights, str):
        raise InputTypeError(f"weights must be a str or a path, got {type(weights).__name__}")
    if weights == "random":
        return "random"
    if weights == "packaged":
        if spec.packaged is None:
            raise UserInputError(f"{spec.name} ships no weights; use random, a torchvision name or a file")
        ref = resources.files("zfvis.models") / "weights" / spec.packaged
        with resources.as_file(ref) as path:
            if not path.is_file():
                raise FileNotFoundError(f"the packaged weights '{path}' are missing; reinstall zfvis")
            apply_state_dict(model, read_checkpoint(path), f"packaged {spec.packaged}")
        return f"packaged:{spec.packaged}"
    if spec.weights_enum is None:
        names = ["random", "packaged"] if spec.packaged else ["random"]
        raise UserInputError(
            f"unknown weights '{weights}' for {spec.name}: it has no torchvision weights; "
            f"use {' or '.join(names)}, or the path of a .pt file"
        )
    apply_state_dict(model, _download(spec, weights), f"torchvision {weights}")
    return f"torchvision:{spec.weights_enum[weights].name if weights != 'DEFAULT' else spec.weights_enum.DEFAULT.name}"


def load_model(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[nn.Module, Preprocess]:
    """Builds a zoo model with its weights, in eval mode, and its preprocessing.

    Args:
        name: A name from :func:`list_models`.
        weights: ``None`` (the model's default: packaged weights for ``zfnet-cifar10``,
            ``DEFAULT`` for torchvision models, ``random`` for ``zfnet``), ``"random"``,
            ``"packaged"``, a torchvision weights name, or a local state dict / checkpoint.
        device: Where to put the model.
        seed: Seed of the initialisation for ``weights="random"``.

    Returns:
        ``(model, preprocess)``, the preprocessing a callable from PIL image to (C, H, W).

    Raises:
        ValueError: Unknown model or weights name, mismatched or unsafe checkpoint.
        FileNotFoundError: A weights file does not exist.
        WeightsDownloadError: Weights cannot be downloaded (no network).
    """
    spec = get_spec(name)
    device = check_device(device)
    check_int("seed", seed, 0, 2**63 - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build()
    load_weights(model, spec, spec.default_weights if weights is None else weights)
    return model.eval().to(device), spec.preprocess


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
