"""The explorer's connections: one loop reads every request, a bounded pool answers them.

One thread (the loop) accepts connections and reads their requests without blocking,
each under a deadline: a request's head must arrive within ``head_timeout`` seconds of
its first byte, a body at ``body_rate`` bytes per second at least, a kept-alive connection
may idle ``idle_timeout`` seconds. So a slow or stalled client costs a buffer, never a
thread, and is dropped (408) when its time runs out. A body takes its bytes from a
server-wide budget before it is read (over it: a brief wait, then 503 with
``Retry-After``). A whole request goes to a fixed pool of ``workers`` threads; the
connection returns to the loop after the response. At most ``max_connections`` are open
(the next get a 503 and are closed).

:meth:`ConnectionLoop.stop` stops accepting, answers the requests not yet started with
503, lets the started ones finish within ``grace`` seconds and returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import queue
import selectors
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

from .budget import Budget
from .handler import error_response, handle
from .wire import MAX_HEAD, Head, Malformed, find_head_end, parse_head, response_bytes

__all__ = ["Limits", "ConnectionLoop"]


@dataclasses.dataclass
class Limits:
    """How much the server gives its clients.

    Attributes:
        workers: Threads answering requests.
        max_connections: Connections open at once.
        head_timeout: Seconds a request's head may take from its first byte.
        idle_timeout: Seconds a kept-alive connection may wait for its next request.
        body_rate: The slowest a body may arrive, in bytes per second (after ``head_timeout``).
        write_timeout: Seconds a response may take to be taken by the client.
        receive_bytes: Bytes of bodies being received at once, server-wide.
        decode_pixels: Pixels of uploaded images being decoded at once, server-wide.
        budget_wait: Seconds a request may wait for its share of a budget before a 503.
        grace: Seconds started requests get to finish when the server stops.
    """

    workers: int = 16
    max_connections: int = 256
    head_timeout: float = 5.0
    idle_timeout: float = 20.0
    body_rate: float = float(1 << 20)
    write_timeout: float = 20.0
    receive_bytes: int = 64 << 20
    decode_pixels: int = 40_000_000
    budget_wait: float = 3.0
    grace: float = 5.0


@dataclasses.dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: str
    deadline: float
    buf: bytearray = dataclasses.field(default_factory=bytearray)
    state: str = "head"  # head | budget | body | busy | closing
    head: Head | None = None
    body: bytearray | None = None
    got: int = 0
    reserved: int = 0


class ConnectionLoop:
    """Reads requests from ``listener`` and answers them with ``app`` (see the module).

    Args:
        listener: The listening socket (bound, listening).
        app: The routes (:class:`zfvis.explorer.routes.App`): ``guard``, ``route``,
            ``body_limit``, ``verbose``.
        limits: The limits.
    """

    def __init__(self, listener: socket.socket, app: Any, limits: Limits) -> None:
        self.listener = listener
        self.app = app
        self.limits = limits
        self.received = Budget(limits.receive_bytes, "bytes")
        self.unfinished = 0  # requests still running when the grace ran out
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: set[_Conn] = set()
        self._returned: deque[_Conn] = deque()
        self._queue: queue.Queue[tuple[_Conn, Head, bytes] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, name=f"zfvis-worker-{i}", daemon=True)
                         for i in range(limits.workers)]

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Asks the loop to stop (from any thread or a signal handler); returns at once."""
        self._stopping.set()
        self._wake()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping.is_set()

    def open_connections(self) -> int:
        """Connections open now."""
        return len(self._conns)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(self) -> None:
        """Serves until :meth:`stop`; then stops as the module says and returns."""
        self.listener.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        for w in self._workers:
            w.start()
        try:
            while not self._stopping.is_set():
                self._turn()
        finally:
            self._shut_down()

    def _turn(self) -> None:
        now = time.monotonic()
        waiting = any(c.state == "budget" for c in self._conns)
        soonest = min((c.deadline for c in self._conns), default=math.inf)
        timeout = max(0.0, min(0.05 if waiting else 0.5, soonest - now))
        for key, _ in self._sel.select(timeout):
            if key.data == "listen":
                self._accept()
            elif key.data == "wake":
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            else:
                self._read(key.data)
        while self._returned:
            conn = self._returned.popleft()
            if conn.state == "closing" or self._stopping.is_set():
                self._linger(conn)
            else:
                self._resume(conn)
        for conn in [c for c in self._conns if c.state == "budget"]:
            self._start_body(conn)
        now = time.monotonic()
        for conn in [c for c in self._conns if c.deadline <= now]:
            self._expire(conn)

    # ------------------------------------------------------------------ reading
    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. out of file descriptors: the client's connect fails, we go on
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr),
                         time.monotonic() + self.limits.head_timeout)
            self._conns.add(conn)
            if self._stopping.is_set():
                self._answer(conn, 503, "the server is stopping; try again once it is restarted")
            elif len(self._conns) > self.limits.max_connections:
                self._answer(conn, 503, f"too many open connections (the limit is {self.limits.max_connections}); "
                             "try again in a moment")
            else:
                self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            if conn.state == "body":
                n = conn.sock.recv_into(memoryview(conn.body or bytearray())[conn.got:])
                data = None
            else:
                data = conn.sock.recv(1 << 16)
                n = len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if n == 0:
            self._eof(conn)
        elif conn.state == "closing":
            return  # what a refused client still sends is dropped
        elif conn.state == "body":
            conn.got += n
            if conn.got == len(conn.body or b""):
                self._dispatch(conn, bytes(conn.body or b""))
        else:
            if not conn.buf.strip():
                conn.deadline = time.monotonic() + self.limits.head_timeout  # the head's time starts now
            conn.buf += data or b""
            self._parse(conn)

    def _eof(self, conn: _Conn) -> None:
        if conn.state == "body":
            self._answer(conn, 400, f"the body is truncated: {conn.got:,} of {len(conn.body or b''):,} bytes arrived")
        elif conn.state == "head" and conn.buf.strip():
            self._answer(conn, 400, "the request was cut off before the end of its head")
        else:
            self._close(conn)

    def _parse(self, conn: _Conn) -> None:
        end = find_head_end(conn.buf)
        if end is None or end[0] > MAX_HEAD:
            if len(conn.buf) > MAX_HEAD:
                self._answer(conn, 431, f"the request's head is longer than {MAX_HEAD:,} bytes")
            return
        try:
            head = parse_head(conn.buf[: end[0]])
        except Malformed as err:
            self._answer(conn, err.status, str(err))
            return
        del conn.buf[: end[1]]
        limit = self.app.body_limit(head.method, head.target)
        if head.length > limit:
            self._answer(conn, 413, f"the body is {head.length:,} bytes; the limit here is {limit:,}")
            return
        conn.head = head
        if head.length == 0:
            self._dispatch(conn, b"")
        else:
            conn.state = "budget"
            conn.deadline = time.monotonic() + self.limits.budget_wait
            self._unwatch(conn)
            self._start_body(conn)

    def _start_body(self, conn: _Conn) -> None:
        head = conn.head
        if head is None:
            return
        if not self.received.try_take(head.length):
            return  # waits; _expire answers 503 when budget_wait runs out
        conn.reserved = head.length
        conn.body = bytearray(head.length)
        take = min(len(conn.buf), head.length)
        conn.body[:take] = conn.buf[:take]
        del conn.buf[:take]
        conn.got = take
        conn.state = "body"
        conn.deadline = time.monotonic() + self.limits.head_timeout + head.length / self.limits.body_rate
        if conn.got == head.length:
            self._dispatch(conn, bytes(conn.body))
            return
        if head.expect_continue:
            with contextlib.suppress(OSError):
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _dispatch(self, conn: _Conn, body: bytes) -> None:
        self._unwatch(conn)
        conn.state, conn.deadline, conn.body = "busy", math.inf, None
        self._queue.put((conn, conn.head, body))  # type: ignore[arg-type]

    def _resume(self, conn: _Conn) -> None:
        """A connection back from a worker, kept alive: its next request (maybe already here)."""
        conn.state, conn.head = "head", None
        conn.deadline = time.monotonic() + (self.limits.head_timeout if conn.buf.strip() else self.limits.idle_timeout)
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        if conn.buf:
            self._parse(conn)

    def _expire(self, conn: _Conn) -> None:
        if conn.state == "budget":
            self._answer(conn, 503, f"the server is receiving other uploads ({self.received.held:,} bytes); try "
                         "again in a moment")
        elif conn.state == "body":
            total = len(conn.body or b"")
            self._answer(conn, 408, f"the body did not arrive in time ({conn.got:,} of {total:,} bytes)")
        elif conn.state == "head" and conn.buf.strip():
            self._answer(conn, 408, f"the request's head did not arrive within {self.limits.head_timeout:g} s")
        else:
            self._close(conn)

    # ------------------------------------------------------------------ answering
    def _answer(self, conn: _Conn, status: int, message: str) -> None:
        """Answers an error from the loop (small: one non-blocking send) and closes."""
        response = error_response(status, message)
        data = response_bytes(status, response.all_headers(close=True), response.body)
        with contextlib.suppress(OSError):
            conn.sock.send(data)
        self._linger(conn)

    def _linger(self, conn: _Conn) -> None:
        """Closes after the response: our side now, theirs within a second (what they still
        send is read and dropped, so that the response is not lost to a reset)."""
        self._release(conn)
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        self._unwatch(conn)
        conn.state, conn.deadline, conn.body = "closing", time.monotonic() + 1.0, None
        with contextlib.suppress(OSError, ValueError):
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _release(self, conn: _Conn) -> None:
        if conn.reserved:
            self.received.give(conn.reserved)
            conn.reserved = 0

    def _unwatch(self, conn: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(conn.sock)

    def _close(self, conn: _Conn) -> None:
        self._release(conn)
        self._unwatch(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()
        self._conns.discard(conn)

    # ------------------------------------------------------------------ the workers
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            conn, head, body = item
            with self._busy_lock:
                self._busy += 1
            try:
                self._serve(conn, head, body)
            finally:
                with self._busy_lock:
                    self._busy -= 1

    def _serve(self, conn: _Conn, head: Head, body: bytes) -> None:
        if self._stopping.is_set():
            response = error_response(503, "the server is stopping; try again once it is restarted")
        else:
            response = handle(self.app, head, body)
        del body
        self._release(conn)
        close = not head.keep_alive or self._stopping.is_set() or response.status in (408, 413, 431)
        if self.app.verbose:
            print(f"zfvis serve: {conn.peer} \"{head.method} {head.target[:200]}\" {response.status}",
                  file=sys.stderr, flush=True)
        data = response_bytes(response.status, response.all_headers(close=close), response.body,
                              head_only=head.method == "HEAD")
        if not self._write(conn, data) or close:
            conn.state = "closing"  # the loop closes it
        self._returned.append(conn)
        self._wake()

    def _write(self, conn: _Conn, data: bytes) -> bool:
        """Sends ``data`` within ``write_timeout`` seconds in all; whether it went."""
        end = time.monotonic() + self.limits.write_timeout
        view = memoryview(data)
        try:
            while view:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                conn.sock.settimeout(left)
                sent = conn.sock.send(view[: 1 << 18])
                view = view[sent:]
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                conn.sock.setblocking(False)

    # ------------------------------------------------------------------ stopping
    def _shut_down(self) -> None:
        end = time.monotonic() + self.limits.grace
        self._accept()  # the connections waiting in the backlog get their 503 too
        self._unwatch_listener()
        for conn in list(self._conns):
            if conn.state in ("body", "budget") or (conn.state == "head" and conn.buf.strip()):
                self._answer(conn, 503, "the server is stopping; try again once it is restarted")
            elif conn.state == "head":
                self._close(conn)
        while time.monotonic() < end and (self._busy or not self._queue.empty() or self._returned or self._conns):
            self._turn()
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(timeout=max(0.0, end - time.monotonic()))
        self.unfinished = sum(w.is_alive() for w in self._workers)
        for conn in list(self._conns):
            if conn.state != "busy":
                self._close(conn)
        self._sel.close()
        for s in (self._wake_r, self._wake_w):
            s.close()

    def _unwatch_listener(self) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(self.listener)
        with contextlib.suppress(OSError):
            self.listener.close()
