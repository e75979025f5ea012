"""Encoding what the explorer computes: PNGs of maps and projections, ``.npy`` arrays."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..viz.render import normalize_projection

__all__ = ["MAX_TILE", "MapSprite", "png", "npy", "map_png", "projection_png", "sprite"]

#: The longest side of a map's thumbnail on the grid sprite; larger maps are max-pooled
#: down (peaks stay visible).
MAX_TILE = 64
_LEVEL = 1  # zlib level: fast; these PNGs live in memory for a moment


def png(arr: np.ndarray) -> bytes:
    """An 8-bit PNG of an (H, W) or (H, W, 3) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=_LEVEL)
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    """The bytes of a ``.npy`` file holding ``arr`` (read back with ``numpy.load``)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _scaled(maps: torch.Tensor) -> torch.Tensor:
    """Each map (..., H, W) scaled to [0, 255] by its own maximum; zero and below are black."""
    peak = maps.flatten(-2).amax(dim=-1).clamp_min(0)[..., None, None]
    scale = torch.where(peak > 0, 255.0 / peak.clamp_min(1e-30), torch.zeros_like(peak))
    return (maps.clamp_min(0) * scale).round_().clamp_(0, 255).to(torch.uint8)


def map_png(fmap: torch.Tensor) -> bytes:
    """One feature map (H, W) at its own size, grey, scaled to its own maximum."""
    fmap = torch.nan_to_num(fmap.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    return png(_scaled(fmap).numpy())


def projection_png(p: torch.Tensor) -> bytes:
    """A projection (C, H, W) as the figures show it: zero mid-grey, scaled by its largest
    absolute value."""
    u8 = (normalize_projection(p) * 255).round_().to(torch.uint8)
    if u8.shape[0] == 1:
        u8 = u8.expand(3, -1, -1)
    return png(u8[:3].permute(1, 2, 0).contiguous().numpy())


@dataclasses.dataclass
class MapSprite:
    """A layer's feature maps as one grey image: the thumbnails in a grid, row-major.

    Attributes:
        png: The sprite.
        cols: Thumbnails per row.
        tile: (height, width) of a thumbnail.
        pool: How many map pixels a thumbnail pixel covers (1: the map's own size).
    """

    png: bytes
    cols: int
    tile: tuple[int, int]
    pool: int


def sprite(maps: torch.Tensor) -> MapSprite:
    """The sprite of a layer's maps (C, H, W), each scaled to its own maximum.

    Args:
        maps: The feature maps of one image; a vector layer's units are (F, 1, 1).

    Returns:
        A :class:`MapSprite`.
    """
    maps = torch.nan_to_num(maps.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    c, h, w = maps.shape
    pool = max(1, math.ceil(max(h, w) / MAX_TILE))
    if pool > 1:
        maps = F.max_pool2d(maps[None], pool, pool, ceil_mode=True)[0]
    th, tw = maps.shape[-2:]
    cols = max(1, math.ceil(math.sqrt(c)))
    rows = math.ceil(c / cols)
    u8 = _scaled(maps) if h * w > 1 else _scaled(maps.reshape(1, c, 1)).reshape(c, 1, 1)  # units: one scale
    sheet = torch.zeros(rows * cols, th, tw, dtype=torch.uint8)
    sheet[:c] = u8
    sheet = sheet.reshape(rows, cols, th, tw).permute(0, 2, 1, 3).reshape(rows * th, cols * tw)
    return MapSprite(png(sheet.contiguous().numpy()), cols, (int(th), int(tw)), pool)
