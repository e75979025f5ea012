"""The ``zfvis`` command line: ``project``, ``layers``, ``filters``, ``evolution``, ``mine``.

Every subcommand lives in its own module with ``add_parser(subparsers)`` and
``run(args) -> int``. Bad input ends with a one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def _interrupted_at_start(signum: int, frame: object) -> None:  # noqa: ARG001 - a signal handler's signature
    """Ctrl-C while the heavy modules (torch) load: one line and exit 130, no traceback."""
    os.write(2, b"zfvis: interrupted\n")
    os._exit(130)


_ON_MAIN_THREAD = threading.current_thread() is threading.main_thread()
if _ON_MAIN_THREAD:  # before the imports below, which take seconds
    _PREVIOUS_SIGINT = signal.signal(signal.SIGINT, _interrupted_at_start)

import argparse  # noqa: E402 - after the handler, on purpose
import contextlib  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from ..io.atomic import output_group  # noqa: E402
from . import correspond, evolution, filters, invariance, layers, mine, occlude, optimize, project  # noqa: E402
from . import serve as serve_command  # noqa: E402
from ._common import ArgumentParser  # noqa: E402
from .boundary import report_error  # noqa: E402
from .config import _parse  # noqa: E402
from .outputs import invoked  # noqa: E402

if _ON_MAIN_THREAD:
    signal.signal(signal.SIGINT, _PREVIOUS_SIGINT)

__all__ = ["get_args_parser", "main"]

#: Commands whose outputs appear all together at the end (:func:`zfvis.io.atomic.output_group`);
#: the others write as they go (``mine``'s run folder is resumable, page by page).
_GROUPED = frozenset({"project", "layers", "filters", "evolution", "occlude", "invariance", "correspond"})

_COMMANDS = (project, layers, filters, evolution, mine, occlude, invariance, correspond, optimize, serve_command)


def get_args_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line (one sub-parser per command)."""
    parser = ArgumentParser(  # usage errors are one line; sub-parsers inherit the class
        prog="zfvis",
        description="Deconvnet visualizations of CNN features (Zeiler & Fergus, 2014).",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also after COMMAND)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    0: done; 2: bad input (one line on stderr: the option, file or setting at fault, or
    running out of memory); 1: a zfvis bug (one line asking for a report; ``--debug``
    prints the traceback); 130: interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut]
    argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["project", *argv]  # `zfvis` alone runs the main job
    if argv and argv[0] == "--version":
        from .._version import __version__

        print(f"zfvis {__version__}")
        return 0
    parser = get_args_parser()
    with warnings.catch_warnings(record=True) as caught:  # no warning printed before an error line
        try:
            args, config, from_config = _parse(parser, argv)
            with invoked(args, config, from_config):
                try:
                    status = _run(args)
                except BrokenPipeError:
                    raise
                except Exception as err:  # noqa: BLE001 - reported here, where the config's keys are known
                    if debug:
                        traceback.print_exc()
                    return report_error(err, argv[0] if argv else None)
        except SystemExit as exit_:
            return int(exit_.code) if isinstance(exit_.code, int) else 2
        except BrokenPipeError:  # the reader went away (`zfvis layers | head`): stop quietly
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
            return 0
        except KeyboardInterrupt as err:
            if debug:
                traceback.print_exc()
            print(f"zfvis: interrupted{f': {err}' if str(err) else ''}", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - the boundary: one line, never a traceback unless --debug
            if debug:
                traceback.print_exc()
            return report_error(err, argv[0] if argv else None)
    for w in caught:  # the command succeeded: show its warnings after all
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return status


def _run(args: argparse.Namespace) -> int:
    """Runs the command; its outputs appear together at the end, or none does (a full disk,
    an error or Ctrl-C part-way leaves every earlier file as it was)."""
    if args.command not in _GROUPED:
        return int(args.func(args) or 0)
    with output_group() as group:
        status = int(args.func(args) or 0)
    if group.replaced:
        names = ", ".join(p.name for p in group.replaced)
        print(f"replaced the earlier zfvis output{'s' if len(group.replaced) > 1 else ''} {names} "
              "(pass another -o to keep both)")
    return status
