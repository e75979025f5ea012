"""The explorer on every screen, in headless Chromium: a phone (390x844), a laptop
(1366x900), a 4K desktop at 2560x1440 and a notebook's IFrame: nothing overflows
sideways, every control can be reached; and a page on another port of 127.0.0.1 cannot
upload into it. Screenshots go to /tmp/serve-shots/ (docs/explorer_*.png come from them).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request
from functools import partial

import pytest
import torch
from serve_helpers import make_run
from test_serve_browser import driver, settle, shot, view  # noqa: F401 - the shared browser fixture

import zfvis

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.set_num_threads(2)
    model, preprocess = zfvis.load_model("zfnet-cifar10")
    run = make_run(tmp_path_factory.mktemp("mine"), model, preprocess)
    s = zfvis.serve(model, preprocess, runs=[run], name="zfnet-cifar10", classes=CLASSES)
    yield s
    s.close()


@pytest.fixture(scope="module")
def other_site(tmp_path_factory):
    """A web server on another port of 127.0.0.1 (a page the person happens to open)."""
    root = tmp_path_factory.mktemp("site")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _fits(d) -> None:
    width, scroll, body, inner = d.execute_script(
        "const e = document.documentElement; return [e.clientWidth, e.scrollWidth, document.body.scrollWidth, "
        "window.innerWidth]")
    assert inner - 20 <= width <= inner  # the viewport, less a vertical scroll bar
    assert scroll == width and body <= width, f"the page is {scroll} px wide in a {width} px viewport"


def _reachable(d, css: str) -> None:
    """The element is shown, has a size, and lies within the page's width."""
    e = d.find_element("css selector", css)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", e)
    assert e.is_displayed(), css
    r = d.execute_script("const r = arguments[0].getBoundingClientRect(); "
                         "return [r.left, r.right, r.width, r.height]", e)
    width = d.execute_script("return document.documentElement.clientWidth")
    assert r[2] > 0 and r[3] > 0 and r[0] >= -1 and r[1] <= width + 1, (css, r, width)


@pytest.mark.parametrize("size", [(360, 740), (390, 844), (1366, 900), (2560, 1440)],
                         ids=["small", "phone", "laptop", "4k"])
def test_every_screen(driver, server, size):
    d = driver
    d.set_window_size(*size)
    inner = d.execute_script("return [window.innerWidth, window.innerHeight]")
    d.set_window_size(size[0] * 2 - inner[0], size[1] * 2 - inner[1])  # the viewport itself at that size
    d.get(server.url + "&layer=conv3&channel=3")
    settle(d)
    assert d.execute_script("return window.innerWidth") == size[0]
    _fits(d)
    shot(d, f"screen_{size[0]}")
    for css in ('.rules button[data-rule="guided"]', "#images .img", "#upload", "#predict li", "#maps .tile",
                "img.projection", "#input-frame", "#map-frame", "#top9 .pair", "#occlusion-panel summary", "#sort"):
        _reachable(d, css)
    top5 = [li.text for li in d.find_elements("css selector", "#predict li")]
    assert len(top5) == 5 and all("%" in t for t in top5)
    phone = size[0] < 700
    assert d.find_element("id", "layers").is_displayed() is not phone  # folded away on a phone
    if phone:
        d.execute_script("document.getElementById('unit-panel').scrollIntoView()")
        shot(d, "screen_390_unit")
        box = {k: d.find_element("css selector", css).rect for k, css in
               (("maps", "#maps-panel"), ("unit", "#unit-panel"), ("image", "#images-panel"))}
        assert box["image"]["y"] < box["maps"]["y"] < box["unit"]["y"]  # stacked
        assert all(abs(b["width"] - box["maps"]["width"]) < 2 for b in box.values())
        d.find_element("id", "layers-toggle").click()
        _reachable(d, '#layers li[data-layer="conv2"]')
        d.find_element("css selector", '#layers li[data-layer="conv2"]').click()
        settle(d)
        assert view(d)["layer"] == "conv2" and not d.find_element("id", "layers").is_displayed()
        _fits(d)
    else:
        _reachable(d, '#layers li[data-layer="conv2"]')
        maps, unit = d.find_element("id", "maps-panel").rect, d.find_element("id", "unit-panel").rect
        assert maps["x"] + maps["width"] <= unit["x"]  # side by side


def test_inside_a_notebook_iframe(driver, server, other_site):
    root, origin = other_site
    (root / "notebook.html").write_text(
        f'<!doctype html><body style="margin:0"><iframe id="f" src="{server.url}&layer=conv3&channel=5" '
        'width="640" height="700" style="border:0"></iframe></body>')
    d = driver
    d.set_window_size(1000, 900)
    d.get(f"{origin.replace('127.0.0.1', 'localhost')}/notebook.html")  # another site: no cookie for the IFrame
    d.switch_to.frame(d.find_element("id", "f"))
    try:
        settle(d)
        _fits(d)
        assert d.execute_script("return window.innerWidth") == 640
        for css in ("#maps .tile", "img.projection", '.rules button[data-rule="all"]', "#predict li"):
            _reachable(d, css)
        shot(d, "screen_iframe")
    finally:
        d.switch_to.default_content()


def test_a_page_on_another_port_cannot_upload(driver, server, other_site):
    root, origin = other_site
    d = driver
    d.set_window_size(1200, 900)
    d.get(server.url)  # the person's own tab: the browser now holds the explorer's cookie
    settle(d)
    before = _images(server)
    target = f"http://127.0.0.1:{server.port}"
    (root / "attack.html").write_text("""<!doctype html><body><script>
      const png = Uint8Array.from(atob("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"), c => c.charCodeAt(0));
      const tries = [];
      for (const mode of ["no-cors", "cors"]) for (const type of ["text/plain", "image/png"])
        tries.push(fetch("%s/api/images", {method: "POST", mode, credentials: "include", body: png,
                                           headers: {"Content-Type": type}}).then(r => r.status, e => "blocked"));
      tries.push(fetch("%s/api/occlusion", {method: "POST", mode: "no-cors", credentials: "include",
        body: JSON.stringify({image: "chelsea", layer: "conv1", channel: 0})}).then(r => r.status, e => "blocked"));
      Promise.all(tries).then(s => { document.body.dataset.done = JSON.stringify(s); });
    </script></body>""" % (target, target))
    d.get(f"{origin}/attack.html")
    for _ in range(100):
        if d.execute_script("return document.body.dataset.done"):
            break
        time.sleep(0.1)
    assert d.execute_script("return document.body.dataset.done"), "the attack page did not finish"
    assert _images(server) == before  # nothing uploaded
    jobs = server.app.jobs
    assert not jobs._jobs, "an occlusion job was started from another page"


def _images(server) -> list[str]:
    with urllib.request.urlopen(server.url.replace("/?", "/api/images?"), timeout=30) as r:
        return [i["id"] for i in json.loads(r.read())["images"]]


def test_a_layer_of_2048_maps(driver):
    """The grid scales: 2,048 maps drawn densely, many in view at once, nothing overflowing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(2048, 10)).eval()
    _, preprocess = zfvis.load_model("zfnet-cifar10")
    with zfvis.serve(model, preprocess, images=[zfvis.default_image()], name="wide") as s:
        d = driver
        d.set_window_size(1366, 900)
        d.get(s.url + "&layer=0&channel=7")
        settle(d)
        _fits(d)
        tiles = d.find_elements("css selector", "#maps .tile")
        assert len(tiles) == 2048 and "dense" in d.find_element("id", "maps").get_attribute("class")
        panel = d.find_element("id", "maps").rect
        in_view = d.execute_script(
            "const p = document.getElementById('maps').getBoundingClientRect();"
            "return [...document.querySelectorAll('#maps .tile')].filter(t => {"
            "const r = t.getBoundingClientRect(); return r.top >= p.top && r.bottom <= p.bottom}).length")
        assert in_view >= 150, (in_view, panel)  # a screenful, not 4 columns of 2,048
        assert d.find_element("css selector", "img.projection").is_displayed()
        shot(d, "screen_2048_maps")
