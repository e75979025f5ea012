"""Rendering: turns image and projection tensors into readable PNG figures.

All figures are drawn on :class:`matplotlib.figure.Figure` objects with an explicit
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, so importing this module
never touches pyplot or the user's interactive backend. Layouts are computed in
inches by hand (no ``tight_layout``), so text sizes are predictable: at the written
size (``dpi`` 100) body text is 9 to 10 pt and titles 13 pt.

Every PNG is written atomically through :func:`zfvis._io.atomic_open`: a missing or
unwritable output folder raises the ``OSError`` (``FileNotFoundError``,
``PermissionError``, ``NotADirectoryError``) before anything is written, and a
failure while writing leaves neither the target nor a temporary file behind.

Tensor conventions: CPU float tensors; an image is ``(3, H, W)`` in ``[0, 1]``
(``(1, H, W)`` and ``(H, W)`` greyscale are accepted where an image is drawn); a
deconvnet projection is ``(3, H, W)`` of any sign and is shown through
:func:`normalize_projection` (0 is mid-grey).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from zfvis._io import atomic_open

__all__ = [
    "DPI",
    "BOX_COLOR",
    "normalize_projection",
    "to_pil",
    "upscale_nearest",
    "save_image",
    "project_figure",
    "grid_figure",
    "mining_figure",
    "filter_grid",
]

#: Resolution of every written figure (pixels per inch); sizes below are in inches.
DPI = 100
#: Colour of receptive-field rectangles (cyan shows on photos and on grey projections).
BOX_COLOR = "#00e5ff"

_FONT_TITLE = 13.0
_FONT_LABEL = 10.0
_FONT_SMALL = 9.0
_CHAR_W = 0.6  # mean DejaVu Sans glyph width in em, used to estimate text extents
_LINE_H = 1.35  # line height in em
_MARGIN = 0.25  # outer figure margin, inches
_BLANK = 1.0  # padding value for cells of unequal size (white, like the background)
_MAX_PIXELS = 60000  # Agg refuses images with a side of 2**16 pixels or more


# --------------------------------------------------------------------------- tensors


def normalize_projection(p: torch.Tensor) -> torch.Tensor:
    """Maps a deconvnet projection of any sign to ``[0, 1]`` for display.

    Zero maps to mid-grey 0.5 and the largest absolute value of the projection maps
    to 0 or 1: ``out = 0.5 + 0.5 * p / max|p|``. A batch ``(..., C, H, W)`` is
    normalised per projection (each leading index on its own scale). An all-zero
    projection gives uniform 0.5; NaN and infinite values are treated as 0.

    Args:
        p: A projection ``(C, H, W)`` (normally ``C == 3``) or a batch ``(..., C, H, W)``.

    Returns:
        A float32 tensor of the same shape with values in ``[0, 1]``.

    Raises:
        ValueError: ``p`` has fewer than 3 dimensions.
    """
    if p.dim() < 3:
        raise ValueError(f"expected a projection (C, H, W) or a batch (..., C, H, W), got shape {tuple(p.shape)}")
    p = torch.nan_to_num(p.detach().to(device="cpu", dtype=torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if p.numel() == 0:
        return torch.full_like(p, 0.5)
    peak = p.abs().flatten(-3).amax(dim=-1)[..., None, None, None]
    scale = torch.where(peak > 0, 0.5 / peak.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(peak))
    return (0.5 + p * scale).clamp_(0.0, 1.0)


def _to_hwc(img: torch.Tensor) -> np.ndarray:
    """Converts an image tensor to a float32 ``(H, W, 3)`` array clipped to ``[0, 1]``."""
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (3, H, W), (1, H, W) or (H, W), got shape {tuple(img.shape)}")
    img = torch.nan_to_num(img.detach().to(device="cpu", dtype=torch.float32), nan=0.0).clamp(0.0, 1.0)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return np.ascontiguousarray(img.permute(1, 2, 0).numpy())


def to_pil(img: torch.Tensor) -> Image.Image:
    """Converts an image tensor to an 8-bit RGB Pillow image.

    Args:
        img: ``(3, H, W)`` in ``[0, 1]`` (``(1, H, W)`` and ``(H, W)`` are shown as
            grey); values outside are clipped, NaN becomes 0.

    Returns:
        The RGB image, each value rounded to the nearest of 256 levels.

    Raises:
        ValueError: The shape is not an image's.
    """
    arr = np.rint(_to_hwc(img) * 255.0).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def upscale_nearest(img: torch.Tensor, min_side: int, *, max_side: int | None = None) -> torch.Tensor:
    """Enlarges an image by an integer factor, repeating pixels (no smoothing).

    The factor is the smallest integer that makes the shorter side at least
    ``min_side`` (1 if it already is), lowered where needed so the longer side stays
    at most ``max_side`` (never below 1). Each pixel becomes a ``factor x factor``
    block, so a 7x7 patch stays a sharp 7x7 grid of squares.

    Args:
        img: A tensor ``(..., H, W)``, e.g. an image ``(3, H, W)``.
        min_side: Wanted length of the shorter side, in pixels.
        max_side: Upper bound on the longer side after enlarging; None for no bound.

    Returns:
        The enlarged tensor (``img`` itself when the factor is 1).

    Raises:
        ValueError: ``img`` has fewer than 2 dimensions.
    """
    if img.dim() < 2:
        raise ValueError(f"expected a tensor (..., H, W), got shape {tuple(img.shape)}")
    h, w = img.shape[-2], img.shape[-1]
    if min(h, w) == 0:
        return img
    factor = max(1, math.ceil(min_side / min(h, w)))
    if max_side is not None:
        factor = max(1, min(factor, max_side // max(h, w)))
    if factor == 1:
        return img
    return img.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


# --------------------------------------------------------------------------- output


def save_image(img: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Writes one image tensor as a PNG, atomically, at its own pixel size.

    Args:
        img: ``(3, H, W)`` in ``[0, 1]`` (see :func:`to_pil`).
        path: Target file; its folder must exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: The folder is missing or cannot be written.
        ValueError: The shape is not an image's.
    """
    path = Path(path)
    pil = to_pil(img)
    with atomic_open(path, "wb") as fh:
        pil.save(fh, format="PNG")
    return path


def _new_figure(width_in: float, height_in: float) -> Figure:
    """A white figure of the given size in inches, attached to an Agg canvas."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Writes ``fig`` as a PNG atomically; the dpi is lowered only if Agg's size limit needs it."""
    path = Path(path)
    w_in, h_in = fig.get_size_inches()
    dpi = min(float(DPI), _MAX_PIXELS / max(w_in, h_in, 1e-6))
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi, facecolor="white")
    return path


# --------------------------------------------------------------------------- layout


def _text_width(text: str, fontsize: float) -> float:
    """Estimated width in inches of the longest line of ``text``."""
    longest = max((len(line) for line in text.split("\n")), default=0)
    return longest * fontsize * _CHAR_W / 72.0


def _text_height(lines: int, fontsize: float) -> float:
    """Height in inches of ``lines`` lines of text."""
    return lines * fontsize * _LINE_H / 72.0


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """Wraps each line of ``text`` so it fits ``width_in`` inches."""
    chars = max(8, int(width_in * 72.0 / (fontsize * _CHAR_W)))
    return "\n".join(textwrap.fill(line, chars) if line else "" for line in text.split("\n"))


def _n_lines(text: str | None) -> int:
    """Number of lines in ``text`` (0 for None or empty)."""
    return 0 if not text else text.count("\n") + 1


def _axes(fig: Figure, left: float, top: float, width: float, height: float) -> Axes:
    """Adds axes placed in inches from the figure's top-left corner."""
    fw, fh = fig.get_size_inches()
    ax = fig.add_axes((left / fw, 1.0 - (top + height) / fh, width / fw, height / fh))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#b0b0b0")
        spine.set_linewidth(0.6)
    return ax


def _text(fig: Figure, x: float, y: float, s: str, **kwargs: Any) -> None:
    """Places text at ``(x, y)`` inches from the figure's top-left corner."""
    fw, fh = fig.get_size_inches()
    fig.text(x / fw, 1.0 - y / fh, s, **kwargs)


def _show(ax: Axes, arr: np.ndarray, cell_in: float) -> None:
    """Draws an ``(H, W, 3)`` array: sharp pixels when enlarged, smoothed when shrunk."""
    h, w = arr.shape[:2]
    enlarged = max(h, w) <= cell_in * DPI
    ax.imshow(arr, interpolation="nearest" if enlarged else "auto", aspect="equal", resample=not enlarged)


def _pad_to(arr: np.ndarray, h: int, w: int, value: float = _BLANK) -> np.ndarray:
    """Centres ``arr`` (H, W, 3) on an ``(h, w, 3)`` canvas filled with ``value``."""
    ah, aw = arr.shape[:2]
    if (ah, aw) == (h, w):
        return arr
    out = np.full((h, w, 3), value, dtype=np.float32)
    top, left = (h - ah) // 2, (w - aw) // 2
    out[top : top + ah, left : left + aw] = arr
    return out


def _mosaic(arrs: Sequence[np.ndarray], h: int, w: int, cell_px: float, gap_ratio: float) -> np.ndarray:
    """Tiles up to 9 ``(h, w, 3)`` arrays 3x3 into one image with white gutters.

    Each array is enlarged by the integer factor that brings its longer side nearest
    to ``cell_px`` (at least 1); missing cells are filled light grey. One image per
    grid instead of one axes per cell keeps large figures fast to draw.
    """
    f = max(1, round(cell_px / max(h, w)))
    ch, cw = h * f, w * f
    g = max(1, round(max(ch, cw) * gap_ratio))
    out = np.full((3 * ch + 2 * g, 3 * cw + 2 * g, 3), 1.0, dtype=np.float32)
    for i in range(9):
        top, left = (i // 3) * (ch + g), (i % 3) * (cw + g)
        if i < len(arrs):
            out[top : top + ch, left : left + cw] = arrs[i].repeat(f, axis=0).repeat(f, axis=1)
        else:
            out[top : top + ch, left : left + cw] = 0.94
    return out


def _blank_cell(ax: Axes, message: str = "") -> None:
    """Turns ``ax`` into an empty cell, optionally with a short grey message."""
    ax.set_facecolor("#f2f2f2")
    if message:
        ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=_FONT_SMALL, color="#808080",
                transform=ax.transAxes)


def _title_band(title: str | None, width_in: float) -> tuple[str | None, float]:
    """Wraps a figure title to the figure width; returns it and the band height in inches."""
    if not title:
        return None, 0.0
    wrapped = _wrap(title, width_in - 2 * _MARGIN, _FONT_TITLE)
    return wrapped, _text_height(_n_lines(wrapped), _FONT_TITLE) + 0.15


# --------------------------------------------------------------------------- figures


def project_figure(
    image: torch.Tensor,
    projections: Sequence[torch.Tensor],
    boxes: Sequence[tuple[int, int, int, int]],
    titles: Sequence[str],
    suptitle: str,
    path: str | os.PathLike[str],
    *,
    note: str | None = None,
) -> Path:
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
        path: Target PNG; its folder must exist.
        note: Optional small line at the bottom, e.g. how projections are scaled.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: No projections, lists of unequal length, or wrong shapes.
        OSError: The folder is missing or cannot be written.
    """
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
            ax.set_anchor("N")  # non-square panels shrink from below, keeping titles level
            if r == 0:
                ax.set_title(headers[c], fontsize=_FONT_SMALL, color="#404040", pad=4)
            if arr.size == 0:
                _blank_cell(ax, "empty window")
                continue
            _show(ax, arr, cell)
            if c < 2:
                ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                       edgecolor=BOX_COLOR, linewidth=1.8))
    if note_txt:
        _text(fig, _MARGIN, fig_h - _MARGIN, note_txt, ha="left", va="bottom", fontsize=_FONT_SMALL,
              color="#505050")
    return _save_figure(fig, path)


def _clip_box(box: Sequence[int], height: int, width: int) -> tuple[int, int, int, int]:
    """Rounds a ``(top, left, bottom, right)`` window to ints and clips it to the image."""
    top, left, bottom, right = (int(round(float(v))) for v in box)
    top, bottom = max(0, min(top, height)), max(0, min(bottom, height))
    left, right = max(0, min(left, width)), max(0, min(right, width))
    return top, left, max(top, bottom), max(left, right)


def grid_figure(
    cells: Sequence[Sequence[torch.Tensor | None]],
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell_inches: float = 1.2,
) -> Path:
    """Draws a grid of images, e.g. feature maps (rows) across checkpoints (columns).

    Each image fills a square ``cell_inches`` cell, keeping its aspect ratio; small
    images are enlarged with sharp pixels. A ``None`` entry is drawn as a light-grey
    blank cell; rows may be ragged, and places past the end of a short row stay
    empty (white). Row labels are written at the left of each row,
    column labels above the first row (wrapped to the cell width).

    Args:
        cells: Rows of images ``(3, h, w)`` in ``[0, 1]``, or None for a blank cell.
        path: Target PNG; its folder must exist.
        row_labels: One label per row, or None.
        col_labels: One label per column, or None.
        title: Figure title, or None.
        cell_inches: Side of one cell in inches (at least 0.35 is readable).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

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
        fig_w = max(fig_w, min(_text_width(title, _FONT_TITLE) + 2 * _MARGIN, 12.0))
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
    return _save_figure(fig, path)


def mining_figure(
    layer_title: str,
    channels: Sequence[tuple[int, Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[float]]],
    path: str | os.PathLike[str],
    *,
    columns: int = 4,
    cell_inches: float = 0.42,
) -> Path:
    """Draws top activations per channel as in Zeiler & Fergus (2014), Fig. 2.

    For each channel a 3x3 grid of projections (each normalised on its own with
    :func:`normalize_projection`) stands beside a 3x3 grid of the matching input
    patches, under a label ``"ch N"`` (with the largest value, if any). Channels are
    placed ``columns`` per figure row, in the given order. Within one channel all 18
    cells share one pixel scale: each is centred on a white canvas of the largest
    height and width among them, so patches clipped at image borders look smaller
    rather than stretched. Missing entries (fewer than 9) are light-grey blanks.

    All channels given are drawn in one figure, whose height grows with their number
    (64 channels at 4 columns: about 28 inches, 2,800 pixels; 256: about 11,000
    pixels, still readable). To split a large layer into pages, call this once per
    slice of ``channels`` and put the page in ``layer_title``.

    Args:
        layer_title: Figure title, e.g. ``"zfnet-cifar10 / conv2: top-9 per channel"``.
        channels: ``(channel_index, projections, patches, values)`` per channel;
            projections are raw ``(3, h, w)``, patches ``(3, h, w)`` in ``[0, 1]``,
            values the activations (only the largest is printed); up to 9 each.
        path: Target PNG; its folder must exist.
        columns: Channels per figure row.
        cell_inches: Side of one thumbnail; at least 0.35 keeps it readable.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: No channels, ``columns < 1``, or wrong shapes.
        OSError: The folder is missing or cannot be written.
    """
    if not channels:
        raise ValueError("mining_figure needs at least one channel")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    columns = min(columns, len(channels))
    cell = max(0.2, cell_inches)
    gap = 0.03
    grid = 3 * cell + 2 * gap
    mid_gap, block_gap, label_h = 0.15, 0.3, _text_height(1, _FONT_LABEL) + 0.06
    block_w = 2 * grid + mid_gap
    block_h = label_h + grid
    n_rows = math.ceil(len(channels) / columns)
    fig_w = 2 * _MARGIN + columns * block_w + (columns - 1) * block_gap
    sup, sup_h = _title_band(layer_title, fig_w)
    sub_h = _text_height(1, _FONT_SMALL) + 0.1
    fig_h = _MARGIN + sup_h + sub_h + n_rows * block_h + (n_rows - 1) * block_gap + _MARGIN
    fig = _new_figure(fig_w, fig_h)
    if sup:
        _text(fig, fig_w / 2, _MARGIN, sup, ha="center", va="top", fontsize=_FONT_TITLE, fontweight="bold")
    _text(fig, fig_w / 2, _MARGIN + sup_h, "left: projections (0 = grey, each scaled by its max |value|)"
          "    right: input patches", ha="center", va="top", fontsize=_FONT_SMALL, color="#505050")
    top0 = _MARGIN + sup_h + sub_h
    for k, (index, projections, patches, values) in enumerate(channels):
        if len(projections) > 9 or len(patches) > 9:
            raise ValueError(f"channel {index}: at most 9 projections and patches, "
                             f"got {len(projections)} and {len(patches)}")
        r, c = divmod(k, columns)
        x0 = _MARGIN + c * (block_w + block_gap)
        y0 = top0 + r * (block_h + block_gap)
        label = f"ch {index}"
        if len(values):
            label += f"   max {max(float(v) for v in values):.3g}"
        _text(fig, x0, y0 + label_h - 0.04, label, ha="left", va="bottom", fontsize=_FONT_LABEL)
        arrs = [_to_hwc(normalize_projection(p)) for p in projections], [_to_hwc(p) for p in patches]
        sizes = [a.shape[:2] for group in arrs for a in group]
        ch = max([1] + [s[0] for s in sizes])
        cw = max([1] + [s[1] for s in sizes])
        for g, group in enumerate(arrs):
            ax = _axes(fig, x0 + g * (grid + mid_gap), y0 + label_h, grid, grid)
            ax.set_anchor("NW")
            ax.set_axis_off()
            mosaic = _mosaic([_pad_to(a, ch, cw) for a in group], ch, cw, cell * DPI, gap / cell)
            _show(ax, mosaic, grid)
    return _save_figure(fig, path)


def filter_grid(weight: torch.Tensor, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Draws convolution filters ``(out, in, k, k)`` as a grid of small images.

    With 3 input channels each filter is an RGB image; otherwise the mean over input
    channels is shown as grey. Each filter is normalised on its own like a projection
    (0 is grey, its largest absolute value is black or white). The grid is about
    square (at most 16 per row); each row is labelled with its first filter's index.

    Args:
        weight: Convolution weight ``(out, in, kh, kw)``.
        path: Target PNG; its folder must exist.
        title: Figure title, or None.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``weight`` is not 4-D or has no filters.
        OSError: The folder is missing or cannot be written.
    """
    if weight.dim() != 4 or weight.shape[0] == 0:
        raise ValueError(f"expected a convolution weight (out, in, kh, kw), got shape {tuple(weight.shape)}")
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    images = normalize_projection(w)
    n = images.shape[0]
    n_cols = min(16, math.ceil(math.sqrt(n)))
    n_rows = math.ceil(n / n_cols)
    cells: list[list[torch.Tensor | None]] = [
        [images[i] for i in range(r * n_cols, min(n, (r + 1) * n_cols))] for r in range(n_rows)
    ]
    labels = [str(r * n_cols) for r in range(n_rows)]
    cell_in = 0.6 if n_cols > 8 else 0.9
    return grid_figure(cells, path, row_labels=labels, title=title, cell_inches=cell_in)
