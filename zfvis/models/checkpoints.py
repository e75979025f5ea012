"""Reading weights files: state dicts and checkpoint dicts, always with ``weights_only=True``.

Before a file is handed to ``torch.load`` it is looked at: a folder, an empty file, a text
file, an image or an archive that is not a PyTorch file each get a message that says what
the file is and what was expected, instead of the unpickler's internals.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.atomic import note_read
from ..io.checks import check_path
from ..io.errors import UserInputError

__all__ = ["EXPECTED", "check_checkpoint_file", "read_checkpoint", "extract_state_dict", "apply_state_dict",
           "check_finite"]

#: What a weights file should be, for messages.
EXPECTED = "a PyTorch state dict or checkpoint written by torch.save (a .pt file)"

_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"ustar", "a tar archive"),
)


def _sniff(head: bytes) -> str | None:
    """What a file that is not a PyTorch file looks like (``None``: it may be one)."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None  # torch.save's zip format, or its legacy pickle format
    for magic, what in _MAGIC:
        if head.startswith(magic) or (magic == b"ustar" and head[257:262] == magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file of an unknown format"
    if "\x00" in text:
        return "a binary file of an unknown format"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file (it starts with {first!r})"


def check_checkpoint_file(path: str | Path, what: str = "weights file") -> Path:
    """Checks that ``path`` is a readable file that looks like a PyTorch file.

    Raises:
        FileNotFoundError: It does not exist.
        UserInputError: It is a folder, empty, or clearly another kind of file; the
            message says which, and what was expected.
    """
    path = check_path(what, path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))[:4]
        hint = f"; it holds {', '.join(inside)}: pass one of those" if inside else ""
        raise UserInputError(f"{what} '{path}' is a folder, not a file; expected {EXPECTED}{hint}")
    if not path.exists():
        raise FileNotFoundError(f"{what} '{path}' does not exist; expected {EXPECTED}")
    if not path.is_file():
        raise UserInputError(f"{what} '{path}' is not a regular file (a device or a pipe); expected {EXPECTED}")
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        raise UserInputError(f"{what} '{path}' is empty (0 bytes); expected {EXPECTED}")
    kind = _sniff(head)
    if kind is not None:
        raise UserInputError(f"{what} '{path}' is {kind}, not {EXPECTED}")
    return path


def _refusal(err: BaseException) -> str:
    """The one useful fact of torch's weights-only refusal: the object type it met."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return f"a Python object of type {found.group(1)}" if found else "Python objects other than tensors"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict (or the state dict inside a checkpoint dict) from a file.

    The file is read with ``torch.load(..., weights_only=True)``: a file that holds
    objects which could run code is refused, never executed.

    Raises:
        FileNotFoundError: The file does not exist.
        UserInputError: It is not a PyTorch file, it is damaged, it holds other objects
            than tensors, or it holds no state dict.
    """
    path = check_checkpoint_file(path)
    note_read(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserInputError(
            f"refused to load '{path}': it holds {_refusal(err)}, which could run code when loaded; zfvis reads "
            "only tensors. Save the weights with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as err:  # noqa: BLE001 - damaged data: the zip and pickle readers raise many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(f"cannot read '{path}': it is damaged or not {EXPECTED} ({first})") from None
    return extract_state_dict(obj, str(path))


def extract_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, or of the state dict inside a checkpoint dict
    (``state_dict``, ``model_state_dict`` or ``model``); a ``module.`` prefix
    (DataParallel) is dropped.

    Raises:
        UserInputError: ``obj`` holds no state dict.
    """
    if isinstance(obj, Mapping):
        if "fingerprint" in obj and "topk" in obj:
            raise UserInputError(f"'{source}' is a zfvis mining state (state.pt), not model weights")
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            prefix = "module."
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
            return tensors
    what = type(obj).__name__
    raise UserInputError(
        f"'{source}' holds a {what} without tensors, not a state dict; expected a dict of tensors, or a checkpoint "
        "dict with 'state_dict' or 'model'"
    )


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Loads ``state`` into ``model`` after checking that keys and shapes match.

    Raises:
        UserInputError: Missing or unexpected keys, or a shape that differs (named).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise UserInputError(f"weights '{source}' do not match the model ({'; '.join(parts)})")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise UserInputError(
                f"weights '{source}' do not match the model: '{k}' has shape {tuple(v.shape)}, "
                f"the model expects {tuple(own[k].shape)}"
            )
    check_finite(state.items(), f"weights '{source}'")
    model.load_state_dict(state)


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Refuses weights that hold NaN or infinite values (every output would be NaN).

    Raises:
        UserInputError: Naming the tensors that do, and how many values.
    """
    bad = []
    with torch.no_grad():
        for name, t in tensors:
            if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
                bad.append(f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()})")
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise UserInputError(f"{what} hold NaN or infinite values in {shown}; every activation would be NaN: "
                             "use weights saved from a model whose training did not diverge")

