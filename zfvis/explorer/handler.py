"""The HTTP side: requests in, responses out, errors as JSON.

:class:`Handler` reads a request (the Host header and the token checked first, the body
bounded), hands it to the routes (:mod:`zfvis.explorer.routes`), and writes the response.
Every refusal is a 4xx JSON error naming the problem; a bug of ours is a 500 with one
line, and its traceback on the terminal. No traceback ever reaches the client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import sys
import traceback
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..io.errors import UnsupportedModelError, UserInputError, first_line, is_out_of_memory
from .errors import ApiError

__all__ = ["Request", "Response", "Handler", "json_response", "error_response"]

_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclasses.dataclass
class Request:
    """A request as the routes see it.

    Attributes:
        method: ``GET``, ``POST``, ...
        path: The path, percent-decoded.
        query: The query parameters (the last value of each).
        headers: The request's headers (case-insensitive).
        body: The body (empty for GET).
    """

    method: str
    path: str
    query: dict[str, str]
    headers: Any
    body: bytes = b""

    def json(self) -> dict[str, Any]:
        """The body as a JSON object.

        Raises:
            ApiError: 400 where it is not one.
        """
        try:
            data = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ApiError(400, f"the body is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
        return data


@dataclasses.dataclass
class Response:
    """What the server answers.

    Attributes:
        status: The HTTP status.
        body: The bytes.
        content_type: Their type.
        headers: Further headers.
    """

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def json_response(data: Any, status: int = 200) -> Response:
    """A JSON response."""
    return Response(status, json.dumps(data, allow_nan=False, default=str).encode("utf-8"))


def error_response(status: int, message: str) -> Response:
    """A JSON error: ``{"error": message, "status": status}``."""
    return json_response({"error": message, "status": status}, status)


def _classify(err: BaseException) -> Response:
    """The response for an error a route raised (bugs are logged in full here)."""
    if isinstance(err, ApiError):
        return error_response(err.status, str(err))
    if is_out_of_memory(err):
        return error_response(503, f"out of memory ({first_line(err)[:160]}); try a smaller image or layer")
    if isinstance(err, UnsupportedModelError):
        return error_response(422, first_line(err))
    if isinstance(err, (UserInputError, FileNotFoundError)):
        return error_response(400, first_line(err))
    print(f"zfvis serve: internal error: {type(err).__name__}: {first_line(err)}", file=sys.stderr)
    traceback.print_exception(err, file=sys.stderr)
    return error_response(500, f"internal error in zfvis ({type(err).__name__}: {first_line(err)[:200]}); "
                               "the traceback is on the server's terminal; please report it")


class Handler(BaseHTTPRequestHandler):
    """One connection. The server (:class:`zfvis.explorer.server.ExplorerServer`) sets
    ``app`` on the class it makes from this one."""

    protocol_version = "HTTP/1.1"
    server_version = "zfvis"
    sys_version = ""
    timeout = 20  # seconds a client may stall (a truncated body ends here)
    app: Any = None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Logs a request only with ``--verbose``."""
        if self.app is not None and self.app.verbose:
            super().log_message(format, *args)

    def setup(self) -> None:
        """Sends small responses at once (no Nagle delay)."""
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, an unknown method) as JSON."""
        self.close_connection = True
        text = message or (HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "error")
        if code == 501:
            text = f"method {self.command!r} is not supported; use GET or POST"
        self._send(error_response(code, text))

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        """Answers a GET."""
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        """Answers a HEAD (a GET without the body)."""
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        """Answers a POST."""
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        """Refuses a PUT (405)."""
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        """Refuses a DELETE (405)."""
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        slot = self.app.slots.acquire(timeout=30)
        try:
            response = self._respond(method) if slot else error_response(503, "the server is busy; try again")
        finally:
            if slot:
                self.app.slots.release()
        self._send(response, head=method == "HEAD")

    def _respond(self, method: str) -> Response:
        try:
            request = self._read(method)
            return self.app.route(request)
        except (socket.timeout, ConnectionError) as err:
            self.close_connection = True
            return error_response(400, f"the request body is incomplete ({first_line(err)})")
        except Exception as err:  # noqa: BLE001 - the boundary: nothing reaches the client as a traceback
            return _classify(err)

    def _read(self, method: str) -> Request:
        """Parses the request; checks the Host header, the token and the body's size."""
        split = urlsplit(self.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        try:
            path = unquote(split.path, errors="strict") if "%" in split.path else split.path
        except UnicodeDecodeError:
            raise ApiError(400, "bad path: its percent-encoding is not UTF-8") from None
        guard = self.app.guard
        if not guard.host_ok(self.headers.get("Host")):
            raise ApiError(403, f"refused: Host '{self.headers.get('Host')}' is not this server's name "
                           "(a guard against DNS rebinding); use the printed URL")
        if not guard.token_ok(query, self.headers, self._cookies()):
            raise ApiError(403, "missing or wrong token: open the URL that `zfvis serve` printed (it ends in "
                           "?token=...)")
        body = self._body(method, path)
        return Request(method if method != "HEAD" else "GET", path, query, self.headers, body)

    def _cookies(self) -> dict[str, str]:
        raw = self.headers.get("Cookie")
        if not raw:
            return {}
        try:
            return {k: m.value for k, m in SimpleCookie(raw).items()}
        except CookieError:
            return {}

    def _body(self, method: str, path: str) -> bytes:
        if method not in ("POST", "PUT"):
            return b""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise ApiError(411, "chunked bodies are not accepted; send a Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self.close_connection = True
            raise ApiError(411, "a body needs a Content-Length header")
        try:
            length = int(length_text)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {length_text!r}") from None
        limit = self.app.body_limit(path)
        if length < 0 or length > limit:
            self.close_connection = True
            raise ApiError(413, f"the body is {length:,} bytes; the limit here is {limit:,}")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise ApiError(400, f"the body is truncated: {len(body):,} of {length:,} bytes arrived")
        return body

    def _send(self, r: Response, *, head: bool = False) -> None:
        try:
            self.send_response(r.status, HTTPStatus(r.status).phrase if r.status in HTTPStatus._value2member_map_ else None)
            headers = {**_SECURITY_HEADERS, "Content-Type": r.content_type, "Content-Length": str(len(r.body)),
                       "Cache-Control": "no-store", **r.headers}
            if self.close_connection:
                headers["Connection"] = "close"
            for k, v in headers.items():
                self.send_header(k, v)
            # headers and body in one write: two small writes wait on the client's delayed ACK (40 ms)
            self._headers_buffer.append(b"\r\n")
            self.wfile.write(b"".join(self._headers_buffer) + (b"" if head else r.body))
            self._headers_buffer = []
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
