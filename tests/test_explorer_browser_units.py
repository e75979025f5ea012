"""The unit views in a real browser (headless Chromium with a fake camera, driven by selenium):
the synthetic image with its progress, the connections walked down, the live camera and its stop.

Screenshots go to /tmp/serve-shots/ (phone 390 px and desktop 1366 px). Without Chromium these
tests skip, except under CI (``CI`` set), where a missing browser fails them.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import torch

import zfvis
from serve_helpers import chrome

SHOTS = Path("/tmp/serve-shots")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# wraps getUserMedia so that the test sees the streams the page opened (and whether their tracks ended)
SPY = """
const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
window.__streams = [];
navigator.mediaDevices.getUserMedia = async (c) => { const s = await real(c); window.__streams.push(s); return s; };
"""


@pytest.fixture(scope="module")
def driver():
    d = chrome("--window-size=1366,900", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(2)
    model, preprocess = zfvis.load_model("zfnet-cifar10")
    server = zfvis.serve(model, preprocess, name="zfnet-cifar10", classes=CLASSES)
    yield server
    server.close()


def wait_for(d, script: str, timeout: float = 30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = d.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}")


def open_unit(d, server, query: str) -> None:
    d.get(server.url + "&" + query)
    wait_for(d, "return document.body.dataset.ready && !document.getElementById('links').hidden && "
                "[...document.images].every(i => !i.getAttribute('src') || i.complete)")


def query(d) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(d.current_url).query).items()}


def test_synthetic_image_and_connections_walk_down(driver, server):
    d = driver
    from selenium.webdriver.common.by import By

    calls = server.app.synthetic.optimisations
    open_unit(d, server, "layer=conv3&channel=5")
    assert d.find_element(By.ID, "synth-image").get_attribute("hidden") is not None
    d.find_element(By.ID, "synth-run").click()
    wait_for(d, "const i = document.getElementById('synth-image'); return !i.hidden && i.complete && i.naturalWidth")
    assert server.app.synthetic.optimisations == calls + 1
    assert "objective" in d.find_element(By.ID, "synth-status").text
    title = d.find_element(By.ID, "links-title").text
    assert "conv3 #5" in title and "conv2" in title
    assert "pre-activation" in d.find_element(By.ID, "links-note").text
    tiles = d.find_elements(By.CSS_SELECTOR, "#links .link-tiles[data-kind=contribution] .link")
    assert len(tiles) == 8
    assert all(d.execute_script("return arguments[0].querySelector('img').naturalWidth", t) == 16 for t in tiles)
    for width, name in ((390, "phone"), (1366, "desktop")):
        d.set_window_size(width, 900)
        time.sleep(0.3)
        d.execute_script("document.getElementById('links').scrollIntoView({block: 'end'})")
        d.save_screenshot(str(SHOTS / f"units-{name}.png"))
    # a unit visited again shows its cached image without a click, and no optimisation runs
    d.find_element(By.CSS_SELECTOR, "#maps .tile[data-channel='6']").click()
    wait_for(d, "return document.getElementById('synth-image').hidden")
    d.back()
    wait_for(d, "const i = document.getElementById('synth-image'); return !i.hidden && i.complete && i.naturalWidth")
    assert "(cached)" in d.find_element(By.ID, "synth-status").text
    assert server.app.synthetic.optimisations == calls + 1
    # walk down: the strongest contributor in conv2, then on to conv1, which says why it has none
    tile = d.find_element(By.CSS_SELECTOR, "#links .link-tiles[data-kind=contribution] .link")
    below = tile.get_attribute("data-channel")
    tile.click()
    wait_for(d, f"return location.search.includes('layer=conv2') && document.getElementById('links-title')"
                f".textContent.includes('conv2 #{below}')")
    assert query(d)["channel"] == below
    d.find_element(By.CSS_SELECTOR, "#links .link-tiles[data-kind=weight] .link").click()
    wait_for(d, "return location.search.includes('layer=conv1') && "
                "document.getElementById('links-note').textContent.includes('input image')")
    assert d.find_element(By.ID, "error").get_attribute("hidden") is not None  # a note, not an error
    assert not d.find_elements(By.CSS_SELECTOR, "#links .link")


def test_live_camera_feeds_the_maps_and_stops(driver, server):
    d = driver
    from selenium.webdriver.common.by import By

    d.set_window_size(1366, 900)
    open_unit(d, server, "layer=conv3&channel=5")
    d.execute_script(SPY)
    store = server.explorer.images
    start = store.live_frames
    d.find_element(By.ID, "camera-start").click()
    wait_for(d, "return document.getElementById('camera-status').textContent.includes('live')", 20)
    n0 = store.live_frames
    values, projected, t_end = set(), set(), time.monotonic() + 2.0
    while time.monotonic() < t_end:  # the maxima shown under the maps, and the projection, follow the picture
        values.add(d.execute_script("return [...document.querySelectorAll('#maps .tile .v')].slice(0, 12)"
                                    ".map(e => e.textContent).join(' ')"))
        projected.add(d.execute_script("const p = document.querySelector('#projections img'); "
                                       "return p ? p.dataset.value + ' ' + p.dataset.position : ''"))
        time.sleep(0.1)
    n1 = store.live_frames
    assert n0 > start and n1 - n0 >= 2, (start, n0, n1)  # a few frames a second arrive
    assert len(values) >= 2 and len(projected - {""}) >= 2, (values, projected)
    assert "camera-" in d.execute_script("return document.getElementById('input-image').src")
    d.save_screenshot(str(SHOTS / "units-camera.png"))
    d.find_element(By.ID, "camera-stop").click()
    ended = d.execute_script("return window.__streams.length === 1 && "
                             "window.__streams[0].getTracks().every(t => t.readyState === 'ended')")
    assert ended, "stopping must release the camera"
    assert d.execute_script("return document.getElementById('camera-video').srcObject") is None
    time.sleep(0.6)  # a frame already being sent may land
    n2 = store.live_frames
    time.sleep(1.5)
    assert store.live_frames == n2, "frames were still sent after stop"
    assert d.find_element(By.ID, "camera-start").is_displayed()
