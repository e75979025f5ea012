"""What zfvis wrote: one record, kept beside the files, of every file zfvis made.

Each folder zfvis writes into holds a ledger, ``.zfvis-written.json``: for each file zfvis
wrote there, its SHA-256 and size at the moment it was written. A file is zfvis's
(:func:`is_ours`) only while it is exactly what zfvis wrote: once a person edits it, or
puts a file of their own in its place, it is theirs, and no command replaces it without
``--overwrite``, nor does ``mine --restart`` delete it. The command line's outputs, the
Python API's ``path=`` figures and a mining run's files are all recorded here
(:mod:`zfvis.io.atomic` records what it writes), so that a file the Python API wrote is
zfvis's for the command line too.

The ledger is updated under an ``flock`` of its folder and replaced atomically; a ledger
that cannot be read counts as empty (nothing there is zfvis's, the safe side).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["LEDGER", "digest", "digest_file", "record", "forget", "is_ours", "ledger", "ledgers_under"]

#: The ledger's file name, in every folder zfvis writes into.
LEDGER = ".zfvis-written.json"
_VERSION = 1


def digest(data: bytes) -> str:
    """The SHA-256 of ``data``, as hex."""
    return hashlib.sha256(data).hexdigest()


def digest_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's contents, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ledger(folder: str | os.PathLike[str]) -> dict[str, dict[str, object]]:
    """The ledger of ``folder``: file name -> ``{"sha256", "size"}`` (empty when there is none,
    or when it cannot be read)."""
    try:
        data = json.loads((Path(folder) / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself (no lock file), where the system has one."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_ledger(folder: Path, files: dict[str, dict[str, object]]) -> None:
    path = folder / LEDGER
    if not files:
        path.unlink(missing_ok=True)
        return
    text = json.dumps({"zfvis": "files zfvis wrote in this folder, as written", "version": _VERSION,
                       "files": dict(sorted(files.items()))}, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{LEDGER}.", suffix=".tmp", dir=folder)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # as the files it lists, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _by_folder(paths: Iterable[tuple[Path, str | None]]) -> dict[Path, list[tuple[str, str | None]]]:
    out: dict[Path, list[tuple[str, str | None]]] = {}
    for path, sha in paths:
        path = Path(path)
        out.setdefault(path.parent, []).append((path.name, sha))
    return out


def record(paths: Iterable[tuple[str | os.PathLike[str], str | None]]) -> None:
    """Records files zfvis has just written, each with its digest (``None``: read it now).

    Files that no longer exist are left out. A folder where the ledger cannot be written
    (read-only) is skipped: its files then count as the person's, the safe side.
    """
    for folder, entries in _by_folder((Path(p), s) for p, s in paths).items():
        with contextlib.suppress(OSError), _folder_locked(folder):
            files = ledger(folder)
            for name, sha in entries:
                p = folder / name
                with contextlib.suppress(OSError):
                    files[name] = {"sha256": sha or digest_file(p), "size": p.stat().st_size}
            _write_ledger(folder, files)


def forget(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Removes files from their ledgers (after zfvis deleted them)."""
    for folder, entries in _by_folder((Path(p), None) for p in paths).items():
        with contextlib.suppress(OSError), _folder_locked(folder):
            files = ledger(folder)
            for name, _ in entries:
                files.pop(name, None)
            _write_ledger(folder, files)


def is_ours(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file exactly as zfvis wrote it (its ledger lists its digest)."""
    path = Path(path)
    entry = ledger(path.parent).get(path.name)
    if entry is None:
        return False
    try:
        if not path.is_file() or path.stat().st_size != entry.get("size"):
            return False
        return digest_file(path) == entry.get("sha256")
    except OSError:
        return False


def ledgers_under(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """The files listed in the ledgers of ``folder`` and its sub-folders (symbolic links to
    folders are not followed), whether or not they are still as written."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        if LEDGER in files:
            yield from (Path(root) / name for name in ledger(root))
