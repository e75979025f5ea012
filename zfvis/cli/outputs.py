"""Outputs a command may write: never an input, never a person's file (unless ``--overwrite``), with the settings beside them.

A file is zfvis's while it is exactly as zfvis wrote it (:mod:`zfvis.io.ownership`); the
outputs of one command appear together or not at all (:func:`zfvis.io.atomic.output_group`,
opened around each command by :func:`zfvis.cli.main`)."""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..io.errors import (
    UserInputError,
    show_path,
)
from ..io.ownership import check_ledger, check_target, is_ours
from ._common import CLIError

__all__ = ["Invocation", "invocation", "invoked", "check_output", "write_settings"]


@dataclasses.dataclass(frozen=True)
class Invocation:
    """What the command line being run was given, for checks that span options.

    Attributes:
        inputs: Every existing file an option or the config file names (resolved), with
            the option's name: no output may replace one, ``--overwrite`` or not.
        config: The config file, if any.
        from_config: Option (dest) -> the config key that set it, for messages.
        datasets: The data sets the options name (``dataset``): no output may lie in such
            a folder or be an image such a list file names.
    """

    inputs: dict[Path, str] = dataclasses.field(default_factory=dict)
    config: str | None = None
    from_config: dict[str, str] = dataclasses.field(default_factory=dict)
    datasets: tuple[Path, ...] = ()

    def reads(self, path: Path) -> str | None:
        """What writing ``path`` would replace or add to among what the command reads
        (``None``: nothing)."""
        with contextlib.suppress(OSError):
            target = path.resolve()
            if target in self.inputs:
                return f"the input file '{path}' ({self.inputs[target]})"
            for data in self.datasets:
                if data.is_dir() and data.resolve() in target.parents:
                    return f"a file inside the data set '{data}'"
                if data.is_file() and target in _listed(data):
                    return f"the image '{path}' of the data set '{data}'"
        return None


def _listed(list_file: Path) -> set[Path]:
    """The images a data-set list file names, resolved (empty if it is not a list)."""
    from ..io.images import list_images, resolve

    try:
        return {resolve(list_file, rel).resolve() for rel in list_images(list_file)}
    except (OSError, UserInputError):
        return set()


_INVOCATION: contextvars.ContextVar[Invocation] = contextvars.ContextVar("zfvis_invocation", default=Invocation())


def invocation() -> Invocation:
    """The :class:`Invocation` of the command line being run (empty outside one)."""
    return _INVOCATION.get()


@contextlib.contextmanager
def invoked(args: argparse.Namespace, config: str | None, from_config: dict[str, str]) -> Iterator[Invocation]:
    """Makes ``args`` the current :class:`Invocation` for the block."""
    datasets = tuple(Path(v) for v in [getattr(args, "dataset", None)] if isinstance(v, str) and v)
    token = _INVOCATION.set(Invocation(_input_files(args, config), config, dict(from_config), datasets))
    try:
        yield _INVOCATION.get()
    finally:
        _INVOCATION.reset(token)


def _input_files(args: argparse.Namespace, config: str | None) -> dict[Path, str]:
    named: list[tuple[str, Any]] = [("config file", config)] if config else []
    for dest, value in vars(args).items():
        if dest != "output":
            named += [(dest.replace("_", "-"), v) for v in (value if isinstance(value, list) else [value])]
    found: dict[Path, str] = {}
    for label, v in named:
        if isinstance(v, (str, os.PathLike)) and str(v):
            with contextlib.suppress(OSError, ValueError):
                if Path(v).is_file():
                    found.setdefault(Path(v).resolve(), label)
    return found


# --------------------------------------------------------------------------- outputs


def add_inputs(paths: Sequence[str | os.PathLike[str]], label: str) -> None:
    """Adds files the command reads through another file (the images a part file names)
    to the current :class:`Invocation`'s inputs: no output may replace them."""
    for p in paths:
        with contextlib.suppress(OSError, ValueError):
            if Path(p).is_file():
                invocation().inputs.setdefault(Path(p).resolve(), label)


def check_output(path: str | os.PathLike[str], *, directory: bool = False, overwrite: bool | None = None,
                 also: Sequence[str] = ()) -> Path:  # fmt: skip
    """Fails early, with a clear message, where an output cannot or should not be written.

    Every file the output writes (``path``, its ``.json`` settings, its companions
    ``also``) is checked before any work starts: none may be a folder or a file that the
    command reads (an image, a checkpoint, a part file or an image it names, the config
    file: see :class:`Invocation`) or a device, FIFO or socket, ``--overwrite`` or not;
    the folder's ledger must be readable (:mod:`zfvis.io.ownership`); and none may replace a file
    that is not exactly as zfvis wrote it (:func:`zfvis.io.ownership.is_ours`) unless
    ``overwrite``.

    Args:
        path: The output file (or folder, with ``directory``).
        directory: The output is a folder (created here).
        overwrite: ``False``: refuse to replace an existing file that is not zfvis's;
            ``True``: replace it; ``None``: do not check (commands without ``--overwrite``).
        also: Suffixes of further files written beside ``path`` (``(".png",)``).
    """
    path = Path(path)
    folder = path if directory else path.parent
    if directory:
        if path.exists() and not path.is_dir():
            raise CLIError(f"output {show_path(path)} exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CLIError(f"cannot create output directory {show_path(path)}: {err.strerror}") from None
    else:
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise CLIError(f"cannot write {show_path(path)}: {show_path(folder)} {what}")
        written = _written_files(path, also)
        _refuse_folders(path, written)
        for f in written:
            check_target(f)  # a device, FIFO or socket: never replaced, --overwrite or not
        check_ledger(folder)  # a ledger zfvis cannot read: refused before anything is written
        _refuse_inputs(path, written)
        if overwrite is False:
            _refuse_foreign(path, written)
    if not os.access(folder, os.W_OK):
        raise CLIError(f"cannot write {show_path(path)}: folder {show_path(folder)} is not writable")
    return path


def _written_files(path: Path, also: Sequence[str]) -> list[Path]:
    """The files an output writes: itself, its ``.json`` settings, its companions."""
    return list(dict.fromkeys([path, path.with_suffix(".json"), *(path.with_suffix(s) for s in also)]))


def _role(path: Path, f: Path) -> str:
    """How ``f`` relates to the output ``path``, for messages."""
    if f == path:
        return ""
    return f" (where the {'settings' if f.suffix == '.json' else f.suffix[1:]} of '{path.name}' go)"


def _refuse_folders(path: Path, written: Sequence[Path]) -> None:
    for f in written:
        if f.is_dir():
            hint = f"; give a file name such as {path / 'out.png'}" if f == path else "; choose another -o"
            raise CLIError(f"output {show_path(f)}{_role(path, f)} is a directory{hint}")


def _refuse_inputs(path: Path, written: Sequence[Path]) -> None:
    for f in written:
        what = invocation().reads(f)
        if what is not None:
            raise CLIError(f"-o {path} would replace {what}{_role(path, f)}; choose another -o")


def _refuse_foreign(path: Path, written: Sequence[Path]) -> None:
    for f in written:
        if f.exists() and not is_ours(f):
            raise CLIError(f"{show_path(f)}{_role(path, f)} already exists and is not a file zfvis wrote (or it was "
                           "changed since); choose another -o or pass --overwrite")


def settings_record(settings: dict[str, Any]) -> dict[str, Any]:
    """The resolved settings as they are written (paths as strings), marked as zfvis's."""
    from .._version import __version__

    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items() if k not in ("func", "debug")}
    output = clean.get("output")
    clean["zfvis"] = {"command": clean.get("command"), "version": __version__,
                      "output": Path(output).name if isinstance(output, str) else None}
    return clean


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Writes ``data`` as JSON, atomically and recorded as zfvis's. NaN and infinity are
    refused (a :class:`ValueError`, a bug): no output holds them unasked."""
    from ..io.atomic import atomic_write_text  # loads torch: not at import (zfvis --help stays light)

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n", own=True)


def write_settings(path: str | os.PathLike[str], settings: dict[str, Any]) -> None:
    """Writes the resolved settings as JSON (atomically), marked as zfvis's."""
    write_json(path, settings_record(settings))
