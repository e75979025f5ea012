"""The explorer in a real browser (headless Chromium driven by selenium), as a person uses
it: pick a layer, click a map and a point, switch rules, upload, go back and forward.

Each step is screenshotted to /tmp/serve-shots/. Without Chromium these tests skip, except
under CI (``CI`` set), where a missing browser fails them.
"""

from __future__ import annotations

import io
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import chrome, make_run, png_bytes

import zfvis

SHOTS = Path("/tmp/serve-shots")


@pytest.fixture(scope="module")
def driver():
    d = chrome("--window-size=1400,1000")
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(2)
    model, preprocess = zfvis.load_model("zfnet-cifar10")
    run = make_run(tmp_path_factory.mktemp("mine"), model, preprocess)
    server = zfvis.serve(model, preprocess, runs=[run], name="zfnet-cifar10",
                         classes=["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    yield server, zfvis.Deconvnet(model), preprocess
    server.close()


def settle(d, timeout: float = 30) -> None:
    """Waits until the page has drawn its current view (every image loaded)."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        state = d.execute_script(
            "return [document.body.dataset.ready || null, "
            "[...document.images].filter(i => i.getAttribute('src') && !i.complete).length, location.href]")
        if state[0] is not None and state[1] == 0 and state == last:
            return
        last = state
        time.sleep(0.15)
    raise AssertionError(f"the page did not settle: {last}")


def view(d) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(d.current_url).query).items() if k != "token"}


def shot(d, name: str) -> None:
    d.save_screenshot(str(SHOTS / f"{name}.png"))


def shown_projections(d, token: str) -> list[tuple[dict[str, str], np.ndarray]]:
    """Each projection the page shows, with the .npy it used (fetched as the page did)."""
    out = []
    for img in d.find_elements("css selector", "img.projection"):
        url = urllib.parse.urljoin(d.current_url, img.get_attribute("data-npy"))
        with urllib.request.urlopen(url, timeout=30) as r:
            arr = np.load(io.BytesIO(r.read()), allow_pickle=False)
        attrs = {k: img.get_attribute(f"data-{k}") for k in ("rule", "channel", "layer", "position", "value")}
        out.append((attrs, arr))
    return out


def check(d, token: str, dn, x: torch.Tensor, layer: str, channel: int, position=None, rules=("deconvnet",)):
    shown = shown_projections(d, token)
    assert [a["rule"] for a, _ in shown] == list(rules)
    for attrs, arr in shown:
        assert attrs["layer"] == layer and int(attrs["channel"]) == channel
        expected = dn.project(x, layer, channel=channel, position=position, rule=attrs["rule"])[0].numpy()
        np.testing.assert_allclose(arr, expected, rtol=1e-5, atol=1e-7)
        assert np.abs(expected).max() > 0  # a projection to see, not a blank one
        if position is not None:
            assert attrs["position"] == f"{position[0]},{position[1]}"


def test_a_person_explores(driver, setup):
    d = driver
    server, dn, preprocess = setup
    x = preprocess(zfvis.load_image(zfvis.default_image()))[None]
    d.get(server.url + "&layer=conv3")
    settle(d)
    shot(d, "01_layer")
    assert d.find_element("css selector", "#layers li.on").get_attribute("data-layer") == "conv3"
    assert len(d.find_elements("css selector", "#maps .tile")) == 128
    assert "128 feature maps of 8×8" in d.find_element("id", "maps-title").text

    # a layer from the list
    d.find_element("css selector", '#layers li[data-layer="conv2"]').click()
    settle(d)
    assert view(d)["layer"] == "conv2" and len(d.find_elements("css selector", "#maps .tile")) == 64
    d.find_element("css selector", '#layers li[data-layer="conv3"]').click()
    settle(d)

    # click a map: its strongest activation, projected, with the receptive field drawn
    d.find_element("css selector", '#maps .tile[data-channel="5"]').click()
    settle(d)
    shot(d, "02_map_clicked")
    assert view(d)["channel"] == "5"
    check(d, server.token, dn, x, "conv3", 5)
    assert d.find_element("id", "rf-box").is_displayed() and d.find_element("id", "map-image").is_displayed()
    assert "channel 5" in d.find_element("id", "unit-title").text

    # click a point of the enlarged map: (y, x) = (4, 3) of 8x8, beside the strongest (4, 2)
    frame = d.find_element("id", "map-frame")
    size = frame.size["width"]
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(d).move_to_element_with_offset(frame, int((3.5 / 8 - 0.5) * size), int((4.5 / 8 - 0.5) * size)).click().perform()
    settle(d)
    shot(d, "03_point_clicked")
    assert (view(d)["y"], view(d)["x"]) == ("4", "3")
    check(d, server.token, dn, x, "conv3", 5, position=(4, 3))

    # the rules
    d.find_element("css selector", '.rules button[data-rule="guided"]').click()
    settle(d)
    assert view(d)["rule"] == "guided"
    check(d, server.token, dn, x, "conv3", 5, position=(4, 3), rules=("guided",))
    d.find_element("css selector", '.rules button[data-rule="all"]').click()
    settle(d)
    shot(d, "04_all_rules")
    check(d, server.token, dn, x, "conv3", 5, position=(4, 3), rules=("deconvnet", "guided", "gradient"))

    # back and forward restore views
    d.back()
    settle(d)
    assert view(d)["rule"] == "guided"
    check(d, server.token, dn, x, "conv3", 5, position=(4, 3), rules=("guided",))
    d.back()
    d.back()
    settle(d)
    assert view(d)["channel"] == "5" and "y" not in view(d) and view(d)["rule"] == "deconvnet"
    check(d, server.token, dn, x, "conv3", 5)
    d.forward()
    settle(d)
    assert (view(d)["y"], view(d)["x"]) == ("4", "3")
    check(d, server.token, dn, x, "conv3", 5, position=(4, 3))

    # keyboard: right = the next map as sorted (strongest first), down = the next named layer, same channel
    maxima = dn.output(x, "conv3")[0].flatten(1).amax(1)
    order = sorted(range(128), key=lambda c: (-float(maxima[c]), c))
    after = order[order.index(5) + 1]
    d.find_element("tag name", "body").send_keys("\ue014")  # ArrowRight
    settle(d)
    assert view(d)["channel"] == str(after) and "y" not in view(d)
    check(d, server.token, dn, x, "conv3", after)
    d.find_element("tag name", "body").send_keys("\ue015")  # ArrowDown
    settle(d)
    assert view(d)["layer"] == "conv4" and view(d)["channel"] == str(after)  # a named layer, not a ReLU node
    d.find_element("tag name", "body").send_keys("\ue013")  # ArrowUp
    settle(d)
    assert view(d)["layer"] == "conv3" and view(d)["channel"] == str(after)

    # a pasted link restores its view in a fresh page
    link = server.url + "&image=grace_hopper_face&layer=conv2&channel=9&y=4&x=4&rule=gradient"
    d.get(link)
    settle(d)
    xg = preprocess(zfvis.load_image(zfvis.default_image().parent / "grace_hopper_face.jpg"))[None]
    check(d, server.token, dn, xg, "conv2", 9, position=(4, 4), rules=("gradient",))
    assert d.find_element("css selector", ".images .img.on").get_attribute("data-image") == "grace_hopper_face"


def test_sort_top9_upload_and_occlusion(driver, setup, tmp_path):
    d = driver
    server, dn, preprocess = setup
    d.get(server.url + "&layer=conv3&channel=3")
    settle(d)
    shot(d, "05_top9")
    assert len(d.find_elements("css selector", "#top9 .pair")) == 9
    assert "/runs/0/layers/conv3/c0003.html" in d.find_element("css selector", "#top9 h3 a").get_attribute("href")

    # sort by strongest: the first map is the one with the largest maximum
    from selenium.webdriver.support.ui import Select

    Select(d.find_element("id", "sort")).select_by_value("strongest")
    settle(d)
    maxima = dn.output(preprocess(zfvis.load_image(zfvis.default_image()))[None], "conv3")[0].flatten(1).amax(1)
    first = d.find_element("css selector", "#maps .tile").get_attribute("data-channel")
    assert int(first) == int(maxima.argmax())

    # upload an image: it becomes the current image, and its projections are its own
    path = tmp_path / "upload.png"
    path.write_bytes(png_bytes((60, 45), seed=7))
    d.find_element("id", "upload-input").send_keys(str(path))
    for _ in range(100):
        if view(d).get("image", "").startswith("upload-"):
            break
        time.sleep(0.1)
    settle(d)
    assert view(d)["image"].startswith("upload-")
    d.find_element("css selector", '#maps .tile[data-channel="11"]').click()
    settle(d)
    shot(d, "06_uploaded")
    xu = preprocess(Image.open(path).convert("RGB"))[None]
    check(d, server.token, dn, xu, "conv3", 11)

    # occlusion, with progress, for the chosen unit
    d.find_element("css selector", "#occlusion-panel summary").click()
    d.find_element("id", "occ-run").click()
    for _ in range(300):
        if len(d.find_elements("css selector", "#occ-result canvas")) == 2:
            break
        time.sleep(0.1)
    d.execute_script("document.getElementById('occ-result').scrollIntoView()")
    shot(d, "07_occlusion")
    assert len(d.find_elements("css selector", "#occ-result canvas")) == 2
    assert len(d.find_elements("css selector", "#occ-result .frame img")) == 2  # drawn over the image
    assert len(d.find_elements("css selector", "#occ-result .colorbar")) == 2
    assert "positions in" in d.find_element("id", "occ-status").text
    assert not d.find_element("id", "error").is_displayed()


def test_output_units_and_links_with_unknown_names(driver, setup):
    d = driver
    server, dn, preprocess = setup
    d.set_window_size(1400, 1000)
    d.get(server.url + "&layer=fc8&channel=3")
    settle(d)
    shot(d, "08_output_units")
    rows = d.find_elements("css selector", "#maps .unitrow")
    assert len(rows) == 10 and not d.find_elements("css selector", "#maps .t")  # no grey squares for classes
    x = preprocess(zfvis.load_image(zfvis.default_image()))[None]
    logits = dn.output(x, "fc8")[0]
    probs = torch.softmax(logits, 0)
    best = int(logits.argmax())
    first = rows[0]  # strongest first: the top class, its name, rank and probability
    assert int(first.get_attribute("data-channel")) == best
    assert "#1" in first.text and setup_classes()[best] in first.text and f"{100 * float(probs[best]):.1f}%" in first.text
    title = d.find_element("id", "unit-title").text
    assert "“cat”" in title and "rank" in title and "probability" in title and " ," not in title
    top5 = d.find_elements("css selector", "#predict li")
    assert [int(li.get_attribute("data-class")) for li in top5] == logits.argsort(descending=True)[:5].tolist()

    # a link naming a layer that does not exist: a visible error, not silently another layer
    d.get(server.url + "&layer=conv9&channel=2")
    settle(d)
    error = d.find_element("id", "error")
    assert error.is_displayed() and "no layer 'conv9'" in error.text
    d.get(server.url + "&layer=conv3&channel=500")
    settle(d)
    assert "channel 500 is out of range" in d.find_element("id", "error").text


def setup_classes() -> list[str]:
    return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
