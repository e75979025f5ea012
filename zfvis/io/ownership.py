"""What zfvis wrote: one record, kept beside the files, of every file zfvis made, and the
one check that every replacement and every deletion of zfvis goes through.

Each folder zfvis writes into holds a ledger, ``.zfvis-written.json``: for each file zfvis
wrote there, its SHA-256, its size and the id of the run that wrote it (a mining run's id
is kept in its ``settings.json``; any other command has an id of its own). A ledger is
itself an input, and trusted only this far (:func:`owns`, the one check): an entry counts
only for a plain file directly inside the ledger's own folder (a bare file name: no
``..``, no absolute path, no folder, no symbolic link), whose bytes still hash to the
recorded value, and, where a run asks, that the same run wrote. Once a person edits a
file, or puts one of their own in its place, or copies a ledger from elsewhere, those
files are theirs.

A ledger that cannot be read as one (damaged JSON, a folder, a FIFO, a device, a link, a
file larger than :data:`MAX_BYTES`) is refused with a :class:`LedgerError` before anything
is written into its folder: zfvis cannot then tell its own files from a person's. Devices,
FIFOs and sockets are never replaced (:func:`check_target`). A ledger is read once and
then only again when it changes on disk (its identity, size and times), so that a restart
over thousands of files stays linear. It is updated under an ``flock`` of its folder and
replaced atomically. The format is described in ``docs/reference/ledger.md``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import hashlib
import json
import os
import stat
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import UserInputError, show_path

__all__ = [
    "LEDGER", "MAX_BYTES", "Entry", "LedgerError", "digest", "digest_file", "record", "forget", "is_ours", "owns",
    "ledger", "check_ledger", "check_ledgers_under", "check_target", "special_kind", "current_run", "new_run_id",
    "using_run", "discard", "delete_own", "Discarded",
]

#: The ledger's file name, in every folder zfvis writes into.
LEDGER = ".zfvis-written.json"
#: The largest ledger read (a run of 100,000 files writes about 20 MB).
MAX_BYTES = 64 << 20
_VERSION = 2
_HEX = frozenset("0123456789abcdef")


class LedgerError(UserInputError):
    """A ledger that cannot be trusted to tell zfvis's files from a person's."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One ledger entry: what zfvis wrote under a file name, and which run wrote it."""

    sha256: str
    size: int
    run: str | None  # None: written by a zfvis older than run ids


# --------------------------------------------------------------------------- run ids


_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("zfvis_run", default=None)
_PROCESS_RUN: list[str] = []


def new_run_id() -> str:
    """A new, unique run id."""
    return uuid.uuid4().hex


def current_run() -> str:
    """The id of the run writing now (:func:`using_run`), else this process's own."""
    run = _RUN.get()
    if run is not None:
        return run
    if not _PROCESS_RUN:
        _PROCESS_RUN.append(new_run_id())
    return _PROCESS_RUN[0]


@contextlib.contextmanager
def using_run(run: str) -> Iterator[str]:
    """Records the files written in the block as the run ``run``'s."""
    token = _RUN.set(run)
    try:
        yield run
    finally:
        _RUN.reset(token)


# --------------------------------------------------------------------------- digests


def digest(data: bytes) -> str:
    """The SHA-256 of ``data``, as hex."""
    return hashlib.sha256(data).hexdigest()


def digest_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's contents, as hex (a link is not followed, a FIFO never waits)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- reading a ledger


def special_kind(mode: int) -> str | None:
    """What a file of ``mode`` is, when it is not a plain file: ``"folder"``, ``"FIFO"``, ..."""
    for test, kind in ((stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "special file"


_CACHE: dict[Path, tuple[tuple[int, ...], dict[str, Entry]]] = {}
_READS = [0]  # ledgers parsed from disk in this process (a test counts them)


def _refuse(path: Path, why: str) -> LedgerError:
    return LedgerError(f"the ledger {show_path(path)} (zfvis's record of the files it wrote in that folder) {why}; "
                       "zfvis cannot tell its own files there from yours and writes nothing: move it away (then "
                       "nothing there counts as zfvis's) or use another output folder")


class _Replaced(Exception):
    """The ledger was replaced between looking at it and opening it."""


def _read(folder: Path) -> dict[str, Entry]:
    """The valid entries of ``folder``'s ledger (read from disk only when it changed). A ledger
    another zfvis process replaces meanwhile (it writes a new one and renames it over the old)
    is read again, up to three times.

    Raises:
        LedgerError: The ledger is no plain file, too large, or not a zfvis ledger.
    """
    for _ in range(3):
        with contextlib.suppress(_Replaced):
            return _read_once(folder)
    raise _refuse(folder / LEDGER, "changed while it was read, three times")


def _read_once(folder: Path) -> dict[str, Entry]:
    path = folder / LEDGER
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as err:
        raise _refuse(path, f"cannot be examined ({err.strerror})") from None
    kind = special_kind(st.st_mode)
    if kind is not None:
        raise _refuse(path, f"is a {kind}, not a file")
    if st.st_size > MAX_BYTES:
        raise _refuse(path, f"is {st.st_size} bytes, more than a ledger ever holds ({MAX_BYTES})")
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with contextlib.suppress(OSError):
        folder = folder.resolve()
    cached = _CACHE.get(folder)
    if cached is not None and cached[0] == key:
        return cached[1]
    entries = _parse(path, _read_bytes(path, st))
    _CACHE[folder] = (key, entries)
    return entries


def _read_bytes(path: Path, st: os.stat_result) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise _refuse(path, f"cannot be read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        now = os.fstat(fh.fileno())
        if not stat.S_ISREG(now.st_mode):
            raise _refuse(path, "changed while it was read")
        if now.st_ino != st.st_ino:
            raise _Replaced
        data = fh.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise _refuse(path, f"is more than {MAX_BYTES} bytes")
    _READS[0] += 1
    return data


def _parse(path: Path, data: bytes) -> dict[str, Entry]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _refuse(path, "is damaged (not valid JSON: cut short or edited)") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        raise _refuse(path, 'is not a zfvis ledger (it has no "files" table)')
    out = {}
    for name, value in files.items():
        entry = _entry(name, value)
        if entry is not None:
            out[name] = entry
    return out


def plain_name(name: object) -> bool:
    """Whether ``name`` is a bare file name (no folder, ``..``, absolute path or NUL)."""
    return (isinstance(name, str) and name not in ("", ".", "..", LEDGER) and not any(c in name for c in "/\\\0")
            and not os.path.isabs(name) and Path(name).name == name)


def _entry(name: object, value: object) -> Entry | None:
    """An entry as recorded, or ``None`` when it is malformed (it is then never honoured)."""
    if not plain_name(name) or not isinstance(value, dict):
        return None
    sha, size, run = value.get("sha256"), value.get("size"), value.get("run")
    if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX):
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    if run is not None and not (isinstance(run, str) and run):
        return None
    return Entry(sha, size, run)


def ledger(folder: str | os.PathLike[str]) -> dict[str, Entry]:
    """The valid entries of ``folder``'s ledger: file name -> :class:`Entry`.

    Raises:
        LedgerError: The ledger cannot be trusted (see the module's description).
    """
    return dict(_read(Path(folder)))


def check_ledger(folder: str | os.PathLike[str]) -> None:
    """Raises :class:`LedgerError` when ``folder``'s ledger cannot be read as one."""
    _read(Path(folder))


def check_ledgers_under(folder: str | os.PathLike[str]) -> None:
    """:func:`check_ledger` for ``folder`` and every folder below it (links not followed)."""
    for root in _folders(Path(folder)):
        check_ledger(root)


def _folders(top: Path) -> Iterator[Path]:
    """``top`` and the folders below it, links to folders not followed."""
    stack = [top]
    while stack:
        folder = stack.pop()
        yield folder
        with contextlib.suppress(OSError), os.scandir(folder) as it:
            stack += [Path(e.path) for e in it if e.name != LEDGER and e.is_dir(follow_symlinks=False)]


# --------------------------------------------------------------------------- the one check


def owns(folder: Path, entries: dict[str, Entry], name: str, run: str | None = None) -> bool:
    """Whether ``folder/name`` is zfvis's by ``entries`` (``folder``'s ledger): listed under a
    bare name, a plain file (no link, no device) directly in ``folder``, its bytes as
    recorded, and, with ``run``, written by that run."""
    entry = entries.get(name)
    if entry is None or not plain_name(name) or (run is not None and entry.run != run):
        return False
    path = folder / name
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            return False
        if Path(os.path.realpath(path)).parent != Path(os.path.realpath(folder)):
            return False
        return digest_file(path) == entry.sha256
    except OSError:
        return False


def is_ours(path: str | os.PathLike[str], run: str | None = None) -> bool:
    """Whether ``path`` is a file exactly as zfvis (with ``run``: that run) wrote it.

    Raises:
        LedgerError: Its folder's ledger cannot be trusted.
    """
    path = Path(path)
    return owns(path.parent, _read(path.parent), path.name, run)


def check_target(path: str | os.PathLike[str]) -> None:
    """Refuses to replace a device, FIFO or socket, whatever the options (``-o /dev/null``).

    Raises:
        UserInputError: ``path`` is one.
        IsADirectoryError: ``path`` is a folder.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return
    kind = special_kind(st.st_mode)
    if kind == "folder":
        raise IsADirectoryError(errno.EISDIR, "Is a directory (give a file name)", str(path))
    if kind not in (None, "symbolic link"):
        raise UserInputError(f"{show_path(path)} is a {kind}, not a file; zfvis never replaces one, --overwrite or "
                             "not: choose another output name")


# --------------------------------------------------------------------------- writing a ledger


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


def _write_ledger(folder: Path, files: dict[str, Entry]) -> None:
    path = folder / LEDGER
    if not files:
        if os.path.lexists(path) and special_kind(os.lstat(path).st_mode) is None:
            path.unlink()
        return
    table = {name: {"sha256": e.sha256, "size": e.size, "run": e.run} for name, e in sorted(files.items())}
    text = json.dumps({"zfvis": "files zfvis wrote in this folder, as written", "version": _VERSION,
                       "files": table}, indent=1) + "\n"
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


def record(paths: Iterable[tuple[str | os.PathLike[str], str | None]], run: str | None = None) -> None:
    """Records files zfvis has just written, each with its digest (``None``: read it now), as
    the run ``run``'s (default: :func:`current_run`).

    Files that no longer exist are left out. A folder where the ledger cannot be written
    (read-only) is skipped: its files then count as the person's, the safe side.

    Raises:
        LedgerError: A ledger cannot be trusted (checked before the write: a person
            replaced it since).
    """
    run = run or current_run()
    for folder, entries in _by_folder((Path(p), s) for p, s in paths).items():
        with contextlib.suppress(OSError), _folder_locked(folder):
            files = dict(_read(folder))
            for name, sha in entries:
                p = folder / name
                with contextlib.suppress(OSError):
                    st = os.lstat(p)
                    if plain_name(name) and stat.S_ISREG(st.st_mode):
                        files[name] = Entry(sha or digest_file(p), st.st_size, run)
            _write_ledger(folder, files)


def forget(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Removes files from their ledgers (after zfvis deleted them); a ledger is rewritten
    only when it listed one of them."""
    for folder, entries in _by_folder((Path(p), None) for p in paths).items():
        with contextlib.suppress(OSError), _folder_locked(folder):
            files = dict(_read(folder))
            gone = [name for name, _ in entries if name in files and not os.path.lexists(folder / name)]
            for name in gone:
                del files[name]
            if gone:
                _write_ledger(folder, files)


# --------------------------------------------------------------------------- deleting


@dataclasses.dataclass
class Discarded:
    """What :func:`discard` did: the files it deleted, and those of the run it kept
    because they changed since the run wrote them."""

    deleted: list[Path] = dataclasses.field(default_factory=list)
    kept: list[Path] = dataclasses.field(default_factory=list)


def delete_own(paths: Iterable[str | os.PathLike[str]], run: str) -> Discarded:
    """Deletes each of ``paths`` that the run ``run`` wrote and that is still as written
    (:func:`owns`); the others stay. Each ledger is read once."""
    done = Discarded()
    for folder, entries in _by_folder((Path(p), None) for p in paths).items():
        files = _read(folder)
        for name, _ in entries:
            if owns(folder, files, name, run):
                (folder / name).unlink(missing_ok=True)
                done.deleted.append(folder / name)
            elif name in files and files[name].run == run and os.path.lexists(folder / name):
                done.kept.append(folder / name)
    forget(done.deleted)
    return done


def discard(top: str | os.PathLike[str], run: str) -> Discarded:
    """Deletes every file that the run ``run`` wrote in ``top`` and the folders below it
    (links to folders not followed) and that is still as written, then the folders this
    leaves empty. Files of other runs and commands, and files changed since, stay; every
    ledger is read once.

    Raises:
        LedgerError: A ledger there cannot be trusted (nothing is deleted then).
    """
    top = Path(top)
    folders = list(_folders(top))
    tables = {folder: _read(folder) for folder in folders}  # every ledger is checked before a deletion
    done = Discarded()
    for folder, files in tables.items():
        listed = [name for name, e in files.items() if e.run == run]
        if listed:
            part = delete_own([folder / name for name in listed], run)
            done.deleted += part.deleted
            done.kept += part.kept
    emptied = {f for p in done.deleted for f in p.parents if top in f.parents}
    for folder in sorted(emptied, key=lambda f: len(f.parts), reverse=True):  # the deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if nothing is left in it
    return done
