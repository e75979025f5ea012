"""Benchmark: is `zfvis serve` fast enough to feel live? (VGG16, random weights, 224x224, CPU)

In one run, back to back, against an explorer served in this process over HTTP on 127.0.0.1:

* clicks: ``--clicks`` channels of conv5_3, each first projected directly
  (``Deconvnet.select`` + ``reverse`` + ``full()``, what ``Deconvnet.project`` does after
  its forward pass, on a recording made once: a warm recording), then clicked on the
  server (``GET /api/project.png``, from request to the PNG received; the server's
  recording is warm too). The server's own overhead per click is the click's time minus
  the direct projection's. p50 and p95.
  The same clicks again are answered from the cache: the server's own work per request
  (HTTP, parsing, checks, lookup), without the model.
* concurrency: ``--concurrent`` clients (8), each on its own keep-alive connection, at
  once: ``--per-client`` new clicks each (channels not clicked before: the model runs,
  one call at a time), then as many cached ones (the server's own work under load).
  p50 and p95 of each request's latency.
* grids: ``--images`` new images (uploaded first, not timed); for each, a layer's map grid
  (``GET /api/maps`` then ``GET /api/maps.png``, the forward pass included) against a
  forward pass to that layer plus encoding the same sprite directly.

    python scripts/bench_serve.py [--threads 2] [--clicks 50] [--images 7] [--layers conv5_3,conv3_3]
                                  [--concurrent 8] [--per-client 4]

``--model`` and ``--click-layer`` run it on another zoo model (random weights; the smoke test
uses ``zfnet-cifar10`` at tiny counts).
"""

from __future__ import annotations

import argparse
import http.client
import io
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import zfvis  # noqa: E402
from zfvis.explorer import encode  # noqa: E402
from zfvis.io.progress import progress  # noqa: E402


def p(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``."""
    return float(np.quantile(np.asarray(values), q))


class Http:
    """One keep-alive connection to the explorer, as a browser tab keeps one."""

    def __init__(self, server: zfvis.ExplorerServer) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        self.headers = {"X-Zfvis-Token": server.token or ""}

    def get(self, path: str) -> bytes:
        """GET ``path``; its body."""
        self.conn.request("GET", path, headers=self.headers)
        r = self.conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {body[:200]!r}")
        return body

    def post(self, path: str, body: bytes) -> bytes:
        """POST ``body`` to ``path``; the answer's body."""
        self.conn.request("POST", path, body=body, headers=self.headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status >= 300:
            raise RuntimeError(f"{path}: {r.status} {data[:200]!r}")
        return data


def bench_clicks(server: zfvis.ExplorerServer, dn: zfvis.Deconvnet, x: torch.Tensor, clicks: int,
                 layer: str = "conv5_3") -> dict[str, list[float]]:
    """Per click: the direct projection on a warm recording, then the same click served."""
    http = Http(server)
    http.get(f"/api/maps?image=chelsea&layer={layer}")  # the page loads the grid first: the server records once
    rec = dn.record(x, layer)
    out: dict[str, list[float]] = {"direct": [], "click": [], "overhead": [], "cached": []}
    with progress(2 * clicks + 1, f"clicks on {layer}", "click") as bar:
        _clicks(http, dn, rec, layer, clicks, out, bar)
    return out


def _clicks(http: Http, dn: zfvis.Deconvnet, rec: zfvis.Recording, layer: str, clicks: int,
            out: dict[str, list[float]], bar: object) -> None:  # fmt: skip
    for c in range(clicks + 1):
        bar.update()  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        seeds = dn.select(rec, c)
        dn.reverse(rec, seeds).full()
        t1 = time.perf_counter()
        png = http.get(f"/api/project.png?image=chelsea&layer={layer}&channel={c}")
        t2 = time.perf_counter()
        Image.open(io.BytesIO(png)).verify()
        if c == 0:
            continue  # warm-up
        out["direct"].append(t1 - t0)
        out["click"].append(t2 - t1)
        out["overhead"].append((t2 - t1) - (t1 - t0))
    for c in range(1, clicks + 1):  # the same clicks again: served from the cache, the server's work alone
        bar.update()  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        http.get(f"/api/project.png?image=chelsea&layer={layer}&channel={c}")
        out["cached"].append(time.perf_counter() - t0)


def bench_concurrent(server: zfvis.ExplorerServer, layer: str, clients: int, per_client: int,
                     first_channel: int, channels: int) -> dict[str, list[float]]:
    """``clients`` at once, each ``per_client`` new clicks then the same clicks again (cached)."""
    out: dict[str, list[float]] = {"new": [], "cached": []}
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(k: int) -> None:
        http = Http(server)
        mine = [(first_channel + k * per_client + i) % channels for i in range(per_client)]
        start.wait()
        for kind in ("new", "cached"):
            for c in mine:
                t0 = time.perf_counter()
                http.get(f"/api/project.png?image=chelsea&layer={layer}&channel={c}")
                with lock:
                    out[kind].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def bench_grids(server: zfvis.ExplorerServer, dn: zfvis.Deconvnet, layers: list[str], images: int) -> dict[str, list[float]]:
    """Per new image and layer: the served grid against a forward pass plus encoding."""
    http = Http(server)
    rng = np.random.default_rng(0)
    ids = []
    for _ in range(images + 1):
        buf = io.BytesIO()
        Image.fromarray((rng.random((256, 256, 3)) * 255).astype("uint8")).save(buf, format="PNG")
        ids.append(__import__("json").loads(http.post("/api/images", buf.getvalue()))["id"])
    out: dict[str, list[float]] = {}
    for n, image_id in enumerate(ids):
        x = server.explorer.images.get(image_id).x[None]
        for layer in layers:
            t0 = time.perf_counter()
            maps = dn.output(x, layer)[0]
            encode.sprite(maps)
            t1 = time.perf_counter()
            http.get(f"/api/maps?image={image_id}&layer={layer}")
            http.get(f"/api/maps.png?image={image_id}&layer={layer}")
            t2 = time.perf_counter()
            if n == 0:
                continue  # warm-up
            out.setdefault(f"{layer} direct", []).append(t1 - t0)
            out.setdefault(f"{layer} grid", []).append(t2 - t1)
    return out


def main(argv: list[str] | None = None) -> int:
    """Runs both benchmarks and prints the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--clicks", type=int, default=50, help="clicks on maps timed (default 50)")
    ap.add_argument("--images", type=int, default=7, help="new images whose map grid is timed (default 7)")
    ap.add_argument("--layers", default="conv5_3,conv3_3", help="layers whose map grid is timed (default conv5_3,conv3_3)")
    ap.add_argument("--model", default="vgg16", help="zoo model, with random weights (default vgg16)")
    ap.add_argument("--click-layer", default="conv5_3", help="layer whose maps are clicked (default conv5_3)")
    ap.add_argument("--concurrent", type=int, default=8, help="clients at once for the latency rows (default 8)")
    ap.add_argument("--per-client", type=int, default=4, help="requests per concurrent client (default 4)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, preprocess = zfvis.load_model(args.model, weights="random")
    x = preprocess(zfvis.load_image(zfvis.default_image()))[None]
    dn = zfvis.Deconvnet(model)
    with zfvis.serve(model, preprocess, images=[zfvis.default_image()], name=args.model) as server:
        clicks = bench_clicks(server, dn, x, args.clicks, args.click_layer)
        channels = server.explorer.layer(args.click_layer).shape[0]
        crowd = bench_concurrent(server, args.click_layer, args.concurrent, args.per_client, args.clicks + 1, channels)
        grids = bench_grids(server, dn, args.layers.split(","), args.images)
    ms = lambda v: f"{1000 * v:7.1f} ms"  # noqa: E731
    print(f"{args.model} (random weights), {tuple(x.shape[1:])}, CPU, {args.threads} threads, torch {torch.__version__}")
    print(f"\nclick on a {args.click_layer} map, {args.clicks} clicks:        p50        p95")
    for k, label in (("direct", "Deconvnet projection, warm recording"), ("click", "request to PNG received"),
                     ("overhead", "click minus projection"), ("cached", "the same click again (cached)")):
        print(f"  {label:38s} {ms(p(clicks[k], 0.5))} {ms(p(clicks[k], 0.95))}")
    ratio = [c / d for c, d in zip(clicks["click"], clicks["direct"])]
    print(f"  click / projection: p50 of ratios {statistics.median(ratio):.3f}; "
          f"p50/p50 {p(clicks['click'], .5) / p(clicks['direct'], .5):.3f}; p95/p95 "
          f"{p(clicks['click'], .95) / p(clicks['direct'], .95):.3f}   (goal <= 1.15)")
    print(f"\n{args.concurrent} clients at once, {args.per_client} clicks each:      p50        p95")
    print(f"  {'a new click (the model, one call at a time)':38s} {ms(p(crowd['new'], .5))} {ms(p(crowd['new'], .95))}")
    print(f"  {'the same click again (cached)':38s} {ms(p(crowd['cached'], .5))} {ms(p(crowd['cached'], .95))}")
    print(f"\nmap grid of a new image, {args.images} images:          p50        p95   grid / (forward + encoding)")
    for layer in args.layers.split(","):
        d, g = grids[f"{layer} direct"], grids[f"{layer} grid"]
        r = statistics.median([a / b for a, b in zip(g, d)])
        print(f"  {layer:8s} forward + encoding         {ms(p(d, .5))} {ms(p(d, .95))}")
        print(f"  {layer:8s} served grid                {ms(p(g, .5))} {ms(p(g, .95))}   {r:.3f} (goal <= 1.2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
