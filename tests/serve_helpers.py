"""Shared pieces of the explorer's tests: a small mining run, an HTTP client."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import zfvis
from zfvis.mining import mine


def make_run(root: Path, model: Any, preprocess: Any, layers: tuple[str, ...] = ("conv1", "conv3")) -> Path:
    """A small `zfvis mine` run of ``model`` over 12 generated images (channels 0-7)."""
    rng = np.random.default_rng(0)
    data = root / "data" / "x"
    data.mkdir(parents=True)
    for i in range(12):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(data / f"{i:02d}.png")
    out = root / "run"
    mine(model, preprocess, root / "data", list(layers), out_dir=out, top=9, channels=[(0, 7)], progress=False,
         batch_size=12)
    return out


def png_bytes(size: tuple[int, int] = (40, 30), fmt: str = "PNG", seed: int = 1) -> bytes:
    """A random RGB image file's bytes."""
    a = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


class Client:
    """Requests to a running explorer (token added unless ``token=None``)."""

    def __init__(self, server: zfvis.ExplorerServer) -> None:
        self.port = server.port
        self.token = server.token

    def request(self, method: str, path: str, body: bytes | None = None, *, token: str | None | bool = True,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if token is True and self.token:
            path += ("&" if "?" in path else "?") + f"token={self.token}"
        elif isinstance(token, str):
            path += ("&" if "?" in path else "?") + f"token={token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, **kw)

    def json(self, path: str, status: int = 200, **kw: Any) -> Any:
        code, headers, body = self.request(kw.pop("method", "GET"), path, **kw)
        assert code == status, (code, body[:300])
        assert headers["content-type"].startswith("application/json")
        return json.loads(body)

    def error(self, method: str, path: str, status: int, *words: str, **kw: Any) -> str:
        """Asserts a JSON error with ``status`` whose message holds ``words``; returns it."""
        code, headers, body = self.request(method, path, **kw)
        assert code == status, (code, body[:300])
        data = json.loads(body)
        assert data["status"] == status and isinstance(data["error"], str)
        assert "Traceback" not in data["error"] and "\n" not in data["error"]
        for w in words:
            assert w.lower() in data["error"].lower(), (w, data["error"])
        return data["error"]


CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome"))
                 if p), None)
DRIVER = shutil.which("chromedriver")


def chrome(*args: str) -> Any:
    """Headless Chromium under selenium, with ``args`` added; skips where it is missing
    (fails under CI, whose ``.ci/run`` installs it)."""
    missing = [n for n, p in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if p is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        reason = f"no {', '.join(missing)}: `apt-get install chromium chromium-driver` (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run under CI: {reason}")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *args):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    d = webdriver.Chrome(service=Service(DRIVER), options=options)
    d.set_page_load_timeout(60)
    return d
