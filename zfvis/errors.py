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
    "RankFailedError",
    "MiningInterrupted",
    "first_line",
]


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
