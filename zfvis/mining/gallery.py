"""The mining gallery as a static site: a model page, a page per layer, a page per channel.

:func:`write_site` turns what ``zfvis mine`` computed (``topk.json`` and the tiles of
pass 2) into a site a person browses, after OpenAI Microscope: every channel has a
stable address, ``layers/<layer>/c0042.html``, that opens with its nine projections
and patches, large, with their image paths and values. The site is plain HTML and one
style sheet: no scripts, every link and image relative, so the folder can be copied,
served or opened from disk.

Layout under ``out_dir`` (tiles and figures are mining's; the rest is written here)::

    index.html                     the model: every mined layer, shape, receptive field
    style.css
    layers/<layer>/index.html      a thumbnail per channel (page2.html... past 1,024)
    layers/<layer>/c0042.html      one channel
    tiles/<layer>/c0042.png        a channel's projections and patches (its sheet, from mining)
    tiles/<layer>/c0042_top.png    its strongest activation's pair (its thumbnail, from mining)
    synthetic/<layer>/c0042.png    an image that maximises the channel (mining with feature_vis)
    <layer>.png, <layer>_p2.png    the Fig. 2 pages (from mining)

``<layer>`` is the layer name with every character other than a letter, a digit, ``-``
or ``_`` replaced by ``_`` (:func:`safe_name`, as mining names the tile folders).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..io.atomic import atomic_write_bytes
from ..viz import sheets
from .run_folder import safe_name  # mining's tile folders and figures are named with it

__all__ = ["CHANNELS_PER_LAYER_PAGE", "channel_page", "safe_name", "write_site"]

#: Channels per layer page; a larger layer gets ``page2.html``, ``page3.html``, ...
CHANNELS_PER_LAYER_PAGE = 1024
_THUMBS_ON_MODEL_PAGE = 8
_LARGE = 160  # about this many CSS pixels for the longest tile side of a layer on a channel page
_LARGE_MAX = 180
_THUMB = 48  # exactly this many on a layer page

_CSS = """\
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#fafafa;color:#222}
main{max-width:1200px;margin:0 auto;padding:0.8em 1.5em 2em}
a{color:#0557b0;text-decoration:none}a:hover{text-decoration:underline}
h1{font-size:1.45em;margin:0.4em 0 0.2em}h2{font-size:1.1em;margin:1.4em 0 0.4em}
.crumbs{font-size:0.9em;color:#666;padding:0.6em 1.5em;background:#fff;border-bottom:1px solid #e2e2e2}
.crumbs .sep{margin:0 0.4em;color:#aaa}
.meta{color:#555;font-size:0.92em;line-height:1.5}
.pager{display:flex;gap:0.6em;align-items:center;margin:0.6em 0;font-size:0.95em}
.pager a,.pager span{padding:0.25em 0.7em;border:1px solid #ccd;border-radius:4px;background:#fff}
.pager span.off{color:#aaa;border-color:#e4e4e4}
.pager .here{font-weight:600;border-color:#0557b0}
img{image-rendering:pixelated;background:#eee}
table{border-collapse:collapse;background:#fff;font-size:0.92em}
th,td{border:1px solid #e2e2e2;padding:0.35em 0.7em;text-align:left;vertical-align:middle}
th{background:#f0f0f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.strip img{width:65px;height:32px;object-fit:contain;margin-right:3px}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(112px,1fr));gap:8px}
.thumbs a{display:block;background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px;
text-align:center;font-size:12px;color:#333}
.thumbs a:hover{border-color:#0557b0;text-decoration:none}
.thumbs a:target{outline:3px solid #0557b0}
.cell{display:inline-flex;align-items:center;justify-content:center;background:#eee;vertical-align:top}
.cell img{display:block}.cell img.fit{width:100%;height:100%;object-fit:contain}
.cell img.smooth,.tile.smooth{image-rendering:auto}
.tile{display:block;background-repeat:no-repeat;image-rendering:pixelated}
.thumbs .cell{width:97px;height:48px}
.thumbs .v{display:block;color:#777;font-size:11px}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(384px,100%),1fr));gap:14px;margin-top:0.8em}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:4px;padding:8px}
figure .imgs{display:flex;gap:6px;justify-content:center}
figure .cell{width:160px;height:160px}
figcaption{font-size:12.5px;margin-top:6px;line-height:1.45;word-break:break-all}
figcaption b{font-variant-numeric:tabular-nums}
.empty{color:#777;font-style:italic}
.thumbs .syn{width:48px;height:48px;margin-top:3px}
.synth{display:flex;gap:12px;align-items:center;margin:0.8em 0;max-width:560px}
.synth .cell{width:160px;height:160px;flex:none}
.synth figcaption{margin-top:0;word-break:normal}
"""


def channel_page(layer: str, channel: int) -> str:
    """The address of a channel's page relative to the site's root, e.g. ``layers/conv3/c0042.html``."""
    return f"layers/{safe_name(layer)}/c{channel:04d}.html"


def write_site(
    out_dir: Path,
    topk: Mapping[str, Any],
    gallery: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    layer_info: Mapping[str, Mapping[str, Any]] | None = None,
    data_file: str | None = "topk.json",
) -> list[Path]:
    """Writes the gallery site of a mining run.

    Args:
        out_dir: The run's output folder, holding ``tiles/<layer>/`` and the figures.
        topk: The content of mining's ``topk.json``: ``model``, ``weights``,
            ``dataset``, ``images``, ``skipped``, ``top`` and ``layers``
            (``{layer: {"module", "channel_count", "channel_ids", "channels"}}``).
        gallery: Per layer, in display order, one dict per mined channel:
            ``{"channel": int, "entries": [{"image", "index", "value", "position",
            "box"}, ...], "figure": "conv3.png"}``, the figure relative to ``out_dir``;
            a channel with entries has its sheet and thumbnail (:mod:`zfvis.viz.sheets`) in
            ``out_dir/tiles/<layer>/``, laid out by the entries' boxes. Optionally
            ``"synthetic": {"file", "objective", "steps"}``: an image that maximises the
            channel (the file relative to ``out_dir``), shown on its page and thumbnail.
        layer_info: Optional, per layer: ``{"shape": [C, H, W],
            "receptive_field": {"size": [h, w], "jump": [..], "offset": [..]} or None}``.
        data_file: The raw data the model page links to, relative to ``out_dir``
            (mining writes ``topk.json``), or None for no link.

    Returns:
        The files written: ``style.css``, per layer its pages and its channels'
        pages, and last ``index.html``.

    Raises:
        ValueError: A layer of ``gallery`` is missing from ``topk["layers"]``.
        OSError: ``out_dir`` is missing (``FileNotFoundError``) or cannot be written.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"the output folder '{out_dir}' does not exist")
    info = layer_info or {}
    layers = list(gallery)
    missing = [layer for layer in layers if layer not in topk.get("layers", {})]
    if missing:
        raise ValueError(f"layers {missing} are in the gallery but not in topk['layers']")
    folders = _unique_folders(layers)
    written = [_write(out_dir / "style.css", _CSS)]
    for i, layer in enumerate(layers):
        site = _LayerSite(layer, folders[layer], gallery[layer], topk, info.get(layer, {}),
                          prev_layer=layers[i - 1] if i else None,
                          next_layer=layers[i + 1] if i + 1 < len(layers) else None, folders=folders)
        written += site.write(out_dir)
    # the entry page last: once it exists, everything it leads to does
    written.append(_write(out_dir / "index.html", _model_page(topk, gallery, info, folders, data_file)))
    return written


def _unique_folders(layers: Sequence[str]) -> dict[str, str]:
    """A distinct page folder per layer: its safe name, suffixed where two collide."""
    seen: dict[str, int] = {}
    out = {}
    for layer in layers:
        base = safe_name(layer) or "layer"
        n = seen.get(base, 0)
        seen[base] = n + 1
        out[layer] = base if n == 0 else f"{base}-{n + 1}"
    return out


def _write(path: Path, text: str) -> Path:
    """Writes ``text`` atomically (not flushed to disk: the site is rebuilt with the run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"), sync=False)
    return path


# --------------------------------------------------------------------------- formatting

_e = html.escape


_PLAIN = re.compile(r"[A-Za-z0-9._/-]*")


def _url(*parts: str) -> str:
    """A relative URL from path parts, each percent-encoded, ready for an attribute."""
    path = "/".join(parts)
    if _PLAIN.fullmatch(path):  # the usual case: nothing to encode or escape
        return path
    return _e("/".join(quote(p, safe="/") for p in parts), quote=True)


def _pair(v: Sequence[Any] | None) -> str:
    """``27`` for ``[27, 27]``, ``27 × 31`` otherwise; an em dash for None."""
    if v is None:
        return "—"
    v = list(v)
    return str(v[0]) if len(set(v)) == 1 else " × ".join(str(x) for x in v)


def _shape(info: Mapping[str, Any]) -> str:
    shape = info.get("shape")
    return "—" if not shape else " × ".join(str(int(s)) for s in shape)


def _receptive(info: Mapping[str, Any], *, long: bool = False) -> str:
    rf = info.get("receptive_field")
    if not rf:
        return "—"
    text = f"{_pair(rf.get('size'))} px, jump {_pair(rf.get('jump'))}"
    return text + f", offset {_pair(rf.get('offset'))}" if long else text


#: What the receptive field's numbers and the Fig. 2 pages are, said on every page that shows them.
_RF_NOTE = ("Receptive field: the input pixels one activation sees (size), how far apart in the input two "
            "neighbouring activations' fields lie (jump), and where feature-map position (0, 0)'s field begins "
            "(offset: the input row and column of its top-left corner, negative where it starts in the padding).")
_FIG2_NOTE = ("Fig. 2 pages: the layer drawn as in Zeiler &amp; Fergus's Fig. 2, 64 channels a page, each "
              "channel's nine strongest activations projected (left 3x3) beside their image patches (right 3x3).")


def _value(v: Any) -> str:
    return f"{float(v):.4g}"


def _page(title: str, crumbs: Sequence[tuple[str, str | None]], body: Sequence[str], root: str) -> str:
    """A whole HTML page; ``crumbs`` are (text, href or None), ``root`` the way up to ``out_dir``."""
    trail = '<span class="sep">›</span>'.join(
        f'<a href="{href}">{_e(text)}</a>' if href else f"<span>{_e(text)}</span>" for text, href in crumbs
    )
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f'<link rel="stylesheet" href="{root}style.css"></head><body>',
        f'<nav class="crumbs">{trail}</nav><main>',
        *body,
        "</main></body></html>",
        "",
    ])


def _pager(prev: tuple[str, str] | None, up: tuple[str, str] | None, nxt: tuple[str, str] | None) -> str:
    """Previous / up / next links; an absent one is shown greyed out."""
    def link(item: tuple[str, str] | None, fallback: str) -> str:
        return f'<a href="{item[1]}">{_e(item[0])}</a>' if item else f'<span class="off">{_e(fallback)}</span>'

    parts = [link(prev, "← previous"), *([link(up, "")] if up else []), link(nxt, "next →")]
    return f'<div class="pager">{"".join(parts)}</div>'


def _model_name(topk: Mapping[str, Any]) -> str:
    return str(topk.get("model", "model"))


# --------------------------------------------------------------------------- model page


def _model_page(
    topk: Mapping[str, Any],
    gallery: Mapping[str, Sequence[Mapping[str, Any]]],
    info: Mapping[str, Mapping[str, Any]],
    folders: Mapping[str, str],
    data_file: str | None,
) -> str:
    model = _model_name(topk)
    n_channels = sum(len(g) for g in gallery.values())
    shape = topk.get("input_shape")
    facts = [
        f"weights {_e(str(topk['weights']))}" if topk.get("weights") else None,
        f"input {_e(' × '.join(str(int(v)) for v in shape))}" if shape else None,
        (f"data set {_e(str(topk.get('dataset', '?')))}: {int(topk.get('images', 0)):,} images, "
         f"{len(topk.get('skipped', [])):,} skipped"),
        f"top {int(topk.get('top', 9))} activations per channel, at most one per image",
        f"{len(gallery)} layers, {n_channels:,} channels",
    ]
    meta = " · ".join(f for f in facts if f)
    if data_file:
        meta += f' · <a href="{_url(data_file)}">{_e(data_file)}</a>'
    rows = [("<table><thead><tr><th>layer</th><th>module</th><th>output shape</th><th>receptive field</th>"
             "<th>channels</th><th>strongest channels</th><th>Fig. 2 pages</th></tr></thead><tbody>")]
    for layer, channels in gallery.items():
        rows.append(_model_row(layer, channels, topk["layers"][layer], info.get(layer, {}), folders[layer]))
    rows.append("</tbody></table>")
    intro = ('<p class="meta">Each channel\'s strongest activations over the data set, projected back to '
             "pixel space with the deconvnet (Zeiler &amp; Fergus 2014) beside the image patches that caused "
             f"them. Open a layer to see all its channels. {_RF_NOTE} {_FIG2_NOTE}</p>")
    body = [f"<h1>{_e(model)}: what each channel responds to</h1>", f'<p class="meta">{meta}</p>', intro, *rows]
    return _page(f"{model} — zfvis gallery", [(model, None)], body, "")


def _model_row(
    layer: str, channels: Sequence[Mapping[str, Any]], top: Mapping[str, Any], info: Mapping[str, Any], folder: str
) -> str:
    page = _url("layers", folder, "index.html")
    ranked = sorted((g for g in channels if g["entries"]),
                    key=lambda g: -float(g["entries"][0]["value"]))[:_THUMBS_ON_MODEL_PAGE]
    strip = "".join(
        f'<a href="{_url("layers", folder, _channel_file(g["channel"]))}" title="channel {int(g["channel"])}">'
        f'<img src="{_url("tiles", safe_name(layer), sheets.thumb_name(g["channel"]))}" '
        f'alt="channel {int(g["channel"])}"></a>'
        for g in ranked
    )
    figs = sorted({str(g["figure"]) for g in channels if g.get("figure")})
    fig_links = " ".join(f'<a href="{_url(f)}">{i + 1}</a>' for i, f in enumerate(figs)) or "—"
    count = top.get("channel_count", len(channels))
    return (f'<tr><td><a href="{page}"><b>{_e(layer)}</b></a></td><td>{_e(str(top.get("module", "")))}</td>'
            f"<td>{_e(_shape(info))}</td><td>{_e(_receptive(info))}</td>"
            f'<td class="num">{len(channels):,} of {int(count):,}</td><td class="strip">{strip}</td>'
            f"<td>{fig_links}</td></tr>")


# --------------------------------------------------------------------------- layer and channel pages


def _channel_file(channel: int) -> str:
    return f"c{int(channel):04d}.html"


def _layer_page_file(page: int) -> str:
    return "index.html" if page == 0 else f"page{page + 1}.html"


class _LayerSite:
    """The pages of one layer: its thumbnail pages and one page per channel."""

    def __init__(
        self,
        layer: str,
        folder: str,
        channels: Sequence[Mapping[str, Any]],
        topk: Mapping[str, Any],
        info: Mapping[str, Any],
        *,
        prev_layer: str | None,
        next_layer: str | None,
        folders: Mapping[str, str],
    ) -> None:
        self.layer, self.folder, self.channels, self.info = layer, folder, channels, info
        self.top = topk["layers"][layer]
        self.model = _model_name(topk)
        self.tiles = safe_name(layer)  # mining's tile folder
        self.prev_layer = (prev_layer, folders[prev_layer]) if prev_layer else None
        self.next_layer = (next_layer, folders[next_layer]) if next_layer else None
        self.n_pages = max(1, math.ceil(len(channels) / CHANNELS_PER_LAYER_PAGE))
        self.side = _longest_side(channels)
        self.meta = self._meta(figures=True)  # shared by the layer's thumbnail pages
        self.channel_meta = self._meta(figures=False)  # a channel page links its own Fig. 2 page
        self.large = self._large_scale()

    def write(self, out_dir: Path) -> list[Path]:
        """Writes the layer's pages and its channels' pages under ``out_dir/layers/<folder>/``."""
        folder = out_dir / "layers" / self.folder
        written = [_write(folder / _layer_page_file(p), self.layer_page(p)) for p in range(self.n_pages)]
        for i in range(len(self.channels)):
            written.append(_write(folder / _channel_file(self.channels[i]["channel"]), self.channel_page(i)))
        return written

    def _tile(self, name: str) -> str:
        """URL of a tile from a page in ``layers/<folder>/``."""
        return _url(f"../../tiles/{self.tiles}", name)

    def _meta(self, *, figures: bool) -> str:
        figs = sorted({str(g["figure"]) for g in self.channels if g.get("figure")}) if figures else []
        links = ", ".join(f'<a href="{_url("..", "..", f)}">{_e(f)}</a>' for f in figs)
        count = self.top.get("channel_count", len(self.channels))
        return (f'<p class="meta">module {_e(str(self.top.get("module", "")))} · output '
                f"{_e(_shape(self.info))} · receptive field {_e(_receptive(self.info, long=True))} · "
                f"{len(self.channels):,} of {int(count):,} channels mined"
                + (f" · Fig. 2 pages: {links}" if links else "") + "</p>"
                + f'<p class="meta">{_RF_NOTE} {_FIG2_NOTE}</p>')

    def layer_page(self, page: int) -> str:
        """Thumbnail page ``page`` (0-based) of the layer."""
        first = page * CHANNELS_PER_LAYER_PAGE
        chunk = self.channels[first : first + CHANNELS_PER_LAYER_PAGE]
        prev = (f"← {self.prev_layer[0]}", _url("..", self.prev_layer[1], "index.html")) if self.prev_layer else None
        nxt = (f"{self.next_layer[0]} →", _url("..", self.next_layer[1], "index.html")) if self.next_layer else None
        body = [f"<h1>{_e(self.layer)}</h1>", self.meta, _pager(prev, ("all layers", "../../index.html"), nxt)]
        if self.n_pages > 1:
            body.append('<div class="pager">' + "".join(
                f'<span class="here">{p + 1}</span>' if p == page else f'<a href="{_layer_page_file(p)}">{p + 1}</a>'
                for p in range(self.n_pages)) + "</div>")
        below = (" Below it: the channel's synthetic image, optimised to excite it most (on the Fig. 2 pages, left "
                 "of the grids)." if any(g.get("synthetic") for g in chunk) else "")
        body.append('<p class="meta">Each thumbnail: the channel\'s strongest activation projected to pixel '
                    f"space (left) and its image patch (right).{below} Open a channel for its top "
                    f"{len(chunk[0]['entries']) if chunk and chunk[0]['entries'] else 9}.</p>")
        body.append('<div class="thumbs">')
        body += [self._thumb(g) for g in chunk]
        body.append("</div>")
        crumbs = [(self.model, "../../index.html"), (self.layer, None)]
        return _page(f"{self.layer} — {self.model} — zfvis gallery", crumbs, body, "../../")

    def _thumb(self, g: Mapping[str, Any]) -> str:
        ch = int(g["channel"])
        imgs = self._thumb_img(g) if g["entries"] else ""
        value = (f'<span class="v">max {_value(g["entries"][0]["value"])}</span>' if g["entries"]
                 else '<span class="v">never active</span>')
        syn = g.get("synthetic")
        if syn:
            imgs += (f'<br><span class="cell syn"><img class="fit smooth" loading="lazy" '
                     f'src="{_url("..", "..", str(syn["file"]))}" alt="synthetic image"></span>')
        return f'<a id="c{ch:04d}" href="{_channel_file(ch)}">{imgs}<br>ch {ch}{value}</a>'

    def _thumb_img(self, g: Mapping[str, Any]) -> str:
        """The channel's thumbnail (its strongest pair) in a grey cell, at the layer's scale:
        a patch clipped at the image border looks smaller, not stretched. It loads as it
        scrolls into view (plain HTML)."""
        name = self._tile(sheets.thumb_name(g["channel"]))
        h, w = sheets.SheetLayout.of([g["entries"][0]["box"]]).sizes[0]
        scale = _THUMB / (self.side or max(h, w))
        height, width = max(1, round(h * scale)), max(1, round((2 * w + sheets.THUMB_GAP) * scale))
        smooth = ' class="smooth"' if scale < 1 else ""  # reduced: filtered; enlarged: sharp pixels
        return (f'<span class="cell"><img{smooth} loading="lazy" src="{name}" width="{width}" height="{height}" '
                f'alt=""></span>')

    def _sheet_tile(self, g: Mapping[str, Any], rank: int, patch: bool, alt: str) -> str:
        """One tile of the channel's sheet, cut out by CSS, in a grey cell of the channel
        page, at the layer's scale (one scale per layer keeps its tiles comparable)."""
        layout = sheets.SheetLayout.of([e["box"] for e in g["entries"]])
        (h, w), (top, left), (sh, sw) = layout.sizes[rank], layout.place(rank, patch), layout.size
        scale, cell = self.large
        s = scale if scale is not None else cell / max(h, w)
        style = (f"width:{max(1, round(w * s))}px;height:{max(1, round(h * s))}px;"
                 f"background-image:url('{self._tile(sheets.sheet_name(g['channel']))}');"
                 f"background-position:{-round(left * s)}px {-round(top * s)}px;"
                 f"background-size:{round(sw * s)}px {round(sh * s)}px")
        smooth = " smooth" if s < 1 else ""
        return (f'<span class="cell" style="width:{cell}px;height:{cell}px">'
                f'<span class="tile{smooth}" role="img" aria-label="{_e(alt)}" style="{style}"></span></span>')

    def _large_scale(self) -> tuple[float | None, int]:
        """CSS pixels per tile pixel on channel pages, and the cell size.

        Small tiles are enlarged by the whole factor that brings the layer's longest tile
        side nearest 160 CSS pixels (at most 180), so their pixels stay even squares;
        larger ones are reduced to 160.
        """
        if not self.side:
            return None, _LARGE
        if self.side > _LARGE:
            return _LARGE / self.side, _LARGE
        f = max(1, round(_LARGE / self.side))
        if f > 1 and f * self.side > _LARGE_MAX:
            f -= 1
        return float(f), f * self.side

    def channel_page(self, i: int) -> str:
        """The page of the layer's ``i``-th channel (in gallery order)."""
        g = self.channels[i]
        ch = int(g["channel"])
        back = f"{_layer_page_file(i // CHANNELS_PER_LAYER_PAGE)}#c{ch:04d}"

        def near(j: int, text: str) -> tuple[str, str] | None:
            if not 0 <= j < len(self.channels):
                return None
            other = int(self.channels[j]["channel"])
            return text.format(other), _channel_file(other)

        body = [f"<h1>{_e(self.layer)} · channel {ch}</h1>",
                _pager(near(i - 1, "← channel {}"), (f"all of {self.layer}", back), near(i + 1, "channel {} →"))]
        if g.get("synthetic"):
            body.append(_synthetic(g["synthetic"]))
        body.append('<div class="pairs">')
        if not g["entries"]:
            body.append('<p class="empty">No activations were recorded for this channel.</p>')
        for r, entry in enumerate(g["entries"]):
            body.append(self._pair(g, r, entry))
        body.append("</div>")
        body.append(self.channel_meta)
        if g.get("figure"):
            body.append(f'<p class="meta">This channel on its Fig. 2 page: '
                        f'<a href="{_url("..", "..", str(g["figure"]))}">{_e(str(g["figure"]))}</a></p>')
        crumbs = [(self.model, "../../index.html"), (self.layer, back), (f"channel {ch}", None)]
        return _page(f"{self.layer} channel {ch} — {self.model} — zfvis gallery", crumbs, body, "../../")

    def _pair(self, g: Mapping[str, Any], r: int, entry: Mapping[str, Any]) -> str:
        pos = entry.get("position")
        where = f" at feature-map row {int(pos[0])}, column {int(pos[1])}" if pos else ""
        box = entry.get("box")
        box_txt = (f"<br>patch: rows {int(box[0])}–{int(box[2]) - 1}, columns {int(box[1])}–{int(box[3]) - 1}"
                   if box else "")
        imgs = (self._sheet_tile(g, r, False, f"projection {r + 1}")
                + self._sheet_tile(g, r, True, f"patch {r + 1}"))
        return (f'<figure><div class="imgs">{imgs}</div>'
                f"<figcaption>#{r + 1} · value <b>{_value(entry['value'])}</b>{_e(where)}<br>"
                f"{_e(str(entry.get('image', '')))}{box_txt}</figcaption></figure>")


def _synthetic(syn: Mapping[str, Any]) -> str:
    """A channel's synthetic image, large, with what it is."""
    return (f'<figure class="synth"><span class="cell"><img class="fit" src="{_url("..", "..", str(syn["file"]))}" '
            f'alt="synthetic image"></span><figcaption><b>What the channel wants</b>: an image optimised to '
            f"maximise the channel's mean activation (feature visualization by optimization, "
            f"{int(syn['steps'])} steps), reaching <b>{_value(syn['objective'])}</b>. Below: the data set's images "
            "that excite it most.</figcaption></figure>")


def _longest_side(channels: Sequence[Mapping[str, Any]]) -> int | None:
    """The longest side, in pixels, of any tile of the layer (from the entries' boxes); None if unknown."""
    sides = [max(int(b[2]) - int(b[0]), int(b[3]) - int(b[1]))
             for g in channels for e in g["entries"] if (b := e.get("box"))]
    return max(sides) if sides and max(sides) > 0 else None
