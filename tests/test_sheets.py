"""A channel's tiles in one sheet: the layout follows from the boxes, and cutting a sheet
gives back exactly the tiles it was made of."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zfvis.viz import render, sheets


def _tile(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_layout_follows_the_boxes() -> None:
    layout = sheets.SheetLayout.of([(0, 0, 27, 27), (5, 0, 32, 20), (0, 3, 9, 30)])
    assert layout.sizes == ((27, 27), (27, 20), (9, 27))
    assert layout.cell == (27, 27) and layout.size == (81, 54)
    assert layout.place(0, False) == (0, 0) and layout.place(1, True) == (27, 27) and layout.place(2, False) == (54, 0)


def test_a_sheet_cut_gives_back_its_tiles_through_a_png(tmp_path: Path) -> None:
    boxes = [(0, 0, 12, 12), (4, 0, 16, 7), (0, 5, 3, 16)]  # tiles clipped at borders: three sizes
    tiles = [(_tile(b - t, r - l, 2 * k), _tile(b - t, r - l, 2 * k + 1)) for k, (t, l, b, r) in enumerate(boxes)]
    sheet = sheets.make_sheet(tiles)
    assert tuple(sheet.shape) == (3, 36, 24)
    assert sheet[:, 23, 23].tolist() == [sheets.GREY] * 3  # the unused part of a cell is grey
    render.save_image(sheet, tmp_path / sheets.sheet_name(7))
    back = sheets.cut_sheet(sheets.read_png(tmp_path / "c0007.png"), sheets.SheetLayout.of(boxes))
    assert len(back) == 3
    for (p, q), (p2, q2) in zip(tiles, back):
        assert torch.equal(p, p2) and torch.equal(q, q2)


def test_thumbnail_is_the_pair_side_by_side() -> None:
    p, q = _tile(5, 4, 0), _tile(5, 4, 1)
    thumb = sheets.make_thumb(p, q)
    assert tuple(thumb.shape) == (3, 5, 4 + sheets.THUMB_GAP + 4)
    assert torch.equal(thumb[:, :, :4], p) and torch.equal(thumb[:, :, -4:], q)
    assert sheets.thumb_name(42) == "c0042_top.png" and sheets.sheet_name(42) == "c0042.png"


def test_wrong_tiles_and_wrong_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        sheets.make_sheet([(_tile(4, 4, 0), _tile(4, 5, 1))])
    with pytest.raises(ValueError, match="uint8"):
        sheets.make_sheet([(_tile(4, 4, 0).float(), _tile(4, 4, 1))])
    sheet = sheets.make_sheet([(_tile(4, 4, 0), _tile(4, 4, 1))])
    with pytest.raises(ValueError, match="other boxes"):
        sheets.cut_sheet(sheet, sheets.SheetLayout.of([(0, 0, 5, 5)]))
