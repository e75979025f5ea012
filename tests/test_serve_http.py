"""The explorer's HTTP API in-process: every endpoint, error and limit of `zfvis serve`."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import Client, make_run, png_bytes

import zfvis
from zfvis.explorer.cache import LRUCache
from zfvis.explorer.explorer import Explorer
from zfvis.explorer.security import Guard, host_name, is_loopback


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return zfvis.load_model("zfnet-cifar10")


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("mine"), *model)


@pytest.fixture(scope="module")
def server(model, run_dir):
    m, p = model
    s = zfvis.serve(m, p, runs=[run_dir], name="zfnet-cifar10", classes=list("abcdefghij"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server)


@pytest.fixture(scope="module")
def dn(model):
    return zfvis.Deconvnet(model[0])


def cat(model) -> torch.Tensor:
    return model[1](zfvis.load_image(zfvis.default_image()))[None]


# ----------------------------------------------------------------------------- endpoints


def test_info_and_layers_in_graph_order(client, dn):
    info = client.json("/api/info")
    assert info["model"] == "zfnet-cifar10" and info["input"] == [3, 32, 32]
    assert [i["id"] for i in info["images"]] == ["chelsea", "astronaut_face", "grace_hopper_face"]
    assert info["rules"] == ["deconvnet", "guided", "gradient"] and info["classes"] == list("abcdefghij")
    layers = client.json("/api/layers")["layers"]
    names = [x["name"] for x in layers]
    assert names.index("conv1") < names.index("conv3") < names.index("fc6") < names.index("fc8")
    conv3 = layers[names.index("conv3")]
    assert conv3["shape"] == [128, 8, 8] and conv3["node"] == dn.resolve("conv3")
    assert conv3["receptive_field"]["size"] == [27, 27]
    assert layers[names.index("fc8")]["shape"] == [10] and layers[names.index("fc8")]["receptive_field"] is None


def test_maps_give_every_channel_and_its_maximum(client, model, dn):
    g = client.json("/api/maps?image=chelsea&layer=conv3")
    out = dn.output(cat(model), "conv3")[0]
    assert g["channels"] == 128 and g["map_size"] == [8, 8] and not g["vector"]
    np.testing.assert_allclose(g["max"], out.flatten(1).amax(1).numpy(), rtol=1e-6)
    y, x = g["argmax"][5]
    assert float(out[5, y, x]) == pytest.approx(g["max"][5])
    code, headers, body = client.get("/api/maps.png?image=chelsea&layer=conv3")
    assert code == 200 and headers["content-type"] == "image/png"
    sprite = Image.open(io.BytesIO(body))
    cols, (th, tw) = g["sprite"]["cols"], g["sprite"]["tile"]
    assert sprite.size == (cols * tw, -(-128 // cols) * th)
    a = np.asarray(sprite.convert("L"))
    row, col = divmod(5, cols)
    assert a[row * th + y, col * tw + x] == 255  # each map scaled to its own maximum
    code, _, body = client.get("/api/map.png?image=chelsea&layer=conv3&channel=5")
    assert code == 200 and Image.open(io.BytesIO(body)).size == (8, 8)


def test_predict_favicon_and_runs(client, model, dn):
    top = client.json("/api/predict?image=chelsea")
    logits = dn.output(cat(model), "fc8")[0]
    probs = torch.softmax(logits.double(), 0)
    order = logits.argsort(descending=True)[:5].tolist()
    assert top["layer"] == "fc8" and [t["class"] for t in top["top"]] == order
    assert [t["rank"] for t in top["top"]] == [1, 2, 3, 4, 5] and top["top"][0]["name"] == "abcdefghij"[order[0]]
    assert top["top"][0]["probability"] == pytest.approx(float(probs[order[0]]), rel=1e-5)
    code, headers, body = client.get("/favicon.ico")
    assert code == 200 and headers["content-type"] == "image/svg+xml" and body.startswith(b"<svg")
    runs = client.json("/api/runs")["runs"]
    assert len(runs) == 1 and runs[0]["gallery"] == "/runs/0/index.html" and "conv3" in runs[0]["layers"]
    client.error("GET", "/runs/%D9%A3/index.html", 404, "no run")  # an Arabic-Indic digit is not a run number


def test_vector_layer_maps(client):
    g = client.json("/api/maps?image=chelsea&layer=fc8")
    assert g["vector"] and g["channels"] == 10 and g["argmax"] is None


@pytest.mark.parametrize("query, kwargs", [
    ("layer=conv3&channel=5", dict(layer="conv3", channel=5)),
    ("layer=conv3&channel=7&y=2&x=6", dict(layer="conv3", channel=7, position=(2, 6))),
    ("layer=conv3&channel=7&y=2&x=6&rule=guided", dict(layer="conv3", channel=7, position=(2, 6), rule="guided")),
    ("layer=conv1&channel=3&rule=gradient", dict(layer="conv1", channel=3, rule="gradient")),
    ("layer=fc8&channel=3", dict(layer="fc8", channel=3)),
])
def test_projection_equals_deconvnet_project(client, model, dn, query, kwargs):
    meta = client.json(f"/api/project?image=chelsea&{query}")
    expected = dn.project(cat(model), **kwargs)[0].numpy()
    code, headers, body = client.get(meta["npy"], token=False)
    assert code == 200
    got = np.load(io.BytesIO(body), allow_pickle=False)
    assert got.dtype == np.float32 and got.shape == (3, 32, 32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert np.abs(got).max() > 0
    rec = dn.record(cat(model), kwargs["layer"], rule=kwargs.get("rule"))
    seeds = dn.select(rec, kwargs["channel"], kwargs.get("position"))
    assert meta["value"] == pytest.approx(float(seeds.value[0]))
    assert meta["box"] == list(dn.reverse(rec, seeds).boxes()[0])
    if "position" in kwargs:
        assert meta["position"] == list(kwargs["position"])
    code, headers, body = client.get(meta["png"], token=False)
    assert code == 200 and headers["content-type"] == "image/png"
    assert headers["x-zfvis-box"] == ",".join(map(str, meta["box"]))
    png = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(float)
    norm = 0.5 + 0.5 * expected / np.abs(expected).max()
    np.testing.assert_allclose(png / 255, norm.transpose(1, 2, 0), atol=1 / 255 + 1e-6)


def test_rules_differ(client):
    a, b = (client.get(f"/api/project.npy?image=chelsea&layer=conv3&channel=5&rule={r}")[2] for r in ("deconvnet", "guided"))
    assert not np.array_equal(np.load(io.BytesIO(a)), np.load(io.BytesIO(b)))


def test_a_click_reuses_the_recorded_forward_pass(server, client, monkeypatch):
    ex = server.explorer
    calls = []
    original = ex.dn.record
    monkeypatch.setattr(ex.dn, "record", lambda *a, **k: calls.append(a[1:]) or original(*a, **k))
    graph = ex.dn.graph
    client.json("/api/maps?image=grace_hopper_face&layer=conv2")
    for c in range(6):
        client.json(f"/api/project?image=grace_hopper_face&layer=conv2&channel={c}")
    client.json("/api/project?image=grace_hopper_face&layer=conv2&channel=1&y=3&x=3")
    assert len(calls) == 1  # one forward pass for the grid and every click
    client.json("/api/project?image=grace_hopper_face&layer=conv2&channel=1&rule=guided")
    client.json("/api/project?image=astronaut_face&layer=conv2&channel=1")
    assert len(calls) == 3 and ex.dn.graph is graph  # a new rule or image records again, never re-traces


def test_recording_cache_is_bounded(model):
    ex = Explorer(model[0], model[1], [zfvis.default_image()] * 6, cache_bytes=300_000)
    layer = ex.layer("conv1")  # a recording of conv1 at 32x32 holds 128 kB
    for image in ex.images.all():
        ex.project(image.id, layer, 0, None, "deconvnet")
        assert 0 < ex.recordings.bytes <= 300_000
    assert len(ex.recordings) == 2
    cache = LRUCache(100, max_items=2, size=len)
    cache.put("a", b"x" * 40)
    cache.put("b", b"x" * 40)
    cache.get("a")
    cache.put("c", b"x" * 40)
    assert cache.get("b") is None and cache.get("a") is not None and cache.bytes == 80


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("path, status, words", [
    ("/api/maps?image=chelsea&layer=conv33", 404, ["conv33", "closest", "conv3"]),
    ("/api/maps?image=chelsea", 400, ["layer"]),
    ("/api/maps?image=nope&layer=conv3", 404, ["no image 'nope'"]),
    ("/api/maps?image=../etc&layer=conv3", 400, ["image id"]),
    ("/api/project?image=chelsea&layer=conv3&channel=128", 400, ["channel 128", "128 channels"]),
    ("/api/project?image=chelsea&layer=conv3&channel=-1", 400, ["channel -1"]),
    ("/api/project?image=chelsea&layer=conv3&channel=five", 400, ["'channel' must be an integer"]),
    ("/api/project?image=chelsea&layer=conv3&channel=%EF%BC%95", 400, ["'channel' must be an integer"]),
    ("/api/maps?image=chelsea&layer=conv9", 404, ["conv9"]),
    ("/api/project?image=chelsea&layer=conv3", 400, ["missing parameter 'channel'"]),
    ("/api/project?image=chelsea&layer=conv3&channel=1&y=8&x=0", 400, ["outside", "8x8"]),
    ("/api/project?image=chelsea&layer=conv3&channel=1&y=1", 400, ["'x'"]),
    ("/api/project?image=chelsea&layer=conv3&channel=1&y=99999999999&x=0", 400, ["integer"]),
    ("/api/project?image=chelsea&layer=fc8&channel=1&y=0&x=0", 400, ["vector"]),
    ("/api/project?image=chelsea&layer=conv3&channel=1&rule=deconv", 400, ["unknown rule"]),
    ("/api/map.png?image=chelsea&layer=conv3&channel=500", 400, ["channel 500"]),
    ("/api/units?layer=conv3&channel=999", 400, ["channel 999"]),
    ("/api/occlusion/abc", 404, ["no occlusion job"]),
    ("/api/nothing", 404, ["no such address"]),
    ("/static/server.py", 404, ["no such file"]),
    ("/api/images/nope.png", 404, ["no image"]),
])
def test_bad_requests_get_a_json_error(client, path, status, words):
    client.error("GET", path, status, *words)


def test_bad_bodies(client, server):
    client.error("POST", "/api/occlusion", 400, "not JSON", body=b"{nope", headers={"Content-Type": "application/json"})
    client.error("POST", "/api/occlusion", 400, "JSON object", body=b"[1]")
    client.error("POST", "/api/occlusion", 400, "patch", body=json.dumps(
        {"image": "chelsea", "layer": "conv3", "channel": 0, "patch": 99}).encode())
    client.error("POST", "/api/occlusion", 400, "target class 10", body=json.dumps(
        {"image": "chelsea", "layer": "conv3", "channel": 0, "target": 10}).encode())
    client.error("POST", "/api/images", 415, "not a JPEG, PNG or WebP", body=b"GIF89a" + b"\0" * 100)
    client.error("POST", "/api/images", 415, "not a JPEG, PNG or WebP", body=b"#!/bin/sh\nrm -rf /\n")
    client.error("POST", "/api/images", 400, "empty", body=b"")
    client.error("POST", "/api/images", 400, "truncated", body=png_bytes((64, 64))[:300])
    limit = server.explorer.images.max_upload_bytes
    client.error("POST", "/api/images", 413, "limit", headers={"Content-Length": str(limit + 1)})
    client.error("POST", "/api/project", 405, "not part of the API", body=b"")
    client.error("DELETE", "/api/images", 405, "method")
    client.error("GET", "/api/images/", 404)


def test_decompression_bomb_is_refused_before_decoding(client):
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, format="PNG")  # 64 Mpixels in 70 kB
    client.error("POST", "/api/images", 413, "pixels", body=buf.getvalue())


def _raw(port: int, data: bytes, shut: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_truncated_and_lengthless_bodies(server):
    head = (f"POST /api/images?token={server.token} HTTP/1.1\r\nHost: 127.0.0.1\r\n").encode()
    reply = _raw(server.port, head + b"Content-Length: 5000\r\n\r\n" + png_bytes()[:100])
    assert reply.startswith(b"HTTP/1.1 400") and b"truncated" in reply and b"Traceback" not in reply
    reply = _raw(server.port, head + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length" in reply
    reply = _raw(server.port, head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 411")
    for bad in (b"-3", b"-5", b"\xef\xbc\x95", b"+5", b"5 5", b"0x10", b""):  # full-width 5, hex, ...
        reply = _raw(server.port, head + b"Content-Length: " + bad + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400") and b"bad Content-Length" in reply, (bad, reply[:200])


def test_a_bug_is_a_500_with_one_line_and_the_traceback_on_the_terminal(server, client, monkeypatch, capfd):
    def broken(*a, **k):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(server.explorer, "maps", broken)
    message = client.error("GET", "/api/maps?image=chelsea&layer=conv3", 500, "internal error", "something inside broke")
    assert "second line" not in message
    err = capfd.readouterr().err
    assert "Traceback" in err and "something inside broke" in err
    monkeypatch.undo()
    assert client.json("/api/maps?image=chelsea&layer=conv3")["channels"] == 128


# ----------------------------------------------------------------------------- uploads


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_upload_then_project(client, model, dn, fmt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = png_bytes((50, 40), fmt=fmt, seed=3)
    entry = client.json("/api/images?name=my%20photo.png", 201, method="POST", body=data)
    assert entry["source"] == "upload" and entry["input"] == [3, 32, 32] and entry["width"] == 50
    assert entry["id"] in [i["id"] for i in client.json("/api/images")["images"]]
    x = model[1](zfvis.to_rgb(Image.open(io.BytesIO(data))))[None]
    got = np.load(io.BytesIO(client.get(f"/api/project.npy?image={entry['id']}&layer=conv2&channel=4")[2]))
    np.testing.assert_allclose(got, dn.project(x, "conv2", channel=4)[0].numpy(), rtol=1e-5, atol=1e-7)
    code, _, body = client.get(f"/api/images/{entry['id']}.png")
    assert code == 200 and Image.open(io.BytesIO(body)).size == (32, 32)
    assert list(tmp_path.iterdir()) == []  # nothing written beside the user's files


def test_uploads_are_bounded(server, client):
    store = server.explorer.images
    ids = [client.json("/api/images", 201, method="POST", body=png_bytes(seed=s))["id"] for s in range(store.max_uploads + 2)]
    listed = [i["id"] for i in client.json("/api/images")["images"]]
    assert ids[0] not in listed and ids[-1] in listed and "chelsea" in listed
    assert sum(i.startswith("upload-") for i in listed) == store.max_uploads
    client.error("GET", f"/api/maps?image={ids[0]}&layer=conv1", 404, "no image")


# ----------------------------------------------------------------------------- security


def test_token_is_required(client, server):
    for path in ("/", "/api/layers", "/api/maps?image=chelsea&layer=conv3", "/runs/0/index.html", "/api/info"):
        client.error("GET", path, 403, "token", token=None)
        client.error("GET", path, 403, "token", token="wrong")
    assert client.get("/api/layers", token=None, headers={"X-Zfvis-Token": server.token})[0] == 200
    for public in ("/static/app.js", "/static/style.css", "/favicon.ico"):  # the same files for everyone
        assert client.get(public, token=None)[0] == 200
    client.error("POST", "/static/app.js", 403, "token", token=None, body=b"")
    code, headers, body = client.get("/")
    assert code == 200 and b"zfvis explorer" in body
    cookie = headers["set-cookie"].split(";")[0]
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    assert client.get("/runs/0/index.html", token=None, headers={"Cookie": cookie})[0] == 200
    assert "script-src 'self'" in headers["content-security-policy"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "localhost.evil.example", "127.0.0.1.nip.io", ""])
def test_foreign_host_headers_are_refused(client, host):
    client.error("GET", "/api/info", 403, "host", headers={"Host": host})


def test_local_host_headers_are_accepted(client):
    for host in ("localhost", f"localhost:{client.port}", f"127.0.0.1:{client.port}", "[::1]:80"):
        assert client.get("/api/info", headers={"Host": host})[0] == 200


def test_guard_rules():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM:81") == "example.com"
    g = Guard("0.0.0.0", "t", "c")
    assert g.host_ok("192.168.1.4:8000") and not g.host_ok("rebind.example:8000")
    assert Guard("192.168.1.4", None, "c").host_ok("192.168.1.4") and not Guard("127.0.0.1", None, "c").host_ok("192.168.1.4")


def test_no_token_and_other_hosts_warn(model):
    with pytest.warns(UserWarning, match="no token"):
        s = zfvis.serve(*model, images=[zfvis.default_image()], token=False)
    with s:
        assert "token" not in s.url
        assert Client(s).get("/api/layers", token=None)[0] == 200
    seen = []
    with pytest.raises(zfvis.UserInputError, match="cannot listen"):  # a warning first, then no such address here
        zfvis.serve(*model, images=[zfvis.default_image()], host="192.0.2.1", warn=seen.append)
    assert "anyone who can reach" in seen[0]


@pytest.mark.parametrize("path, status", [
    ("/runs/0/../topk.json", 400), ("/runs/0/%2e%2e/%2e%2e/etc/passwd", 400), ("/runs/0/%2E%2E/x", 400),
    ("/runs/0/tiles/../../../etc/passwd", 400), ("/runs/0//etc/passwd", 400), ("/runs/0/%00topk.json", 400),
    ("/runs/0/topk.json%00.png", 400), ("/runs/0/tiles", 404), ("/runs/0/tiles/conv3/", 404), ("/runs/0/state.pt", 404),
    ("/runs/0/.zfvis.lock", 400), ("/runs/0/outside.html", 404), ("/runs/0/%5C..%5Cx", 400), ("/runs/1/index.html", 404),
    ("/runs/x/index.html", 404), ("/runs/0/%ff", 400),
])
def test_run_folders_do_not_leak(server, client, run_dir, path, status):
    secret = run_dir.parent / "secret.html"
    secret.write_text("secret")
    link = run_dir / "outside.html"
    if not link.exists():
        link.symlink_to(secret)
    code, _, body = client.get(path)
    assert code == status and b"secret" not in body and b"root:" not in body


def test_runs_give_the_units_top_9_and_their_gallery(client, run_dir):
    topk = json.loads((run_dir / "topk.json").read_text())
    data = client.json("/api/units?layer=conv3&channel=3")
    run = data["runs"][0]
    entries = topk["layers"]["conv3"]["channels"][topk["layers"]["conv3"]["channel_ids"].index(3)]
    assert run["mined"] and [e["image"] for e in run["entries"]] == [e["image"] for e in entries]
    assert [e["value"] for e in run["entries"]] == [e["value"] for e in entries]
    code, headers, body = client.get(run["sheet"])
    assert code == 200 and Image.open(io.BytesIO(body)).size[::-1] == tuple(run["sheet_size"])
    code, _, body = client.get(run["page"])
    assert code == 200 and b"c0003" in body or b"channel 3" in body.lower()
    assert client.get("/runs/0/")[0] == 200  # the gallery's index
    assert not client.json("/api/units?layer=conv3&channel=100")["runs"][0]["mined"]
    assert not client.json("/api/units?layer=conv2&channel=1")["runs"][0]["mined"]


def test_a_run_of_another_model_is_refused(model, run_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    topk = json.loads((run_dir / "topk.json").read_text())
    topk["layers"]["conv3_3"] = topk["layers"].pop("conv3")
    (other / "topk.json").write_text(json.dumps(topk))
    with pytest.raises(zfvis.UserInputError, match="another model"):
        zfvis.serve(*model, images=[zfvis.default_image()], runs=[other])
    topk["layers"]["conv3"] = topk["layers"].pop("conv3_3")
    topk["layers"]["conv3"]["channel_count"] = 256
    (other / "topk.json").write_text(json.dumps(topk))
    with pytest.raises(zfvis.UserInputError, match="256 channels"):
        zfvis.serve(*model, images=[zfvis.default_image()], runs=[other])


# ----------------------------------------------------------------------------- occlusion


def test_occlusion_job_matches_zfvis_occlusion(client, model):
    job = client.json("/api/occlusion", 202, method="POST",
                      body=json.dumps({"image": "chelsea", "layer": "conv3", "channel": 5, "patch": 8, "stride": 4}).encode())
    assert job["state"] == "running" and job["total"] == 49
    deadline = time.monotonic() + 60
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        job = client.json(f"/api/occlusion/{job['id']}")
    assert job["state"] == "done" and job["done"] == job["total"]
    res = zfvis.occlusion(model[0], cat(model)[0], patch=8, stride=4, layer="conv3", channel=5)
    r = job["result"]
    assert r["method"] == "incremental" and r["target"] == res.target and r["target_name"] == "abcdefghij"[res.target]
    np.testing.assert_allclose(r["class_prob"], res.class_prob.numpy(), atol=1e-5)
    np.testing.assert_allclose(r["activation"], res.activation.numpy(), rtol=1e-4, atol=1e-4)
    assert r["tops"] == res.tops.tolist() and r["base_prob"] == pytest.approx(res.base_prob, abs=1e-6)


# ----------------------------------------------------------------------------- load


def test_load_many_clients_then_malformed_requests(server, client, model, dn):
    expected = {c: dn.project(cat(model), "conv3", channel=c)[0].numpy() for c in range(4)}
    maxima = client.json("/api/maps?image=chelsea&layer=conv3")["max"]
    failures: list[str] = []

    def worker(k: int) -> None:
        for i in range(25):
            kind, c = (k + i) % 4, (k * 7 + i) % 4
            try:
                if kind == 0:
                    got = np.load(io.BytesIO(client.get(f"/api/project.npy?image=chelsea&layer=conv3&channel={c}")[2]))
                    ok = np.allclose(got, expected[c], rtol=1e-5, atol=1e-7)
                elif kind == 1:
                    ok = client.json("/api/maps?image=chelsea&layer=conv3")["max"] == maxima
                elif kind == 2:
                    ok = client.get(f"/api/project.png?image=chelsea&layer=conv{1 + c % 3}&channel={c}&rule=guided")[0] == 200
                else:
                    ok = client.get("/api/project?image=chelsea&layer=conv3&channel=999")[0] == 400
            except Exception as err:  # noqa: BLE001
                ok, err_text = False, repr(err)
                failures.append(err_text)
            if not ok:
                failures.append(f"client {k} request {i} kind {kind}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:5]
    ex = server.explorer
    assert ex.recordings.bytes <= ex.recordings.max_bytes and len(ex.projections) <= ex.projections.max_items
    junk = [b"\x00\x01\x02\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"BREW /pot HTCPCP/1.0\r\n\r\n",
            b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
            b"POST /api/images HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", b"PATCH /api/info HTTP/1.1\r\nHost: localhost\r\n\r\n",
            b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nCookie: ;;;=\"\r\n\r\n", b"\r\n\r\n"]
    for i in range(20):
        reply = _raw(server.port, junk[i % len(junk)])
        assert b"Traceback" not in reply
    assert client.json("/api/info")["model"] == "zfnet-cifar10"


# ----------------------------------------------------------------------------- the command


def test_cli_prints_one_url_and_stops_cleanly_on_ctrl_c(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "zfvis", "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and "?token=" in url
        port = int(url.split(":")[2].split("/")[0])
        with urllib.request.urlopen(url.replace("/?", "/api/info?"), timeout=30) as r:
            assert json.loads(r.read())["model"] == "zfnet-cifar10"
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopped" in err and "Traceback" not in err and out == ""
    assert took < 2.0, f"an idle server took {took:.1f} s to stop"
    with socket.socket() as s:  # nothing listens on the port any more (TIME_WAIT connections aside)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, words", [
    (["--port", "70000"], "--port"), (["missing.png"], "does not exist"), (["--run", "."], "topk.json"),
    (["--model", "vgg17"], "unknown model"), (["--cache-mb", "1"], "--cache-mb"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from zfvis.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_config_file_is_checked_per_key(tmp_path, capsys):
    from zfvis.cli import main

    cfg = tmp_path / "s.toml"
    cfg.write_text('[serve]\nport = "8000"\n')
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "port" in capsys.readouterr().err
    cfg.write_text('[serve]\nprot = 8000\n')
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "port" in capsys.readouterr().err
