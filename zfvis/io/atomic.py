"""Atomic file output: a crash never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "FolderLock"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path`` and renames it over ``path`` on success.

    Raises:
        PermissionError / FileNotFoundError: The folder cannot be written.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it, not mkstemp's 0600
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_TMP_COUNTER = itertools.count()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, sync: bool = True) -> None:
    """Writes ``data`` to ``path`` atomically: a temporary file beside it, then a rename.

    With ``sync`` the file is flushed to disk first (as :func:`atomic_open`). Without,
    a crash of the process still never leaves a partial file at ``path`` (many small
    files, such as tiles, are much faster that way).
    """
    path = Path(path)
    if sync:
        with atomic_open(path, "wb") as fh:
            fh.write(data)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_COUNTER)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except FileExistsError:  # a stale file of an earlier process with this pid
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_open(path, "w") as fh:
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
