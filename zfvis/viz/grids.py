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
    BOX_COLOR,
    FONT_LABEL,
    FONT_SMALL,
    FONT_TITLE,
    MARGIN,
    axes,
    blank_cell,
    finish,
    n_lines,
    new_figure,
    show,
    text,
    text_height,
    text_width,
    title_band,
    wrap,
)
from .render import _to_hwc, normalize_projection

__all__ = ["project_figure", "grid_figure", "crop_box", "SUPPORT_SHARE", "COVERS_SHARE"]

#: Where an activation's receptive field covers this share of the image or more, its crop is
#: the region where the projection is non-negligible instead (the whole image repeated shows nothing).
COVERS_SHARE = 0.9
#: Non-negligible: at least this share of the projection's largest absolute value (summed over channels).
SUPPORT_SHARE = 0.05


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
    crops = [crop_box(p, b) for p, b in zip(projections, boxes)]
    note = _with_support_note(note, any(support for _, support in crops))
    blocks = 1 if n <= 4 else 2 if n <= 12 else 3
    rows = math.ceil(n / blocks)
    cell = {1: 2.8, 2: 2.2, 3: 1.8}[blocks]
    gap, row_gap, block_gap = 0.12, 0.22, 0.45
    label_w = max(text_width(t, FONT_LABEL) for t in titles) + 0.2
    label_w = min(max(label_w, 0.6), 2.5)
    block_w = label_w + 4 * cell + 3 * gap
    fig_w = 2 * MARGIN + blocks * block_w + (blocks - 1) * block_gap
    header_h = text_height(1, FONT_SMALL) + 0.08
    sup, sup_h = title_band(suptitle, fig_w)
    note_txt = wrap(note, fig_w - 2 * MARGIN, FONT_SMALL) if note else None
    note_h = text_height(n_lines(note_txt), FONT_SMALL) + 0.15 if note_txt else 0.0
    top0 = MARGIN + sup_h + header_h
    fig_h = top0 + rows * cell + (rows - 1) * row_gap + note_h + MARGIN
    fig = new_figure(fig_w, fig_h)
    if sup:
        text(fig, fig_w / 2, MARGIN, sup, ha="center", va="top", fontsize=FONT_TITLE, fontweight="bold")

    headers = ("input", "projection", "input crop", "projection crop")
    for k in range(n):
        b, r = divmod(k, rows)
        x0 = MARGIN + b * (block_w + block_gap)
        y0 = top0 + r * (cell + row_gap)
        top, left, bottom, right = _clip_box(boxes[k], height, width)
        (c_top, c_left, c_bottom, c_right), support = crops[k]
        label_y = y0 + cell * min(1.0, height / max(width, 1)) / 2  # middle of the input panel
        text(fig, x0 + label_w - 0.12, label_y, titles[k], ha="right", va="center", fontsize=FONT_LABEL,
              linespacing=1.25)
        panels = (img, projs[k], img[c_top:c_bottom, c_left:c_right], projs[k][c_top:c_bottom, c_left:c_right])
        for c, arr in enumerate(panels):
            ax = axes(fig, x0 + label_w + c * (cell + gap), y0, cell, cell)
            _panel(ax, arr, cell, header=headers[c] if r == 0 else None,
                   box=(top, left, bottom, right) if c < 2 else None,
                   support=(c_top, c_left, c_bottom, c_right) if c < 2 and support else None)
    if note_txt:
        text(fig, MARGIN, fig_h - MARGIN, note_txt, ha="left", va="bottom", fontsize=FONT_SMALL,
              color="#505050")
    return finish(fig, path)


def _with_support_note(note: str | None, support: bool) -> str | None:
    """The figure's note, saying what the dashed boxes are where some crop shows a projection's support."""
    if not support:
        return note
    return (f"{note}; " if note else "") + (
        "dashed boxes: where a receptive field covers the whole image, the crops show instead where "
        f"|projection| is at least {SUPPORT_SHARE:.0%} of its largest value")


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


def _panel(ax: Axes, arr: np.ndarray, cell: float, *, header: str | None, box: tuple[int, int, int, int] | None,
           support: tuple[int, int, int, int] | None = None) -> None:
    """One panel of a row: the array (or a blank for an empty window), its header, the box drawn on
    it, and the support window the crops show instead (dashed), where there is one."""
    ax.set_anchor("N")  # non-square panels shrink from below, keeping titles level
    if header is not None:
        ax.set_title(header, fontsize=FONT_SMALL, color="#404040", pad=4)
    if arr.size == 0:
        blank_cell(ax, "empty window")
        return
    show(ax, arr, cell)
    if box is not None:
        top, left, bottom, right = box
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                               edgecolor=BOX_COLOR, linewidth=1.8))
    if support is not None:
        top, left, bottom, right = support
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                               edgecolor=BOX_COLOR, linewidth=1.5, linestyle=(0, (3, 2))))


def crop_box(projection: torch.Tensor, box: Sequence[int]) -> tuple[tuple[int, int, int, int], bool]:
    """The window to crop a projection and its input to, and whether it is the projection's support.

    The receptive-field ``box`` (top, left, bottom, right), clipped to the image, unless it covers
    :data:`COVERS_SHARE` of the image or more (deep layers, global pooling, gates): then the
    bounding box of the pixels where the projection's absolute value, summed over channels, is at
    least :data:`SUPPORT_SHARE` of its largest, with a margin of 2 pixels and at least 4 pixels a
    side. A projection that is zero everywhere, or non-negligible over nearly all of the image,
    keeps the box.

    Args:
        projection: A raw projection (C, H, W).
        box: Its receptive field in pixels, bottom and right exclusive.

    Returns:
        The window, and True when it is the support rather than the receptive field.
    """
    height, width = projection.shape[-2:]
    clipped = _clip_box(box, height, width)
    top, left, bottom, right = clipped
    if (bottom - top) * (right - left) < COVERS_SHARE * height * width:
        return clipped, False
    magnitude = projection.detach().float().abs().sum(dim=0)
    peak = float(magnitude.max())
    if not peak > 0:
        return clipped, False
    rows = torch.nonzero((magnitude >= SUPPORT_SHARE * peak).any(dim=1)).flatten()
    cols = torch.nonzero((magnitude >= SUPPORT_SHARE * peak).any(dim=0)).flatten()
    t, b = int(rows.min()) - 2, int(rows.max()) + 3
    l_, r = int(cols.min()) - 2, int(cols.max()) + 3
    t, b = _at_least(t, b, 4, height)
    l_, r = _at_least(l_, r, 4, width)
    if (b - t) * (r - l_) >= COVERS_SHARE * height * width:
        return clipped, False
    return (t, l_, b, r), True


def _at_least(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """``[lo, hi)`` clipped to ``[0, limit)`` and widened about its middle to ``size`` where it is smaller."""
    lo, hi = max(0, lo), min(limit, hi)
    if hi - lo < size:
        mid = (lo + hi) // 2
        lo = max(0, min(mid - size // 2, limit - size))
        hi = min(limit, lo + size)
    return lo, hi


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
        label_w = min(text_width("\n".join(row_labels), FONT_SMALL) + 0.15, 2.5)
    col_txt = [wrap(s, cell_inches + gap, FONT_SMALL) for s in col_labels] if col_labels else []
    col_h = text_height(max(map(n_lines, col_txt)), FONT_SMALL) + 0.08 if col_txt else 0.0
    grid_w = n_cols * cell_inches + (n_cols - 1) * gap
    fig_w = 2 * MARGIN + label_w + grid_w
    if title:  # widen a narrow grid for its title, up to 12 inches, rather than wrap it
        fig_w = max(fig_w, min(text_width(title, FONT_TITLE) + 2 * MARGIN + 0.1, 12.0))
    sup, sup_h = title_band(title, fig_w)
    x0 = (fig_w - label_w - grid_w) / 2 + label_w  # centre the grid when the title is wider
    top0 = MARGIN + sup_h + col_h
    fig_h = top0 + n_rows * cell_inches + (n_rows - 1) * gap + MARGIN
    fig = new_figure(fig_w, fig_h)
    if sup:
        text(fig, fig_w / 2, MARGIN, sup, ha="center", va="top", fontsize=FONT_TITLE, fontweight="bold")
    for j, txt in enumerate(col_txt):
        text(fig, x0 + j * (cell_inches + gap) + cell_inches / 2, top0 - 0.06, txt, ha="center",
              va="bottom", fontsize=FONT_SMALL, linespacing=1.2)
    for i, row in enumerate(cells):
        y = top0 + i * (cell_inches + gap)
        if row_labels:
            text(fig, x0 - 0.1, y + cell_inches / 2, row_labels[i], ha="right", va="center",
                  fontsize=FONT_SMALL, linespacing=1.2)
        for j, img in enumerate(row):
            ax = axes(fig, x0 + j * (cell_inches + gap), y, cell_inches, cell_inches)
            if img is None:
                blank_cell(ax)
            else:
                show(ax, _to_hwc(img), cell_inches)
    return finish(fig, path)
