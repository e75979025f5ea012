"""The one parsing layer for what a person types or hands over: numbers, ranges, class
targets, name lists and JSON files.

Every command of the command line and every function of the Python API that takes such a
value goes through here, so each rule exists once:

- a number is finite and representable in the model's dtype (``1e39`` is not a float32;
  neither is ``1e-39``, which float32 keeps only as a denormal that loses its digits);
- whole numbers are written in ASCII digits (``²`` and ``٣`` are not numbers here, although
  Python's ``int`` reads the second);
- a range ``START:STOP:STEP`` has a count that is computed arithmetically and bounded
  before anything is built (``0:1e308:1e-308`` is refused at once);
- a list of names names at least one (``--layers ''`` is refused, not read as the default);
- a JSON file is a regular file, UTF-8 (a byte-order mark is allowed), and nested at most
  :data:`MAX_JSON_DEPTH` deep.

Every refusal is a :class:`~zfvis.io.errors.UserInputError` (an
:class:`~zfvis.io.errors.InputTypeError` for a value of the wrong type) with one line that
names the setting and what to give instead; the command line prints it and exits with 2.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import InputTypeError, UserInputError, show_path

__all__ = [
    "MAX_AMOUNTS",
    "MAX_JSON_DEPTH",
    "MAX_JSON_BYTES",
    "representable",
    "parse_number",
    "parse_int",
    "parse_range",
    "parse_names",
    "parse_target",
    "check_seed",
    "check_fill",
    "read_json",
    "check_finite_result",
]

#: The most values a range may give (each is at least one forward pass).
MAX_AMOUNTS = 10_000
#: How deeply a JSON file zfvis reads may nest (a part file needs 3 levels).
MAX_JSON_DEPTH = 32
#: The largest JSON file zfvis reads (part files are a few kB).
MAX_JSON_BYTES = 64 * 2**20

_INT = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def representable(value: float, dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``value`` is finite and a normal number of ``dtype`` (or zero): neither
    beyond its largest value nor so small that it turns into a denormal or zero."""
    if not math.isfinite(value):
        return False
    info = torch.finfo(dtype if dtype.is_floating_point else torch.float32)
    return value == 0 or info.tiny <= abs(value) <= info.max


def parse_number(value: object, name: str, *, dtype: torch.dtype = torch.float32, low: float | None = None,
                 high: float | None = None, above: bool = False) -> float:  # fmt: skip
    """A real number typed (a string in ASCII) or given (an int or float), checked.

    Args:
        value: The text or the number.
        name: How the person knows the setting (``--fill``, ``fill``), for the message.
        dtype: The dtype the number will live in (the model's): it must be representable there.
        low: Smallest allowed value (``None``: no bound).
        high: Largest allowed value (``None``: no bound).
        above: ``value`` must exceed ``low`` (not equal it).

    Raises:
        InputTypeError: A value that is neither text nor a real number (a bool is not one).
        UserInputError: Not a number, not finite, not representable in ``dtype``, out of bounds.
    """
    if isinstance(value, str):
        text = value.strip()
        if not _FLOAT.match(text) and text.lower().lstrip("+-") not in ("inf", "infinity", "nan"):
            raise UserInputError(f"{name} must be a number (like 0.5 or 1e-3, in ASCII digits), got {value!r}")
        number = float(text)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    else:
        raise InputTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(number):
        raise UserInputError(f"{name} must be a finite number, got {value!r}")
    if not representable(number, dtype):
        info = torch.finfo(dtype if dtype.is_floating_point else torch.float32)
        raise UserInputError(f"{name} {value!r} is not representable in the model's {_dtype_name(dtype)}: use 0 or a "
                             f"magnitude between {info.tiny:.3g} and {info.max:.3g}")
    if low is not None and (number < low or (above and number == low)):
        raise UserInputError(f"{name} must be {'more than' if above else 'at least'} {low:g}, got {value!r}")
    if high is not None and number > high:
        raise UserInputError(f"{name} must be at most {high:g}, got {value!r}")
    return number


def parse_int(value: object, name: str, low: int | None = None, high: int | None = None) -> int:
    """A whole number typed (ASCII digits, an optional sign) or given (an int), checked.

    Raises:
        InputTypeError: Neither text nor an int (a bool or a float is not one).
        UserInputError: Not a whole number in ASCII digits, or out of bounds.
    """
    if isinstance(value, str):
        text = value.strip()
        if not _INT.match(text):
            raise UserInputError(f"{name} must be a whole number in ASCII digits (like 3 or -2), got {value!r}")
        if len(text.lstrip("+-")) > 4000:  # beyond Python's int-from-text limit
            raise UserInputError(f"{name} {text[:20]}... is far too large")
        number = int(text)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = int(value)
    else:
        raise InputTypeError(f"{name} must be a whole number, got {type(value).__name__} {value!r}")
    if (low is not None and number < low) or (high is not None and number > high):
        if low is not None and high is not None:
            bound = f"between {low} and {high}"
        else:
            bound = f"at least {low}" if low is not None else f"at most {high}"
        shown = str(number) if len(str(number)) <= 30 else f"{str(number)[:20]}..."
        raise UserInputError(f"{name} must be {bound}, got {shown}")
    return number


def parse_range(text: object, name: str, *, dtype: torch.dtype = torch.float32,
                max_count: int = MAX_AMOUNTS) -> list[float]:  # fmt: skip
    """``START:STOP:STEP`` (STOP included when the steps reach it) or a comma-separated list.

    The count is computed from the three numbers, and bounded, before any value is made;
    every number, and every value of the range, is representable in ``dtype``.

    Raises:
        UserInputError: Malformed text, a number that is not representable, a step of 0 or
            one that leads away from STOP, no values, or more than ``max_count`` of them.
    """
    if not isinstance(text, str):
        raise InputTypeError(f"{name} must be text like 0:360:15 or 1,2,3, got {type(text).__name__}")
    usage = f"{name} must be START:STOP:STEP or a comma-separated list of numbers, got {text!r}"
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise UserInputError(usage)
        start, stop, step = (_range_number(p, name, dtype, usage) for p in parts)
        if step == 0 or (stop - start) / step < 0:
            raise UserInputError(f"{name} {text!r}: the step must be non-zero and lead from START to STOP")
        span = (stop - start) / step
        if not math.isfinite(span) or span + 1 > max_count:
            count = f"{int(span + 1e-9) + 1:,}" if math.isfinite(span) else "infinitely many"
            raise UserInputError(f"{name} {text!r} gives {count} values, more than {max_count:,}; use a larger step")
        values = [round(start + k * step, 10) for k in range(int(span + 1e-9) + 1)]
    else:
        values = [_range_number(p, name, dtype, usage) for p in text.split(",") if p.strip()]
        if len(values) > max_count:
            raise UserInputError(f"{name} gives {len(values):,} values, more than {max_count:,}")
    if not values:
        raise UserInputError(f"{name} names no values; e.g. 0:360:15 or 1,2,3")
    return values


def _range_number(part: str, name: str, dtype: torch.dtype, usage: str) -> float:
    if not part.strip():
        raise UserInputError(usage)
    return parse_number(part, name, dtype=dtype)


def parse_names(text: object, name: str, *, example: str) -> list[str]:
    """A comma-separated list of names (``conv1,fc7``): stripped, without repeats, at least one.

    Raises:
        UserInputError: Not text, or no name in it (``''``, ``','``).
    """
    if not isinstance(text, str):
        raise InputTypeError(f"{name} must be comma-separated names like {example}, got {type(text).__name__}")
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not names:
        raise UserInputError(f"{name} {text!r} names nothing; give e.g. {name} {example}")
    return names


def parse_target(value: object, names: Sequence[str] | None, name: str = "--target", *,
                 why: str | None = None) -> int:  # fmt: skip
    """A class: its number (ASCII digits, from 0) or its name (case-insensitive).

    Args:
        value: The text, or a class index.
        names: The model's class names (``None``: not known).
        name: The setting, for messages.
        why: Why ``names`` is ``None`` and what to give instead (say, random weights).

    Raises:
        UserInputError: A negative or malformed number, or a name that is not a class
            (with the closest names).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_int(value, name, 0)
    if not isinstance(value, str):
        raise InputTypeError(f"{name} must be a class number or name, got {type(value).__name__}")
    text = value.strip()
    if _INT.match(text):
        return parse_int(text, name, 0)
    if not text or text.lstrip("+-").isdigit() or text.lstrip("+-").isdecimal():  # Unicode digits, '--5'
        raise UserInputError(f"{name} must be a class number in ASCII digits (0, 1, ...) or a class name, got {value!r}")
    if names is None:
        why = why or f"this model's class names are not known; give a class number ({name} 0, {name} 1, ...)"
        raise UserInputError(f"unknown class name '{text}': {why}")
    lower = [n.lower() for n in names]
    if text.lower() in lower:
        return lower.index(text.lower())
    close = difflib.get_close_matches(text.lower(), lower, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(names[lower.index(c)]) for c in close)}?" if close else ""
    raise UserInputError(f"unknown class name '{text}'.{hint}")


def check_seed(value: object, name: str = "seed") -> int:
    """A random seed: an int that ``torch.Generator.manual_seed`` takes (0 .. 2**63 - 1).

    Raises:
        InputTypeError: Not an int.
        UserInputError: Negative or too large.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an int, got {type(value).__name__}")
    return parse_int(value, name, 0, 2**63 - 1)


def check_fill(fill: object, channels: int, dtype: torch.dtype, name: str = "fill") -> float | torch.Tensor:
    """A fill colour in model input space: a real number, or a (C,) tensor of them, each
    finite and representable in the images' ``dtype``.

    Raises:
        InputTypeError: Neither a real number nor a tensor (text, a bool, None).
        UserInputError: A NaN, an infinity, a value beyond ``dtype``, or a tensor of the
            wrong shape.
    """
    if isinstance(fill, torch.Tensor):
        if fill.numel() not in (1, channels):
            raise UserInputError(f"{name} must be a float or a ({channels},) tensor, got shape {tuple(fill.shape)}")
        if fill.dtype == torch.bool or fill.is_complex():
            raise InputTypeError(f"{name} must hold real numbers, got a {fill.dtype} tensor")
        for v in fill.detach().double().cpu().reshape(-1).tolist():
            parse_number(v, name, dtype=dtype)
        return fill
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        raise InputTypeError(f"{name} must be a float or a ({channels},) tensor, got {type(fill).__name__}")
    return parse_number(fill, name, dtype=dtype)


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Reads a JSON file a person gives (a part file), checked before it is opened.

    Args:
        path: The file.
        what: What the file is, for messages (``"part file"``).

    Raises:
        FileNotFoundError: It does not exist.
        UserInputError: A folder, a pipe or a device; too large; not UTF-8; not JSON;
            nested deeper than :data:`MAX_JSON_DEPTH`.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {show_path(p)} does not exist; check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserInputError(f"{what} {show_path(p)} is a folder; give a .json file")
    if not stat.S_ISREG(st.st_mode):
        raise UserInputError(f"{what} {show_path(p)} is not a regular file (a pipe or a device); give a .json file")
    if st.st_size > MAX_JSON_BYTES:
        raise UserInputError(f"{what} {show_path(p)} is {st.st_size / 2**20:.0f} MiB; a {what} is at most "
                             f"{MAX_JSON_BYTES // 2**20} MiB")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserInputError(f"{what} {show_path(p)} is not UTF-8 text (byte {err.start}); it must be JSON") from None
    depth = _max_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise UserInputError(f"{what} {show_path(p)} nests {depth} levels deep; a {what} nests at most "
                             f"{MAX_JSON_DEPTH}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{what} {show_path(p)} is not valid JSON: {err}") from None


def _max_depth(text: str) -> int:
    """How deeply the brackets of a JSON text nest (outside strings), counted without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def check_finite_result(values: torch.Tensor, what: str, cause: str) -> None:
    """Refuses a result that holds NaN or infinity, naming the input that made it.

    Args:
        values: The result.
        what: What it is (``"the feature distances"``).
        cause: What to change (``"fill 1e30 is far outside the images' values; ..."``).

    Raises:
        UserInputError: ``values`` holds a NaN or an infinity.
    """
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise UserInputError(f"{what} overflowed (NaN or infinity): {cause}")
