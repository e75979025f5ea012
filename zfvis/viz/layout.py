"""The geometry every figure shares: sizes in inches, text extents, axes placed by hand, and
images drawn pixel for pixel (one figure pixel per image pixel, with no resampling)."""

from __future__ import annotations

import functools
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.transforms import Bbox, IdentityTransform, TransformedBbox
from PIL import ImageFont

from ..io.atomic import atomic_open
from ..io.checks import check_path
from ..io.errors import UserInputError, show_path
from . import render
from .render import PNG_COMPRESS_LEVEL

__all__ = [
    "DPI",
    "BOX_COLOR",
    "FONT_TITLE",
    "FONT_LABEL",
    "FONT_SMALL",
    "MARGIN",
    "new_figure",
    "finish",
    "text_width",
    "text_height",
    "wrap",
    "n_lines",
    "axes",
    "text",
    "show",
    "blank_cell",
    "title_band",
    "label_font",
    "pixel_image",
]

#: Resolution of every written figure (pixels per inch); sizes below are in inches.
DPI = 100
#: Colour of receptive-field rectangles (cyan shows on photos and on grey projections).
BOX_COLOR = "#00e5ff"

FONT_TITLE = 13.0
FONT_LABEL = 10.0
FONT_SMALL = 9.0
_CHAR_W = 0.6  # mean DejaVu Sans glyph width in em, used to estimate text extents
_LINE_H = 1.35  # line height in em
MARGIN = 0.25  # outer figure margin, inches
_MAX_PIXELS = 60000  # Agg refuses images with a side of 2**16 pixels or more
def new_figure(width_in: float, height_in: float) -> Figure:
    """A white figure of the given size in inches, attached to an Agg canvas."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


#: File endings a figure may be written as -> matplotlib's format name (PNG is the default).
FIGURE_FORMATS = {"": "png", ".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpeg", ".jpeg": "jpeg",
                  ".eps": "eps", ".ps": "ps"}  # fmt: skip


def figure_format(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """The path of a figure to write and the format its ending names.

    Raises:
        InputTypeError: ``path`` is not a path.
        UserInputError: An ending that names no format zfvis writes.
    """
    path = check_path("path", path)
    fmt = FIGURE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        endings = ", ".join(e for e in FIGURE_FORMATS if e)
        raise UserInputError(f"path {show_path(path)}: zfvis writes figures as {endings}; end the name with one")
    return path, fmt


def save_with_matplotlib(fig: Figure, path: Path, fmt: str, dpi: float) -> Path:
    """Writes ``fig`` atomically with matplotlib's own writer for ``fmt``, recorded as zfvis's."""
    with atomic_open(path, "wb", own=True) as fh:
        fig.savefig(fh, format=fmt, dpi=dpi, facecolor="white")
    return path


def _save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Writes ``fig`` atomically, as a PNG unless the name ends otherwise (:func:`figure_format`),
    recorded as zfvis's; the dpi is lowered only if Agg's size limit needs it.

    At the figure's own dpi the canvas is drawn once and its RGB pixels are streamed out
    by :func:`_png_chunks` (zlib level :data:`PNG_COMPRESS_LEVEL`): about twice as fast
    as matplotlib's RGBA PNG through Pillow, and smaller. A page image that
    :func:`pixel_image` placed (nothing drawn over it) is copied into the drawn
    pixels rather than composited by Agg: the same pixels, without the cost.
    """
    path, fmt = figure_format(path)
    w_in, h_in = fig.get_size_inches()
    dpi = min(float(DPI), _MAX_PIXELS / max(w_in, h_in, 1e-6))
    if fmt != "png":
        return save_with_matplotlib(fig, path, fmt, dpi)
    with atomic_open(path, "wb", own=True) as fh:
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
        for chunk in render._png_chunks(rgb, compress_level=PNG_COMPRESS_LEVEL):  # one encoder for every PNG
            fh.write(chunk)
    return path


def finish(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
    """Writes ``fig`` to ``path`` when one is given; returns ``fig``."""
    if path is not None:
        _save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- layout


def text_width(text: str, fontsize: float) -> float:
    """Estimated width in inches of the longest line of ``text``."""
    longest = max((len(line) for line in text.split("\n")), default=0)
    return longest * fontsize * _CHAR_W / 72.0


def text_height(lines: int, fontsize: float) -> float:
    """Height in inches of ``lines`` lines of text."""
    return lines * fontsize * _LINE_H / 72.0


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """Wraps each line of ``text`` so it fits ``width_in`` inches."""
    chars = max(8, int(width_in * 72.0 / (fontsize * _CHAR_W)))
    return "\n".join(textwrap.fill(line, chars) if line else "" for line in text.split("\n"))


def n_lines(text: str | None) -> int:
    """Number of lines in ``text`` (0 for None or empty)."""
    return 0 if not text else text.count("\n") + 1


def axes(fig: Figure, left: float, top: float, width: float, height: float) -> Axes:
    """Adds axes placed in inches from the figure's top-left corner."""
    fw, fh = fig.get_size_inches()
    ax = fig.add_axes((left / fw, 1.0 - (top + height) / fh, width / fw, height / fh))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#b0b0b0")
        spine.set_linewidth(0.6)
    return ax


def text(fig: Figure, x: float, y: float, s: str, **kwargs: Any) -> None:
    """Places text at ``(x, y)`` inches from the figure's top-left corner."""
    fw, fh = fig.get_size_inches()
    fig.text(x / fw, 1.0 - y / fh, s, **kwargs)


def show(ax: Axes, arr: np.ndarray, cell_in: float) -> None:
    """Draws an ``(H, W, 3)`` array: sharp pixels when enlarged, smoothed when shrunk."""
    h, w = arr.shape[:2]
    enlarged = max(h, w) <= cell_in * DPI
    ax.imshow(arr, interpolation="nearest" if enlarged else "auto", aspect="equal", resample=not enlarged)


def blank_cell(ax: Axes, message: str = "") -> None:
    """Turns ``ax`` into an empty cell, optionally with a short grey message."""
    ax.set_facecolor("#f2f2f2")
    if message:
        ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=FONT_SMALL, color="#808080",
                transform=ax.transAxes)


def title_band(title: str | None, width_in: float) -> tuple[str | None, float]:
    """Wraps a figure title to the figure width; returns it and the band height in inches."""
    if not title:
        return None, 0.0
    wrapped = wrap(title, width_in - 2 * MARGIN, FONT_TITLE)
    return wrapped, text_height(n_lines(wrapped), FONT_TITLE) + 0.15


# --------------------------------------------------------------------------- figures
@functools.lru_cache(maxsize=4)
def label_font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
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
    own size at whole-pixel offsets (as :func:`pixel_image` places it), this hands the
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


def pixel_image(fig: Figure, arr: np.ndarray, left_px: int, top_px: int) -> Axes:
    """Shows ``arr`` (H, W, 3) RGB uint8 pixel for pixel at ``(left_px, top_px)`` from the top-left corner."""
    fw, fh = fig.bbox.width, fig.bbox.height
    h, w = arr.shape[:2]
    ax = fig.add_axes((left_px / fw, 1.0 - (top_px + h) / fh, w / fw, h / fh))
    ax.set_axis_off()
    ax.add_image(_PixelImage(ax, arr))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    return ax
