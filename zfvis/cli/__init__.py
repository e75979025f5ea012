"""The ``zfvis`` command line: ``project``, ``layers``, ``filters``, ``evolution``, ``mine``.

Every subcommand lives in its own module with ``add_parser(subparsers)`` and
``run(args) -> int``. Bad input ends with a one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import evolution, filters, layers, mine, project
from ._common import CLIError, apply_config

__all__ = ["get_args_parser", "main"]

_COMMANDS = (project, layers, filters, evolution, mine)


def get_args_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line (one sub-parser per command)."""
    parser = argparse.ArgumentParser(
        prog="zfvis",
        description="Deconvnet visualizations of CNN features (Zeiler & Fergus, 2014).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["project", *argv]  # `zfvis` alone runs the main job
    if argv and argv[0] == "--version":
        from .. import __version__

        print(f"zfvis {__version__}")
        return 0
    parser = get_args_parser()
    try:
        args = parser.parse_args(argv)
        args = apply_config(parser, args, argv)
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"zfvis: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, LookupError) as err:
        print(f"zfvis: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zfvis: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else 2
