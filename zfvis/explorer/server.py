"""The explorer's server: :func:`serve` and :class:`ExplorerServer`.

Connections are read by one loop and answered by a bounded pool of threads
(:mod:`zfvis.explorer.connections`); model calls take the explorer's lock. Stopping
(:meth:`ExplorerServer.close`, Ctrl-C, SIGTERM) stops accepting, cancels a running
occlusion and synthetic image, lets started requests finish within a few seconds and answers
the rest with 503; nothing is left behind (uploads live in memory only).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..io.errors import InputTypeError, UserInputError
from ..io.images import default_image
from .budget import Budget
from .connections import ConnectionLoop, Limits
from .explorer import Explorer
from .occlusion_jobs import OcclusionJobs
from .routes import App
from .runs import MiningRun, RunSet
from .security import Guard, is_loopback, new_token

__all__ = ["ExplorerServer", "Limits", "serve", "default_images"]


def default_images() -> list[Any]:
    """The photos shipped with zfvis: the cat, then the two portraits."""
    folder = default_image().parent
    return [default_image(), folder / "astronaut_face.jpg", folder / "grace_hopper_face.jpg"]


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``.

    Raises:
        UserInputError: The port is in use, or the address is not this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserInputError(f"port {port} is in use; choose another port (0 picks a free one)") from None
        if err.errno in (errno.EADDRNOTAVAIL, errno.EACCES) or isinstance(err, socket.gaierror):
            raise UserInputError(f"cannot listen on {host}:{port} ({err.strerror or err}); check --host "
                                 "and --port") from None
        raise


class ExplorerServer:
    """A running explorer: ``url``, ``close()``; a context manager.

    Build it with :func:`serve`. ``serve_forever()`` blocks (the command line's way),
    ``start()`` serves from a background thread (Python's and notebooks' way).

    Attributes:
        url: The page's address, with its token.
        host: The address it listens on.
        port: Its port.
        token: The token (``None`` without one).
        explorer: The model side (:class:`zfvis.explorer.explorer.Explorer`).
        unfinished: Requests still running when the last stop's grace ran out.
    """

    def __init__(self, app: App, host: str, port: int, limits: Limits | None = None) -> None:
        listener = _listen(host, port)
        self.app = app
        self.explorer = app.ex
        self.host = host
        self.port = int(listener.getsockname()[1])
        self.token = app.guard.token
        self.limits = limits or Limits()
        app.guard.cookie = f"zfvis-token-{self.port}"
        self._loop = ConnectionLoop(listener, app, self.limits)
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else (f"[{host}]" if ":" in host else host)
        self.url = f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")
        self._thread: threading.Thread | None = None
        self._ran = False
        self._closed = False
        self.unfinished = 0

    def start(self) -> ExplorerServer:
        """Serves from a background thread; returns at once."""
        if self._thread is None and not self._ran:
            self._ran = True
            self._thread = threading.Thread(target=self._loop.run, name=f"zfvis-serve-{self.port}", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serves until :meth:`stop` or :meth:`close` (from another thread or a signal
        handler) or Ctrl-C; then stops cleanly."""
        if self._ran:
            raise RuntimeError("this server is already serving (or was closed)")
        self._ran = True
        try:
            self._loop.run()
        finally:
            self.stop()
            self._finish()

    def stop(self) -> None:
        """Asks the server to stop and returns at once (safe in a signal handler): no new
        connections, the running occlusion cancelled after its batch, the running synthetic image
        after its step."""
        self.app.jobs.cancel()
        self.app.synthetic.cancel()
        self._loop.stop()

    def close(self) -> None:
        """Stops serving (see the module) and frees the port; returns within a few seconds."""
        if self._closed:
            return
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=self.limits.grace + 5)
        elif not self._ran:
            self._ran = True
            self._loop.run()  # never started: closes at once
        self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.app.jobs.close(wait=self.limits.grace)
        self.app.synthetic.close(wait=self.limits.grace)
        self.unfinished = self._loop.unfinished + self.app.jobs.running() + self.app.synthetic.running()

    def __enter__(self) -> ExplorerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<ExplorerServer {state} at {self.url}>"

    def _repr_html_(self) -> str:  # a notebook shows the page's link
        return f'<a href="{self.url}" target="_blank">zfvis explorer: {self.url}</a>'


def serve(
    model: nn.Module,
    preprocess: Callable[..., torch.Tensor],
    images: Sequence[str | os.PathLike[str] | Any] | None = None,
    runs: Sequence[str | os.PathLike[str]] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: bool | str = True,
    name: str | None = None,
    classes: Sequence[str] | None = None,
    cache_mb: int = 512,
    allowed_hosts: Sequence[str] = (),
    warn: Callable[[str], None] | None = None,
    start: bool = True,
    limits: Limits | None = None,
) -> ExplorerServer:
    """Serves the live explorer of ``model`` in the browser; returns at once.

    Args:
        model: Any network :class:`zfvis.Deconvnet` takes (never changed).
        preprocess: PIL image -> model input (C, H, W), e.g. from :func:`zfvis.load_model`.
        images: Image files or PIL images to offer (default: the photos shipped with zfvis).
        runs: ``zfvis mine`` output folders of the same model (top 9 and gallery).
        host: The address to listen on; anything but this machine gets a warning.
        port: The port; 0 picks a free one.
        token: ``True``: a random token in the URL, required on every request; a str:
            that token; ``False``: none (a warning; only on this machine's loopback).
        name: The model's name on the page.
        classes: The model's class names (occlusion's target).
        cache_mb: The most memory the recorded forward passes may hold.
        allowed_hosts: Further Host header names to accept (a name this machine has).
        warn: Where warnings go (default :func:`warnings.warn`).
        start: Serve from a background thread now (``False``: call ``serve_forever``).
        limits: Workers, connections, timeouts and budgets (default :class:`Limits`).

    Returns:
        The running :class:`ExplorerServer` (``server.url``, ``server.close()``).

    Raises:
        UserInputError: A bad image or run, a port in use, an address it cannot use,
            no token beyond loopback.
    """
    warn = warn or (lambda text: warnings.warn(text, UserWarning, stacklevel=3))
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InputTypeError(f"port must be an int in 0..65535, got {port!r}")
    if token is False and not is_loopback(host):
        raise UserInputError(f"--no-token is allowed only on this machine's loopback (127.0.0.1), not on "
                             f"{host or 'every interface'}: beyond it a token is required; drop --no-token")
    if not is_loopback(host):
        warn(f"serving on {host or 'every interface'}: anyone who can reach this machine on that address can use "
             "the explorer" + (" with the token" if token is not False else ""))
    if token is False:
        warn("no token: any program on this machine can use the explorer's API (--no-token); other sites' pages cannot")
    secret = None if token is False else (new_token() if token is True else str(token))
    limits = limits or Limits()
    ex = Explorer(model, preprocess, default_images() if images is None else list(images), cache_bytes=cache_mb << 20)
    ex.images.pixels, ex.images.wait = Budget(limits.decode_pixels, "pixels"), limits.budget_wait
    channels = {layer.node: layer.shape[0] for layer in ex.layers() if layer.shape}
    run_set = RunSet([MiningRun(i, path, ex.dn.resolve, channels) for i, path in enumerate(runs)])
    names = list(classes) if classes is not None else None
    app = App(ex, run_set, Guard(host, secret, "zfvis-token", allowed_hosts), OcclusionJobs(ex, names),
              name=name or type(model).__name__, classes=names)
    server = ExplorerServer(app, host, port, limits)
    return server.start() if start else server


