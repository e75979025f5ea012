"""zfvis's own exception types.

Every error that zfvis raises because of what a person gave it (an argument, a file, a
setting, an output folder) is a :class:`UserInputError`. It subclasses ``ValueError`` so
that code written against the documented ``ValueError`` contracts keeps working. The
command line turns exactly these (and :class:`CLIError`-style checks of its own, missing
or unreadable paths, and running out of memory) into a one-line message with exit
status 2; anything else is reported as an internal error with exit status 1.
"""

from __future__ import annotations

__all__ = [
    "ZfvisError",
    "UserInputError",
    "InputTypeError",
    "OutputFolderError",
    "ForwardPassError",
    "CaptureMismatchError",
    "RankFailedError",
    "MiningInterrupted",
    "first_line",
    "show_path",
    "error_chain",
    "is_out_of_memory",
]

_OOM_TEXT = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def show_path(path: object) -> str:
    """A path quoted for a one-line message: ``'a b.png'``; newlines, tabs and other control
    characters are written as escapes, so that the message stays on one line and shows
    the path whole."""
    text = str(path)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        return repr(text)
    return f"'{text}'"


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it was raised from (``raise ... from``)."""
    out = [err]
    while out[-1].__cause__ is not None and len(out) < 8:
        out.append(out[-1].__cause__)
    return out


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is, or was raised from, the CPU or a GPU running out of memory
    (torch words the CPU's as a ``RuntimeError``)."""
    for e in error_chain(err):
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return True
        if isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT):
            return True
    return False


class ZfvisError(Exception):
    """Base class of the errors zfvis raises on purpose."""


class UserInputError(ZfvisError, ValueError):
    """Bad input from a person: an argument, a file, a setting.

    The message names what is wrong and, where possible, what would be right. The
    command line prints it as one line and exits with status 2.
    """


class InputTypeError(UserInputError, TypeError):
    """An argument of the wrong type (a ``TypeError`` too, as the API documents)."""


class OutputFolderError(UserInputError):
    """An output folder that zfvis will not write into (it holds someone else's files, a
    run with other settings, or another run is writing to it)."""


class ForwardPassError(UserInputError):
    """The model's forward pass failed on the images it was given: most often an input
    size or channel count the model does not take. The original error is its
    ``__cause__``; where zfvis chose the input (the command line checks ``--input-size``
    first), such a failure is a bug of zfvis's, not the person's."""


class RankFailedError(ZfvisError, RuntimeError):
    """Another process of a distributed (torchrun) run failed; this one stopped too.

    Attributes:
        rank: The rank that failed first.
        reason: Its error, as one line (``""`` when it is not known).
    """

    def __init__(self, rank: int, world: int, reason: str = "") -> None:
        self.rank, self.world, self.reason = rank, world, reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"rank {rank} of {world} failed{detail}; every rank stopped")


class MiningInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a kill) during mining; the message says how to resume."""


class UnsupportedModelError(UserInputError):
    """The model contains an operation or a topology the deconvnet cannot reverse."""


class CaptureMismatchError(UnsupportedModelError):
    """zfvis's graph of the model differs from what the model ran (:mod:`zfvis.core.capture`);
    the message names the first node that differs."""


class WeightsDownloadError(OSError):
    """Pretrained weights (torchvision's or timm's) are not cached and cannot be downloaded."""
