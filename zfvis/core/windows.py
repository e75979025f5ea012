"""Windows of signals: cutting per-seed rectangles out of maps and pasting them back.

A reverse pass computes each map only over a window per seed (:class:`~zfvis.core.cone.Window`);
these functions move a signal between its windows and whole maps, with zeros outside the map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cone import Window

__all__ = ["crop_windows", "shifted", "paste", "cut", "move", "memory_format"]


def crop_windows(
    src: torch.Tensor,
    index: torch.Tensor | None,
    top: torch.Tensor,
    left: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Cuts per-item windows out of a batch of maps, with zeros outside the map.

    Args:
        src: Maps (N, ..., H, W): windows are taken over the last two dimensions.
        index: For each output item, which map to cut from (B,); ``None``: item b is cut
            from map b.
        top: First row of each window (B,), may be negative or run past the map.
        left: First column of each window (B,).
        height: Window height.
        width: Window width.

    Returns:
        (B, ..., height, width): ``out[b, ..., i, j] = src[index[b], ..., top[b] + i, left[b] + j]``,
        zero where that lies outside the map. With negative offsets and a larger size this
        pastes windows into a larger canvas.
    """
    mid = tuple(src.shape[1:-2])
    if len(mid) != 1:
        flat = src.reshape(src.shape[0], math.prod(mid), *src.shape[-2:])
        out = crop_windows(flat, index, top, left, height, width)
        return out.reshape(out.shape[0], *mid, height, width)
    n, _, h, w = src.shape
    b = top.shape[0]
    if index is None and b == n and b > 0:
        t0, l0 = int(top[0]), int(left[0])
        if b == 1 or (bool((top == t0).all()) and bool((left == l0).all())):
            return shifted(src, t0, l0, height, width)
    if b <= _LOOP_MAX:
        return _crop_loop(src, index, top, left, height, width)
    if index is None:
        index = torch.arange(b, device=src.device)
    rows = top[:, None] + torch.arange(height, device=src.device)
    cols = left[:, None] + torch.arange(width, device=src.device)
    rows_ok = (rows >= 0) & (rows < h)
    cols_ok = (cols >= 0) & (cols < w)
    picked = src[index[:, None, None], :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    picked = picked.permute(0, 3, 1, 2)
    if not (bool(rows_ok.all()) and bool(cols_ok.all())):
        mask = (rows_ok[:, :, None] & cols_ok[:, None, :])[:, None]
        picked = picked * mask.to(picked.dtype)
    return picked


def shifted(src: torch.Tensor, t0: int, l0: int, height: int, width: int) -> torch.Tensor:
    """:func:`crop_windows` with the same offsets for every item: one slice, of the maps
    padded with zeros where the window runs past them."""
    h, w = src.shape[-2:]
    pad = (max(0, -l0), max(0, l0 + width - w), max(0, -t0), max(0, t0 + height - h))
    x = F.pad(src, pad) if any(pad) else src
    r0, c0 = t0 + pad[2], l0 + pad[0]
    return x[..., r0 : r0 + height, c0 : c0 + width]


#: Up to this many windows are cut one by one (slices and copies); more by one gather.
_LOOP_MAX = 1024


def _crop_loop(src: torch.Tensor, index: torch.Tensor | None, top: torch.Tensor, left: torch.Tensor,
               height: int, width: int) -> torch.Tensor:
    """:func:`crop_windows` by slicing each window (faster than a gather for a few windows)."""
    _, c, h, w = src.shape
    tops, lefts = top.tolist(), left.tolist()
    items = range(len(tops)) if index is None else index.tolist()
    out = torch.empty(len(tops), c, height, width, dtype=src.dtype, device=src.device,
                      memory_format=memory_format(src)).zero_()
    for i, (j, t, l_) in enumerate(zip(items, tops, lefts)):
        r0, r1, c0, c1 = max(t, 0), min(t + height, h), max(l_, 0), min(l_ + width, w)
        if r1 > r0 and c1 > c0:
            out[i, :, r0 - t : r1 - t, c0 - l_ : c1 - l_] = src[j, :, r0:r1, c0:c1]
    return out


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-d tensor whose channels are its innermost
    dimension (also a window cut out of one), else ``torch.contiguous_format``."""
    if t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1 and t.stride(3) >= t.shape[1]:
        return torch.channels_last
    return torch.contiguous_format


def paste(signal: torch.Tensor, win: Window | None) -> torch.Tensor:
    """A windowed signal pasted into zero maps of the full size (dense signals pass)."""
    if win is None or win.is_full:
        return signal
    if win.ints is not None and signal.shape[0] == 1:  # one seed: its numbers, no tensor arithmetic
        return shifted(signal, -win.ints[0], -win.ints[1], *win.map_size)
    return crop_windows(signal, None, -win.top, -win.left, *win.map_size)


def cut(full: torch.Tensor, win: Window | None) -> torch.Tensor:
    """The windows ``win`` cut out of full maps (dense signals pass)."""
    if win is None or win.is_full:
        return full
    if win.ints is not None and full.shape[0] == 1:
        return shifted(full, win.ints[0], win.ints[1], *win.size)
    return crop_windows(full, None, win.top, win.left, *win.size)


def move(signal: torch.Tensor, src: Window | None, dst: Window | None) -> torch.Tensor:
    """A signal on windows ``src`` re-cut to windows ``dst`` of the same maps (zero where
    ``dst`` reaches beyond ``src``); ``None`` stands for the dense tensor."""
    if src is None:
        return signal if dst is None else cut(signal, dst)
    if dst is None:
        return paste(signal, src)
    if src.ints is not None and dst.ints is not None and signal.shape[0] == 1:
        dy, dx = dst.ints[0] - src.ints[0], dst.ints[1] - src.ints[1]
        return signal if (dy, dx) == (0, 0) and src.size == dst.size else shifted(signal, dy, dx, *dst.size)
    if src is dst or (src.size == dst.size and bool((src.top == dst.top).all()) and bool((src.left == dst.left).all())):
        return signal
    return crop_windows(signal, None, dst.top - src.top, dst.left - src.left, *dst.size)
