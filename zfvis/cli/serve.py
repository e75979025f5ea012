"""``zfvis serve``: the live explorer in the browser (see :mod:`zfvis.explorer`)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

from ._analysis import class_names
from ._common import CLIError, add_config_arg, add_model_args, command_parser

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
    p.add_argument("--no-token", action="store_true", help="no token in the URL (any local program can then use it)")
    p.add_argument("--input-size", type=int, help="side of the square model input (default: the model's own)")
    p.add_argument("--cache-mb", type=int, default=512, help="memory for recorded forward passes (default 512)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    add_config_arg(p)
    p.set_defaults(func=run)


def _warn(text: str) -> None:
    print(f"zfvis serve: warning: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM stops the server as Ctrl-C does (a clean exit)."""
    def stop(signum: int, frame: Any) -> None:
        """Raises KeyboardInterrupt in the main thread."""
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(args: argparse.Namespace) -> int:
    """Loads the model, prints the URL and serves until Ctrl-C (or SIGTERM); returns 0."""
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    if args.cache_mb < 16:
        raise CLIError(f"--cache-mb must be at least 16, got {args.cache_mb}")
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
    with _stop_on_sigterm():
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("zfvis serve: stopped", file=sys.stderr, flush=True)
    return 0
