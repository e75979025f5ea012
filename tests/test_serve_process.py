"""`zfvis serve` as a process: bounded memory under parallel uploads of large images, and
a clean stop (exit 0, no traceback, no abort) with requests and an occlusion in flight."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak RSS in /proc")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def _request(port: int, token: str, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"X-Zfvis-Token": token})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


@pytest.fixture()
def served(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "zfvis", "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        yield proc, int(url.split(":")[2].split("/")[0]), url.split("token=")[1]
    finally:
        proc.kill()
        proc.wait()


def test_parallel_large_uploads_then_sigterm_under_load(served):
    proc, port, token = served
    buf = io.BytesIO()
    Image.new("RGB", (6300, 6300)).save(buf, format="PNG", compress_level=1)  # 40 Mpixels in a small file
    big = buf.getvalue()
    assert len(big) < 1_000_000
    answers: list[tuple[int, dict]] = []

    def upload() -> None:
        code, headers, _ = _request(port, token, "POST", "/api/images?name=big.png", big)
        answers.append((code, headers))

    threads = [threading.Thread(target=upload) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    peak = _peak_rss_mb(proc.pid)
    codes = sorted(c for c, _ in answers)
    assert len(codes) == 8 and 201 in codes and set(codes) <= {201, 503}, codes
    assert all(h.get("Retry-After") == "2" for c, h in answers if c == 503)
    print(f"peak RSS {peak:.0f} MB, answers {codes}")
    assert peak < 2500, f"peak RSS {peak:.0f} MB"

    # about 40 requests in flight and an occlusion job, then SIGTERM
    job = json.dumps({"image": "chelsea", "layer": "conv1", "channel": 0, "patch": 4, "stride": 1}).encode()
    code, _, body = _request(port, token, "POST", "/api/occlusion", job)
    assert code == 202, body
    results: list[object] = []

    def clicks(i: int) -> None:
        for j in range(40):  # until the server stops: new projections (a point of the map each time)
            layer, side = (("conv1", 32), ("conv2", 16), ("conv3", 8))[i % 3]
            path = (f"/api/project.npy?image=chelsea&layer={layer}&channel={(i + j) % 32}&y={j % side}&x={i % side}"
                    f"&rule={('deconvnet', 'guided', 'gradient')[j % 3]}")
            try:
                results.append(_request(port, token, "GET", path)[0])
            except ConnectionRefusedError:
                results.append("refused")  # after the port closed
                return
            except (ConnectionError, OSError, http.client.HTTPException) as err:
                results.append(type(err).__name__)  # an answer lost
                return

    threads = [threading.Thread(target=clicks, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # 40 clients busy, the occlusion running
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - started
    for t in threads:
        t.join(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "terminate called" not in err and "stopped" in err
    assert took < 5, f"took {took:.1f} s to stop"
    answered = [r for r in results if isinstance(r, int)]
    print(f"stopped in {took:.2f} s; {len(answered)} answered, {answered.count(503)} with 503, "
          f"{results.count('refused')} refused, lost {[r for r in results if isinstance(r, str) and r != 'refused']}")
    assert set(answered) <= {200, 503} and 503 in answered, sorted(map(str, results))
    assert len([r for r in results if isinstance(r, str) and r != "refused"]) <= 2  # nothing in flight was dropped
