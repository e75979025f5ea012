"""Atomic file output: a crash never leaves a half-written file behind, the outputs of one
command appear together or not at all (:func:`output_group`), and what zfvis writes is
recorded as its own (:mod:`zfvis.io.ownership`)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from . import ownership
from .errors import UserInputError, show_path

__all__ = [
    "output_group",
    "note_read",
    "recording",
    "flush_recording",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "FolderLock",
]


#: The all-or-nothing group of outputs being written (:func:`output_group`), if any.
_STAGE: contextvars.ContextVar[_Stage | None] = contextvars.ContextVar("zfvis_output_group", default=None)
#: Files read while an :func:`output_group` is open: none of them may become an output.
_READS: contextvars.ContextVar[set[Path] | None] = contextvars.ContextVar("zfvis_reads", default=None)
#: The :class:`_Recording` that collects the files written for the ledgers, if one does.
_RECORD: contextvars.ContextVar[_Recording | None] = contextvars.ContextVar("zfvis_record", default=None)


@dataclasses.dataclass
class _Recording:
    """What a :func:`recording` block wrote (not yet in the ledgers) and what it kept."""

    run: str
    replace_foreign: bool
    written: dict[Path, str] = dataclasses.field(default_factory=dict)
    #: Existing files that are not the run's (edited since, or a person's): left as they are.
    kept: list[Path] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Stage:
    """Temporary files written in full, waiting to be renamed over their targets together."""

    staged: dict[Path, tuple[Path, str]] = dataclasses.field(default_factory=dict)
    #: After the commit: the targets that replaced an existing file.
    replaced: list[Path] = dataclasses.field(default_factory=list)

    def add(self, tmp: Path, path: Path, sha: str) -> None:
        old = self.staged.pop(path.absolute(), None)
        if old is not None:  # written twice in one group: the last one counts
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old[0])
        self.staged[path.absolute()] = (tmp, sha)

    def discard(self) -> None:
        for tmp, _ in self.staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.staged.clear()

    def commit(self, reads: set[Path]) -> list[tuple[Path, bool]]:
        """Renames every staged file over its target; returns each target and whether it
        replaced an existing file.

        Raises:
            UserInputError: A target is a file the command read (nothing is renamed then).
        """
        for path in self.staged:
            with contextlib.suppress(OSError):
                if path.resolve() in reads:
                    self.discard()
                    raise UserInputError(f"{show_path(path)} is a file this command read (an input, or one an input "
                                         "file names); it is never an output: choose another output name")
        for path in self.staged:
            ownership.check_target(path)  # a device or FIFO put there since the check
        existed = {p: p.exists() for p in self.staged}
        done = []
        try:
            for path, (tmp, sha) in list(self.staged.items()):
                os.replace(tmp, path)
                done.append((path, sha))
                del self.staged[path]
        finally:
            self.discard()
            ownership.record(done)
        return [(p, existed[p]) for p, _ in done]


@contextlib.contextmanager
def output_group() -> Iterator[_Stage]:
    """All the atomic writes in the block appear together at its end, or none does.

    Each file is written in full (and flushed to disk) to a temporary file beside its
    target while the block runs; a failure anywhere (a full disk, an error, Ctrl-C)
    removes them all and leaves every target as it was. At the end they are renamed over
    their targets one after the other (renames within a folder do not fail for want of
    space) and recorded as zfvis's (:mod:`zfvis.io.ownership`).
    """
    stage = _Stage()
    reads: set[Path] = set()
    token, reads_token = _STAGE.set(stage), _READS.set(reads)
    try:
        yield stage
    except BaseException:
        stage.discard()
        raise
    finally:
        _STAGE.reset(token)
        _READS.reset(reads_token)
    stage.replaced = [p for p, existed in stage.commit(reads) if existed]


def note_read(path: str | os.PathLike[str]) -> None:
    """Notes that the command reads ``path`` (an image, a part file, weights): inside an
    :func:`output_group`, no output may replace it."""
    reads = _READS.get()
    if reads is not None:
        with contextlib.suppress(OSError, RuntimeError):
            reads.add(Path(path).resolve())


@contextlib.contextmanager
def recording(run: str | None = None, *, replace_foreign: bool = False) -> Iterator[list[Path]]:
    """Records every file written atomically in the block in its folder's ledger
    (:mod:`zfvis.io.ownership`) as the run ``run``'s (default: the current run), at the
    block's end however it ends: what a long job such as a mining run wrote, so that a
    restart deletes exactly that.

    An existing file is replaced only when this run wrote it and it is still as written
    (:func:`zfvis.io.ownership.is_ours`), or with ``replace_foreign`` (``--overwrite``);
    any other (an edited page, a person's file under a name the run writes) is kept as it
    is and added to the list the block is given, for the run to say so. Devices, FIFOs
    and sockets are never replaced.
    """
    rec = _Recording(run or ownership.current_run(), replace_foreign)
    token = _RECORD.set(rec)
    try:
        with ownership.using_run(rec.run):
            yield rec.kept
    finally:
        _RECORD.reset(token)
        ownership.record(rec.written.items(), rec.run)


def flush_recording() -> None:
    """Records what the current :func:`recording` has collected so far (at a checkpoint of a
    long job, so that a kill loses at most what came after it)."""
    rec = _RECORD.get()
    if rec is not None and rec.written:
        ownership.record(rec.written.items(), rec.run)
        rec.written.clear()


def _check_target(path: Path) -> None:
    """Refuses a target that is a folder (``path='/tmp'`` would otherwise write into ``/``)
    or a device, FIFO or socket, before a temporary file is made beside it; checks the
    folder's ledger where zfvis records what it writes."""
    ownership.check_target(path)
    if _RECORD.get() is not None:
        ownership.check_ledger(path.parent)


def _may_replace(rec: _Recording, path: Path) -> bool:
    """Whether the :func:`recording` ``rec`` may put its file at ``path`` (see there)."""
    if not os.path.lexists(path) or rec.replace_foreign:
        return True
    if path in rec.written:  # written by this block, not yet in the ledger
        with contextlib.suppress(OSError):
            return os.path.isfile(path) and not os.path.islink(path) and ownership.digest_file(path) == rec.written[path]
        return False
    return ownership.is_ours(path, rec.run)


def _named(err: OSError, path: Path) -> OSError:
    """``err`` with the path it concerns (``[Errno 28] No space left on device`` has none)."""
    if err.filename is not None or err.errno is None:
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))


def _done(tmp: Path, path: Path, sha: str, own: bool) -> None:
    """Puts a fully written temporary file in place: staged in the current
    :func:`output_group`, or renamed now (and recorded when ``own`` or :func:`recording`)."""
    stage = _STAGE.get()
    if stage is not None:
        stage.add(tmp, path, sha)
        return
    rec = _RECORD.get()
    if rec is not None and not _may_replace(rec, path):
        os.unlink(tmp)
        rec.kept.append(path)
        return
    ownership.check_target(path)
    os.replace(tmp, path)
    if rec is not None:
        rec.written[path] = sha
    elif own:
        ownership.record([(path, sha)])


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *, own: bool = False) -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path`` and renames it over ``path`` on success.

    Inside :func:`output_group` the rename waits for the group's end. With ``own`` (or
    inside :func:`recording` or a group) the file is recorded as zfvis's.

    Raises:
        OSError: The folder cannot be written, ``path`` is a folder, or the disk is full;
            the error names ``path``.
    """
    path = Path(path)
    _check_target(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # named by the output, not by the temporary file it could not make
        raise type(err)(err.errno, err.strerror or str(err), str(path)) from None
    tmp = Path(name)
    with _removed_on_failure(tmp, path):
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it, not mkstemp's 0600
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _done(tmp, path, ownership.digest_file(tmp), own)


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, path: Path) -> Iterator[None]:
    """Removes the temporary file ``tmp`` when the block fails; an ``OSError`` then names ``path``."""
    try:
        yield
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _named(err, path) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_TMP_COUNTER = itertools.count()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, sync: bool = True, own: bool = False) -> None:
    """Writes ``data`` to ``path`` atomically: a temporary file beside it, then a rename.

    With ``sync`` the file is flushed to disk first (as :func:`atomic_open`). Without,
    a crash of the process still never leaves a partial file at ``path`` (many small
    files, such as tiles, are much faster that way). ``own``: as :func:`atomic_open`.
    """
    path = Path(path)
    if sync or _STAGE.get() is not None:
        with atomic_open(path, "wb", own=own) as fh:
            fh.write(data)
        return
    _check_target(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_COUNTER)}.tmp")
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:  # a stale file of an earlier process with this pid
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmp = Path(name)
            os.chmod(tmp, 0o666 & ~_umask())
    except OSError as err:  # named by the output, not by the temporary file
        raise type(err)(err.errno, err.strerror or str(err), str(path)) from None
    with _removed_on_failure(tmp, path):
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        _done(tmp, path, ownership.digest(data), own)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, own: bool = False) -> None:
    """Writes ``text`` to ``path`` atomically (UTF-8); ``own``: as :func:`atomic_open`."""
    with atomic_open(path, "w", own=own) as fh:
        fh.write(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


# --------------------------------------------------------------------------- folder locks


class FolderLock:
    """An exclusive, advisory lock on an output folder: ``FOLDER/.zfvis.lock``.

    On POSIX it is an ``fcntl.flock`` on the lock file, which the system releases when
    the process ends however it ends, so a lock is never stale. Where there is no flock
    (Windows, some network file systems) the pid written in the file is checked instead:
    a lock whose process is alive is respected, one whose process is gone is taken over
    (this fallback does not close every race). The file records the owner's pid and host
    for the message.

    Args:
        folder: The folder (it must exist).
        busy: Raised (called with the message) when another process holds the lock.
    """

    NAME = ".zfvis.lock"

    def __init__(self, folder: str | os.PathLike[str], busy: type[Exception] = RuntimeError) -> None:
        self.path = Path(folder) / self.NAME
        self.busy = busy
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock or raises ``busy`` naming the process that holds it."""
        for _ in range(5):  # the file may be replaced between open and lock: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            if not _try_lock(fd, self.path):
                os.close(fd)
                raise self.busy(f"another zfvis run ({_owner(self.path)}) is writing to '{self.path.parent}'; "
                                "wait for it to finish, or use another output folder")
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {_hostname()}\n".encode())
                self._fd = fd
                return
            os.close(fd)
        raise self.busy(f"cannot lock '{self.path}': it keeps changing; is another zfvis run starting there?")

    def release(self) -> None:
        """Removes the lock file and releases the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _owner(path: Path) -> str:
    try:
        pid, _, host = path.read_text().strip().partition(" ")
        return f"pid {int(pid)}" + (f" on {host}" if host and host != _hostname() else "")
    except (OSError, ValueError):
        return "unknown process"


def _try_lock(fd: int, path: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): an O_EXCL marker with a pid check instead
        return _try_marker(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock (some network mounts)
        return _try_marker(path)


def _try_marker(path: Path) -> bool:  # pragma: no cover - platforms without fcntl
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True  # stale: its process is gone
    except OSError:
        return False
    return False
