"""The command line's error boundary: a person's mistake is one line and exit 2; a bug of ours is one line asking for a report, exit 1."""

from __future__ import annotations

import errno
import sys

from ..io.errors import (
    ForwardPassError,
    UserInputError,
    ZfvisError,
    error_chain,
    first_line,
    is_out_of_memory,
)
from ._common import REPORT_TO
from .outputs import invocation

__all__ = ["report_error"]

# --------------------------------------------------------------------------- the error boundary


_PATH_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP}

#: What to do about an operating-system error on a path a person gave.
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "choose another path",
    errno.ENOSPC: "free some space, or write elsewhere (-o)",
    errno.EDQUOT: "free some space, or write elsewhere (-o)",
    errno.EROFS: "the file system is read-only: write elsewhere (-o)",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.ELOOP: "the path's symbolic links go round in a circle",
}

def _forward_failure(err: BaseException) -> BaseException | None:
    """The error of a forward pass that the engine passed on as a :class:`UserInputError`
    ("does the model expect another input size?"). On the command line the input size is
    zfvis's own or checked by :func:`fit_input_size` first, so such a failure is ours."""
    return err.__cause__ if isinstance(err, ForwardPassError) else None


def _is_user_os_error(err: BaseException) -> bool:
    path_errors = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
    return isinstance(err, path_errors) or (isinstance(err, OSError) and err.errno in _PATH_ERRNOS)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename and err.strerror:
        fix = _OS_FIXES.get(err.errno or 0)
        return f"{err.strerror}: '{err.filename}'" + (f"; {fix}" if fix else "")
    return first_line(err)


def _from_config(line: str) -> str:
    """``line`` with the config key named where the option at fault came from the config file."""
    inv = invocation()
    for dest, key in inv.from_config.items():
        if f"--{dest.replace('_', '-')}" in line:
            return f"{line} (set by '{key}' in config file '{inv.config}')"
    return line


def _internal(what: str) -> str:
    return (f"zfvis: internal error: {what[:300]} — a bug in zfvis; please report it to {REPORT_TO} "
            "(rerun with --debug for the traceback)")


def report_error(err: BaseException, command: str | None) -> int:
    """Prints one line for ``err`` on stderr and returns the exit status.

    Errors from checking what a person gave (zfvis's :class:`UserInputError`,
    :class:`~zfvis.UnsupportedModelError`, :class:`~zfvis.WeightsDownloadError`, missing or
    unwritable paths) and running out of memory: status 2. zfvis's other deliberate
    errors: status 1. Anything else is a bug (a forward pass of a zoo model that fails,
    too): status 1 and a request to report it.
    """
    from ..io.errors import UnsupportedModelError, WeightsDownloadError

    if is_out_of_memory(err):
        text = " ".join(str(e) for e in error_chain(err)).lower()
        where = "GPU memory" if "cuda" in text or "gpu" in text else "memory"
        lower = "--batch-size or --input-size" if command in ("mine", "evolution", "occlude") else "--input-size"
        print(f"zfvis: error: out of {where} ({first_line(error_chain(err)[-1])[:160]}); lower {lower}", file=sys.stderr)
        return 2
    cause = _forward_failure(err)
    if cause is not None:
        print(_internal(f"the forward pass failed ({type(cause).__name__}: {first_line(cause)})"), file=sys.stderr)
        return 1
    if isinstance(err, (UserInputError, UnsupportedModelError, WeightsDownloadError)) or _is_user_os_error(err):
        print(f"zfvis: error: {_from_config(_one_line(err))}", file=sys.stderr)
        return 2
    if isinstance(err, ZfvisError):
        print(f"zfvis: error: {_one_line(err)}", file=sys.stderr)
        return 1
    print(_internal(f"{type(err).__name__}: {_one_line(err)}"), file=sys.stderr)
    return 1
