"""Tests for zfvis.render: display normalisation, PNG output, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from PIL import Image

from zfvis import render


def _image(h: int = 32, w: int = 32) -> torch.Tensor:
    """A smooth colour gradient (3, h, w) in [0, 1]."""
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    return torch.stack([y, x, (x + y) / 2])


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- normalize_projection


def test_normalize_zero_is_grey_and_extremes_reach_bounds() -> None:
    p = torch.zeros(3, 4, 4)
    p[0, 1, 1] = -4.0
    p[2, 2, 3] = 2.0
    out = render.normalize_projection(p)
    assert out.shape == p.shape
    assert out[1, 0, 0].item() == pytest.approx(0.5)
    assert out[0, 1, 1].item() == pytest.approx(0.0)  # max |p| element, negative
    assert out[2, 2, 3].item() == pytest.approx(0.75)  # 0.5 + 0.5 * 2 / 4
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0

    out_pos = render.normalize_projection(-p)
    assert out_pos[0, 1, 1].item() == pytest.approx(1.0)


def test_normalize_all_zero_is_uniform_grey() -> None:
    out = render.normalize_projection(torch.zeros(3, 5, 6))
    assert torch.all(out == 0.5)


def test_normalize_batched_is_per_item() -> None:
    a = torch.zeros(3, 4, 4)
    a[0, 0, 0] = 100.0
    b = torch.zeros(3, 4, 4)
    b[1, 2, 2] = -0.01
    batch = torch.stack([a, b, torch.zeros(3, 4, 4)])
    out = render.normalize_projection(batch)
    assert out.shape == batch.shape
    assert out[0, 0, 0, 0].item() == pytest.approx(1.0)
    assert out[1, 1, 2, 2].item() == pytest.approx(0.0)  # its own scale, not the batch's
    assert torch.all(out[2] == 0.5)
    assert torch.allclose(out[1], render.normalize_projection(b))
    nested = render.normalize_projection(batch.reshape(1, 3, 3, 4, 4))
    assert torch.allclose(nested[0], out)


def test_normalize_rejects_low_rank_and_ignores_nan() -> None:
    with pytest.raises(ValueError):
        render.normalize_projection(torch.zeros(4, 4))
    p = torch.tensor([[[float("nan"), 1.0]], [[0.0, -1.0]], [[0.5, 0.0]]])
    out = render.normalize_projection(p)
    assert torch.isfinite(out).all()
    assert out[0, 0, 0].item() == pytest.approx(0.5)


# --------------------------------------------------------------------------- to_pil / upscale / save_image


def test_to_pil_round_trip() -> None:
    img = _image(9, 13)
    pil = render.to_pil(img)
    assert pil.mode == "RGB" and pil.size == (13, 9)
    back = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).reshape(9, 13, 3).permute(2, 0, 1) / 255.0
    assert torch.allclose(back, img, atol=0.5 / 255 + 1e-6)


def test_to_pil_grey_and_clipping() -> None:
    pil = render.to_pil(torch.tensor([[[-1.0, 2.0]]]))
    assert pil.getpixel((0, 0)) == (0, 0, 0)
    assert pil.getpixel((1, 0)) == (255, 255, 255)
    with pytest.raises(ValueError):
        render.to_pil(torch.zeros(2, 4, 4))


def test_upscale_nearest() -> None:
    img = torch.arange(2 * 7 * 5, dtype=torch.float32).reshape(2, 7, 5)
    up = render.upscale_nearest(img, 64)
    assert up.shape == (2, 7 * 13, 5 * 13)  # ceil(64 / 5) = 13
    assert torch.equal(up[:, ::13, ::13], img)
    assert torch.equal(up[:, 12::13, 12::13], img)
    assert render.upscale_nearest(img, 4) is img
    assert render.upscale_nearest(img, 64, max_side=20).shape == (2, 14, 10)


def test_save_image(tmp_path: Path) -> None:
    out = render.save_image(_image(10, 20), tmp_path / "a.png")
    assert out == tmp_path / "a.png"
    assert _png_size(out) == (20, 10)
    assert _only(tmp_path) == ["a.png"]


# --------------------------------------------------------------------------- figures


def _project(path: Path, n: int = 3) -> Path:
    img = _image()
    projections = [torch.randn(3, 32, 32) for _ in range(n)]
    boxes = [(0, 0, 7, 7), (10, 12, 17, 19), (28, 27, 32, 32), (5, 5, 5, 5)] * n
    titles = [f"ch {i} @ (1, 2)\nact {1.0 / (i + 1):.2f}" for i in range(n)]
    return render.project_figure(img, projections, boxes[:n], titles, "net / conv1 / top channels", path,
                                 note="projections: 0 = grey")


@pytest.mark.parametrize("n", [1, 4, 9])
def test_project_figure_writes_png(tmp_path: Path, n: int) -> None:
    path = _project(tmp_path / "p.png", n)
    w, h = _png_size(path)
    assert 600 <= w <= 4000 and 200 <= h <= 4000
    assert _only(tmp_path) == ["p.png"]


def test_project_figure_empty_window_and_mismatch(tmp_path: Path) -> None:
    img = _image()
    render.project_figure(img, [torch.zeros(3, 32, 32)], [(4, 4, 4, 4)], ["empty"], "t", tmp_path / "e.png")
    assert _png_size(tmp_path / "e.png")[0] > 0
    with pytest.raises(ValueError):
        render.project_figure(img, [torch.zeros(3, 32, 32)], [], ["x"], "t", tmp_path / "x.png")
    with pytest.raises(ValueError):
        render.project_figure(img, [torch.zeros(3, 16, 16)], [(0, 0, 1, 1)], ["x"], "t", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_grid_figure_writes_png(tmp_path: Path) -> None:
    cells = [[_image(8, 8), None, _image(5, 9)], [_image(3, 3)]]
    path = render.grid_figure(cells, tmp_path / "g.png", row_labels=["conv1 ch 0", "conv1 ch 1"],
                              col_labels=["epoch 1", "epoch 5", "final"], title="evolution")
    w, h = _png_size(path)
    assert 300 <= w <= 2000 and 200 <= h <= 2000
    with pytest.raises(ValueError):
        render.grid_figure(cells, tmp_path / "bad.png", row_labels=["only one"])


def test_mining_figure_writes_png(tmp_path: Path) -> None:
    channels = []
    for ch in range(6):
        k = 9 if ch % 2 else 4  # fewer than 9 found: blank cells
        projections = [torch.randn(3, 7, 7 if j else 4) for j in range(k)]  # border patch narrower
        patches = [_image(7, 7 if j else 4) for j in range(k)]
        channels.append((ch * 10, projections, patches, [float(9 - j) for j in range(k)]))
    path = render.mining_figure("net / conv1 / top-9", channels, tmp_path / "m.png", columns=4)
    w, h = _png_size(path)
    assert 800 <= w <= 2000 and 300 <= h <= 2000
    assert _only(tmp_path) == ["m.png"]


def test_filter_grid_rgb_and_grey(tmp_path: Path) -> None:
    a = render.filter_grid(torch.randn(12, 3, 5, 5), tmp_path / "rgb.png", title="conv1 filters")
    b = render.filter_grid(torch.randn(7, 16, 3, 3), tmp_path / "grey.png")
    assert min(_png_size(a)) >= 150 and min(_png_size(b)) >= 150
    with pytest.raises(ValueError):
        render.filter_grid(torch.randn(3, 5, 5), tmp_path / "bad.png")


# --------------------------------------------------------------------------- atomic output


def test_missing_folder_raises_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _project(tmp_path / "missing" / "p.png")
    with pytest.raises(FileNotFoundError):
        render.save_image(_image(), tmp_path / "missing" / "a.png")
    assert _only(tmp_path) == []


def test_parent_is_a_file_raises_oserror(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        render.grid_figure([[_image()]], tmp_path / "file" / "g.png")
    assert _only(tmp_path) == ["file"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder_raises_permission_error(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            render.filter_grid(torch.randn(4, 3, 3, 3), folder / "f.png")
        assert _only(folder) == []
    finally:
        folder.chmod(0o755)


def test_failure_while_writing_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "p.png"
    target.write_bytes(b"old")

    def broken_savefig(self: matplotlib.figure.Figure, fh: object, **kwargs: object) -> None:
        fh.write(b"\x89PNG partial")  # type: ignore[attr-defined]
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError):
        _project(target)
    assert _only(tmp_path) == ["p.png"]
    assert target.read_bytes() == b"old"  # the previous file is untouched


def test_overwrite_replaces_file(tmp_path: Path) -> None:
    target = tmp_path / "f.png"
    target.write_bytes(b"old")
    render.filter_grid(torch.randn(4, 3, 3, 3), target)
    assert _png_size(target)[0] > 0
    assert _only(tmp_path) == ["f.png"]
