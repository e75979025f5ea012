"""The ``zfvis`` command line: ``project``, ``layers``, ``filters``, ``evolution``, ``mine``.

Every subcommand lives in its own module with ``add_parser(subparsers)`` and
``run(args) -> int``. Bad input ends with a one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from . import correspond, evolution, filters, invariance, layers, mine, occlude, project
from . import serve as serve_command
from ._common import ArgumentParser
from .boundary import report_error
from .config import _parse
from .outputs import invoked

__all__ = ["get_args_parser", "main"]

_COMMANDS = (project, layers, filters, evolution, mine, occlude, invariance, correspond, serve_command)


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
                    status = int(args.func(args) or 0)
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
