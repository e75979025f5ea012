"""The Fig. 2 pages of a mining run, from Python: what ``zfvis mine`` draws, one call away.

:func:`mining_page` draws page ``page`` of a mined layer from the run's folder (its
``topk.json`` and tile sheets, :mod:`zfvis.viz.sheets`) and returns the matplotlib
``Figure``; a PNG is written only when ``path`` is given. :func:`page_title`,
:func:`page_file` and :func:`draw_page` are how mining titles, names and draws its
pages, in one place.

>>> fig = zfvis.mining_page("runs/cifar", "conv5", page=2)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.errors import UserInputError
from ..viz import fig2, sheets
from .run_folder import safe_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PAGE_CHANNELS", "FIGURE_TOP", "page_title", "page_file", "draw_page", "mining_page"]

#: Channels per Fig. 2 page (a layer with more gets several pages).
PAGE_CHANNELS = 64
#: Activations per channel drawn on a page (a 3x3 grid); tiles and the gallery show all.
FIGURE_TOP = 9


def page_title(model: str, layer: str, top: int, rule: str, channels: Sequence[int], *, page: int, pages: int) -> str:
    """The title of page ``page`` (1-based) of ``pages`` of a layer, showing ``channels``."""
    title = f"{model} / {layer}: top-{top} activations per channel ({rule})"
    return title + (f" (channels {channels[0]}-{channels[-1]}, page {page} of {pages})" if pages > 1 else "")


def page_file(layer: str, page: int, pages: int) -> str:
    """The file of page ``page`` (1-based) of ``pages``: ``conv3.png``, or ``conv3_p2.png`` past one page."""
    return f"{safe_name(layer)}.png" if pages == 1 else f"{safe_name(layer)}_p{page}.png"


def draw_page(title: str, entries: Sequence[fig2.Channel], path: str | os.PathLike[str] | None = None, *,
              synthetic: Sequence[Any] | None = None) -> Figure:
    """One Fig. 2 page: ``(channel, projections, patches, values)`` per channel
    (:func:`zfvis.fig2.mining_figure`, 4 channels a row, 0.6-inch tiles; 3 a row with
    ``synthetic``, one image per channel drawn left of its grids)."""
    columns = 4 if synthetic is None else 3
    return fig2.mining_figure(title, entries, path, columns=min(columns, len(entries)), cell_inches=0.6,
                              synthetic=synthetic)


def _read_topk(run: str | os.PathLike[str]) -> tuple[Path, Mapping[str, Any]]:
    folder = Path(run)
    file = folder / "topk.json"
    if not file.is_file():
        raise UserInputError(f"'{folder}' holds no topk.json: pass the output folder of a zfvis mine run")
    return folder, json.loads(file.read_text(encoding="utf-8"))


def mining_page(run: str | os.PathLike[str], layer: str, *, page: int = 1,
                path: str | os.PathLike[str] | None = None) -> Figure:
    """Page ``page`` of a mined layer's Fig. 2 figure, drawn from the run's folder.

    Args:
        run: The output folder of ``zfvis mine`` (or :func:`zfvis.mining.mine`), with
            its ``topk.json`` and ``tiles/``.
        layer: A layer of the run, as it was mined.
        page: Which page (1-based) of :data:`PAGE_CHANNELS` channels.
        path: Where to write the PNG (atomically); ``None`` writes nothing.

    Returns:
        The figure, the same as the run's ``<layer>.png`` (or ``<layer>_p<page>.png``): with
        each channel's synthetic image left of its grids when the run computed them.

    Raises:
        UserInputError: No ``topk.json`` there, a layer that was not mined, or a page
            out of range.
        FileNotFoundError: A tile sheet is missing (the run was mined without figures), or a
            synthetic image of a run mined with ``feature_vis``.
    """
    folder, topk = _read_topk(run)
    layers = topk.get("layers", {})
    if layer not in layers:
        raise UserInputError(f"layer '{layer}' was not mined in '{folder}'; mined: {', '.join(layers)}")
    info = layers[layer]
    ids: list[int] = info["channel_ids"]
    per_page = PAGE_CHANNELS
    pages = max(1, math.ceil(len(ids) / per_page))
    if isinstance(page, bool) or not isinstance(page, int) or not 1 <= page <= pages:
        raise UserInputError(f"page must be 1..{pages} for layer '{layer}' ({len(ids)} channels), got {page!r}")
    first = (page - 1) * per_page
    tiles = folder / "tiles" / safe_name(layer)
    entries = []
    for c in range(first, min(len(ids), first + per_page)):
        ranked = info["channels"][c][:FIGURE_TOP]
        layout = sheets.SheetLayout.of([e["box"] for e in info["channels"][c]])
        pairs = sheets.cut_sheet(sheets.read_png(tiles / sheets.sheet_name(ids[c])), layout)[:FIGURE_TOP] if ranked else []
        entries.append((ids[c], [p for p, _ in pairs], [q for _, q in pairs],
                        [float(e["value"]) for e in ranked]))
    shown = [e[0] for e in entries]
    title = page_title(str(topk.get("model", "model")), layer, int(topk.get("top", FIGURE_TOP)),
                       str(topk.get("rule", "deconvnet")), shown, page=page, pages=pages)
    made = info.get("synthetic")
    synthetic = None if not made else [sheets.read_png(folder / f) for f in made["files"][first : first + per_page]]
    return draw_page(title, entries, path, synthetic=synthetic)
