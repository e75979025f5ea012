"""Who may talk to the explorer: the token and the Host header (DNS rebinding)."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from collections.abc import Iterable, Mapping

__all__ = ["LOCAL_NAMES", "Guard", "new_token", "host_name", "is_loopback"]

#: Host names that always mean this machine.
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def new_token() -> str:
    """A random token for the printed URL (as Jupyter's)."""
    return secrets.token_urlsafe(24)


def host_name(header: str) -> str:
    """The host of a Host header, without its port and brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header[1:]
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header


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


class Guard:
    """Checks every request's Host header and token.

    Args:
        bind: The address the server listens on.
        token: The token, or ``None`` for none (``--no-token``).
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
        if name in self.names:
            return True
        return self.wildcard and _is_ip(name) or (_is_ip(name) and ipaddress.ip_address(name).is_loopback)

    def token_ok(self, query: Mapping[str, str], headers: Mapping[str, str], cookies: Mapping[str, str]) -> bool:
        """Whether the request carries the token (query ``token``, header
        ``X-Zfvis-Token`` or the cookie)."""
        if self.token is None:
            return True
        for given in (query.get("token"), headers.get("X-Zfvis-Token"), cookies.get(self.cookie)):
            if given and hmac.compare_digest(given.encode(), self.token.encode()):
                return True
        return False
