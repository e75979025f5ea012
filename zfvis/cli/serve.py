"""``zfvis serve``: the live explorer in the browser (see :mod:`zfvis.explorer`)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._analysis import class_names
from ._common import CLIError, add_config_arg, add_model_args, command_parser

if TYPE_CHECKING:
    from ..explorer.server import ExplorerServer

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``zfvis serve``."""
    p = command_parser(
        sub, "serve",
        "Serves a page on which you pick an image and a layer, see every feature map, click one to "
        "see its strongest activation (or any point of it) projected to pixel space with its receptive field, "
        "switch rules, compare with the unit's top 9 from a mining run (--run), and run occlusion. Prints one "
        "URL (with a token) and serves until Ctrl-C.",
        ["zfvis serve --port 0                               # the shipped model and photos, on a free port",
         "zfvis serve zfvis/assets/chelsea.png --model alexnet --weights random --port 8000   # any zoo model"],
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="images to offer (default: the photos shipped with zfvis)")
    add_model_args(p)
    p.add_argument("--run", action="append", metavar="MINING_RUN",
                   help="a `zfvis mine` output folder of the same model: top 9 and gallery (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--no-token", action="store_true", help="no token in the URL (loopback only: any program on this machine can then use it)")
    p.add_argument("--input-size", type=int, help="side of the square model input (default: the model's own)")
    p.add_argument("--cache-mb", type=int, default=512, help="memory for recorded forward passes (default 512)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    add_config_arg(p)
    p.set_defaults(func=run)


def _warn(text: str) -> None:
    print(f"zfvis serve: warning: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stop_on_signals(server: ExplorerServer) -> Iterator[list[int]]:
    """Ctrl-C (SIGINT) and SIGTERM ask the server to stop (a clean stop, exit 0); a second
    one ends the wait for requests still running."""
    seen: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        """Stops the server (no exception thrown into whatever the main thread runs)."""
        seen.append(signum)
        if len(seen) > 1:
            server.limits.grace = 0.0
        server.stop()

    olds = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            olds[sig] = signal.signal(sig, stop)
    except ValueError:  # not the main thread
        pass
    try:
        yield seen
    finally:
        for sig, old in olds.items():
            signal.signal(sig, old)


def run(args: argparse.Namespace) -> int:
    """Loads the model, prints the URL and serves until Ctrl-C (or SIGTERM); returns 0."""
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    if args.cache_mb < 16:
        raise CLIError(f"--cache-mb must be at least 16, got {args.cache_mb}")
    from ..explorer.security import is_loopback

    if args.no_token and not is_loopback(args.host):
        raise CLIError(f"--no-token is allowed only on loopback (127.0.0.1, ::1), not on --host {args.host!r}: "
                       "beyond this machine a token is required; drop --no-token")
    from ..explorer.server import serve
    from .models import load_zoo_model, resolve_device

    device = resolve_device(args.device)
    model, preprocess = load_zoo_model(args.model, args.weights, device)
    if args.input_size is not None:
        preprocess = preprocess.with_size(args.input_size)
    server = serve(model, preprocess, args.images or None, args.run or (), host=args.host, port=args.port,
                         token=not args.no_token, name=args.model, classes=class_names(args.model, args.weights),
                         cache_mb=args.cache_mb, warn=_warn, start=False)
    server.app.verbose = args.verbose
    print(server.url, flush=True)
    print("zfvis serve: open the URL above in a browser; Ctrl-C stops the server", file=sys.stderr, flush=True)
    with _stop_on_signals(server) as signals:
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # a Ctrl-C before the handlers were in place
            server.close()
    print("zfvis serve: stopped", file=sys.stderr, flush=True)
    if signals or server.unfinished:
        _exit_now()
    return 0


def _exit_now() -> None:
    """Ends the process at once, exit 0, after the exit handlers (temporary folders).

    A stopped server has nothing left to write; the interpreter's own teardown of torch
    takes seconds, and a model call still running in a C++ thread could abort it
    (``terminate called without an active exception``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(0)
