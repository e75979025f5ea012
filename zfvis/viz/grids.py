"""Figures of rows and grids of images: ``zfvis project``'s rows (:func:`project_figure`) and a
labelled grid of projections (:func:`grid_figure`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .layout import (
    _FONT_LABEL,
    _FONT_SMALL,
    _FONT_TITLE,
    _MARGIN,
    BOX_COLOR,
    _axes,
    _blank_cell,
    _finish,
    _n_lines,
    _new_figure,
    _show,
    _text,
    _text_height,
    _text_width,
    _title_band,
    _wrap,
)
from .render import _to_hwc, normalize_projection


def project_figure(
    image: torch.Tensor,
    projections: Sequence[torch.Tensor],
    boxes: Sequence[tuple[int, int, int, int]],
    titles: Sequence[str],
    suptitle: str,
    path: str | os.PathLike[str] | None = None,
    *,
    note: str | None = None,
) -> Figure:
    """Draws the figure of ``zfvis project``: each projection beside its input.

    Each projection gets one row of four panels: the input with the receptive-field
    box, the full projection with the same box, the input cropped to the box, and the
    projection cropped to the box (crops are enlarged with sharp pixels). The row's
    title is written to the left of the row; the panel names head the first row.
    Up to 4 projections are stacked in one column of rows; more are laid out in 2
    (up to 12) or 3 side-by-side blocks so the figure stays near screen proportions.

    Args:
        image: The input as shown, ``(3, H, W)`` in ``[0, 1]``.
        projections: P raw projections ``(3, H, W)`` (each shown through
            :func:`normalize_projection`; the crop keeps the full projection's scale).
        boxes: P receptive-field windows ``(top, left, bottom, right)`` in pixels,
            bottom/right exclusive (clipped to the image again here).
        titles: P row titles, e.g. ``"ch 12 @ (5, 7)\\nact 3.21"``.
        suptitle: Figure title, e.g. ``"zfnet-cifar10 / conv3 / top-9 channels"``.
        path: Target PNG (its folder must exist), or None to write nothing.
        note: Optional small line at the bottom, e.g. how projections are scaled.

    Returns:
        The figure (written to ``path`` first, when given).

    Raises:
        ValueError: No projections, lists of unequal length, or wrong shapes.
        OSError: The folder is missing or cannot be written.
    """
    img, projs = _displayed(image, projections, boxes, titles)
    n, (height, width) = len(projs), img.shape[:2]
    blocks = 1 if n <= 4 else 2 if n <= 12 else 3
    rows = math.ceil(n / blocks)
    cell = {1: 2.8, 2: 2.2, 3: 1.8}[blocks]
    gap, row_gap, block_gap = 0.12, 0.22, 0.45
    label_w = max(_text_width(t, _FONT_LABEL) for t in titles) + 0.2
    label_w = min(max(label_w, 0.6), 2.5)
    block_w = label_w + 4 * cell + 3 * gap
    fig_w = 2 * _MARGIN + blocks * block_w + (blocks - 1) * block_gap
    header_h = _text_height(1, _FONT_SMALL) + 0.08
    sup, sup_h = _title_band(suptitle, fig_w)
    note_txt = _wrap(note, fig_w - 2 * _MARGIN, _FONT_SMALL) if note else None
    note_h = _text_height(_n_lines(note_txt), _FONT_SMALL) + 0.15 if note_txt else 0.0
    top0 = _MARGIN + sup_h + header_h
    fig_h = top0 + rows * cell + (rows - 1) * row_gap + note_h + _MARGIN
    fig = _new_figure(fig_w, fig_h)
    if sup:
        _text(fig, fig_w / 2, _MARGIN, sup, ha="center", va="top", fontsize=_FONT_TITLE, fontweight="bold")

    headers = ("input", "projection", "input crop", "projection crop")
    for k in range(n):
        b, r = divmod(k, rows)
        x0 = _MARGIN + b * (block_w + block_gap)
        y0 = top0 + r * (cell + row_gap)
        top, left, bottom, right = _clip_box(boxes[k], height, width)
        label_y = y0 + cell * min(1.0, height / max(width, 1)) / 2  # middle of the input panel
        _text(fig, x0 + label_w - 0.12, label_y, titles[k], ha="right", va="center", fontsize=_FONT_LABEL,
              linespacing=1.25)
        panels = (img, projs[k], img[top:bottom, left:right], projs[k][top:bottom, left:right])
        for c, arr in enumerate(panels):
            ax = _axes(fig, x0 + label_w + c * (cell + gap), y0, cell, cell)
            _panel(ax, arr, cell, header=headers[c] if r == 0 else None,
                   box=(top, left, bottom, right) if c < 2 else None)
    if note_txt:
        _text(fig, _MARGIN, fig_h - _MARGIN, note_txt, ha="left", va="bottom", fontsize=_FONT_SMALL,
              color="#505050")
    return _finish(fig, path)


def _displayed(image: torch.Tensor, projections: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]],
               titles: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image and the projections as displayed (H, W, 3) arrays, after checking they match."""
    n = len(projections)
    if n == 0:
        raise ValueError("project_figure needs at least one projection")
    if not (len(boxes) == len(titles) == n):
        raise ValueError(f"got {n} projections, {len(boxes)} boxes and {len(titles)} titles; they must match")
    img = _to_hwc(image)
    height, width = img.shape[:2]
    projs = []
    for i, p in enumerate(projections):
        if p.dim() != 3 or tuple(p.shape[-2:]) != (height, width):
            raise ValueError(
                f"projection {i} has shape {tuple(p.shape)}; expected (3, {height}, {width}) like the image"
            )
        projs.append(_to_hwc(normalize_projection(p)))
    return img, projs


def _panel(ax: Axes, arr: np.ndarray, cell: float, *, header: str | None, box: tuple[int, int, int, int] | None) -> None:
    """One panel of a row: the array (or a blank for an empty window), its header, the box drawn on it."""
    ax.set_anchor("N")  # non-square panels shrink from below, keeping titles level
    if header is not None:
        ax.set_title(header, fontsize=_FONT_SMALL, color="#404040", pad=4)
    if arr.size == 0:
        _blank_cell(ax, "empty window")
        return
    _show(ax, arr, cell)
    if box is not None:
        top, left, bottom, right = box
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                               edgecolor=BOX_COLOR, linewidth=1.8))


def _clip_box(box: Sequence[int], height: int, width: int) -> tuple[int, int, int, int]:
    """Rounds a ``(top, left, bottom, right)`` window to ints and clips it to the image."""
    top, left, bottom, right = (round(float(v)) for v in box)
    top, bottom = max(0, min(top, height)), max(0, min(bottom, height))
    left, right = max(0, min(left, width)), max(0, min(right, width))
    return top, left, max(top, bottom), max(left, right)


def grid_figure(
    cells: Sequence[Sequence[torch.Tensor | None]],
    path: str | os.PathLike[str] | None = None,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell_inches: float = 1.2,
) -> Figure:
    """Draws a grid of images, e.g. feature maps (rows) across checkpoints (columns).

    Each image fills a square ``cell_inches`` cell, keeping its aspect ratio; small
    images are enlarged with sharp pixels. A ``None`` entry is drawn as a light-grey
    blank cell; rows may be ragged, and places past the end of a short row stay
    empty (white). Row labels are written at the left of each row,
    column labels above the first row (wrapped to the cell width).

    Args:
        cells: Rows of images ``(3, h, w)`` in ``[0, 1]``, or None for a blank cell.
        path: Target PNG (its folder must exist), or None to write nothing.
        row_labels: One label per row, or None.
        col_labels: One label per column, or None.
        title: Figure title, or None.
        cell_inches: Side of one cell in inches (at least 0.35 is readable).

    Returns:
        The figure (written to ``path`` first, when given).

    Raises:
        ValueError: No cells, label counts that do not match, or wrong shapes.
        OSError: The folder is missing or cannot be written.
    """
    n_rows = len(cells)
    n_cols = max((len(row) for row in cells), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("grid_figure needs at least one row with one cell")
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"got {len(row_labels)} row labels for {n_rows} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"got {len(col_labels)} column labels for {n_cols} columns")
    if cell_inches <= 0:
        raise ValueError(f"cell_inches must be positive, got {cell_inches}")

    gap = max(0.04, 0.06 * cell_inches)
    label_w = 0.0
    if row_labels:
        label_w = min(_text_width("\n".join(row_labels), _FONT_SMALL) + 0.15, 2.5)
    col_txt = [_wrap(s, cell_inches + gap, _FONT_SMALL) for s in col_labels] if col_labels else []
    col_h = _text_height(max(map(_n_lines, col_txt)), _FONT_SMALL) + 0.08 if col_txt else 0.0
    grid_w = n_cols * cell_inches + (n_cols - 1) * gap
    fig_w = 2 * _MARGIN + label_w + grid_w
    if title:  # widen a narrow grid for its title, up to 12 inches, rather than wrap it
        fig_w = max(fig_w, min(_text_width(title, _FONT_TITLE) + 2 * _MARGIN + 0.1, 12.0))
    sup, sup_h = _title_band(title, fig_w)
    x0 = (fig_w - label_w - grid_w) / 2 + label_w  # centre the grid when the title is wider
    top0 = _MARGIN + sup_h + col_h
    fig_h = top0 + n_rows * cell_inches + (n_rows - 1) * gap + _MARGIN
    fig = _new_figure(fig_w, fig_h)
    if sup:
        _text(fig, fig_w / 2, _MARGIN, sup, ha="center", va="top", fontsize=_FONT_TITLE, fontweight="bold")
    for j, txt in enumerate(col_txt):
        _text(fig, x0 + j * (cell_inches + gap) + cell_inches / 2, top0 - 0.06, txt, ha="center",
              va="bottom", fontsize=_FONT_SMALL, linespacing=1.2)
    for i, row in enumerate(cells):
        y = top0 + i * (cell_inches + gap)
        if row_labels:
            _text(fig, x0 - 0.1, y + cell_inches / 2, row_labels[i], ha="right", va="center",
                  fontsize=_FONT_SMALL, linespacing=1.2)
        for j, img in enumerate(row):
            ax = _axes(fig, x0 + j * (cell_inches + gap), y, cell_inches, cell_inches)
            if img is None:
                _blank_cell(ax)
            else:
                _show(ax, _to_hwc(img), cell_inches)
    return _finish(fig, path)
