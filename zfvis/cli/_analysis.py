"""Options the analysis commands (``occlude``, ``invariance``, ``correspond``) share: the
occluder colour (``--fill``), class names and ``--target``, default layers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._common import CLIError
from .outputs import settings_record, write_json

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    import torch

    from ..models.zoo import Preprocess

__all__ = [
    "FILL_HELP",
    "parse_fill",
    "fill_rgb",
    "class_names",
    "parse_target",
    "parse_layers",
    "write_results",
]

FILL_HELP = "occluder colour: mean (the data set's mean colour), gray, black, or a VALUE in model input space (default mean)"


def parse_fill(text: str, preprocess: Preprocess, dtype: torch.dtype | None = None) -> float | torch.Tensor:
    """``mean`` -> 0.0 (the mean after normalisation); ``gray``/``black`` -> 0.5/0 normalised;
    or a number, finite and representable in the model's ``dtype`` (default float32)."""
    import torch

    from ..io.parse import parse_number

    name = str(text).strip().lower()
    mean, std = torch.tensor(preprocess.mean), torch.tensor(preprocess.std)
    if name == "mean":
        return 0.0
    if name in ("gray", "grey"):
        return (0.5 - mean) / std
    if name == "black":
        return -mean / std
    if not name or not (name[0].isdigit() or name[0] in "+-." or name in ("nan", "inf", "infinity")):
        raise CLIError(f"--fill must be mean, gray, black or a number, got '{text}'")
    return parse_number(text, "--fill", dtype=torch.float32 if dtype is None else dtype)


def fill_rgb(fill: float | torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """The occluder colour as shown (3,) in [0, 1]."""
    import torch

    value = torch.as_tensor(fill, dtype=torch.float32).expand(3)
    return (value * torch.tensor(preprocess.std) + torch.tensor(preprocess.mean)).clamp(0, 1)


def class_names(model: str, weights: str | None) -> list[str] | None:
    """Output class names of a zoo model with these weights, where known."""
    from ..models.zoo import get_spec

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
    """A class number or (case-insensitive) name (:func:`zfvis.io.parse.parse_target`);
    ``None`` stays ``None``. ``why``: why ``names`` is ``None`` (:func:`no_class_names`)."""
    from ..io.parse import parse_target as _parse_target

    if text is None:
        return None
    return _parse_target(text, names, "--target", why=why)


def parse_layers(text: str | None, default: list[str]) -> list[str]:
    """``--layers``: ``None`` (not given) is ``default``; anything given must name a layer."""
    from ..io.parse import parse_names

    return list(default) if text is None else parse_names(text, "--layers", example="conv5,fc7")


def write_results(path: str | os.PathLike[str], settings: dict[str, Any], **results: Any) -> None:
    """One JSON file (atomically written) with the settings, marked as zfvis's
    (:func:`~zfvis.cli.outputs.settings_record`), and the results as further keys."""
    write_json(path, {**settings_record(settings), **results})
