"""Options the analysis commands (``occlude``, ``invariance``, ``correspond``) share: the
occluder colour (``--fill``), class names and ``--target``, default layers."""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..io.atomic import atomic_write_text
from ..models.zoo import Preprocess, get_spec
from ._common import CLIError
from .outputs import write_settings

FILL_HELP = "occluder colour: mean (the data set's mean colour), gray, black, or a VALUE in model input space (default mean)"


def parse_fill(text: str, preprocess: Preprocess) -> float | torch.Tensor:
    """``mean`` -> 0.0 (the mean after normalisation); ``gray``/``black`` -> 0.5/0 normalised; or a number."""
    name = str(text).strip().lower()
    mean, std = torch.tensor(preprocess.mean), torch.tensor(preprocess.std)
    if name == "mean":
        return 0.0
    if name in ("gray", "grey"):
        return (0.5 - mean) / std
    if name == "black":
        return -mean / std
    try:
        value = float(name)
    except ValueError:
        raise CLIError(f"--fill must be mean, gray, black or a number, got '{text}'") from None
    if not math.isfinite(value):
        raise CLIError(f"--fill must be a finite number, got '{text}'")
    return value


def fill_rgb(fill: float | torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """The occluder colour as shown (3,) in [0, 1]."""
    value = torch.as_tensor(fill, dtype=torch.float32).expand(3)
    return (value * torch.tensor(preprocess.std) + torch.tensor(preprocess.mean)).clamp(0, 1)


def class_names(model: str, weights: str | None) -> list[str] | None:
    """Output class names of a zoo model with these weights, where known."""
    spec = get_spec(model)
    if spec.classes is not None:
        return list(spec.classes)
    enum = spec.weights_enum
    name = spec.default_weights if weights is None else weights
    if enum is None or not isinstance(name, str):
        return None
    try:
        entry = enum.DEFAULT if name == "DEFAULT" else enum[name]
    except KeyError:
        return None
    categories = entry.meta.get("categories")
    return list(categories) if categories else None


def format_probability(p: float) -> str:
    """A probability with three decimals, or three significant digits under 0.01 (a 1,000-class
    model with random weights gives about 0.001 to every class: "0.000" would hide it)."""
    return f"{p:.3f}" if p >= 0.01 else f"{p:.3g}"


def no_class_names(model: str, weights: str | None) -> str:
    """Why a zoo model with these weights has no class names, and what to give instead."""
    if weights == "random":
        return (f"{model} with --weights random has no class names: untrained, its outputs are not yet classes. "
                "Give a class number (--target 3), or load trained weights (--weights DEFAULT, or a file)")
    return f"the class names of {model} with weights '{weights}' are not known; give a class number (--target 3)"


def parse_target(text: str | None, names: Sequence[str] | None, *, why: str | None = None) -> int | None:
    """A class index or (case-insensitive) name; ``None`` stays ``None``. ``why``: why
    ``names`` is ``None`` (:func:`no_class_names`)."""
    if text is None:
        return None
    text = str(text).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if names is None:
        raise CLIError(f"unknown class name '{text}': {why or 'this model has no class names; give a class number'}")
    lower = [n.lower() for n in names]
    if text.lower() in lower:
        return lower.index(text.lower())
    close = difflib.get_close_matches(text.lower(), lower, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(names[lower.index(c)]) for c in close)}?" if close else ""
    raise CLIError(f"unknown class name '{text}'.{hint}")


def parse_layers(text: str | None, default: list[str]) -> list[str]:
    layers = [s.strip() for s in str(text).split(",") if s.strip()] if text else default
    if not layers:
        raise CLIError("no layers given; pass --layers, e.g. --layers conv5,fc7")
    return layers


def write_results(path: str | os.PathLike[str], settings: dict[str, Any], **results: Any) -> None:
    """One JSON file (atomically written) with the settings, marked as zfvis's
    (:func:`~zfvis.cli._common.write_settings`), and the results as further keys."""
    write_settings(path, settings)
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    data.update(results)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
