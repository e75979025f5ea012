"""timm's models as zoo entries: ``timm:NAME`` wherever a model name is taken.

``timm:convnext_atto`` builds ``timm.create_model("convnext_atto")`` with the
preprocessing of its pretrained config (input size, crop fraction, mean, std,
interpolation). Its weights are ``"random"`` (seeded), ``"DEFAULT"`` (timm's pretrained
weights, from the Hugging Face hub cache or the network), a pretrained tag (``"in1k"``
means ``convnext_atto.in1k``), or a local state dict read with ``weights_only=True``.
timm is an optional dependency (``pip install 'zfvis[timm]'``): without it a ``timm:``
name is refused with that command.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import warnings
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..io.errors import UserInputError, WeightsDownloadError, first_line

__all__ = ["PREFIX", "timm_module", "is_timm_name", "timm_architecture", "timm_preprocess_options",
           "timm_builder", "timm_pretrained"]

#: The prefix that names a timm model.
PREFIX = "timm:"


def is_timm_name(name: str) -> bool:
    """Whether ``name`` names a timm model (``timm:NAME``)."""
    return name.startswith(PREFIX)


def timm_module() -> ModuleType:
    """The ``timm`` package.

    Raises:
        UserInputError: timm is not installed (the message says how to install it).
    """
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise UserInputError("timm models need the timm package, which is not installed: "
                             "pip install 'zfvis[timm]' (or pip install timm)") from None


def timm_architecture(name: str) -> str:
    """The timm architecture of ``timm:NAME``, checked against timm's registry.

    Raises:
        UserInputError: timm is missing, or knows no such model (with the closest names).
    """
    arch = name[len(PREFIX):]
    timm = timm_module()
    if not arch or not timm.is_model(arch.split(".")[0]):
        close = timm.list_models(f"*{arch.split('.')[0][:6]}*")[:5] if arch else []
        hint = f" Close: {', '.join(PREFIX + c for c in close)}." if close else ""
        raise UserInputError(f"unknown timm model '{arch}'.{hint} Hint: timm.list_models() lists them all")
    return arch


def timm_preprocess_options(arch: str) -> dict[str, Any]:
    """The keyword arguments of a :class:`~zfvis.models.zoo.Preprocess` for a timm model,
    from its pretrained config (ImageNet's defaults where it has none)."""
    cfg = timm_module().models.get_pretrained_cfg(arch)
    size = int(cfg.input_size[-1]) if cfg is not None else 224
    crop_pct = float(cfg.crop_pct) if cfg is not None and cfg.crop_pct else 0.875
    interpolation = cfg.interpolation if cfg is not None and cfg.interpolation in ("bilinear", "bicubic") else "bilinear"
    mean = tuple(cfg.mean) if cfg is not None else (0.485, 0.456, 0.406)
    std = tuple(cfg.std) if cfg is not None else (0.229, 0.224, 0.225)
    return {"resize": int(math.floor(size / crop_pct)), "crop": size, "mean": mean, "std": std,
            "interpolation": interpolation}


def timm_builder(arch: str) -> Any:
    """A builder ``build(num_classes=None)`` of the architecture, with random weights."""

    def build(num_classes: int | None = None) -> nn.Module:
        extra = {} if num_classes is None else {"num_classes": num_classes}
        return timm_module().create_model(arch, pretrained=False, **extra)

    return build


def timm_pretrained(arch: str, tag: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of ``arch`` (``tag``: ``"DEFAULT"``, or a pretrained tag such
    as ``"in1k"``), as a state dict: from the Hugging Face hub cache, or downloaded.

    Raises:
        UserInputError: An unknown tag.
        WeightsDownloadError: Not cached, and no network (the message says what to pass instead).
    """
    timm = timm_module()
    full = arch if tag == "DEFAULT" else f"{arch.split('.')[0]}.{tag}"
    if tag != "DEFAULT" and full not in timm.list_pretrained(full):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch.split('.')[0]}.*")]
        raise UserInputError(f"unknown weights '{tag}' for timm:{arch}; use random, DEFAULT, "
                             f"{', '.join(tags) or 'no pretrained tag (it has none)'}, or the path of a .pt file")
    try:
        with _quiet_hub():
            return timm.create_model(full, pretrained=True).state_dict()
    except (OSError, RuntimeError, ValueError) as err:  # offline hub, missing file, unreachable host
        raise WeightsDownloadError(
            f"cannot load timm's pretrained weights of {full} ({type(err).__name__}: {first_line(err)}); without a "
            "network, pass --weights PATH to a local state dict, or --weights random (weights=\"random\" in Python)"
        ) from None


@contextlib.contextmanager
def _quiet_hub() -> Any:
    """The Hugging Face hub's own log lines and warnings held back: the error says it all."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hub.setLevel(level)
