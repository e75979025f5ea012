"""From a request to a response: the guard first, then the routes, errors as JSON.

:func:`handle` takes a request whose head and body the connection loop
(:mod:`zfvis.explorer.connections`) has read, checks it (Host, token, origin: see
:mod:`zfvis.explorer.security`), hands it to the routes (:mod:`zfvis.explorer.routes`)
and gives the response. Every refusal is a 4xx JSON error naming the problem; a bug of
ours is a 500 with one line, and its traceback on the terminal. No traceback ever
reaches the client.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..io.errors import UnsupportedModelError, UserInputError, first_line, is_out_of_memory
from .budget import Busy
from .errors import ApiError
from .wire import Head

__all__ = ["Request", "Response", "handle", "json_response", "error_response", "SECURITY_HEADERS"]

#: Sent with every response. The page's own requests carry their origin (``same-origin``
#: referrer policy); no ``Access-Control-Allow-*`` header is ever sent (CORS stays closed).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
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

    def all_headers(self, *, close: bool) -> dict[str, str]:
        """Every header to send: the security headers, type, length, caching, ``Connection``."""
        headers = {**SECURITY_HEADERS, "Content-Type": self.content_type, "Content-Length": str(len(self.body)),
                   "Cache-Control": "no-store", **self.headers}
        if close:
            headers["Connection"] = "close"
        return headers


def json_response(data: Any, status: int = 200) -> Response:
    """A JSON response."""
    return Response(status, json.dumps(data, allow_nan=False, default=str).encode("utf-8"))


def error_response(status: int, message: str) -> Response:
    """A JSON error: ``{"error": message, "status": status}``."""
    response = json_response({"error": message, "status": status}, status)
    if status == 503:
        response.headers["Retry-After"] = "2"
    return response


def _classify(err: BaseException) -> Response:
    """The response for an error a route raised (bugs are logged in full here)."""
    if isinstance(err, Busy):
        response = error_response(503, str(err))
        response.headers["Retry-After"] = str(err.retry_after)
        return response
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


def _cookies(raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        return {k: m.value for k, m in SimpleCookie(raw).items()}
    except CookieError:
        return {}


def _request(app: Any, head: Head, body: bytes) -> Request:
    """The request, checked: its path, the Host header, the token and the origin."""
    split = urlsplit(head.target)
    query = dict(parse_qsl(split.query, keep_blank_values=True))
    try:
        path = unquote(split.path, errors="strict") if "%" in split.path else split.path
    except UnicodeDecodeError:
        raise ApiError(400, "bad path: its percent-encoding is not UTF-8") from None
    refusal = app.guard.check(head.method, query, head.headers, _cookies(head.headers.get("Cookie")),
                              public=path.startswith("/static/") or path == "/favicon.ico")
    if refusal is not None:
        raise ApiError(*refusal)
    method = "GET" if head.method == "HEAD" else head.method
    return Request(method, path, query, head.headers, body)


def handle(app: Any, head: Head, body: bytes) -> Response:
    """The response to one request (never raises for a request's sake).

    Args:
        app: The routes (:class:`zfvis.explorer.routes.App`) with their guard.
        head: The request's head.
        body: Its body, whole.
    """
    try:
        if head.method not in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
            raise ApiError(501, f"method {head.method!r} is not supported; use GET or POST")
        return app.route(_request(app, head, body))
    except Exception as err:  # noqa: BLE001 - the boundary: nothing reaches the client as a traceback
        return _classify(err)
