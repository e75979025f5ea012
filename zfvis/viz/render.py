"""Rendering: turns image and projection tensors into pixels and PNG files.

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
flushed to disk (``fsync``, through :func:`zfvis.io.atomic.atomic_open`); the many small
tiles of :func:`save_image` and :func:`save_images` are not unless ``sync=True``, which
would cost more than encoding them.

Tensor conventions: CPU float tensors; an image is ``(3, H, W)`` in ``[0, 1]``
(``(1, H, W)`` and ``(H, W)`` greyscale are accepted where an image is drawn); a
deconvnet projection is ``(3, H, W)`` of any sign and is shown through
:func:`normalize_projection` (0 is mid-grey).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io.atomic import atomic_write_bytes

__all__ = [
    "normalize_projection",
    "to_pil",
    "upscale_nearest",
    "encode_png",
    "save_image",
    "save_images",
]
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


