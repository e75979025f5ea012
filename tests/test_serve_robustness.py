"""The explorer left running: malformed requests, slow clients, too many connections,
bounded budgets; every refusal an answer, never a traceback."""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time

import pytest
import torch
from serve_helpers import Client, png_bytes

import zfvis
from zfvis.explorer import Limits
from zfvis.explorer.budget import Budget

LIMITS = Limits(workers=4, max_connections=80, head_timeout=1.0, idle_timeout=2.0, receive_bytes=4 << 20,
                budget_wait=0.3, grace=2.0)


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(2)
    s = zfvis.serve(*zfvis.load_model("zfnet-cifar10"), images=[zfvis.default_image()], limits=LIMITS)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server)


def raw(port: int, data: bytes, *, shut: bool = True, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("data, status", [
    (b"GET /\r\n\r\n", 400), (b"GET /\n\n", 400), (b"GET /api/in", 400), (b"GET / HTTP/1.1\r\nHost: local", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400), (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET /\xff HTTP/1.1\r\n\r\n", 400), (b"GET / HTTP/1.1\r\n bad: fold\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400), (b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\n\r\n", 431),
    (b"POST /api/images HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST /api/images HTTP/1.1\r\nHost: localhost\r\nContent-Length: \xef\xbc\x95\r\n\r\n", 400),
    (b"POST /api/images HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
])
def test_malformed_requests_get_an_answer_and_no_traceback(server, data, status, capfd):
    reply = raw(server.port, data)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["status"] == status and "\n" not in body["error"]
    out, err = capfd.readouterr()
    assert err == "" and out == ""  # nothing on the terminal


def test_full_width_digits_are_refused(client):
    client.error("GET", "/api/project?image=chelsea&layer=conv3&channel=%EF%BC%95", 400, "integer")  # '５'
    client.error("GET", "/api/project?image=chelsea&layer=conv3&channel=%205", 400, "integer")
    body = json.dumps({"image": "chelsea", "layer": "conv3", "channel": "５"}).encode()
    client.error("POST", "/api/occlusion", 400, "integer", body=body)


def test_a_connection_closed_at_once_is_quiet(server, capfd):
    for _ in range(5):
        socket.create_connection(("127.0.0.1", server.port)).close()
    raw(server.port, b"")
    time.sleep(0.1)
    assert capfd.readouterr().err == ""


def test_slow_clients_do_not_delay_others_and_are_dropped(server, client):
    slow = []
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"GET /api/info HTTP/1.1\r\nHost: loc" if i % 2 else b"POST /api/images HTTP/1.1\r\nHost: "
                  b"localhost\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        slow.append(s)
    started = time.monotonic()
    for _ in range(3):
        assert client.json("/api/info")["model"]
    assert time.monotonic() - started < 1.0  # the slow ones take no worker
    replies = []
    for s in slow:
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        replies.append(data)
        s.close()
    assert time.monotonic() - started < LIMITS.head_timeout + 100_000 / LIMITS.body_rate + 3
    assert all(r.startswith(b"HTTP/1.1 408") for r in replies), {r[:40] for r in replies}


def test_idle_connections_are_capped(server, client):
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.2)
        reply = raw(server.port, b"GET /api/info HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503") and b"Retry-After: 2" in reply and b"too many" in reply
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    assert client.json("/api/info")["model"]


def test_bodies_share_a_budget(server, client):
    held = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    size = LIMITS.receive_bytes - 1000
    held.sendall(f"POST /api/images?token={server.token} HTTP/1.1\r\nHost: localhost\r\n"
                 f"Content-Length: {size}\r\n\r\n".encode())
    time.sleep(0.1)
    try:
        code, headers, body = client.request("POST", "/api/images", body=png_bytes((200, 200)))
        assert code == 503 and headers["retry-after"] == "2" and b"other uploads" in body
    finally:
        held.close()
    time.sleep(0.1)
    assert client.json("/api/images", 201, method="POST", body=png_bytes((200, 200)))["source"] == "upload"


def test_budget_waits_then_refuses():
    b = Budget(10, "pixels")
    assert b.take(6, 0) and not b.take(6, 0.05) and b.take(4, 0)
    threading.Timer(0.05, b.give, args=(6,)).start()
    assert b.take(5, 2.0) and b.held == 9 and b.peak == 10
    big = Budget(10, "pixels")
    assert big.take(50, 0)  # one share larger than the budget runs alone
    assert not big.take(1, 0)


def test_any_bytes_parse_or_are_malformed():
    """Property: whatever a client sends, the head parser gives a request or a Malformed
    error with a 4xx/5xx status, never another exception."""
    from zfvis.explorer.wire import Malformed, parse_head

    rng = random.Random(0)
    pieces = [b"GET", b"POST", b" ", b"/api/info", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b":", b"Host",
              b"Content-Length", b"-5", b"\xef\xbc\x95", b"\x00", b"\xff", b"\t", b"Transfer-Encoding", b"99999999999999999"]
    for _ in range(3000):
        raw = b"".join(rng.choice(pieces) if rng.random() < 0.8 else bytes([rng.randrange(256)])
                       for _ in range(rng.randrange(0, 14)))
        try:
            head = parse_head(raw)
        except Malformed as err:
            assert 400 <= err.status < 600 and str(err) and "\n" not in str(err)
        else:
            assert head.method.isupper() and head.length >= 0


def test_random_junk_gets_answers_not_tracebacks(server, client, capfd):
    rng = random.Random(1)
    for _ in range(30):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\r\n\r\n"
        reply = raw(server.port, junk)
        assert reply == b"" or re.match(rb"HTTP/1\.1 (4\d\d|5\d\d) ", reply), reply[:80]
    assert client.json("/api/info")["model"]
    assert capfd.readouterr().err == ""


def test_decoding_shares_a_pixel_budget(server, client):
    pixels = server.explorer.images.pixels
    assert pixels.total == LIMITS.decode_pixels and server.explorer.images.wait == LIMITS.budget_wait
    assert pixels.take(pixels.total, 0)  # as if a large upload were being decoded
    try:
        code, headers, body = client.request("POST", "/api/images", body=png_bytes((300, 200)))
        assert code == 503 and headers["retry-after"] == "2" and b"images being decoded" in body
    finally:
        pixels.give(pixels.total)
    assert client.json("/api/images", 201, method="POST", body=png_bytes((300, 200)))["width"] == 300
    assert pixels.held == 0 and pixels.peak >= 300 * 200
