"""Rendering: turns image and projection tensors into readable figures and PNG files.

Every figure function returns a :class:`matplotlib.figure.Figure`, drawn with an
explicit :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, so importing this
module never touches pyplot or the user's interactive backend; in a notebook the
returned figure displays itself. Writing a PNG is optional: pass ``path``. Layouts are
computed in inches by hand (no ``tight_layout``), so text sizes are predictable: at
the written size (``dpi`` 100) body text is 9 to 10 pt and titles 13 pt.

Every PNG is written atomically (a temporary file beside the target, renamed over it):
a missing or unwritable output folder raises the ``OSError`` (``FileNotFoundError``,
``PermissionError``, ``NotADirectoryError``) before anything is written, and a failure
while writing leaves neither the target nor a temporary file behind. Figures are also
flushed to disk (``fsync``, through :func:`zfvis._io.atomic_open`); the many small
tiles of :func:`save_image` and :func:`save_images` are not unless ``sync=True``, which
would cost more than encoding them.

Tensor conventions: CPU float tensors; an image is ``(3, H, W)`` in ``[0, 1]``
(``(1, H, W)`` and ``(H, W)`` greyscale are accepted where an image is drawn); a
deconvnet projection is ``(3, H, W)`` of any sign and is shown through
:func:`normalize_projection` (0 is mid-grey).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
import textwrap
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from matplotlib.transforms import Bbox, IdentityTransform, TransformedBbox
from PIL import Image, ImageDraw, ImageFont

from zfvis._io import atomic_open, atomic_write_bytes

__all__ = [
    "DPI",
    "BOX_COLOR",
    "normalize_projection",
    "to_pil",
    "upscale_nearest",
    "encode_png",
    "save_image",
    "save_images",
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
_MAX_PIXELS = 60000  # Agg refuses images with a side of 2**16 pixels or more
#: zlib level of written PNGs: 1 is several times faster than Pillow's default 6 and,
#: on projections, patches and figures of flat colour, within a few percent of its size.
PNG_COMPRESS_LEVEL = 1
_GREY_BLANK = 240  # light grey of missing cells (0.94)

#: An image accepted by :func:`save_image`: a tensor ``(3, H, W)``/``(1, H, W)``/``(H, W)``,
#: float in ``[0, 1]`` or uint8, or a NumPy array ``(H, W, 3)``/``(H, W)`` likewise.
ImageLike = torch.Tensor | np.ndarray


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


def _u8_from_array(arr: np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 array from a NumPy image ``(H, W, 3)``, ``(H, W, 1)`` or ``(H, W)``."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected an array image (H, W, 3) or (H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def _u8(img: ImageLike) -> np.ndarray:
    """Converts any :data:`ImageLike` to an ``(H, W, 3)`` uint8 array (see :func:`to_pil`)."""
    if isinstance(img, torch.Tensor):
        t = img.detach().to("cpu")
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"expected an image (3, H, W), (1, H, W) or (H, W), got shape {tuple(img.shape)}")
        img = (t if t.dtype == torch.uint8 else t.to(torch.float32)).permute(1, 2, 0).numpy()
    return _u8_from_array(img)


def _projection_u8(p: torch.Tensor) -> np.ndarray:
    """``_u8(normalize_projection(p))`` for one projection ``(C, H, W)``, computed in NumPy.

    The same float32 arithmetic as :func:`normalize_projection`, without a dozen small
    tensor operations per tile: a mining page has over a thousand tiles.
    """
    if p.dim() != 3 or p.shape[0] not in (1, 3):
        raise ValueError(f"expected a projection (3, H, W) or (1, H, W), got shape {tuple(p.shape)}")
    a = p.detach().to("cpu", torch.float32).numpy()
    if not np.isfinite(a).all():
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    peak = np.abs(a).max() if a.size else np.float32(0.0)
    scale = np.float32(0.5) / peak if peak > 0 else np.float32(0.0)
    return _u8_from_array(np.clip(np.float32(0.5) + a * scale, 0.0, 1.0).transpose(1, 2, 0))


def to_pil(img: ImageLike) -> Image.Image:
    """Converts an image to an 8-bit RGB Pillow image.

    Args:
        img: A tensor ``(3, H, W)`` in ``[0, 1]`` (``(1, H, W)`` and ``(H, W)`` are
            shown as grey; values outside are clipped, NaN becomes 0) or uint8 in
            ``[0, 255]``; or a NumPy array ``(H, W, 3)`` or ``(H, W)``, likewise.

    Returns:
        The RGB image, each value rounded to the nearest of 256 levels.

    Raises:
        ValueError: The shape is not an image's.
    """
    return Image.fromarray(_u8(img))


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


def encode_png(img: ImageLike, *, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Encodes one image as PNG bytes at its own pixel size.

    Args:
        img: An image (see :func:`to_pil`).
        compress_level: zlib level, 0 (none, fastest) to 9 (smallest).

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: The shape is not an image's, or the level is not in 0..9.
    """
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be in 0..9, got {compress_level}")
    return b"".join(_png_chunks(_u8(img), compress_level=compress_level))


def save_image(
    img: ImageLike,
    path: str | os.PathLike[str],
    *,
    compress_level: int = PNG_COMPRESS_LEVEL,
    sync: bool = False,
) -> Path:
    """Writes one image as a PNG, atomically, at its own pixel size.

    Made for the many small tiles of a mining run: a uint8 image is encoded without
    any float round trip, and the file is not flushed to disk unless ``sync`` (the
    write is atomic either way: the target is complete or untouched).

    Args:
        img: An image (see :func:`to_pil`): a tensor ``(3, H, W)`` float in ``[0, 1]``
            or uint8, or a NumPy array ``(H, W, 3)``.
        path: Target file; its folder must exist.
        compress_level: zlib level, 0 to 9.
        sync: Flush the file to disk before renaming it over ``path``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: The folder is missing or cannot be written.
        ValueError: The shape is not an image's.
    """
    path = Path(path)
    atomic_write_bytes(path, encode_png(img, compress_level=compress_level), sync=sync)
    return path


def save_images(
    items: Iterable[tuple[ImageLike, str | os.PathLike[str]]],
    *,
    compress_level: int = PNG_COMPRESS_LEVEL,
    sync: bool = False,
) -> list[Path]:
    """Writes many images as PNGs, each atomically (see :func:`save_image`).

    Args:
        items: ``(image, path)`` pairs; each folder must exist.
        compress_level: zlib level, 0 to 9.
        sync: Flush each file to disk before renaming it into place.

    Returns:
        The paths written, in order.

    Raises:
        OSError: A folder is missing or cannot be written (the files before it are
            written, the others not).
        ValueError: A shape is not an image's.
    """
    return [save_image(img, path, compress_level=compress_level, sync=sync) for img, path in items]


def _new_figure(width_in: float, height_in: float) -> Figure:
    """A white figure of the given size in inches, attached to an Agg canvas."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Writes ``fig`` as a PNG atomically; the dpi is lowered only if Agg's size limit needs it.

    At the figure's own dpi the canvas is drawn once and its RGB pixels are streamed out
    by :func:`_png_chunks` (zlib level :data:`PNG_COMPRESS_LEVEL`): about twice as fast
    as matplotlib's RGBA PNG through Pillow, and smaller. A page image that
    :func:`_pixel_image` placed (nothing drawn over it) is copied into the drawn
    pixels rather than composited by Agg: the same pixels, without the cost.
    """
    path = Path(path)
    w_in, h_in = fig.get_size_inches()
    dpi = min(float(DPI), _MAX_PIXELS / max(w_in, h_in, 1e-6))
    with atomic_open(path, "wb") as fh:
        if dpi != fig.dpi:
            fig.savefig(fh, format="png", dpi=dpi, facecolor="white",
                        pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
            return path
        pages = [im for ax in fig.axes for im in ax.get_images() if isinstance(im, _PixelImage) and im.exact()]
        for im in pages:
            im.set_visible(False)
        try:
            fig.canvas.draw()
        finally:
            for im in pages:
                im.set_visible(True)
        rgb = np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
        for im in pages:
            im.paste_into(rgb)
        for chunk in _png_chunks(rgb, compress_level=PNG_COMPRESS_LEVEL):
            fh.write(chunk)
    return path


def _png_chunks(rgb: np.ndarray, *, compress_level: int) -> Iterator[bytes]:
    """Encodes an ``(H, W, 3)`` uint8 image as an 8-bit RGB PNG, piece by piece.

    Every row uses PNG filter 2 ("up": the difference to the row above), computed in
    NumPy, where Pillow picks one of PNG's five filters row by row: on photo tiles the
    files are within a few percent of Pillow's, on figures smaller, and encoding is two
    to three times faster. The pixels are deflated in bands of rows, so memory stays
    small.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    yield b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    z = zlib.compressobj(compress_level)
    band = max(1, (1 << 22) // max(1, 3 * w))  # about 4 MB of pixels at a time
    above = np.zeros(3 * w, dtype=np.uint8)
    for top in range(0, h, band):
        rows = rgb[top : top + band].reshape(-1, 3 * w)
        raw = np.empty((rows.shape[0], 1 + 3 * w), dtype=np.uint8)
        raw[:, 0] = 2
        np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 arithmetic wraps modulo 256
        np.subtract(rows[0], above, out=raw[0, 1:])
        above = rows[-1]
        data = z.compress(raw.tobytes())
        if data:
            yield chunk(b"IDAT", data)
    yield chunk(b"IDAT", z.flush()) + chunk(b"IEND", b"")


def _finish(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
    """Writes ``fig`` to ``path`` when one is given; returns ``fig``."""
    if path is not None:
        _save_figure(fig, path)
    return fig


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
    return _finish(fig, path)


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


Channel = tuple[int, Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[float]]


def mining_figure(
    layer_title: str,
    channels: Sequence[Channel],
    path: str | os.PathLike[str] | None = None,
    *,
    columns: int = 4,
    cell_inches: float = 0.42,
) -> Figure:
    """Draws top activations per channel as in Zeiler & Fergus (2014), Fig. 2.

    For each channel a 3x3 grid of projections (each normalised on its own with
    :func:`normalize_projection`) stands beside a 3x3 grid of the matching input
    patches, under a label ``"ch N"`` (with the largest value, if any). Channels are
    placed ``columns`` per figure row, in the given order. Within one channel all 18
    cells share one pixel scale: each is centred on a white canvas of the largest
    height and width among them, so patches clipped at image borders look smaller
    rather than stretched. Small tiles are enlarged by a whole factor (sharp
    pixels), large ones reduced with a Lanczos filter. Missing entries (fewer than 9)
    are light-grey blanks.

    The whole grid, its channel labels included, is composed as one image at the
    figure's own pixel size and shown by one :class:`~matplotlib.axes.Axes` under the
    title (figure text): a page of 64 channels draws and writes in a fraction of a
    second. All channels given are drawn in one figure, whose height grows with their
    number (64 channels at 4 columns and ``cell_inches=0.6``: 15 to 18 inches wide, 36
    to 42 tall). To split a large layer into
    pages, call this once per slice of ``channels`` and put the page in
    ``layer_title``.

    Args:
        layer_title: Figure title, e.g. ``"zfnet-cifar10 / conv2: top-9 per channel"``.
        channels: ``(channel_index, projections, patches, values)`` per channel;
            projections are raw ``(3, h, w)`` (or uint8 tiles already shown, as mining
            writes them), patches ``(3, h, w)`` in ``[0, 1]`` (or uint8), values the
            activations (only the largest is printed); up to 9 each.
        path: Target PNG (its folder must exist), or None to write nothing.
        columns: Channels per figure row.
        cell_inches: Side of one thumbnail; at least 0.35 keeps it readable.

    Returns:
        The figure (written to ``path`` first, when given). Its one axes holds the
        grid image with the channel labels; ``fig.texts`` hold the title and the legend.

    Raises:
        ValueError: No channels, ``columns < 1``, more than 9 tiles for a channel, or
            wrong shapes.
        OSError: The folder is missing or cannot be written.
    """
    if not channels:
        raise ValueError("mining_figure needs at least one channel")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    columns = min(columns, len(channels))
    target = max(1, round(max(0.2, cell_inches) * DPI))
    blocks = [_channel_cells(index, projections, patches, target) for index, projections, patches, _ in channels]
    cell = max(b.side for b in blocks)
    lay = _MiningLayout(cell, columns, math.ceil(len(channels) / columns))
    page = np.full((lay.height, lay.width, 3), 255, dtype=np.uint8)  # white RGB
    for k, cells in enumerate(blocks):
        lay.paste(page, k, cells)
    lay.labels = [f"ch {index}" + (f"   max {max(float(v) for v in values):.3g}" if len(values) else "")
                  for index, _, _, values in channels]
    lay.write_labels(page)

    fig_w = (lay.width + 2 * lay.margin) / DPI
    sup, sup_h = _title_band(layer_title, fig_w)
    sub_h = _text_height(1, _FONT_SMALL) + 0.1
    head_px = math.ceil((sup_h + sub_h) * DPI)
    fig_h = (lay.margin + head_px + lay.height + lay.margin) / DPI
    fig = _new_figure(fig_w, fig_h)
    if sup:
        _text(fig, fig_w / 2, _MARGIN, sup, ha="center", va="top", fontsize=_FONT_TITLE, fontweight="bold")
    _text(fig, fig_w / 2, _MARGIN + sup_h, "left: projections (0 = grey, each scaled by its max |value|)"
          "    right: input patches", ha="center", va="top", fontsize=_FONT_SMALL, color="#505050")
    _pixel_image(fig, page, lay.margin, lay.margin + head_px)
    fig._zfvis_layout = lay  # type: ignore[attr-defined]  # where each cell and label is, for tests and tools
    return _finish(fig, path)


@dataclasses.dataclass
class _Cells:
    """One channel's 9 + 9 tiles (uint8, before enlarging) on one pixel scale.

    Tile ``i`` of a group sits at ``offsets[g][i]`` (rows, columns, before enlarging) on a
    white canvas of ``canvas`` pixels, enlarged ``factor`` times (1 when reduced already).
    """

    groups: tuple[list[np.ndarray], list[np.ndarray]]
    offsets: tuple[list[tuple[int, int]], list[tuple[int, int]]]
    canvas: tuple[int, int]
    factor: int

    @property
    def side(self) -> int:
        """The longer side of the enlarged canvas."""
        return max(self.canvas) * self.factor


def _display_u8(p: torch.Tensor, *, projection: bool) -> np.ndarray:
    """A tile as shown, (h, w, 3) uint8: a raw projection through :func:`normalize_projection`;
    a uint8 tile (already shown, as mining writes them) or a patch in [0, 1] as it is."""
    return _projection_u8(p) if projection and p.dtype != torch.uint8 else _u8(p)


def _channel_cells(
    index: int, projections: Sequence[torch.Tensor], patches: Sequence[torch.Tensor], target: int
) -> _Cells:
    """One channel's projection and patch tiles on one scale: each centred on a white
    canvas of the largest height and width among them, the canvas's longer side scaled
    near ``target`` pixels (enlarged by a whole factor, or reduced with Lanczos)."""
    if len(projections) > 9 or len(patches) > 9:
        raise ValueError(f"channel {index}: at most 9 projections and patches, "
                         f"got {len(projections)} and {len(patches)}")
    groups = ([_display_u8(p, projection=True) for p in projections],
              [_display_u8(p, projection=False) for p in patches])
    h = max([1] + [a.shape[0] for g in groups for a in g])
    w = max([1] + [a.shape[1] for g in groups for a in g])
    blank = np.full((h, w, 3), _GREY_BLANK, dtype=np.uint8)
    full = tuple(g + [blank] * (9 - len(g)) for g in groups)
    if max(h, w) > target:  # reduce: pad, then resample each canvas
        size = (max(1, round(w * target / max(h, w))), max(1, round(h * target / max(h, w))))
        reduced = tuple([np.asarray(Image.fromarray(_pad_u8(a, h, w)).resize(size, Image.LANCZOS)) for a in g]
                        for g in full)
        return _Cells(reduced, ([(0, 0)] * 9, [(0, 0)] * 9), (size[1], size[0]), 1)  # type: ignore[arg-type]
    offsets = tuple([((h - a.shape[0]) // 2, (w - a.shape[1]) // 2) for a in g] for g in full)
    return _Cells(full, offsets, (h, w), max(1, round(target / max(h, w))))  # type: ignore[arg-type]


def _pad_u8(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Centres ``arr`` (H, W, 3) uint8 on a white ``(h, w, 3)`` canvas."""
    ah, aw = arr.shape[:2]
    if (ah, aw) == (h, w):
        return arr
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    top, left = (h - ah) // 2, (w - aw) // 2
    out[top : top + ah, left : left + aw] = arr
    return out


def _put(page: np.ndarray, top: int, left: int, tile: np.ndarray, f: int) -> None:
    """Writes ``tile`` (h, w, 3) enlarged ``f`` times (sharp pixels) into ``page`` at ``(top, left)``."""
    h, w = tile.shape[:2]
    if f == 1:
        page[top : top + h, left : left + w] = tile
        return
    page[top : top + h * f, left : left + w * f].reshape(h, f, w, f, 3)[:] = tile[:, None, :, None]


@dataclasses.dataclass
class _MiningLayout:
    """Pixel layout of :func:`mining_figure`'s grid: blocks of two 3x3 grids under a label."""

    cell: int
    columns: int
    rows: int
    gap: int = round(0.03 * DPI)
    mid_gap: int = round(0.15 * DPI)
    block_gap: int = round(0.3 * DPI)
    label: int = round((_text_height(1, _FONT_LABEL) + 0.06) * DPI)
    margin: int = round(_MARGIN * DPI)
    labels: list[str] = dataclasses.field(default_factory=list)  # block k's label, drawn above its grids

    @property
    def grid(self) -> int:
        return 3 * self.cell + 2 * self.gap

    @property
    def width(self) -> int:
        block = 2 * self.grid + self.mid_gap
        return self.columns * block + (self.columns - 1) * self.block_gap

    @property
    def height(self) -> int:
        return self.rows * (self.label + self.grid) + (self.rows - 1) * self.block_gap

    def origin(self, k: int) -> tuple[int, int]:
        """Top-left pixel ``(x, y)`` of block ``k`` (its label's top) in the grid image."""
        r, c = divmod(k, self.columns)
        return c * (2 * self.grid + self.mid_gap + self.block_gap), r * (self.label + self.grid + self.block_gap)

    def write_labels(self, page: np.ndarray) -> None:
        """Writes every block's label in black into its band of ``page`` (H, W, 3), in
        DejaVu Sans at 10 pt.

        Drawn into the pixels with Pillow (the font matplotlib ships): a matplotlib text
        per label costs a few milliseconds, 64 of them more than the rest of a page.
        """
        font = _label_font(round(_FONT_LABEL * DPI / 72.0))
        width = 2 * self.grid + self.mid_gap + self.block_gap  # up to the next block
        for k, text in enumerate(self.labels):
            x, y = self.origin(k)
            mask = Image.new("L", (min(width, page.shape[1] - x), self.label))
            ImageDraw.Draw(mask).text((0, self.label - 4), text, fill=255, font=font, anchor="ld")
            ink = np.asarray(mask, dtype=np.uint16)[..., None]
            band = page[y : y + self.label, x : x + mask.width]
            band[:] = (band * (255 - ink) + 127) // 255  # black text over the band, antialiased

    def paste(self, page: np.ndarray, k: int, cells: _Cells) -> None:
        """Writes block ``k``'s two groups of 9 tiles into ``page``, each canvas centred in its cell."""
        x0, y0 = self.origin(k)
        f = cells.factor
        ch, cw = cells.canvas[0] * f, cells.canvas[1] * f
        for g, (tiles, offsets) in enumerate(zip(cells.groups, cells.offsets)):
            gx, gy = x0 + g * (self.grid + self.mid_gap), y0 + self.label
            for i, (t, (oy, ox)) in enumerate(zip(tiles, offsets)):
                top = gy + (i // 3) * (self.cell + self.gap) + (self.cell - ch) // 2 + oy * f
                left = gx + (i % 3) * (self.cell + self.gap) + (self.cell - cw) // 2 + ox * f
                _put(page, top, left, t, f)


@functools.lru_cache(maxsize=4)
def _label_font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (matplotlib's own font) at ``size_px`` pixels per em."""
    from matplotlib import font_manager

    try:
        return ImageFont.truetype(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans")), size_px)
    except OSError:  # pragma: no cover - matplotlib always ships it
        return ImageFont.load_default()


class _PixelImage(AxesImage):
    """An RGB uint8 image drawn pixel for pixel when its axes are exactly its size.

    Matplotlib resamples every image it draws, which for a page-sized image costs far
    more than the page's text. Where the image's extent on the canvas is exactly its
    own size at whole-pixel offsets (as :func:`_pixel_image` places it), this hands the
    pixels to the renderer unchanged; at any other size (another dpi, a resized figure)
    matplotlib's own nearest-neighbour resampling draws it.
    """

    def __init__(self, ax: Axes, rgba: np.ndarray) -> None:
        h, w = rgba.shape[:2]
        super().__init__(ax, interpolation="nearest", resample=False, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        self.set_data(rgba)

    def _normalize_image_array(self, A: Any) -> Any:  # noqa: N803 - matplotlib's name
        """An RGB uint8 page as it is: matplotlib's check copies and scans every pixel."""
        if isinstance(A, np.ndarray) and A.dtype == np.uint8 and A.ndim == 3 and A.shape[2] == 3:
            return A
        return super()._normalize_image_array(A)

    def _placement(self) -> tuple[int, int, bool]:
        """The image's lower-left canvas pixel and whether it is drawn exactly at its own size there."""
        x1, x2, y1, y2 = self.get_extent()
        box = TransformedBbox(Bbox([[x1, y1], [x2, y2]]), self.get_transform())
        rgba = np.asarray(self.get_array())
        h, w = rgba.shape[:2]
        exact = (
            rgba.dtype == np.uint8 and rgba.ndim == 3 and rgba.shape[2] == 3
            and abs(abs(box.width) - w) < 1e-6 and abs(abs(box.height) - h) < 1e-6
            and abs(box.xmin - round(box.xmin)) < 1e-6 and abs(box.ymin - round(box.ymin)) < 1e-6
        )
        return round(box.xmin), round(box.ymin), exact

    def exact(self) -> bool:
        """Whether the image is visible and drawn pixel for pixel on the canvas."""
        return self.get_visible() and self._placement()[2]

    def paste_into(self, rgb: np.ndarray) -> None:
        """Copies the image's RGB pixels into a drawn canvas ``rgb`` (H, W, 3), top row first."""
        x0, y0, _ = self._placement()
        page = np.asarray(self.get_array())
        h, w = page.shape[:2]
        top = rgb.shape[0] - y0 - h
        rgb[top : top + h, x0 : x0 + w] = page

    def make_image(self, renderer: Any, magnification: float = 1.0, unsampled: bool = False) -> Any:
        """The RGBA pixels and their lower-left corner; resampled unless drawn at their own size."""
        x0, y0, exact = self._placement()
        if magnification != 1.0 or unsampled or not exact:
            return super().make_image(renderer, magnification, unsampled)
        page = np.asarray(self.get_array())
        rgba = np.empty((*page.shape[:2], 4), dtype=np.uint8)
        rgba[..., :3] = page[::-1]  # the renderer takes RGBA rows bottom-up
        rgba[..., 3] = 255
        return rgba, x0, y0, IdentityTransform()


def _pixel_image(fig: Figure, arr: np.ndarray, left_px: int, top_px: int) -> Axes:
    """Shows ``arr`` (H, W, 3) RGB uint8 pixel for pixel at ``(left_px, top_px)`` from the top-left corner."""
    fw, fh = fig.bbox.width, fig.bbox.height
    h, w = arr.shape[:2]
    ax = fig.add_axes((left_px / fw, 1.0 - (top_px + h) / fh, w / fw, h / fh))
    ax.set_axis_off()
    ax.add_image(_PixelImage(ax, arr))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    return ax


def filter_grid(
    weight: torch.Tensor, path: str | os.PathLike[str] | None = None, *, title: str | None = None
) -> Figure:
    """Draws convolution filters ``(out, in, k, k)`` as a grid of small images.

    With 3 input channels each filter is an RGB image; otherwise the mean over input
    channels is shown as grey. Each filter is normalised on its own like a projection
    (0 is grey, its largest absolute value is black or white). The grid is about
    square (at most 16 per row); each row is labelled with its first filter's index.

    Args:
        weight: Convolution weight ``(out, in, kh, kw)``.
        path: Target PNG (its folder must exist), or None to write nothing.
        title: Figure title, or None.

    Returns:
        The figure (written to ``path`` first, when given).

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
