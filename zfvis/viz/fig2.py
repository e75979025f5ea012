"""The Fig. 2 page of mined channels: for each channel its top projections beside their image
patches, drawn straight into pixels (Pillow) at the tiles' own size."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from .layout import (
    DPI,
    FONT_LABEL,
    FONT_SMALL,
    FONT_TITLE,
    MARGIN,
    finish,
    label_font,
    new_figure,
    pixel_image,
    text,
    text_height,
    title_band,
)
from .render import _GREY_BLANK, _projection_u8, _u8

__all__ = ["Channel", "mining_figure"]

Channel = tuple[int, Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[float]]


def mining_figure(
    layer_title: str,
    channels: Sequence[Channel],
    path: str | os.PathLike[str] | None = None,
    *,
    columns: int = 4,
    cell_inches: float = 0.42,
    synthetic: Sequence[torch.Tensor | None] | None = None,
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
        synthetic: Optional, per channel, an image that maximises it ((3, H, W) uint8 or in
            [0, 1]; ``None``: a grey blank), drawn left of its grids as large as one grid
            (feature visualization, :func:`zfvis.feature_vis`).

    Returns:
        The figure (written to ``path`` first, when given). Its one axes holds the
        grid image with the channel labels; ``fig.texts`` hold the title and the legend.

    Raises:
        ValueError: No channels, ``columns < 1``, more than 9 tiles for a channel, or
            wrong shapes, or ``synthetic`` not one per channel.
        OSError: The folder is missing or cannot be written.
    """
    if not channels:
        raise ValueError("mining_figure needs at least one channel")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    if synthetic is not None and len(synthetic) != len(channels):
        raise ValueError(f"synthetic must have one image (or None) per channel: {len(channels)}, got {len(synthetic)}")
    page, lay = _grid(channels, min(columns, len(channels)), cell_inches, synthetic)
    fig_w = (lay.width + 2 * lay.margin) / DPI
    sup, sup_h = title_band(layer_title, fig_w)
    sub_h = text_height(1, FONT_SMALL) + 0.1
    head_px = math.ceil((sup_h + sub_h) * DPI)
    fig_h = (lay.margin + head_px + lay.height + lay.margin) / DPI
    fig = new_figure(fig_w, fig_h)
    if sup:
        text(fig, fig_w / 2, MARGIN, sup, ha="center", va="top", fontsize=FONT_TITLE, fontweight="bold")
    text(fig, fig_w / 2, MARGIN + sup_h, _LEGEND[synthetic is not None], ha="center", va="top", fontsize=FONT_SMALL,
         color="#505050")
    pixel_image(fig, page, lay.margin, lay.margin + head_px)
    fig._zfvis_layout = lay  # type: ignore[attr-defined]  # where each cell and label is, for tests and tools
    return finish(fig, path)


_LEGEND = ("left: projections (0 = grey, each scaled by its max |value|)    right: input patches",
           "left: synthetic image (feature visualization)    middle: projections (0 = grey, each scaled by its "
           "max |value|)    right: input patches")


def _grid(channels: Sequence[Channel], columns: int, cell_inches: float,
          synthetic: Sequence[torch.Tensor | None] | None) -> tuple[np.ndarray, _MiningLayout]:  # fmt: skip
    """The page's grid as one RGB image, with its layout: the channels' blocks and labels."""
    target = max(1, round(max(0.2, cell_inches) * DPI))
    blocks = [_channel_cells(index, projections, patches, target) for index, projections, patches, _ in channels]
    cell = max(b.side for b in blocks)
    lay = _MiningLayout(cell, columns, math.ceil(len(channels) / columns), lead=synthetic is not None)
    page = np.full((lay.height, lay.width, 3), 255, dtype=np.uint8)  # white RGB
    for k, cells in enumerate(blocks):
        lay.paste(page, k, cells)
        if synthetic is not None:
            lay.paste_synthetic(page, k, synthetic[k])
    lay.labels = [f"ch {index}" + (f"   max {max(float(v) for v in values):.3g}" if len(values) else "")
                  for index, _, _, values in channels]
    lay.write_labels(page)
    return page, lay


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
    label: int = round((text_height(1, FONT_LABEL) + 0.06) * DPI)
    margin: int = round(MARGIN * DPI)
    labels: list[str] = dataclasses.field(default_factory=list)  # block k's label, drawn above its grids
    lead: bool = False  # a synthetic image, one grid large, left of each block's grids

    @property
    def grid(self) -> int:
        return 3 * self.cell + 2 * self.gap

    @property
    def shift(self) -> int:
        """Where a block's projection grid begins, from the block's left edge."""
        return self.grid + self.mid_gap if self.lead else 0

    @property
    def block(self) -> int:
        return self.shift + 2 * self.grid + self.mid_gap

    @property
    def width(self) -> int:
        return self.columns * self.block + (self.columns - 1) * self.block_gap

    @property
    def height(self) -> int:
        return self.rows * (self.label + self.grid) + (self.rows - 1) * self.block_gap

    def origin(self, k: int) -> tuple[int, int]:
        """Top-left pixel ``(x, y)`` of block ``k`` (its label's top) in the grid image."""
        r, c = divmod(k, self.columns)
        return c * (self.block + self.block_gap), r * (self.label + self.grid + self.block_gap)

    def write_labels(self, page: np.ndarray) -> None:
        """Writes every block's label in black into its band of ``page`` (H, W, 3), in
        DejaVu Sans at 10 pt.

        Drawn into the pixels with Pillow (the font matplotlib ships): a matplotlib text
        per label costs a few milliseconds, 64 of them more than the rest of a page.
        """
        font = label_font(round(FONT_LABEL * DPI / 72.0))
        width = self.block + self.block_gap  # up to the next block
        for k, label in enumerate(self.labels):
            x, y = self.origin(k)
            mask = Image.new("L", (min(width, page.shape[1] - x), self.label))
            ImageDraw.Draw(mask).text((0, self.label - 4), label, fill=255, font=font, anchor="ld")
            ink = np.asarray(mask, dtype=np.uint16)[..., None]
            band = page[y : y + self.label, x : x + mask.width]
            band[:] = (band * (255 - ink) + 127) // 255  # black text over the band, antialiased

    def paste(self, page: np.ndarray, k: int, cells: _Cells) -> None:
        """Writes block ``k``'s two groups of 9 tiles into ``page``, each canvas centred in its cell."""
        x0, y0 = self.origin(k)
        x0 += self.shift
        f = cells.factor
        ch, cw = cells.canvas[0] * f, cells.canvas[1] * f
        for g, (tiles, offsets) in enumerate(zip(cells.groups, cells.offsets)):
            gx, gy = x0 + g * (self.grid + self.mid_gap), y0 + self.label
            for i, (t, (oy, ox)) in enumerate(zip(tiles, offsets)):
                top = gy + (i // 3) * (self.cell + self.gap) + (self.cell - ch) // 2 + oy * f
                left = gx + (i % 3) * (self.cell + self.gap) + (self.cell - cw) // 2 + ox * f
                _put(page, top, left, t, f)

    def paste_synthetic(self, page: np.ndarray, k: int, image: torch.Tensor | None) -> None:
        """Writes block ``k``'s synthetic image left of its grids, enlarged by the largest whole
        factor that fits one grid (sharp pixels), or reduced to it (Lanczos); ``None``: a grey blank."""
        x0, y0 = self.origin(k)
        y0 += self.label
        if image is None:
            page[y0 : y0 + self.grid, x0 : x0 + self.grid] = _GREY_BLANK
            return
        arr = _u8(image)
        h, w = arr.shape[:2]
        f = self.grid // max(h, w)
        tile = arr
        if f < 1:  # larger than a grid: reduced
            size = (max(1, round(w * self.grid / max(h, w))), max(1, round(h * self.grid / max(h, w))))
            tile, f = np.asarray(Image.fromarray(arr).resize(size, Image.LANCZOS)), 1
        th, tw = tile.shape[0] * f, tile.shape[1] * f
        _put(page, y0 + (self.grid - th) // 2, x0 + (self.grid - tw) // 2, tile, f)
