"""The explorer's server: :func:`serve` and :class:`ExplorerServer`.

The standard library's threaded HTTP server: each connection gets a thread, model calls
take the explorer's lock, and :meth:`ExplorerServer.close` stops everything, leaving
nothing behind (uploads live in memory only).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from http.server import ThreadingHTTPServer
from typing import Any

import torch
from torch import nn

from ..io.errors import InputTypeError, UserInputError
from ..io.images import default_image
from .explorer import Explorer
from .handler import Handler
from .occlusion_jobs import OcclusionJobs
from .routes import App
from .runs import MiningRun, RunSet
from .security import Guard, is_loopback, new_token

__all__ = ["ExplorerServer", "serve", "default_images"]


def default_images() -> list[Any]:
    """The photos shipped with zfvis: the cat, then the two portraits."""
    folder = default_image().parent
    return [default_image(), folder / "astronaut_face.jpg", folder / "grace_hopper_face.jpg"]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignores clients that went away; reports the rest as http.server does."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # a client that went away
        super().handle_error(request, client_address)


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
    """

    def __init__(self, app: App, host: str, port: int) -> None:
        handler = type("ZfvisHandler", (Handler,), {"app": app})
        try:
            self._httpd = _HTTPServer((host, port), handler)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserInputError(f"port {port} is in use; choose another port (0 picks a free one)") from None
            if err.errno in (errno.EADDRNOTAVAIL, errno.EACCES) or isinstance(err, OSError) and "resolve" in str(err):
                raise UserInputError(f"cannot listen on {host}:{port} ({err.strerror or err}); check --host "
                                           "and --port") from None
            raise
        self.app = app
        self.explorer = app.ex
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self.token = app.guard.token
        app.guard.cookie = f"zfvis-token-{self.port}"
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else (f"[{host}]" if ":" in host else host)
        self.url = f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> ExplorerServer:
        """Serves from a background thread; returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name=f"zfvis-serve-{self.port}", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serves until :meth:`close` (from another thread) or Ctrl-C; then closes."""
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self.close()

    def close(self) -> None:
        """Stops serving and frees the port (running occlusion stops after its batch)."""
        if self._closed:
            return
        self._closed = True
        self.app.jobs.close()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()

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
            that token; ``False``: none (a warning).
        name: The model's name on the page.
        classes: The model's class names (occlusion's target).
        cache_mb: The most memory the recorded forward passes may hold.
        allowed_hosts: Further Host header names to accept (a name this machine has).
        warn: Where warnings go (default :func:`warnings.warn`).
        start: Serve from a background thread now (``False``: call ``serve_forever``).

    Returns:
        The running :class:`ExplorerServer` (``server.url``, ``server.close()``).

    Raises:
        UserInputError: A bad image or run, a port in use, an address it cannot use.
    """
    warn = warn or (lambda text: warnings.warn(text, UserWarning, stacklevel=3))
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InputTypeError(f"port must be an int in 0..65535, got {port!r}")
    if not is_loopback(host):
        warn(f"serving on {host or 'every interface'}: anyone who can reach this machine on that address can use "
             "the explorer" + (" with the token" if token is not False else ""))
    if token is False:
        warn("no token: any program on this machine can use the explorer's API (--no-token)")
    secret = None if token is False else (new_token() if token is True else str(token))
    ex = Explorer(model, preprocess, default_images() if images is None else list(images), cache_bytes=cache_mb << 20)
    channels = {layer.node: layer.shape[0] for layer in ex.layers() if layer.shape}
    run_set = RunSet([MiningRun(i, path, ex.dn.resolve, channels) for i, path in enumerate(runs)])
    names = list(classes) if classes is not None else None
    app = App(ex, run_set, Guard(host, secret, "zfvis-token", allowed_hosts), OcclusionJobs(ex, names),
              name=name or type(model).__name__, classes=names)
    server = ExplorerServer(app, host, port)
    return server.start() if start else server


