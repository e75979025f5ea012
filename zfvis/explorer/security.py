"""Who may talk to the explorer: the token, the Host header (DNS rebinding) and the
Origin of a browser's request (another page's cross-site request forgery).

The policy is Jupyter's. A request that carries the token itself (``?token=`` or the
header ``X-Zfvis-Token``) may come from anywhere: a script, the page. A request that the
browser authorised with the cookie alone (or any request, without a token) must come from
the page's own origin: its ``Origin`` header, else its ``Referer``, names this server;
a state-changing request that carries neither is refused. No CORS header is ever sent.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import re
import secrets
import socket
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

__all__ = ["LOCAL_NAMES", "Guard", "Verdict", "new_token", "host_name", "is_loopback"]

#: Host names that always mean this machine.
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
#: A Host header: a name or IPv4 address, or an IPv6 address in brackets; an optional port.
_HOST = re.compile(r"(\[[0-9a-f:.]{2,45}\]|[a-z0-9](?:[a-z0-9.-]{0,252}))(?::([0-9]{1,5}))?", re.ASCII)
_SAFE_METHODS = frozenset({"GET", "HEAD"})


def new_token() -> str:
    """A random token for the printed URL (as Jupyter's)."""
    return secrets.token_urlsafe(24)


def host_name(header: str) -> str | None:
    """The host of a Host header, without its port and brackets, lower case; ``None`` for
    anything but ``name[:port]`` or ``[v6]:port`` (``127.0.0.1:80@evil.example`` is refused).
    """
    m = _HOST.fullmatch(header.strip().lower())
    if m is None or (m.group(2) is not None and int(m.group(2)) > 65535):
        return None
    name = m.group(1)
    return name[1:-1] if name.startswith("[") else name


def is_loopback(host: str) -> bool:
    """Whether a bind address or host name is this machine only."""
    if host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A request refused (``status`` 403, ``reason`` one line) or allowed (``reason`` empty)."""

    reason: str = ""

    def __bool__(self) -> bool:
        return not self.reason


class Guard:
    """Checks every request's Host header, token and origin.

    Args:
        bind: The address the server listens on.
        token: The token, or ``None`` for none (``--no-token``, loopback only).
        cookie: The name of the cookie that carries the token in a browser.
        allowed_hosts: Further host names to accept.
    """

    def __init__(self, bind: str, token: str | None, cookie: str, allowed_hosts: Iterable[str] = ()) -> None:
        self.token = token
        self.cookie = cookie
        self.wildcard = bind in WILDCARDS
        names = set(LOCAL_NAMES) | {h.lower() for h in allowed_hosts}
        if not self.wildcard:
            names.add(bind.lower())
        else:
            names.add(socket.gethostname().lower())
        self.names = frozenset(names)

    def host_ok(self, header: str | None) -> bool:
        """Whether the Host header names this server: a local name, the bound address,
        or (bound to every interface) any IP address. A DNS name pointing here that we
        were not told of is refused: that is how DNS rebinding reaches a local server."""
        if not header:
            return False
        name = host_name(header)
        if name is None:
            return False
        if name in self.names:
            return True
        return self.wildcard and _is_ip(name) or (_is_ip(name) and ipaddress.ip_address(name).is_loopback)

    def _matches(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())  # type: ignore[union-attr]

    def token_ok(self, query: Mapping[str, str], headers: Mapping[str, str], cookies: Mapping[str, str]) -> bool:
        """Whether the request carries the token (query ``token``, header
        ``X-Zfvis-Token`` or the cookie)."""
        if self.token is None:
            return True
        given = (query.get("token"), headers.get("X-Zfvis-Token"), cookies.get(self.cookie))
        return any(self._matches(g) for g in given)

    def explicit_token(self, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
        """Whether the request itself names the token (a script's or the page's call), not
        only a cookie the browser adds to any request."""
        given = (query.get("token"), headers.get("X-Zfvis-Token"))
        return self.token is not None and any(self._matches(g) for g in given)

    def check(self, method: str, query: Mapping[str, str], headers: Mapping[str, str],
              cookies: Mapping[str, str], *, public: bool = False) -> tuple[int, str] | None:  # fmt: skip
        """The refusal of a request, ``(status, message)``, or ``None`` to let it through.

        The Host header first, then the token, then (unless the request names the token
        itself) its origin. A ``public`` GET (the page's own script, style sheet and icon,
        the same for everyone) needs no token: a page in another site's IFrame, whose
        cookie the browser withholds, loads them too.
        """
        host = headers.get("Host")
        if not self.host_ok(host):
            return 403, (f"refused: Host '{(host or '')[:80]}' is not this server's name (a guard against DNS "
                         "rebinding); use the printed URL")
        if public and method in _SAFE_METHODS:
            return None
        if not self.token_ok(query, headers, cookies):
            return 403, "missing or wrong token: open the URL that `zfvis serve` printed (it ends in ?token=...)"
        if self.explicit_token(query, headers):
            return None
        verdict = self.origin_ok(method, host or "", headers)
        return None if verdict else (403, verdict.reason)

    def origin_ok(self, method: str, host: str, headers: Mapping[str, str]) -> Verdict:
        """Whether a request a browser may have made on another page's behalf comes from
        this server's own page: ``Origin``, else ``Referer``, must be ``http://<Host>``;
        a state-changing request with neither is refused."""
        origin = headers.get("Origin")
        source, text = ("Origin", origin) if origin is not None else ("Referer", headers.get("Referer"))
        if text is None:
            if method in _SAFE_METHODS:
                return Verdict()
            return Verdict(f"refused: a {method} without the token must come from the explorer's own page (no Origin "
                           "or Referer header); scripts send the header X-Zfvis-Token")
        try:
            parts = urlsplit(text.strip())
            same = parts.scheme == "http" and parts.netloc.lower() == host.strip().lower() and not parts.username
        except ValueError:
            same = False
        if same:
            return Verdict()
        return Verdict(f"refused: a request from another page ({source} {text[:80]!r}) may not use this explorer; "
                       "open the printed URL, or send the header X-Zfvis-Token from a script")
