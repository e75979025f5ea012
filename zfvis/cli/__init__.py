"""The ``zfvis`` command line: one command per module, listed in :data:`COMMANDS`.

Every command lives in its own module with ``add_parser(subparsers)`` and
``run(args) -> int``; adding one is a line in :data:`COMMANDS`. The modules are imported
only when their command is named, and load torch only when the command runs, so that
``zfvis --help``, ``zfvis CMD --help`` and ``zfvis --version`` answer at once. Bad input
ends with a one-line error on stderr and exit status 2.
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
import importlib  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

from ._common import ArgumentParser  # noqa: E402
from .boundary import report_error  # noqa: E402
from .config import _parse  # noqa: E402
from .outputs import invoked  # noqa: E402

if _ON_MAIN_THREAD:
    signal.signal(signal.SIGINT, _PREVIOUS_SIGINT)

__all__ = ["COMMANDS", "get_args_parser", "main"]

#: Every command: its name -> (its module, its one-line summary). The module has
#: ``add_parser(subparsers)`` (see :func:`zfvis.cli._common.command_parser`) and ``run(args)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "project": ("zfvis.cli.project", "project a layer's strongest activations for one image to pixel space (the default command)"),
    "layers": ("zfvis.cli.layers", "list a model's layers with their output shape and receptive field"),
    "filters": ("zfvis.cli.filters", "draw the filters of a convolution (Zeiler & Fergus Fig. 6)"),
    "evolution": ("zfvis.cli.evolution", "draw how features evolve over training checkpoints (Zeiler & Fergus Fig. 4)"),
    "mine": ("zfvis.cli.mine", "find and project every channel's top activations over a data set (Zeiler & Fergus Fig. 2)"),
    "occlude": ("zfvis.cli.occlude", "map how occluding each part of an image changes a feature map and the class (Fig. 7)"),
    "invariance": ("zfvis.cli.invariance", "measure how features and the class change as images shift, scale and rotate (Fig. 5)"),
    "correspond": ("zfvis.cli.correspond", "measure whether occluding the same part changes features alike across images (Fig. 8)"),
    "optimize": ("zfvis.cli.optimize", "synthesise images that excite a layer's channels most (feature visualization)"),
    "serve": ("zfvis.cli.serve", "explore a model live in the browser: maps, projections, top 9, occlusion"),
}

#: Commands whose outputs appear all together at the end (:func:`zfvis.io.atomic.output_group`);
#: the others write as they go (``mine``'s run folder is resumable, page by page).
_GROUPED = frozenset({"project", "layers", "filters", "evolution", "occlude", "invariance", "correspond"})


class _Commands(argparse._SubParsersAction):
    """The commands' sub-parsers: each one's help starts with its summary in :data:`COMMANDS`."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        from ._common import HelpFormatter

        summary = COMMANDS[name][1]
        details = kwargs.get("description")
        kwargs.update(help=summary, description=f"{summary[0].upper()}{summary[1:]}." + (f"\n\n{details}" if details else ""))
        kwargs.setdefault("formatter_class", HelpFormatter)
        return super().add_parser(name, **kwargs)


def get_args_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of the whole command line (one sub-parser per command).

    Args:
        commands: the commands whose modules are imported and whose options are known
            (default: every command); the others are listed by name and summary only.
    """
    from .._version import __version__
    from ._common import HelpFormatter

    parser = ArgumentParser(  # usage errors are one line; sub-parsers inherit the class
        prog="zfvis",
        description="Deconvnet visualizations of CNN features (Zeiler & Fergus, 2014). "
        "`zfvis` alone runs `zfvis project` on the shipped model and photo.",
        epilog="examples:\n  zfvis -o zfvis_project.png              # the main job, offline\n"
        "  zfvis project --help                    # a command's options and examples",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zfvis {__version__}", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also after COMMAND)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=_Commands)
    wanted = set(COMMANDS if commands is None else commands)
    for name, (module, _) in COMMANDS.items():
        if name in wanted:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name)
    return parser


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser ``argv`` needs: the named command's options only (the other commands'
    modules stay unimported), or every command's where a config file's tables are checked."""
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return get_args_parser()
    return get_args_parser([argv[0]] if argv and argv[0] in COMMANDS else [])


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
    parser = _parser_for(argv)
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
    from ..io.atomic import output_group  # loads torch: only when a command runs

    with output_group() as group:
        status = int(args.func(args) or 0)
    if group.replaced:
        names = ", ".join(p.name for p in group.replaced)
        print(f"replaced the earlier zfvis output{'s' if len(group.replaced) > 1 else ''} {names} "
              "(pass another -o to keep both)")
    return status
