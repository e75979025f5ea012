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
import difflib
import importlib
import logging
import math
import re
import socket
import threading
import urllib.parse
import warnings
from pathlib import Path
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


_NAME = re.compile(r"[A-Za-z0-9_]+")
_TAG = re.compile(r"[A-Za-z0-9_-]+")


def timm_architecture(name: str) -> str:
    """The timm architecture of ``timm:NAME`` (or ``timm:NAME.TAG``), checked against timm's
    registry and, with a tag, its pretrained tags.

    Raises:
        UserInputError: timm is missing, the name is no timm name (a path), timm knows no
            such model (with the closest names), or the tag is not one of the model's.
    """
    arch = name[len(PREFIX):]
    base, dot, tag = arch.partition(".")
    if not _NAME.fullmatch(base) or (dot and not _TAG.fullmatch(tag)):
        path = any(c in arch for c in "/\\") or arch.startswith("~")
        what = "a path" if path else "not a timm model name"
        fix = "; pass a weights file with --weights PATH (weights=PATH in Python)" if path else ""
        raise UserInputError(f"'{name}' is {what}: timm names are letters, digits and underscores, with an optional "
                             f".TAG (timm:resnet18, timm:resnet18.a1_in1k){fix}")
    timm = timm_module()
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.75)
        hint = f" Close: {', '.join(PREFIX + c for c in close)}." if close else ""
        raise UserInputError(f"unknown timm model '{base}'.{hint} Hint: timm.list_models() lists them all")
    if dot and arch not in timm.list_pretrained(arch):
        raise UserInputError(f"unknown pretrained tag '{tag}' for timm:{base}; {_tags(timm, base)}")
    return arch


def _tags(timm: ModuleType, base: str) -> str:
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*") if "." in t]
    return f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags"


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
    if tag != "DEFAULT" and (not _TAG.fullmatch(tag) or full not in timm.list_pretrained(full)):
        raise UserInputError(f"unknown weights '{tag}' for timm:{arch}; use random, DEFAULT, a pretrained tag "
                             f"({_tags(timm, arch.split('.')[0])}), or the path of a .pt file")
    _check_reachable(timm, full)
    try:
        with _quiet_hub():
            return timm.create_model(full, pretrained=True).state_dict()
    except (OSError, RuntimeError, ValueError) as err:  # offline hub, missing file, unreachable host
        raise WeightsDownloadError(
            f"cannot load timm's pretrained weights of {full} ({type(err).__name__}: {first_line(err)}); without a "
            f"network, {_INSTEAD}"
        ) from None


_INSTEAD = 'pass --weights PATH to a local state dict, or --weights random (weights="random" in Python)'
_PROBE_SECONDS = 3.0


def _check_reachable(timm: ModuleType, full: str) -> None:
    """Refuses at once weights that are in no cache and cannot be downloaded (offline, or
    the host unreachable), instead of after the hub's minute of retries. Nothing is sent:
    a cache lookup, the offline setting, and one TCP connection attempt."""
    cfg = timm.models.get_pretrained_cfg(full)
    if cfg is None or _cached(cfg):
        return
    hub = importlib.import_module("huggingface_hub.constants") if cfg.hf_hub_id else None
    if hub is not None and getattr(hub, "HF_HUB_OFFLINE", False):
        raise WeightsDownloadError(f"timm's pretrained weights of {full} are not in the Hugging Face cache "
                                   f"({hub.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; {_INSTEAD}")
    url = hub.ENDPOINT if hub is not None else (cfg.url or "")
    host = urllib.parse.urlparse(url).hostname
    if host and not _reachable(host, urllib.parse.urlparse(url).port or 443):
        raise WeightsDownloadError(f"timm's pretrained weights of {full} are not cached and {host} cannot be "
                                   f"reached (no network?); {_INSTEAD}")


def _cached(cfg: Any) -> bool:
    """Whether the weights of a pretrained config are in the hub's or torch's cache."""
    if cfg.hf_hub_id:
        with contextlib.suppress(Exception):  # an old huggingface_hub: go on as before
            from huggingface_hub import try_to_load_from_cache

            names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
            for fname in [*names, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]:
                if isinstance(try_to_load_from_cache(cfg.hf_hub_id, fname), str):
                    return True
            return False
        return True
    if cfg.url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(cfg.url).path).name).is_file()
    return True


def _reachable(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host`` opens within a few seconds (name lookup included)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=_PROBE_SECONDS).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(_PROBE_SECONDS + 0.5)
    return bool(result and result[0])


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
