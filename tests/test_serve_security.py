"""Who may drive the explorer: the origin policy (as Jupyter's), CORS closed, the Host
header parsed strictly, no token only on loopback."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from serve_helpers import Client, png_bytes

import zfvis
from zfvis.explorer.security import Guard, host_name


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return zfvis.load_model("zfnet-cifar10")


@pytest.fixture(scope="module")
def server(model):
    s = zfvis.serve(*model, images=[zfvis.default_image()], name="zfnet-cifar10")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server)


def _cookie(client: Client) -> str:
    code, headers, _ = client.get("/")
    assert code == 200
    return headers["set-cookie"].split(";")[0]


OCCLUSION = json.dumps({"image": "chelsea", "layer": "conv3", "channel": 0, "patch": 16, "stride": 16}).encode()


@pytest.mark.parametrize("origin", [
    {"Origin": "http://127.0.0.1:9999"}, {"Origin": "http://evil.example"}, {"Origin": "null"},
    {"Origin": "https://127.0.0.1:{port}"}, {"Referer": "http://127.0.0.1:9999/attack.html"},
    {"Origin": "http://127.0.0.1:{port}@evil.example"}, {},
])
def test_a_cookie_alone_from_another_page_cannot_post(client, origin):
    headers = {k: v.format(port=client.port) for k, v in origin.items()}
    headers.update(Cookie=_cookie(client), **{"Content-Type": "text/plain"})
    before = [i["id"] for i in client.json("/api/images")["images"]]
    client.error("POST", "/api/images", 403, "refused", body=png_bytes(), token=None, headers=headers)
    client.error("POST", "/api/occlusion", 403, "refused", body=OCCLUSION, token=None, headers=headers)
    assert [i["id"] for i in client.json("/api/images")["images"]] == before  # nothing was uploaded


def test_a_cookie_from_the_page_itself_works(client):
    cookie = _cookie(client)
    for own in ({"Origin": f"http://127.0.0.1:{client.port}"}, {"Referer": f"http://127.0.0.1:{client.port}/?x=1"},
                {"Origin": f"http://localhost:{client.port}", "Host": f"localhost:{client.port}"}):
        headers = {"Host": f"127.0.0.1:{client.port}", **own, "Cookie": cookie}
        entry = client.json("/api/images", 201, method="POST", body=png_bytes(), token=None, headers=headers)
        assert entry["source"] == "upload"
    # a GET with the cookie and no Origin (an <img> of the page) works; from another page it does not
    assert client.get("/api/info", token=None, headers={"Cookie": cookie})[0] == 200
    client.error("GET", "/api/info", 403, "another page", token=None,
                 headers={"Cookie": cookie, "Origin": "http://127.0.0.1:9999"})


def test_the_header_token_works_from_scripts(client, server):
    headers = {"X-Zfvis-Token": server.token, "Origin": "http://elsewhere.example"}
    assert client.json("/api/images", 201, method="POST", body=png_bytes(seed=4), token=None, headers=headers)
    job = client.json("/api/occlusion", 202, method="POST", body=OCCLUSION, token=None,
                      headers={"X-Zfvis-Token": server.token})
    assert job["state"] in ("running", "done")
    client.error("POST", "/api/images", 403, "token", body=png_bytes(), token=None, headers={"X-Zfvis-Token": "nope"})


def test_cors_stays_closed(client, server):
    for method in ("OPTIONS", "GET", "POST"):
        code, headers, _ = client.request(method, "/api/info", token=None, body=b"" if method == "POST" else None,
                                          headers={"Origin": "http://evil.example", "X-Zfvis-Token": server.token,
                                                   "Access-Control-Request-Method": "POST"})
        assert not any(k.startswith("access-control-") for k in headers), headers
        assert code in (403, 405, 200)


@pytest.mark.parametrize("host", [
    "127.0.0.1:{port}@attacker.com", "127.0.0.1:{port}/x", "127.0.0.1:99999", "127.0.0.1:+80", "localhost:80:80",
    "[::1", "127.0.0.1 evil", "127.0.0.1:８０", "ｌocalhost", "user@127.0.0.1",
])
def test_strict_host_parsing(client, server, host):
    request = (f"GET /api/info?token={server.token} HTTP/1.1\r\nHost: {host.format(port=client.port)}\r\n"
               "Connection: close\r\n\r\n").encode("utf-8")
    with socket.create_connection(("127.0.0.1", client.port), timeout=30) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 403") and b"Host" in reply and b"Traceback" not in reply, (host, reply[:300])


def test_host_names():
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM:81") == "example.com"
    assert host_name("127.0.0.1:80@evil.example") is None and host_name("127.0.0.1:65536") is None
    g = Guard("127.0.0.1", "t", "c")
    assert g.host_ok("127.0.0.1:8000") and not g.host_ok("127.0.0.1:8000@evil.example")


def test_no_token_is_loopback_only(model, capsys):
    with pytest.raises(zfvis.UserInputError, match="loopback"):
        zfvis.serve(*model, images=[zfvis.default_image()], host="0.0.0.0", token=False, warn=lambda _: None)
    from zfvis.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--no-token", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--no-token" in err and "loopback" in err and len(err.strip().splitlines()) == 1


def test_no_token_still_refuses_other_pages(model):
    s = zfvis.serve(*model, images=[zfvis.default_image()], token=False, warn=lambda _: None)
    with s:
        c = Client(s)
        c.error("POST", "/api/images", 403, "another page", body=png_bytes(),
                headers={"Origin": "http://127.0.0.1:9999"})
        c.error("POST", "/api/images", 403, "own page", body=png_bytes())
        assert c.get("/api/info")[0] == 200  # a local program's GET
        own = {"Origin": f"http://127.0.0.1:{s.port}", "Host": f"127.0.0.1:{s.port}"}
        assert c.json("/api/images", 201, method="POST", body=png_bytes(), headers=own)["source"] == "upload"
