"""Checks of numbers a person gives: channel lists and specs, input sizes, counts.

Each check exists once here and is used by the command line and the library alike. All
bounds are checked arithmetically before anything is allocated, so a spec like
``0-99999999999999`` is refused at once instead of building a list that fills memory.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .errors import ForwardPassError, InputTypeError, UserInputError, first_line

__all__ = [
    "MAX_INPUT_SIZE",
    "MAX_CHANNELS",
    "check_int",
    "check_number",
    "check_path",
    "check_device",
    "free_memory",
    "check_memory",
    "check_input_size",
    "parse_channel_spec",
    "check_channels",
    "check_model",
    "forward_failure",
]

#: Largest square input side accepted (pixels). A 4096x4096 VGG16 forward pass already
#: needs tens of GB; anything larger is a typing slip, not a plan.
MAX_INPUT_SIZE = 4096
#: No layer of a CNN zfvis can reverse has more channels than this.
MAX_CHANNELS = 1 << 16


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Returns ``value`` if it is an int in ``low..high``.

    Args:
        name: How the person knows the setting (``--top``, ``top``), for the message.
        value: The value given.
        low: Smallest allowed value.
        high: Largest allowed value (``None``: no upper bound).

    Raises:
        UserInputError: Not an int, or out of bounds.
    """
    if not _is_int(value):
        raise UserInputError(f"{name} must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise UserInputError(f"{name} must be {bound}, got {value}")
    return int(value)  # type: ignore[arg-type]


def check_number(name: str, value: object, low: float, *, above: bool = False) -> float:
    """Returns ``value`` if it is a finite real number ``>= low`` (``> low`` with ``above``).

    Raises:
        UserInputError: Not a number (a bool is not one), not finite, or too small.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserInputError(f"{name} must be a finite number, got {value!r}")
    if value < low or (above and value == low):
        raise UserInputError(f"{name} must be {'more than' if above else 'at least'} {low}, got {value}")
    return float(value)


def check_path(name: str, value: object) -> Path:
    """``value`` as a :class:`~pathlib.Path`, if it is a ``str`` or an ``os.PathLike`` of one.

    Raises:
        InputTypeError: Anything else (``None``, a number, bytes).
    """
    if isinstance(value, str) and value:
        return Path(value)
    if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
        return Path(value)
    raise InputTypeError(f"{name} must be a path (a str or pathlib.Path), got {value!r}")


def check_device(device: object, name: str = "device") -> torch.device:
    """A torch device that exists on this machine.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a :class:`torch.device`.
        name: How the person knows the setting (``--device``), for the message.

    Raises:
        UserInputError: An unknown device, or one this machine does not have (CUDA without
            a GPU, a GPU index beyond the count, MPS without Apple silicon).
    """
    if not isinstance(device, (str, torch.device)):
        raise InputTypeError(f"{name} must be a str such as 'cpu' or 'cuda:0', or a torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserInputError(f"{name}: unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"CUDA was asked for ({name} {device}) but no CUDA GPU is available; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserInputError(f"{name} {device}: only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserInputError(f"{name} {device}: MPS (Apple silicon) is not available here; use cpu")
    elif dev.type != "cpu":
        raise UserInputError(f"{name}: unsupported device '{device}'; use cpu, cuda or cuda:N")
    return dev


def free_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated on ``device`` now: the GPU's free memory, or the system's
    available memory (Linux ``MemAvailable``, else the physical memory); ``None``: unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                info = dict(line.split(":", 1) for line in fh if ":" in line)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError, IndexError):
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def check_memory(need: int | None, device: torch.device, what: str, lower: str) -> None:
    """Refuses work that needs more memory than ``device`` has free, before it starts.

    Args:
        need: Bytes the work needs (``None``: unknown, nothing checked).
        device: Where it runs.
        what: The work, for the message ("a batch of 64 images of (3, 224, 224)").
        lower: What the person can lower ("--batch-size").

    Raises:
        UserInputError: ``need`` exceeds the free memory.
    """
    free = free_memory(device)
    if need is not None and free is not None and need > free:
        raise UserInputError(f"{what} needs about {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on "
                             f"{device}; lower {lower}")


def check_input_size(size: object, name: str = "--input-size") -> int:
    """Checks a square input side against ``1..MAX_INPUT_SIZE`` (see :data:`MAX_INPUT_SIZE`).

    Raises:
        UserInputError: Not an int, or out of bounds.
    """
    if _is_int(size) and int(size) > MAX_INPUT_SIZE:  # type: ignore[arg-type]
        raise UserInputError(
            f"{name} {size} is too large: at most {MAX_INPUT_SIZE} pixels a side (a {size}x{size} input would "
            "need more memory than any machine has)"
        )
    return check_int(name, size, 1, MAX_INPUT_SIZE)


def parse_channel_spec(spec: object, name: str = "--channels") -> list[tuple[int, int]]:
    """Parses ``"0-15,32,40"`` (or an int, or a list of ints and such strings) into
    inclusive ranges, without expanding them.

    Raises:
        UserInputError: Malformed parts, backwards ranges, negative numbers, or numbers
            beyond any layer's channel count (:data:`MAX_CHANNELS`).
    """
    parts: Iterable[object] = spec if isinstance(spec, (list, tuple)) else [spec]
    ranges: list[tuple[int, int]] = []
    for item in parts:
        if _is_int(item):
            ranges.append((int(item), int(item)))  # type: ignore[arg-type]
            continue
        if not isinstance(item, str):
            raise UserInputError(f"{name}: {item!r} is not a channel number or range like 0-15")
        for part in item.split(","):
            part = part.strip()
            if part:
                ranges.append(_parse_part(part, name))
    if not ranges:
        raise UserInputError(f"{name}: {spec!r} names no channels; use e.g. 0-15,32,40")
    for _, b in ranges:
        if b >= MAX_CHANNELS:
            raise UserInputError(f"{name}: channel {b} is beyond any layer's channels (layers have at most {MAX_CHANNELS})")
    return ranges


def _parse_part(part: str, name: str) -> tuple[int, int]:
    a_text, sep, b_text = part.partition("-")
    if not a_text.strip() and sep:
        raise UserInputError(f"{name}: channel numbers start at 0, got '{part}'")
    if not a_text.strip().isascii() or not b_text.strip().isascii():  # int() would read '٣' as 3
        raise UserInputError(f"{name}: '{part}' is not a channel number or range like 0-15 (ASCII digits)")
    try:
        a = int(a_text)
        b = int(b_text) if sep else a
    except ValueError:
        raise UserInputError(f"{name}: '{part}' is not a channel number or range like 0-15") from None
    if a < 0 or b < 0:
        raise UserInputError(f"{name}: channel numbers start at 0, got '{part}'")
    if b < a:
        raise UserInputError(f"{name}: range '{part}' runs backwards")
    return a, b


def check_channels(
    channels: Sequence[int] | Sequence[tuple[int, int]], count: int, layer: str | None = None
) -> list[int]:
    """Checks channels against a layer's channel count and returns them sorted, unique.

    Args:
        channels: Channel numbers, or inclusive ranges from :func:`parse_channel_spec`.
        count: The layer's number of channels.
        layer: The layer's name, for the message.

    Raises:
        UserInputError: An empty list, a non-integer, or a channel outside ``0..count-1``.
    """
    ranges = [_index_pair(c) for c in channels]
    if not ranges:
        raise UserInputError(f"empty channel list for layer '{layer}'")
    for a, b in ranges:
        bad = a if a < 0 else b if b >= count else None
        if bad is not None:
            raise UserInputError(
                f"channel {bad} is out of range: layer '{layer}' has {count} channels (0..{count - 1})"
            )
    return sorted({c for a, b in ranges for c in range(a, b + 1)})


def _index_pair(c: object) -> tuple[int, int]:
    """A channel (an int, numpy or 0-d tensor integer) or an inclusive range as a pair."""
    pair = c if isinstance(c, tuple) else (c, c)
    try:
        if any(isinstance(v, bool) for v in pair):
            raise TypeError
        return operator.index(pair[0]), operator.index(pair[1])
    except (TypeError, IndexError):
        raise UserInputError(f"channels must be whole numbers, got {c!r}") from None


def check_model(model: object, name: str = "model") -> torch.nn.Module:
    """A model zfvis can run: an ``nn.Module`` whose parameters and buffers hold data.

    Raises:
        InputTypeError: Not an ``nn.Module``.
        UserInputError: Parameters or buffers on the ``meta`` device (shapes without data:
            load the weights first, e.g. ``model.to_empty(device="cpu")`` and a state dict).
    """
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_wrappers(model, name)
    for label, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for tname, t in tensors:
            if t.is_meta:
                raise UserInputError(f"{name} has its {label} '{tname}' on the meta device (a shape without data); "
                                     "materialise it first: model.to_empty(device='cpu'), then load its weights")
    return model


#: Wrappers around a model, by class name (no import of what defines them): the attribute that
#: holds the model, and what the wrapper is.
_WRAPPERS = {
    "DataParallel": ("module", "wrapped in nn.DataParallel"),
    "DistributedDataParallel": ("module", "wrapped in DistributedDataParallel"),
    "OptimizedModule": ("_orig_mod", "compiled with torch.compile"),
}


def _refuse_wrappers(model: torch.nn.Module, name: str) -> None:
    """Refuses a model inside a wrapper whose ``forward`` is not the model's (fx cannot trace
    it, and its layer names would start with ``module.``), naming the model inside."""
    found = next((_WRAPPERS[c.__name__] for c in type(model).__mro__ if c.__name__ in _WRAPPERS), None)
    if found is not None and isinstance(getattr(model, found[0], None), torch.nn.Module):
        raise UserInputError(f"{name} is {found[1]}; give the model inside it: {name}.{found[0]} (zfvis runs it "
                             "on one device, uncompiled)")


def _first_conv_channels(model: torch.nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return int(module.in_channels)
    return None


def forward_failure(err: BaseException, model: torch.nn.Module, images: torch.Tensor) -> ForwardPassError:
    """The :class:`ForwardPassError` for a forward pass of ``model`` that failed on ``images``,
    with the likeliest cause: a dtype the device lacks kernels for, a channel count the
    first convolution does not take, or else the input size."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else images.dtype
    device = param.device if param is not None else images.device
    channels = _first_conv_channels(model)
    if dtype in (torch.float16, torch.bfloat16) and device.type == "cpu":
        hint = (f"the model is {str(dtype).replace('torch.', '')} on the CPU, where many operations have no "
                "kernel for it: use model.float(), or run it on CUDA")
    elif images.dim() == 4 and channels is not None and images.shape[1] != channels:
        hint = f"the images have {images.shape[1]} channel(s) but the model's first convolution takes {channels}"
    else:
        hint = "does the model expect another input size or channel count?"
    return ForwardPassError(f"the forward pass failed on input of shape {tuple(images.shape)} "
                            f"({str(dtype).replace('torch.', '')}): {first_line(err)} ({hint})")
