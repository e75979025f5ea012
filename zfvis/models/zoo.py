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

from ..core.aliases import layer_aliases
from ..io.checks import check_device, check_input_size, check_int
from ..io.errors import InputTypeError, UserInputError, WeightsDownloadError, first_line
from ..io.images import to_rgb
from . import aliases as _aliases  # noqa: F401 - registers the zoo's layer aliases
from .checkpoints import apply_state_dict, read_checkpoint
from .timm_models import is_timm_name, timm_architecture, timm_builder, timm_preprocess_options, timm_pretrained
from .zfnet import ZFNet, build_zfnet, build_zfnet_cifar10

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
        interpolation: How the image is resized: ``"bilinear"`` or ``"bicubic"`` (as the weights were trained).
    """

    resize: int | None
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise InputTypeError(f"preprocess takes a PIL image (zfvis.load_image(path)), got {type(image).__name__}")
        image = to_rgb(image)
        if self.resize is not None:
            image = TF.resize(image, self.resize, interpolation=TF.InterpolationMode(self.interpolation), antialias=True)
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
        timm: The timm architecture, for ``timm:NAME`` entries.
    """

    name: str
    build: Callable[..., nn.Module]
    preprocess: Preprocess
    default_weights: str
    weights_enum: Any = None
    packaged: str | None = None
    classes: tuple[str, ...] | None = None
    timm: str | None = None


_IMAGENET_PRE = Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_CIFAR_PRE = Preprocess(resize=32, crop=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)

_REGISTRY: dict[str, ModelSpec] = {}


def _register(spec: ModelSpec) -> None:
    _REGISTRY[spec.name] = spec


_register(ModelSpec("zfnet", build_zfnet, _IMAGENET_PRE, "random"))
_register(
    ModelSpec(
        "zfnet-cifar10",
        build_zfnet_cifar10,
        _CIFAR_PRE,
        "packaged",
        packaged="zfnet_cifar10.pt",
        classes=CIFAR10_CLASSES,
    )
)


def _tv(name: str, enum_name: str, **options: Any) -> ModelSpec:
    """A torchvision classification model; its preprocessing is what its DEFAULT weights ship with."""
    builder = getattr(torchvision.models, name)
    enum = getattr(torchvision.models, enum_name)
    t = enum.DEFAULT.transforms()
    pre = Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean), std=tuple(t.std),
                     interpolation=t.interpolation.value)
    return ModelSpec(
        name,
        lambda num_classes=1000: builder(weights=None, num_classes=num_classes, **options),
        pre,
        "DEFAULT",
        weights_enum=enum,
    )


_register(_tv("alexnet", "AlexNet_Weights"))
for _depth in (11, 13, 16, 19):
    _register(_tv(f"vgg{_depth}", f"VGG{_depth}_Weights"))
    _register(_tv(f"vgg{_depth}_bn", f"VGG{_depth}_BN_Weights"))
for _depth in (18, 34, 50, 101, 152):
    _register(_tv(f"resnet{_depth}", f"ResNet{_depth}_Weights"))
_register(_tv("densenet121", "DenseNet121_Weights"))
_register(_tv("mobilenet_v2", "MobileNet_V2_Weights"))
#: The families researchers study today: SiLU and squeeze-and-excitation (EfficientNet,
#: RegNetY), Hardswish (MobileNetV3), LayerNorm and permutes (ConvNeXt), channel shuffles,
#: fire modules, Inception's factorised convolutions, grouped and wide residual blocks.
for _name, _enum in (("efficientnet_b0", "EfficientNet_B0_Weights"), ("efficientnet_v2_s", "EfficientNet_V2_S_Weights"),
                     ("mobilenet_v3_large", "MobileNet_V3_Large_Weights"), ("convnext_tiny", "ConvNeXt_Tiny_Weights"),
                     ("regnet_y_400mf", "RegNet_Y_400MF_Weights"), ("shufflenet_v2_x1_0", "ShuffleNet_V2_X1_0_Weights"),
                     ("squeezenet1_1", "SqueezeNet1_1_Weights"), ("resnext50_32x4d", "ResNeXt50_32X4D_Weights"),
                     ("resnext101_32x8d", "ResNeXt101_32X8D_Weights"), ("wide_resnet50_2", "Wide_ResNet50_2_Weights"),
                     ("wide_resnet101_2", "Wide_ResNet101_2_Weights")):
    _register(_tv(_name, _enum))
# as torchvision builds it for its ImageNet weights: no auxiliary head (it only runs in training)
_register(_tv("inception_v3", "Inception_V3_Weights", aux_logits=False, transform_input=True, init_weights=True))


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
    """Returns the zoo entry called ``name``: a name of :func:`list_models`, or ``timm:NAME``
    for any model of timm (:mod:`zfvis.models.timm_models`).

    Raises:
        ValueError: No such model; the message lists the valid names.
    """
    if not isinstance(name, str):
        raise InputTypeError(f"model name must be a str, got {type(name).__name__}")
    if is_timm_name(name):
        arch = timm_architecture(name)
        return ModelSpec(name, timm_builder(arch), Preprocess(**timm_preprocess_options(arch)), "DEFAULT", timm=arch)
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
    if spec.timm is not None:
        apply_state_dict(model, timm_pretrained(spec.timm, weights), f"timm {weights}")
        return f"timm:{weights}"
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
