"""A mined channel's tiles in two images: its sheet and its thumbnail.

Pass 2 of mining crops, for each of a channel's top activations, its projection and its
image patch: two *tiles*, each the size of the activation's receptive-field box. A file
system creates a file at a fixed cost, which on some disks is more than drawing the
tile, so a channel's tiles are written as two PNGs, not as two per activation:

- its **sheet**, ``tiles/<layer>/c0042.png``: a row per rank, the projection on the
  left and the patch on the right, each at the top-left of a cell as large as the
  channel's largest tile (the rest of the cell is grey). The gallery's channel page
  shows each tile with CSS (the sheet as a background, cut to the tile), and
  :func:`cut_sheet` takes them back out (:func:`zfvis.mining_page` does);
- its **thumbnail**, ``tiles/<layer>/c0042_top.png``: the strongest activation's
  projection and patch side by side, at their own size, for the layer and model pages.

The layout follows from the entries' boxes alone (:class:`SheetLayout`), which
``topk.json`` records, so nothing else needs to be stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["GREY", "THUMB_GAP", "SheetLayout", "sheet_name", "thumb_name", "make_sheet", "make_thumb", "cut_sheet",
           "read_png"]

#: The grey of the unused part of a cell, and of the gap in a thumbnail (as the gallery's cells).
GREY = 238
#: Pixels of grey between the projection and the patch of a thumbnail.
THUMB_GAP = 1

Box = Sequence[int]


@dataclasses.dataclass(frozen=True)
class SheetLayout:
    """Where each tile of a channel lies on its sheet.

    Attributes:
        sizes: Per rank, the (height, width) of its two tiles (its box's).
    """

    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, boxes: Sequence[Box]) -> SheetLayout:
        """The layout for tiles cropped to ``boxes`` ((top, left, bottom, right) per rank)."""
        return cls(tuple((max(1, int(b[2]) - int(b[0])), max(1, int(b[3]) - int(b[1]))) for b in boxes))

    @property
    def cell(self) -> tuple[int, int]:
        """(height, width) of every cell: the largest tile's."""
        return (max((h for h, _ in self.sizes), default=1), max((w for _, w in self.sizes), default=1))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the sheet: a row per rank, two cells a row."""
        ch, cw = self.cell
        return (max(1, len(self.sizes)) * ch, 2 * cw)

    def place(self, rank: int, patch: bool) -> tuple[int, int]:
        """(top, left) on the sheet of rank ``rank``'s projection (or, with ``patch``, its patch)."""
        ch, cw = self.cell
        return rank * ch, cw if patch else 0


def sheet_name(channel: int) -> str:
    """The file of a channel's sheet in ``tiles/<layer>/``: ``c0042.png``."""
    return f"c{int(channel):04d}.png"


def thumb_name(channel: int) -> str:
    """The file of a channel's thumbnail in ``tiles/<layer>/``: ``c0042_top.png``."""
    return f"c{int(channel):04d}_top.png"


def _check(tile: torch.Tensor) -> torch.Tensor:
    if tile.dtype != torch.uint8 or tile.dim() != 3 or tile.shape[0] != 3:
        raise ValueError(f"a tile must be a uint8 (3, h, w) image, got {tile.dtype} {tuple(tile.shape)}")
    return tile.cpu()


def make_sheet(tiles: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A channel's sheet from its (projection, patch) tiles, uint8 (3, h, w) each, by rank.

    Returns:
        The sheet, uint8 (3, H, W) (see :class:`SheetLayout`).
    """
    layout = SheetLayout(tuple((int(p.shape[1]), int(p.shape[2])) for p, _ in tiles))
    sheet = torch.full((3, *layout.size), GREY, dtype=torch.uint8)
    for r, pair in enumerate(tiles):
        for patch, tile in enumerate(pair):
            tile = _check(tile)
            if tuple(tile.shape[1:]) != layout.sizes[r]:
                raise ValueError(f"rank {r + 1}'s projection and patch differ in size: {layout.sizes[r]} and "
                                 f"{tuple(tile.shape[1:])}")
            top, left = layout.place(r, bool(patch))
            sheet[:, top : top + tile.shape[1], left : left + tile.shape[2]] = tile
    return sheet


def make_thumb(projection: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """A thumbnail: the projection and the patch side by side, :data:`THUMB_GAP` grey
    pixels apart, uint8 (3, h, 2w + gap)."""
    projection, patch = _check(projection), _check(patch)
    gap = torch.full((3, projection.shape[1], THUMB_GAP), GREY, dtype=torch.uint8)
    return torch.cat([projection, gap, patch], dim=2)


def cut_sheet(sheet: torch.Tensor, layout: SheetLayout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (projection, patch) tiles of a sheet, by rank (the inverse of :func:`make_sheet`)."""
    if tuple(sheet.shape[1:]) != layout.size:
        raise ValueError(f"the sheet is {tuple(sheet.shape[1:])}, its layout {layout.size}: it belongs to other boxes")
    out = []
    for r, (h, w) in enumerate(layout.sizes):
        (t, lp), (_, lq) = layout.place(r, False), layout.place(r, True)
        out.append((sheet[:, t : t + h, lp : lp + w].clone(), sheet[:, t : t + h, lq : lq + w].clone()))
    return out


def read_png(path: str | Path) -> torch.Tensor:
    """A PNG as a uint8 (3, H, W) tensor."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
