"""The output folder of a mining run: what it may hold, locking it, and undoing a failed start.

zfvis writes into a folder only when it holds nothing, or a zfvis run with the same
settings (which is then resumed or finished). Anything else is refused before a single
file is written: a person's own files unless ``overwrite``, a zfvis run with other
settings unless ``restart`` (or ``overwrite``). ``settings.json`` carries a ``zfvis``
entry with the run's fingerprint: that is how a folder is known to be a zfvis run. The
folder is locked (:class:`~zfvis.io.atomic.FolderLock`) while a run writes to it. A start that
fails before any result removes what it made: the folders it created and its
``settings.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..io import ownership
from ..io.atomic import FolderLock, atomic_write_text
from ..io.errors import OutputFolderError, UserInputError, first_line

__all__ = ["STATE_VERSION", "FolderRequest", "claim", "load_state", "safe_name"]

#: Version of the saved pass-1 state (``state.pt``).
STATE_VERSION = 1


def safe_name(layer: str) -> str:
    """A layer name as a file name (``features.3`` -> ``features_3``)."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in layer)


def load_state(path: Path) -> dict[str, Any] | None:
    """A saved mining state (``None`` if there is none).

    Raises:
        UserInputError: The file is damaged.
        OutputFolderError: It is not a zfvis mining state.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged state file
        raise UserInputError(f"cannot read the saved state '{path}' ({first_line(err)}); delete it to start again") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise OutputFolderError(f"'{path}' is not a zfvis mining state; use another output folder")
    return state


@dataclasses.dataclass
class FolderRequest:
    """What a run asks of its output folder.

    Attributes:
        out: The folder.
        fingerprint: The run's identity (settings, file list, weights).
        run: The settings the fingerprint covers (named in messages when they differ).
        record: Further settings to record in ``settings.json``.
        restart: Replace a zfvis run, whatever its settings.
        overwrite: Write into a folder that holds other files too.
        flag: How the person turns a flag on, for messages (``--restart``).
        reads: The data set folder the run reads: the output may not be it or lie in
            it, ``overwrite`` or not (its figures and tiles would join the data set).
    """

    out: Path
    fingerprint: str
    run: dict[str, Any]
    record: dict[str, Any]
    restart: bool = False
    overwrite: bool = False
    flag: Callable[[str], str] = lambda name: f"{name}=True"
    reads: Path | None = None


def _run_marker(out: Path) -> dict[str, Any] | None:
    """What marks ``out`` as a zfvis mining run: ``settings.json``'s ``zfvis`` entry (or,
    for runs made before it existed, a zfvis ``state.pt``); ``None``: not a zfvis run."""
    try:
        settings = json.loads((out / "settings.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        settings = None
    except (OSError, ValueError):
        return None  # someone's own, unreadable settings.json
    if isinstance(settings, dict) and isinstance(settings.get("zfvis"), dict):
        marker = {**settings["zfvis"], "run": settings.get("run")}
        return marker if marker.get("command") == "mine" else None
    try:
        state = load_state(out / "state.pt")
    except UserInputError:
        return None
    return {"fingerprint": state["fingerprint"], "run": None} if state else None


def _refuse_data_set(req: FolderRequest) -> None:
    """Refuses an output folder that is the data set's folder or lies inside it."""
    if req.reads is None or not req.reads.is_dir():
        return
    out, data = req.out.resolve(), req.reads.resolve()
    if out == data or data in out.parents:
        raise OutputFolderError(f"output folder '{req.out}' is {'the' if out == data else 'inside the'} data set "
                                f"'{req.reads}' that the run reads; its figures and tiles would join the data set: "
                                "choose an output folder outside it")


def _make_folder(out: Path) -> list[Path]:
    """Creates ``out`` (and missing parents); returns the folders created, outermost first."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output '{out}' exists and is not a folder")
    missing = [p for p in [out, *out.parents] if not p.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"cannot create output folder '{out}': {err.strerror or err}") from None
    if not os.access(out, os.W_OK):
        raise OutputFolderError(f"output folder '{out}' is not writable")
    return missing


def _contents(out: Path) -> list[str]:
    """The folder's entries, less the lock and leftover temporary files."""
    return sorted(p.name for p in out.iterdir() if p.name not in (FolderLock.NAME, ownership.LEDGER)
                  and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def _check_folder(req: FolderRequest) -> str | None:
    """Refuses a folder that holds anything but a zfvis run with the same settings, unless
    the person asked; clears the outputs of a zfvis run that is replaced. Returns the id of
    the run that goes on in the folder (``None``: a new run)."""
    entries = _contents(req.out)
    if not entries:
        return None
    marker = _run_marker(req.out)
    if marker is None:
        if req.overwrite:
            return None
        shown = ", ".join(entries[:4]) + (f", ... ({len(entries)} in all)" if len(entries) > 4 else "")
        raise OutputFolderError(
            f"output folder '{req.out}' already holds files that zfvis did not write ({shown}); use a new or empty "
            f"folder, or {req.flag('overwrite')} to write into it anyway"
        )
    old_run = marker.get("run_id") if isinstance(marker.get("run_id"), str) else None
    same = marker.get("fingerprint") == req.fingerprint
    if same and not req.restart:
        return old_run
    if not same and not (req.restart or req.overwrite):
        raise OutputFolderError(
            f"output folder '{req.out}' holds a zfvis mining run with other settings"
            f"{_differences(marker.get('run'), req.run)}; use another folder, or {req.flag('restart')} to replace "
            "that run"
        )
    if old_run is not None:
        _discard_run(req.out, old_run)
    return None


def _differences(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return ""
    keys = sorted(k for k in new if json.dumps(old.get(k), sort_keys=True, default=str)
                  != json.dumps(new[k], sort_keys=True, default=str))
    return f" (different: {', '.join(keys)})" if keys else " (other image files or other weights)"


def _discard_run(out: Path, run: str) -> None:
    """Removes the outputs of an earlier zfvis run that is being replaced: exactly the files
    that its ledgers (:mod:`zfvis.io.ownership`) list as that run's and that are still as
    it wrote them, then the folders that this leaves empty. A person's own files (notes,
    a changed figure), other commands' outputs, other runs' folders and whatever a copied
    ledger claims stay; the files of the run that changed since are named."""
    done = ownership.discard(out, run)
    if done.kept:
        shown = ", ".join(str(p.relative_to(out)) for p in done.kept[:5])
        more = f" and {len(done.kept) - 5} more" if len(done.kept) > 5 else ""
        print(f"kept {len(done.kept)} file(s) of the earlier run that were changed since it wrote them: "
              f"{shown}{more}", file=sys.stderr)


def _write_settings(req: FolderRequest, run_id: str) -> None:
    from .._version import __version__

    marker = {"command": "mine", "version": __version__, "fingerprint": req.fingerprint, "run_id": run_id}
    settings = {**{k: v for k, v in req.record.items() if not callable(v)}, "zfvis": marker, "run": req.run}
    text = json.dumps(settings, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    with ownership.using_run(run_id):
        atomic_write_text(req.out / "settings.json", text, own=True)


def _has_results(out: Path) -> bool:
    return (out / "state.pt").exists() or (out / "topk.json").exists() or any(out.glob("state.rank*-of-*.pt"))


def _undo(out: Path, created: list[Path], fresh_settings: bool, run_id: str) -> None:
    """Undoes a start that failed before any result: its ``settings.json`` (if there was
    none before, and still as this run wrote it), then the folders it created (each only
    if empty)."""
    if _has_results(out):
        return
    if fresh_settings:
        ownership.delete_own([out / "settings.json"], run_id)
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def claim(req: FolderRequest, *, lead: bool = True, sync: Callable[[], None] = lambda: None,
          share: Callable[[str], str] = lambda run_id: run_id) -> Iterator[str]:  # fmt: skip
    """Claims the output folder for the duration of the block, which is given the run's id
    (kept in ``settings.json``: a resumed run goes on with its id, a new one has a new id).

    The lead process creates and locks the folder, checks every ledger in it
    (:mod:`zfvis.io.ownership`) and what it holds, and writes ``settings.json``; then every
    process calls ``sync`` (under torchrun, the ranks' check-in, which also tells the
    others if the lead refused) and ``share`` (the lead's run id to every process). On a
    failure before any result, what this run made is removed.

    Raises:
        OutputFolderError: The folder holds what the run may not replace, cannot be
            created, or another run holds its lock.
        LedgerError: A ledger in the folder cannot be trusted (nothing is written then).
    """
    created: list[Path] = []
    lock: FolderLock | None = None
    fresh = False
    run_id = ""
    try:
        if lead:
            _refuse_data_set(req)
            created = _make_folder(req.out)
            lock = FolderLock(req.out, busy=OutputFolderError)
            lock.acquire()
            ownership.check_ledgers_under(req.out)
            run_id = _check_folder(req) or ownership.new_run_id()
            fresh = not (req.out / "settings.json").exists()
            _write_settings(req, run_id)
        sync()
        run_id = share(run_id)
        yield run_id
    except BaseException:
        if lock is not None:
            lock.release()
            _undo(req.out, created, fresh, run_id)
        raise
    finally:
        if lock is not None:
            lock.release()
