"""The explorer's addresses: the page, its assets, the HTTP API and the runs' files.

The API (all JSON unless said; errors are ``{"error": ..., "status": ...}``; who may call
it: :mod:`zfvis.explorer.security`; docs/reference/http-api.md has it all):

=======  ===============================  ===============================================
GET      /api/info                        model, input shape, rules, images, runs, classes
GET      /api/layers                      every layer in graph order: name, node, kind,
                                          output shape, receptive field
GET      /api/images                      the images
POST     /api/images[?live=1]             upload an image (the body: JPEG, PNG or WebP);
                                          live=1: a camera frame (kept apart, the last 4)
GET      /api/images/<id>.png             the model's input as a person sees it
GET      /api/maps?image&layer            the layer's maps: each channel's maximum and
                                          its position, the sprite's layout
GET      /api/maps.png?image&layer        the sprite: every map's thumbnail, grey
GET      /api/map.png?image&layer&channel one map at its own size
GET      /api/project?image&layer&channel[&y&x][&rule]
                                          a projection: value, position, box, its PNG
                                          and .npy addresses
GET      /api/project.png?...             the projection as a PNG (headers X-Zfvis-Value,
                                          X-Zfvis-Position, X-Zfvis-Box)
GET      /api/project.npy?...             the projection, float32 (C, H, W)
GET      /api/predict?image               the image's top 5 outputs: rank, class,
                                          softmax probability, score
GET      /api/units?layer&channel         each run's top activations of the unit
GET      /api/runs                        the mining runs
POST     /api/occlusion                   start occlusion: {image, layer, channel,
                                          target, patch, stride}
GET      /api/occlusion/<id>              its progress, then its maps
POST     /api/synthetic                   start a unit's synthetic image: {layer, channel,
                                          steps, seed, param} (at once if cached)
GET      /api/synthetic?layer&channel...  what is known of it, starting nothing
GET      /api/synthetic/<id>              a job's progress, then its result
GET      /api/synthetic.png?layer&channel...  the image (once computed)
GET      /api/connections?image&layer&channel[&y&x][&k]
                                          the unit's top inputs from the layer below, by
                                          weight and by contribution on the image
GET      /runs/<n>/<path>                 a run's files (its gallery)
GET      /, /static/<file>, /favicon.ico  the page
=======  ===============================  ===============================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import urlencode, urlsplit

from .._version import __version__
from . import encode
from .errors import ApiError, BadRequest, NotFound
from .explorer import RULES, Explorer, check_rule
from .handler import Request, Response, json_response
from .occlusion_jobs import OcclusionJobs
from .runs import CONTENT_TYPES, RunSet, resolve_inside
from .security import Guard
from .synthetic_jobs import SyntheticJobs
from .unit_links import TOP, unit_links

__all__ = ["App", "STATIC_FILES"]

#: The page's own files, by name, with their content types.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self' 'unsafe-inline'; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'")
_RUN_CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self'; script-src 'none'; object-src 'none'"
_JSON_LIMIT = 64 << 10
_INT = re.compile(r"-?[0-9]{1,9}", re.ASCII)


def _int(query: dict[str, str], name: str) -> int:
    text = query.get(name)
    if text is None or text == "":
        raise BadRequest(f"missing parameter '{name}'")
    if not _INT.fullmatch(text):
        raise BadRequest(f"'{name}' must be an integer, got {text[:40]!r}")
    return int(text)


def _position(query: dict[str, str]) -> tuple[int, int] | None:
    if query.get("y", "") == "" and query.get("x", "") == "":
        return None
    return _int(query, "y"), _int(query, "x")


class App:
    """Routes requests to the explorer.

    Args:
        explorer: The model side.
        runs: The mining runs.
        guard: The Host and token checks.
        jobs: The occlusion jobs.
        name: The model's name for the page.
        classes: The model's class names, if known.
        synthetic: The synthetic-image jobs (default: new ones for ``explorer``).
    """

    def __init__(self, explorer: Explorer, runs: RunSet, guard: Guard, jobs: OcclusionJobs, *, name: str,
                 classes: list[str] | None = None, synthetic: SyntheticJobs | None = None) -> None:  # fmt: skip
        self.ex = explorer
        self.runs = runs
        self.guard = guard
        self.jobs = jobs
        self.synthetic = synthetic or SyntheticJobs(explorer)
        self.name = name
        self.classes = classes
        self.verbose = False
        self._get: dict[str, Callable[[Request], Response]] = {
            "/api/info": self.info, "/api/layers": self.layers, "/api/images": self.image_list,
            "/api/maps": self.maps, "/api/maps.png": self.maps_png, "/api/map.png": self.map_png,
            "/api/project": self.project, "/api/project.png": self.project_png,
            "/api/project.npy": self.project_npy, "/api/units": self.units, "/api/runs": self.run_list,
            "/api/predict": self.predict, "/api/synthetic": self.synthetic_lookup,
            "/api/synthetic.png": self.synthetic_png, "/api/connections": self.connections,
        }

    def body_limit(self, method: str, target: str) -> int:
        """The largest body a request may have (an upload's, a JSON body's, else none)."""
        if method != "POST":
            return 0
        return self.ex.images.max_upload_bytes if urlsplit(target).path == "/api/images" else _JSON_LIMIT

    def route(self, r: Request) -> Response:
        """The response to a request (routes raise :class:`ApiError` to refuse)."""
        path = r.path
        if r.method == "POST":
            if path == "/api/images":
                return self.upload(r)
            if path == "/api/occlusion":
                return json_response(self.jobs.start(r.json()).info(), 202)
            if path == "/api/synthetic":
                job = self.synthetic.start(r.json())
                return json_response(job.info(), 200 if job.state == "done" else 202)
            raise ApiError(405 if path in self._get else 404, f"POST {path} is not part of the API")
        if r.method != "GET":
            raise ApiError(405, f"method {r.method} is not allowed; use GET or POST")
        if path in self._get:
            return self._get[path](r)
        if path == "/" or path == "/index.html":
            return self.static("index.html", r)
        if path == "/favicon.ico":
            return self.static("favicon.svg", r)
        if path.startswith("/static/"):
            return self.static(path[len("/static/"):], r)
        if path.startswith("/api/images/") and path.endswith(".png"):
            return Response(200, self.ex.images.get(path[len("/api/images/"):-4]).png, "image/png")
        if path.startswith("/api/occlusion/"):
            return json_response(self.jobs.get(path[len("/api/occlusion/"):]).info())
        if path.startswith("/api/synthetic/"):
            return json_response(self.synthetic.get(path[len("/api/synthetic/"):]).info())
        if path.startswith("/runs/"):
            return self.run_file(path[len("/runs/"):])
        if path in ("/api/images", "/api/occlusion"):
            raise ApiError(405, f"GET {path} is not allowed; use POST")
        raise NotFound(f"no such address: {path}")

    # ------------------------------------------------------------------ page
    def static(self, name: str, r: Request) -> Response:
        """One of the page's own files (nothing else is served from the package)."""
        if name not in STATIC_FILES:
            raise NotFound(f"no such file: /static/{name}")
        body = (resources.files("zfvis.explorer") / "static" / name).read_bytes()
        headers = {"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-cache"}
        if name == "index.html" and self.guard.token is not None and r.query.get("token"):
            headers["Set-Cookie"] = f"{self.guard.cookie}={self.guard.token}; Path=/; HttpOnly; SameSite=Strict"
        return Response(200, body, STATIC_FILES[name], headers)

    def info(self, r: Request) -> Response:
        """The model, input shape, rules, images, runs and class names."""
        return json_response({"model": self.name, "input": list(self.ex.input_shape()), "rules": list(RULES),
                              "images": [e.info() for e in self.ex.images.all()],
                              "runs": [run.info() for run in self.runs.runs], "classes": self.classes,
                              "version": __version__})

    def layers(self, r: Request) -> Response:
        """Every layer in graph order."""
        return json_response({"input": list(self.ex.input_shape()), "layers": [x.info() for x in self.ex.layers()]})

    def predict(self, r: Request) -> Response:
        """The image's top 5 outputs (class names where known)."""
        image = self.ex.images.get(r.query.get("image", "")).id
        top = self.ex.predict(image)
        out = self.ex.output_layer()
        if top is not None:
            for t in top:
                t["name"] = self.classes[t["class"]] if self.classes and t["class"] < len(self.classes) else None
        return json_response({"image": image, "layer": out.name if out else None, "top": top})

    # ---------------------------------------------------------------- images
    def image_list(self, r: Request) -> Response:
        """The images."""
        return json_response({"images": [e.info() for e in self.ex.images.all()]})

    def upload(self, r: Request) -> Response:
        """Adds an uploaded image; the body is the file."""
        name = r.query.get("name") or r.headers.get("X-Filename") or "upload"
        live = r.query.get("live", "")
        if live not in ("", "0", "1"):
            raise BadRequest(f"'live' must be 0 or 1, got {live[:20]!r}")
        entry = self.ex.images.upload(r.body, name, live=live == "1")
        return json_response(entry.info(), 201)

    # ------------------------------------------------------------------ maps
    def _unit(self, r: Request) -> tuple[str, Any]:
        image = self.ex.images.get(r.query.get("image", "")).id
        return image, self.ex.layer(r.query.get("layer", ""))

    def maps(self, r: Request) -> Response:
        """A layer's maps for an image: maxima, their positions, the sprite's layout."""
        image, layer = self._unit(r)
        grid = self.ex.maps(image, layer, r.query.get("rule") or "deconvnet")
        c, h, w = grid.maps.shape
        return json_response({
            "image": image, "layer": layer.name, "node": layer.node, "shape": list(layer.shape),
            "channels": c, "map_size": [h, w], "vector": grid.argmax is None, "max": grid.maxima,
            "argmax": grid.argmax, "sprite": {"cols": grid.sprite.cols, "tile": list(grid.sprite.tile),
                                              "pool": grid.sprite.pool}})

    def maps_png(self, r: Request) -> Response:
        """The sprite of a layer's maps."""
        image, layer = self._unit(r)
        return Response(200, self.ex.maps(image, layer, r.query.get("rule") or "deconvnet").sprite.png, "image/png")

    def map_png(self, r: Request) -> Response:
        """One feature map at its own size."""
        image, layer = self._unit(r)
        channel = _int(r.query, "channel")
        grid = self.ex.maps(image, layer)
        if not 0 <= channel < grid.maps.shape[0]:
            raise BadRequest(f"channel {channel} is out of range: layer '{layer.name}' has {grid.maps.shape[0]} "
                             f"channels (0..{grid.maps.shape[0] - 1})")
        return Response(200, encode.map_png(grid.maps[channel]), "image/png")

    # ----------------------------------------------------------- projections
    def _projection(self, r: Request) -> tuple[dict[str, Any], Any]:
        image, layer = self._unit(r)
        channel = _int(r.query, "channel")
        rule = check_rule(r.query.get("rule") or "deconvnet")
        position = _position(r.query)
        proj = self.ex.project(image, layer, channel, position, rule)
        meta = {"image": image, "layer": layer.name, "channel": channel, "rule": rule, "value": proj.value,
                "position": None if proj.position is None else list(proj.position), "box": list(proj.box),
                "shape": list(proj.array.shape)}
        return meta, proj

    def project(self, r: Request) -> Response:
        """A projection's value, position, box and the addresses of its PNG and .npy."""
        meta, _ = self._projection(r)
        keys = ("image", "layer", "channel", "rule", "y", "x", "token")
        query = urlencode({k: r.query[k] for k in keys if r.query.get(k, "") != ""})
        meta.update(png=f"/api/project.png?{query}", npy=f"/api/project.npy?{query}")
        return json_response(meta)

    def project_png(self, r: Request) -> Response:
        """The projection as a PNG; its value, position and box in headers."""
        meta, proj = self._projection(r)
        return Response(200, proj.png, "image/png", _meta_headers(meta))

    def project_npy(self, r: Request) -> Response:
        """The projection as a .npy file, float32 (C, H, W)."""
        meta, proj = self._projection(r)
        return Response(200, encode.npy(proj.array), "application/octet-stream",
                        {**_meta_headers(meta), "Content-Disposition": "attachment; filename=projection.npy"})

    # ------------------------------------------------------------- unit views
    def synthetic_lookup(self, r: Request) -> Response:
        """What is known of a unit's synthetic image (cached, being computed, or none), starting nothing."""
        return json_response(self.synthetic.lookup(dict(r.query)).info())

    def synthetic_png(self, r: Request) -> Response:
        """A unit's synthetic image, once computed."""
        return Response(200, self.synthetic.png(dict(r.query)), "image/png")

    def connections(self, r: Request) -> Response:
        """A unit's top inputs from the layer below (or why it has none the explorer can show)."""
        image, layer = self._unit(r)
        k = _int(r.query, "k") if r.query.get("k") else TOP
        return json_response(unit_links(self.ex, image, layer, _int(r.query, "channel"), _position(r.query), k))

    # ------------------------------------------------------------------ runs
    def run_list(self, r: Request) -> Response:
        """The mining runs."""
        return json_response({"runs": [run.info() for run in self.runs.runs]})

    def units(self, r: Request) -> Response:
        """Each run's top activations of a unit."""
        layer = self.ex.layer(r.query.get("layer", ""))
        channel = _int(r.query, "channel")
        if not 0 <= channel < (layer.shape[0] if layer.shape else 0):
            raise BadRequest(f"channel {channel} is out of range: layer '{layer.name}' has {layer.shape[0]} channels")
        return json_response({"layer": layer.name, "channel": channel, "runs": self.runs.units(layer.node, channel)})

    def run_file(self, rest: str) -> Response:
        """A file of a run's folder."""
        index, _, relative = rest.partition("/")
        run = self.runs.get(index)
        path = resolve_inside(run.root, relative)
        return Response(200, path.read_bytes(), CONTENT_TYPES[path.suffix.lower()],
                        {"Content-Security-Policy": _RUN_CSP})


def _meta_headers(meta: dict[str, Any]) -> dict[str, str]:
    pos = meta["position"]
    return {"X-Zfvis-Value": repr(float(meta["value"])), "X-Zfvis-Position": "" if pos is None else f"{pos[0]},{pos[1]}",
            "X-Zfvis-Box": ",".join(str(v) for v in meta["box"]), "X-Zfvis-Meta": json.dumps(meta)}
