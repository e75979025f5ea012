"""The explorer's views of a unit over HTTP: its synthetic image (a job with progress, cached,
bounded, cancelled on shutdown), its connections to the layer below, and live camera frames."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import Client, png_bytes

import zfvis
from zfvis.explorer.synthetic_jobs import SyntheticLimits, twin


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model, preprocess = zfvis.load_model("zfnet-cifar10")
    server = zfvis.serve(model, preprocess, name="zfnet-cifar10")
    yield server, Client(server), model, preprocess
    server.close()


def post(client: Client, path: str, data: dict, status: int) -> dict:
    return client.json(path, status, method="POST", body=json.dumps(data).encode(),
                       headers={"Content-Type": "application/json"})


def follow(client: Client, job: dict, timeout: float = 60) -> tuple[dict, list[int]]:
    """Polls a job until it ends; returns it and the step counts seen on the way."""
    seen, end = [job["done"]], time.monotonic() + timeout
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < end, job
        time.sleep(0.02)
        job = client.json(f"/api/synthetic/{job['id']}")
        seen.append(job["done"])
    return job, seen


def test_synthetic_image_is_a_job_with_progress_then_cached(setup):
    server, client, model, preprocess = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = server.app.synthetic.optimisations
    none = client.json("/api/synthetic?layer=conv3&channel=7&steps=96")
    assert none["state"] == "none" and none["result"] is None
    client.error("GET", "/api/synthetic.png?layer=conv3&channel=7&steps=96", 404, "POST /api/synthetic")
    job = post(client, "/api/synthetic", {"layer": "conv3", "channel": 7, "steps": 96}, 202)
    assert job["state"] in ("queued", "running") and job["total"] == 96
    again = post(client, "/api/synthetic", {"layer": "conv3", "channel": 7, "steps": 96}, 202)
    assert again["id"] == job["id"]  # the same image asked for twice: one job
    job, seen = follow(client, job)
    assert job["state"] == "done", job
    assert seen == sorted(seen) and seen[-1] == 96 and any(0 < s < 96 for s in seen), seen
    assert server.app.synthetic.optimisations == calls + 1
    # the image is feature_vis's for that unit, at the model's input size and normalisation (deterministic on the CPU)
    code, headers, body = client.get(job["result"]["png"])
    assert code == 200 and headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(body)))
    ref = zfvis.feature_vis(model, "conv3", [7], steps=96, size=32, preprocess=preprocess, progress=False)
    want = (ref.images[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert got.shape == (32, 32, 3) and np.array_equal(got, want)
    assert job["result"]["value"] == pytest.approx(float(ref.final[0]), rel=1e-5)
    assert job["result"]["value"] > job["result"]["first"]
    # asked again: answered at once from the cache, the optimisation not run again
    t = time.monotonic()
    cached = post(client, "/api/synthetic", {"layer": "conv3", "channel": "7", "steps": "96"}, 200)
    assert time.monotonic() - t < 0.5
    assert cached["state"] == "done" and cached["cached"] and cached["result"] == job["result"]
    assert client.json(f"/api/synthetic/{cached['id']}")["state"] == "done"
    assert client.json("/api/synthetic?layer=conv3&channel=7&steps=96")["state"] == "done"
    assert server.app.synthetic.optimisations == calls + 1
    # other settings are another image
    assert client.json("/api/synthetic?layer=conv3&channel=7&steps=96&seed=1")["state"] == "none"
    # the model is as it was: parameters, buffers, mode, hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_synthetic_refuses_bad_requests_with_one_line(setup):
    _, client, _, _ = setup
    body = lambda d: json.dumps(d).encode()  # noqa: E731
    for data, status, word in (({"layer": "conv3", "channel": 128}, 400, "0..127"),
                               ({"layer": "conv9", "channel": 0}, 404, "conv9"),
                               ({"layer": "conv3"}, 400, "missing parameter 'channel'"),
                               ({"layer": "conv3", "channel": 0, "steps": 0}, 400, "steps"),
                               ({"layer": "conv3", "channel": 0, "steps": 10**6}, 400, "steps"),
                               ({"layer": "conv3", "channel": 0, "param": "cppn"}, 400, "fourier"),
                               ({"layer": "conv3", "channel": True}, 400, "integer")):
        client.error("POST", "/api/synthetic", status, word, body=body(data))
    client.error("POST", "/api/synthetic", 400, "not JSON", body=b"{")
    client.error("GET", "/api/synthetic/nosuchjob", 404, "nosuchjob")
    client.error("GET", "/api/synthetic?layer=conv3&channel=x", 400, "channel")
    # the security checks apply: no token, or the cookie from another site's page
    client.error("POST", "/api/synthetic", 403, "token", body=body({"layer": "conv3", "channel": 0}), token=None)
    cookie = f"zfvis-token-{client.port}={client.token}"
    client.error("POST", "/api/synthetic", 403, body=body({"layer": "conv3", "channel": 0}), token=None,
                 headers={"Cookie": cookie, "Origin": "http://evil.example", "Content-Type": "application/json"})


def test_synthetic_jobs_are_bounded_and_cancelled_on_shutdown():
    torch.set_num_threads(1)
    model, preprocess = zfvis.load_model("zfnet-cifar10")
    server = zfvis.serve(model, preprocess)
    client = Client(server)
    server.app.synthetic.limits = SyntheticLimits(queued=1)
    long = post(client, "/api/synthetic", {"layer": "conv5", "channel": 0, "steps": 1024}, 202)
    waiting = post(client, "/api/synthetic", {"layer": "conv5", "channel": 1, "steps": 1024}, 202)
    msg = client.error("POST", "/api/synthetic", 429, "waiting", body=json.dumps({"layer": "conv5", "channel": 2}).encode())
    assert "wait" in msg
    end = time.monotonic() + 20
    while client.json(f"/api/synthetic/{long['id']}")["done"] == 0:
        assert time.monotonic() < end
        time.sleep(0.05)
    t = time.monotonic()
    server.close()
    assert time.monotonic() - t < 5 and server.unfinished == 0
    jobs = server.app.synthetic
    assert jobs.get(long["id"]).state == "cancelled" and 0 < jobs.get(long["id"]).done < 1024
    assert jobs.get(waiting["id"]).state == "cancelled" and jobs.get(waiting["id"]).done == 0
    assert jobs.optimisations == 1


def test_a_model_that_cannot_be_copied_is_optimised_under_the_lock(monkeypatch):
    import zfvis.explorer.synthetic_jobs as sj
    from zfvis.explorer.explorer import Explorer

    def refuse(model):
        raise TypeError("cannot pickle this module")

    monkeypatch.setattr(sj, "twin", refuse)
    model, preprocess = zfvis.load_model("zfnet-cifar10")
    ex = Explorer(model, preprocess, [zfvis.default_image()])
    jobs = sj.SyntheticJobs(ex)
    job = jobs.start({"layer": "conv2", "channel": 3, "steps": 8})
    end = time.monotonic() + 30
    while job.state in ("queued", "running"):
        assert time.monotonic() < end
        time.sleep(0.02)
    assert job.state == "done" and job.done == 8 and jobs._twin is ex.dn
    assert not any(m._forward_hooks for m in model.modules()) and not model.training
    jobs.close()


def test_twin_shares_weights_but_not_modules():
    model, _ = zfvis.load_model("zfnet-cifar10")
    copy = twin(model)
    assert copy is not model
    assert all(a is b for a, b in zip(model.parameters(), copy.parameters(), strict=True))
    assert all(a is b for a, b in zip(model.buffers(), copy.buffers(), strict=True))
    copy.train()
    copy.features[0].register_forward_hook(lambda *a: None)
    assert not model.training and not model.features[0]._forward_hooks


def test_connections_add_up_and_name_the_layer_below(setup):
    server, client, model, _ = setup
    image = server.explorer.images.all()[0]
    rng = np.random.default_rng(0)
    for layer, below, n_in in (("conv2", "conv1", 32), ("conv3", "conv2", 64), ("conv5", "conv4", 128)):
        for channel in rng.choice(64, 3, replace=False).tolist():
            d = client.json(f"/api/connections?image={image.id}&layer={layer}&channel={channel}")
            assert d["supported"] and d["below"] == below and d["inputs"] == n_in
            # the contributions of the units below, with the bias, are the unit's pre-activation
            assert d["contribution_sum"] + d["bias"] == pytest.approx(d["preactivation"], abs=1e-4)
            ref = zfvis.connections(model, layer, channel, images=image.x[None])
            assert tuple(d["position"]) == ref.position
            assert [e["channel"] for e in d["by_contribution"]] == [c for c, _ in ref.top(8)]
            assert [e["channel"] for e in d["by_weight"]] == [c for c, _ in ref.top(8, by="weight")]
            for key in ("by_weight", "by_contribution"):
                values = [e["value"] for e in d[key]]
                assert values == sorted(values, reverse=True) and len(values) == 8
    # a clicked position; a thumbnail is the map of the channel below on this image
    d = client.json(f"/api/connections?image={image.id}&layer=conv3&channel=3&y=1&x=6&k=3")
    assert d["position"] == [1, 6] and len(d["by_weight"]) == 3
    thumb = d["by_contribution"][0]
    code, headers, body = client.get(thumb["map"])
    assert code == 200 and headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(body)).size == (16, 16)  # conv2 (before its pooling) on a 32x32 input


def test_connections_that_cannot_be_shown_say_why(setup):
    server, client, _, _ = setup
    image = server.explorer.images.all()[0].id
    for layer, word in (("conv1", "input image"), ("fc6", "Linear"), ("pool2", "MaxPool2d")):
        d = client.json(f"/api/connections?image={image}&layer={layer}&channel=0")
        assert d["supported"] is False and word in d["reason"] and "\n" not in d["reason"]
    client.error("GET", f"/api/connections?image={image}&layer=conv3&channel=999", 400, "out of range")
    client.error("GET", f"/api/connections?image={image}&layer=conv3&channel=0&y=8&x=0", 400, "outside")
    client.error("GET", f"/api/connections?image={image}&layer=conv3&channel=0&k=0", 400, "k")
    client.error("GET", "/api/connections?image=nope&layer=conv3&channel=0", 404, "nope")


def test_camera_frames_are_kept_apart_from_uploads(setup):
    server, client, _, _ = setup
    store = server.explorer.images
    mine = client.json("/api/images?name=mine.png", 201, method="POST", body=png_bytes(seed=5))
    count = store.live_frames
    frames = []
    for s in range(6):
        frames.append(client.json("/api/images?live=1&name=camera", 201, method="POST", body=png_bytes(seed=s)))
        if s == 0:  # its maps cached now, forgotten with it later
            client.json(f"/api/maps?image={frames[0]['id']}&layer=conv1")
            assert any(key[0] == frames[0]["id"] for key in server.explorer.grids._data)
    assert store.live_frames == count + 6
    assert all(f["source"] == "camera" for f in frames)
    listed = [e["id"] for e in client.json("/api/images")["images"]]
    assert mine["id"] in listed and not any(f["id"] in listed for f in frames)
    # the last four frames are kept, the older ones forgotten with their cached maps; uploads stay
    for f in frames[:2]:
        client.error("GET", f"/api/maps?image={f['id']}&layer=conv1", 404, f["id"])
    for f in frames[2:]:
        assert client.json(f"/api/maps?image={f['id']}&layer=conv1")["channels"] == 32
    assert not any(key[0] == frames[0]["id"] for key in server.explorer.grids._data)
    assert client.get(f"/api/images/{mine['id']}.png")[0] == 200
    client.error("POST", "/api/images?live=yes", 400, "live", body=png_bytes())
