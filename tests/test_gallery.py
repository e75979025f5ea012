"""Tests for zfvis.mining.gallery: the mining gallery as a static site (model, layer and channel pages)."""

from __future__ import annotations

import functools
import html
import html.parser
import json
import os
import posixpath
import re
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import zfvis
from zfvis.mining import gallery, mine
from zfvis.mining import pages as mining_figures
from zfvis.viz import render, sheets

# VGG16's 13 conv layers: (name, channels, output side at 224x224, receptive field size, jump, offset)
VGG16 = [
    ("conv1_1", 64, 224, 3, 1, -1), ("conv1_2", 64, 224, 5, 1, -2),
    ("conv2_1", 128, 112, 10, 2, -4), ("conv2_2", 128, 112, 14, 2, -6),
    ("conv3_1", 256, 56, 24, 4, -10), ("conv3_2", 256, 56, 32, 4, -14), ("conv3_3", 256, 56, 40, 4, -18),
    ("conv4_1", 512, 28, 60, 8, -26), ("conv4_2", 512, 28, 76, 8, -34), ("conv4_3", 512, 28, 92, 8, -42),
    ("conv5_1", 512, 14, 132, 16, -58), ("conv5_2", 512, 14, 164, 16, -74), ("conv5_3", 512, 14, 196, 16, -90),
]
TOP = 9


class _Refs(html.parser.HTMLParser):
    """Collects every href, src and CSS ``url(...)``, the ids, the tiles cut out of sheets
    (their labels), and whether the page has a script."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()
        self.tiles: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts += 1
        for key, value in attrs:
            if key in ("href", "src") and value is not None:
                self.refs.append(value)
            if key == "style" and value:
                self.refs += re.findall(r"url\('([^']+)'\)", value)
            if key == "id" and value:
                self.ids.add(value)
            assert not key.startswith("on"), f"event handler {key} on <{tag}>"
        if dict(attrs).get("role") == "img":
            self.tiles.append(dict(attrs).get("aria-label") or "")


_REF = re.compile(r"""(?:href|src)="([^"]*)"|url\('([^']+)'\)""")


@functools.lru_cache(maxsize=64)
def _parse(path: Path) -> _Refs:
    parser = _Refs()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def _synthetic_run(out: Path, layers: list[tuple[str, int, int, int, int, int]]) -> tuple[dict, dict, dict]:
    """topk, gallery and layer_info as mining would produce them, with a sheet and a thumbnail
    per channel on disk (hard links to one pair of files per layer, so that building
    4,224 channels is quick)."""
    rng = np.random.default_rng(0)
    topk: dict[str, Any] = {"model": "vgg16 <random>", "weights": "random", "dataset": "/data/imgs & more",
                            "images": 5000, "skipped": [{"image": "bad.jpg", "error": "truncated"}], "top": TOP,
                            "layers": {}}
    site: dict[str, list[dict[str, Any]]] = {}
    info: dict[str, dict[str, Any]] = {}
    for p, (layer, count, side, size, jump, offset) in enumerate(layers):
        tiles = out / "tiles" / gallery.safe_name(layer)
        tiles.mkdir(parents=True)
        h = w = min(size, 224)
        pairs = [tuple(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for _ in range(2))
                 for _ in range(TOP)]
        sheet, thumb = out / f"sheet_{p}.png", out / f"thumb_{p}.png"  # the same tiles serve every channel
        render.save_image(sheets.make_sheet(pairs), sheet)
        render.save_image(sheets.make_thumb(*pairs[0]), thumb)
        figs = [f"{gallery.safe_name(layer)}_p{k + 1}.png" for k in range((count + 63) // 64)]
        for f in figs:
            (out / f).write_bytes(b"png")
        channels, entries_per_channel = [], []
        for ch in range(count):
            entries = [{"image": f"class_{ch % 10}/img <{ch * TOP + r}>.jpg", "index": ch * TOP + r,
                        "value": float(100 - r - ch / 1000), "position": [r % side, (r * 3) % side],
                        "box": [0, 0, min(size, 224), min(size, 224)]} for r in range(TOP)]
            if ch == 5:
                entries = []  # a channel that never fired
            entries_per_channel.append(entries)
            channels.append({"channel": ch, "entries": entries, "figure": figs[ch // 64]})
            if entries:
                os.link(sheet, tiles / sheets.sheet_name(ch))
                os.link(thumb, tiles / sheets.thumb_name(ch))
        topk["layers"][layer] = {"module": f"features.{2 * p}", "channel_count": count,
                                 "channel_ids": list(range(count)), "channels": entries_per_channel}
        site[layer] = channels
        info[layer] = {"shape": [count, side, side],
                       "receptive_field": {"size": [size, size], "jump": [jump, jump], "offset": [offset, offset]}}
    (out / "topk.json").write_text(json.dumps(topk))
    return topk, site, info


def _pages(out: Path) -> Iterator[Path]:
    yield from sorted(out.rglob("*.html"))


def _check_links(out: Path, page: Path, refs: list[str], files: set[str]) -> None:
    """Every reference of ``page`` is a relative path to a file in ``files`` (paths relative to ``out``)."""
    here = os.path.dirname(page.relative_to(out).as_posix())
    for ref in refs:
        parts = urlsplit(ref)
        assert not parts.scheme and not parts.netloc, f"{page}: external link {ref}"
        if not parts.path:  # a fragment on the same page
            continue
        target = _resolve(here, unquote(parts.path))
        assert not target.startswith(".."), f"{page.relative_to(out)}: {ref} leaves the site"
        assert target in files, f"{page.relative_to(out)}: {ref} does not resolve"
        if parts.fragment:
            assert parts.fragment in _parse(out / target).ids, f"{page.relative_to(out)}: {ref}: no such id"


@functools.lru_cache(maxsize=4096)
def _resolve(folder: str, path: str) -> str:
    return posixpath.normpath(posixpath.join(folder, path))


def _files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def vgg_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict, dict, list[Path]]:
    out = tmp_path_factory.mktemp("vgg_site")
    topk, site, info = _synthetic_run(out, VGG16)
    written = gallery.write_site(out, topk, site, layer_info=info)
    return out, topk, site, info, written


def test_every_channel_has_its_address(vgg_site: tuple) -> None:
    out, _, site, _, written = vgg_site
    n_channels = sum(len(v) for v in site.values())
    assert n_channels == 4224
    for layer, channels in site.items():
        for g in channels:
            page = out / gallery.channel_page(layer, g["channel"])
            assert page.is_file(), page
    assert gallery.channel_page("conv3_1", 42) == "layers/conv3_1/c0042.html"
    assert len(written) == 2 + len(site) + n_channels  # index, style, one page per layer, one per channel
    assert all(p.is_file() for p in written) and written[-1] == out / "index.html"


def test_all_links_resolve_and_pages_are_small(vgg_site: tuple) -> None:
    out = vgg_site[0]
    pages = list(_pages(out))
    assert len(pages) == 1 + 13 + 4224
    files = _files(out)
    for k, page in enumerate(pages):
        assert page.stat().st_size < 2_000_000, page
        text = page.read_text(encoding="utf-8")
        refs = [html.unescape(a or b) for a, b in _REF.findall(text)]
        assert "<script" not in text.lower()
        _check_links(out, page, refs, files)
        if page.name == "index.html" or k % 64 == 0:  # html.parser on every index and a sample of channels
            parsed = _Refs()
            parsed.feed(text)
            assert parsed.refs == refs and parsed.scripts == 0


def test_channel_pages_link_back_and_to_neighbours(vgg_site: tuple) -> None:
    out, _, site, _, _ = vgg_site
    for layer, channels in site.items():
        ids = [g["channel"] for g in channels]
        for i in (0, 1, len(ids) // 2, len(ids) - 1):
            page = out / gallery.channel_page(layer, ids[i])
            refs = _parse(page).refs
            assert f"index.html#c{ids[i]:04d}" in refs  # back to the layer, at this channel
            assert "../../index.html" in refs  # the model page
            assert i == 0 or f"c{ids[i - 1]:04d}.html" in refs
            assert i + 1 == len(ids) or f"c{ids[i + 1]:04d}.html" in refs
            assert sum(r.startswith("c") and r.endswith(".html") for r in refs) == (i > 0) + (i + 1 < len(ids))
        layer_page = _parse(out / "layers" / gallery.safe_name(layer) / "index.html")
        assert {f"c{c:04d}.html" for c in ids} <= set(layer_page.refs)
        assert {f"c{c:04d}" for c in ids} <= layer_page.ids
    model = _parse(out / "index.html").refs
    assert {f"layers/{gallery.safe_name(layer)}/index.html" for layer in site} <= set(model)
    assert "topk.json" in model


def test_channel_page_opens_with_nine_pairs_values_and_paths(vgg_site: tuple) -> None:
    out, topk, _, _, _ = vgg_site
    text = (out / gallery.channel_page("conv4_2", 17)).read_text(encoding="utf-8")
    body = text[text.index("<main>") :]
    first_tile = body.index('role="img"')
    assert body.index("<h1>") < first_tile < body.index('class="meta"')  # the tiles come before the details
    parsed = _parse(out / gallery.channel_page("conv4_2", 17))
    assert parsed.tiles == [f"{kind} {r + 1}" for r in range(TOP) for kind in ("projection", "patch")]
    assert {r for r in parsed.refs if "/tiles/" in r} == {"../../tiles/conv4_2/c0017.png"}  # its sheet
    for e in topk["layers"]["conv4_2"]["channels"][17]:
        assert f"{e['value']:.4g}" in text
        assert "img &lt;" in text and "&lt;script" not in text  # image paths are escaped
    empty = (out / gallery.channel_page("conv1_1", 5)).read_text(encoding="utf-8")
    assert "No activations" in empty


def test_model_page_lists_shapes_and_receptive_fields(vgg_site: tuple) -> None:
    out = vgg_site[0]
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "vgg16 &lt;random&gt;" in text and "/data/imgs &amp; more" in text
    assert "512 × 14 × 14" in text and "196 px, jump 16" in text
    assert "4,224 channels" in text
    for layer, *_ in VGG16:
        assert f">{layer}<" in text


def test_layer_pages_split_past_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gallery, "CHANNELS_PER_LAYER_PAGE", 10)
    topk, site, _ = _synthetic_run(tmp_path, [("features.28", 25, 14, 196, 16, -90)])
    gallery.write_site(tmp_path, topk, site, layer_info=None, data_file=None)
    folder = tmp_path / "layers" / "features_28"
    assert sorted(p.name for p in folder.glob("*.html") if not p.name.startswith("c")) == [
        "index.html", "page2.html", "page3.html"]
    back = _parse(tmp_path / gallery.channel_page("features.28", 24)).refs
    assert "page3.html#c0024" in back
    files = _files(tmp_path)
    for page in _pages(tmp_path):
        _check_links(tmp_path, page, _parse(page).refs, files)
    assert "topk.json" not in _parse(tmp_path / "index.html").refs


def test_colliding_layer_names_get_distinct_folders(tmp_path: Path) -> None:
    topk, site, info = _synthetic_run(tmp_path, [("a.b", 3, 8, 5, 1, -2)])
    topk["layers"]["a_b"] = topk["layers"]["a.b"]
    site["a_b"] = site["a.b"]
    gallery.write_site(tmp_path, topk, site, layer_info=info)
    assert (tmp_path / "layers" / "a_b" / "index.html").is_file()
    assert (tmp_path / "layers" / "a_b-2" / "index.html").is_file()
    files = _files(tmp_path)
    for page in _pages(tmp_path):
        _check_links(tmp_path, page, _parse(page).refs, files)


def test_bad_input_raises(tmp_path: Path) -> None:
    topk, site, _ = _synthetic_run(tmp_path, [("conv1", 2, 8, 5, 1, -2)])
    with pytest.raises(ValueError, match="conv9"):
        gallery.write_site(tmp_path, topk, {"conv9": []})
    with pytest.raises(FileNotFoundError):
        gallery.write_site(tmp_path / "missing", topk, site)
    assert not (tmp_path / "missing").exists() and not (tmp_path / "index.html").exists()


# --------------------------------------------------------------------------- a real run


def _small_vgg() -> tuple[nn.Module, list[str]]:
    """A VGG-style chain, random weights: three blocks of 3x3 convolutions and ReLUs, max pools between."""
    torch.manual_seed(0)
    layers: dict[str, nn.Module] = {}
    widths, cin = [(4, 4), (6, 6, 6), (8, 8)], 3
    names = []
    for b, block in enumerate(widths, start=1):
        for i, cout in enumerate(block, start=1):
            layers[f"c{b}_{i}"] = conv = nn.Conv2d(cin, cout, 3, padding=1)
            nn.init.constant_(conv.bias, 0.2)  # every channel fires somewhere in every image
            layers[f"conv{b}_{i}"] = nn.ReLU()
            names.append(f"conv{b}_{i}")
            cin = cout
        layers[f"pool{b}"] = nn.MaxPool2d(2)
    return nn.Sequential(OrderedDict(layers)).eval(), names


@pytest.fixture(scope="module")
def mined_vgg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str], nn.Module]:
    root = tmp_path_factory.mktemp("vgg_run")
    data = root / "data"
    data.mkdir()
    gen = torch.Generator().manual_seed(3)
    for i in range(12):
        Image.fromarray((torch.rand(24, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(
            data / f"img{i:02d}.png")
    model, names = _small_vgg()
    pre = zfvis.Preprocess(None, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    out = root / "site"
    res = mine(model, pre, data, names, out_dir=out, top=TOP, batch_size=6, progress=False)
    assert res.topk is not None
    return out, res.topk, names, model


def test_a_vgg_style_run_over_every_conv_layer_is_a_site(mined_vgg: tuple) -> None:
    out, topk, names, model = mined_vgg
    files = _files(out)
    pages = list(_pages(out))
    channels = sum(len(topk["layers"][n]["channel_ids"]) for n in names)
    assert channels == 4 + 4 + 6 * 3 + 8 + 8 and len(pages) == 1 + len(names) + channels
    for page in pages:
        assert page.stat().st_size < 2_000_000
        parsed = _parse(page)
        assert parsed.scripts == 0
        _check_links(out, page, parsed.refs, files)
    dn = zfvis.Deconvnet(model)
    model_page = (out / "index.html").read_text(encoding="utf-8")
    for name in names:
        c, h, w = dn.output(torch.zeros(1, 3, 24, 24), name).shape[1:]
        rf = dn.receptive_field(name, (3, 24, 24))
        row = model_page[model_page.index(f"<b>{name}</b>") :].split("</tr>")[0]
        assert f"{c} × {h} × {w}" in row and f"{rf.size[0]} px, jump {rf.jump[0]}" in row and f"{c} of {c}" in row
        ids = topk["layers"][name]["channel_ids"]
        layer_page = _parse(out / "layers" / gallery.safe_name(name) / "index.html")
        assert [r for r in layer_page.refs if re.fullmatch(r"c\d{4}\.html", r)] == [f"c{c:04d}.html" for c in ids]
        for i, ch in enumerate(ids):  # every channel: its address, its nine pairs, and the way back
            page = out / gallery.channel_page(name, ch)
            refs = _parse(page).refs
            assert f"index.html#c{ch:04d}" in refs
            tiles = [r for r in refs if "/tiles/" in r]
            assert tiles == [f"../../tiles/{gallery.safe_name(name)}/c{ch:04d}.png"] * (2 * TOP)
            assert _parse(page).tiles == [f"{kind} {r + 1}" for r in range(TOP) for kind in ("projection", "patch")]
            text = page.read_text(encoding="utf-8")
            for e in topk["layers"][name]["channels"][i]:
                assert e["image"] in text and _value_text(e["value"]) in text
            assert (f"c{ids[i - 1]:04d}.html" in refs) == (i > 0)  # previous, but none before the first
            assert (f"c{ids[(i + 1) % len(ids)]:04d}.html" in refs) == (i + 1 < len(ids))  # next


def _value_text(v: float) -> str:
    return f"{v:.4g}"


# --------------------------------------------------------------------------- the Fig. 2 pages from Python


def test_mining_page_is_the_page_mining_wrote(mined_vgg: tuple, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out, topk, names, _ = mined_vgg
    for name in ("conv1_1", "conv3_2"):
        fig = zfvis.mining_page(out, name)
        assert list(tmp_path.iterdir()) == []
        written = np.asarray(Image.open(out / f"{gallery.safe_name(name)}.png").convert("RGB"))
        fig.canvas.draw()
        drawn = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        assert min(e["value"] for c in topk["layers"][name]["channels"] for e in c) > 0  # no all-zero projection
        assert np.array_equal(drawn, written)
        lay = fig._zfvis_layout  # type: ignore[attr-defined]
        assert lay.labels[0].startswith("ch 0   max ") and len(lay.labels) == len(topk["layers"][name]["channel_ids"])
    zfvis.mining_page(out, "conv1_1", page=1, path=tmp_path / "p.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".zfvis-written.json", "p.png"]  # and its ledger entry
    with pytest.raises(zfvis.UserInputError, match="page must be 1..1"):
        zfvis.mining_page(out, "conv1_1", page=2)
    with pytest.raises(zfvis.UserInputError, match="not mined"):
        zfvis.mining_page(out, "conv9")
    with pytest.raises(zfvis.UserInputError, match="topk.json"):
        zfvis.mining_page(tmp_path, "conv1_1")
    monkeypatch.setattr(mining_figures, "PAGE_CHANNELS", 4)  # conv2_1's 6 channels on two pages
    second = zfvis.mining_page(out, "conv2_1", page=2)
    assert [t.split()[1] for t in second._zfvis_layout.labels] == ["4", "5"]  # type: ignore[attr-defined]
    assert "(channels 4-5, page 2 of 2)" in " ".join(second.texts[0].get_text().split())  # the title, wrapped
