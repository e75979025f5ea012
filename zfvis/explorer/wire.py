"""HTTP/1.1 on the wire, strictly: a request's head parsed, a response's bytes made.

Only what a browser or a script sends is accepted: ``METHOD SP target SP HTTP/1.x``, in
ASCII; header lines ``name: value`` (no folding); at most one ``Host`` and one
``Content-Length`` of ASCII digits; no ``Transfer-Encoding``. Anything else is a
:class:`Malformed` error with its status, answered by the server without a traceback.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from http import HTTPStatus

__all__ = ["Headers", "Head", "Malformed", "MAX_HEAD", "find_head_end", "parse_head", "response_bytes", "phrase"]

#: The most bytes a request's head (request line and headers) may have.
MAX_HEAD = 32 << 10
_MAX_HEADERS = 100
_REQUEST_LINE = re.compile(r"([A-Z]{1,16}) ([\x21-\x7e]{1,16384}) HTTP/1\.([01])", re.ASCII)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,15}", re.ASCII)
_SINGLE = ("host", "content-length")


class Malformed(Exception):
    """A request that is not HTTP as the explorer takes it.

    Attributes:
        status: The status to answer (400, 411, 413, 431, 505).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Headers(Mapping[str, str]):
    """A request's headers, by case-insensitive name (repeats joined with ``, ``)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._d: dict[str, str] = {}
        for name, value in pairs:
            key = name.lower()
            if key in self._d:
                if key in _SINGLE:
                    raise Malformed(400, f"the header {name} is given twice")
                value = self._d[key] + ("; " if key == "cookie" else ", ") + value
            self._d[key] = value

    def __getitem__(self, name: str) -> str:
        return self._d[name.lower()]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        """The header's value, or ``default``."""
        return self._d.get(name.lower(), default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


@dataclasses.dataclass
class Head:
    """A request's head.

    Attributes:
        method: ``GET``, ``POST``, ...
        target: The request target (path and query), as sent.
        minor: 0 for HTTP/1.0, 1 for HTTP/1.1.
        headers: The headers.
        length: The body's length (0 without ``Content-Length``).
        keep_alive: Whether the client keeps the connection for another request.
        expect_continue: Whether the client waits for ``100 Continue`` before its body.
    """

    method: str
    target: str
    minor: int
    headers: Headers
    length: int
    keep_alive: bool
    expect_continue: bool


def find_head_end(buf: bytes | bytearray) -> tuple[int, int] | None:
    """Where the head ends in ``buf``: (end of the head, start of the body), or ``None``."""
    crlf, lf = buf.find(b"\r\n\r\n"), buf.find(b"\n\n")
    ends = [(i, i + 4) for i in (crlf,) if i >= 0] + [(i, i + 2) for i in (lf,) if i >= 0]
    return min(ends) if ends else None


def parse_head(raw: bytes | bytearray) -> Head:
    """Parses a request's head (without the blank line that ends it).

    Raises:
        Malformed: Anything but a well-formed HTTP/1.0 or 1.1 request head.
    """
    lines = bytes(raw).split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    while lines and not lines[0]:
        lines.pop(0)  # blank lines before a request are allowed (RFC 9112 2.2)
    if not lines:
        raise Malformed(400, "empty request")
    try:
        first = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise Malformed(400, "malformed request line: it is not ASCII") from None
    m = _REQUEST_LINE.fullmatch(first)
    if m is None:
        if re.fullmatch(r"[A-Z]{1,16} \S+ HTTP/(?!1\.[01]$)\S*", first, re.ASCII):
            raise Malformed(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        raise Malformed(400, f"malformed request line {first[:60]!r}; expected 'METHOD /path HTTP/1.1'")
    if len(lines) - 1 > _MAX_HEADERS:
        raise Malformed(431, f"more than {_MAX_HEADERS} header lines")
    pairs = []
    for line in lines[1:]:
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise Malformed(400, f"malformed header line {line[:60]!r}")
        pairs.append((name, value.strip(" \t")))
    headers = Headers(pairs)
    if headers.get("Transfer-Encoding") is not None:
        raise Malformed(411, "chunked (Transfer-Encoding) bodies are not accepted; send a Content-Length")
    length_text = headers.get("Content-Length")
    if length_text is not None and not _DIGITS.fullmatch(length_text):
        raise Malformed(400, f"bad Content-Length {length_text[:40]!r}: it must be a number of bytes (0-9 only)")
    if length_text is None and m.group(1) in ("POST", "PUT"):
        raise Malformed(411, f"a {m.group(1)} needs a Content-Length header")
    minor = int(m.group(3))
    connection = (headers.get("Connection") or "").lower()
    keep = "close" not in connection if minor == 1 else "keep-alive" in connection
    expect = (headers.get("Expect") or "").lower() == "100-continue"
    return Head(m.group(1), m.group(2), minor, headers, int(length_text or 0), keep, expect)


def phrase(status: int) -> str:
    """The reason phrase of a status."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def response_bytes(status: int, headers: Mapping[str, str], body: bytes, *, head_only: bool = False) -> bytes:
    """A whole response, head and body in one buffer (one write: no delayed-ACK wait)."""
    lines = [f"HTTP/1.1 {status} {phrase(status)}"] + [f"{k}: {v}" for k, v in headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")
    return head if head_only else head + body
