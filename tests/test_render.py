"""Tests for zfvis.viz.render: display normalisation, figures as objects, PNG output, atomic writes."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from zfvis.viz import fig2, filters, grids, layout, render


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
    """The folder's files, less zfvis's ledger of what it wrote (``zfvis.io.ownership``)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".zfvis-written.json")


def _png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _drawn(fig: Figure) -> np.ndarray:
    """The figure's pixels as the Agg canvas draws them at the figure's dpi, (H, W, 3)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _panels(fig: Figure) -> list[np.ndarray]:
    """The arrays of every image drawn on the figure's axes, as float RGB in [0, 1]."""
    out = []
    for ax in fig.axes:
        for im in ax.get_images():
            a = np.asarray(im.get_array(), dtype=np.float64)[..., :3]
            out.append(a / 255.0 if np.asarray(im.get_array()).dtype == np.uint8 else a)
    return out


def _has_colour(a: np.ndarray, tol: float = 3 / 255) -> bool:
    """Whether ``a`` has a pixel that is neither white, mid-grey, nor the light grey of blanks."""
    flat = a.reshape(-1, 3)
    plain = np.zeros(len(flat), dtype=bool)
    for v in (1.0, 0.5, 240 / 255):
        plain |= np.all(np.abs(flat - v) <= tol, axis=1)
    return bool((~plain).any())


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
    with pytest.raises(ValueError):
        render.to_pil(np.zeros((4, 4, 2), dtype=np.uint8))


def test_to_pil_accepts_uint8_and_arrays() -> None:
    img = _image(5, 7)
    ref = np.asarray(render.to_pil(img))
    u8 = torch.from_numpy(ref.copy()).permute(2, 0, 1).contiguous()
    assert np.array_equal(np.asarray(render.to_pil(u8)), ref)  # uint8 tensor (3, H, W)
    assert np.array_equal(np.asarray(render.to_pil(ref)), ref)  # uint8 array (H, W, 3)
    assert np.array_equal(np.asarray(render.to_pil(img.permute(1, 2, 0).numpy())), ref)  # float array
    grey = np.asarray(render.to_pil(u8[0]))
    assert grey.shape == (5, 7, 3) and np.array_equal(grey[..., 0], ref[..., 0])


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
    assert np.array_equal(_png_pixels(out), np.asarray(render.to_pil(_image(10, 20))))


@pytest.mark.parametrize("sync", [False, True])
def test_save_image_uint8_levels_and_sync(tmp_path: Path, sync: bool) -> None:
    ref = np.asarray(render.to_pil(_image(9, 11)))
    u8 = torch.from_numpy(ref.copy()).permute(2, 0, 1)
    for level in (0, 1, 9):
        path = render.save_image(u8, tmp_path / f"{level}.png", compress_level=level, sync=sync)
        assert np.array_equal(_png_pixels(path), ref)
    assert _only(tmp_path) == ["0.png", "1.png", "9.png"]  # no temporary files left
    assert (tmp_path / "1.png").stat().st_mode & 0o777 == 0o666 & ~_umask()
    with pytest.raises(ValueError):
        render.save_image(u8, tmp_path / "x.png", compress_level=10)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_images_and_encode_png(tmp_path: Path) -> None:
    imgs = [_image(3 + i, 4 + 2 * i) for i in range(4)]
    paths = render.save_images((img, tmp_path / f"t{i}.png") for i, img in enumerate(imgs))
    assert paths == [tmp_path / f"t{i}.png" for i in range(4)]
    for img, path in zip(imgs, paths):
        assert np.array_equal(_png_pixels(path), np.asarray(render.to_pil(img)))
        assert path.read_bytes() == render.encode_png(img)


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (31, 17), (1500, 1400)])
def test_png_encoder_round_trip(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    a[shape[0] // 2 :] = 255  # flat rows, as on a figure
    data = b"".join(render._png_chunks(a, compress_level=1))  # bands of rows past 1,000 rows
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), a)


def test_projection_u8_matches_normalize_projection() -> None:
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(3, 11, 7, generator=gen) * s for s in (1e-6, 1.0, 1e4)]
    cases += [torch.zeros(3, 4, 4), torch.tensor([[[float("nan"), 1.0]], [[float("inf"), -1.0]], [[0.5, 0.0]]])]
    cases += [torch.randn(1, 5, 5, generator=gen), torch.zeros(3, 0, 4)]
    for p in cases:
        assert np.array_equal(render._projection_u8(p), render._u8(render.normalize_projection(p)))


# --------------------------------------------------------------------------- figures


def _project_args(n: int = 3) -> tuple:
    gen = torch.Generator().manual_seed(n)
    img = _image()
    projections = [torch.randn(3, 32, 32, generator=gen) for _ in range(n)]
    boxes = [(0, 0, 7, 7), (10, 12, 17, 19), (28, 27, 32, 32), (5, 5, 5, 5)] * n
    titles = [f"ch {i} @ (1, 2)\nact {1.0 / (i + 1):.2f}" for i in range(n)]
    return img, projections, boxes[:n], titles, "net / conv1 / top channels"


def _project(path: Path | None, n: int = 3) -> Figure:
    return grids.project_figure(*_project_args(n), path, note="projections: 0 = grey")


def _mining_channels(n: int = 6, side: int = 7) -> list:
    gen = torch.Generator().manual_seed(side)
    channels = []
    for ch in range(n):
        k = 9 if ch % 2 else 4  # fewer than 9 found: blank cells
        projections = [torch.randn(3, side, side if j else side // 2 + 1, generator=gen) for j in range(k)]
        patches = [_image(side, side if j else side // 2 + 1) for j in range(k)]  # border patch narrower
        channels.append((ch * 10, projections, patches, [float(9 - j) for j in range(k)]))
    return channels


def _grid_cells() -> list:
    return [[_image(8, 8), None, _image(5, 9)], [_image(3, 3)]]


_FIGURES = {
    "project": lambda path: _project(path, 3),
    "grid": lambda path: grids.grid_figure(_grid_cells(), path, row_labels=["conv1 ch 0", "conv1 ch 1"],
                                            col_labels=["epoch 1", "epoch 5", "final"], title="evolution"),
    "mining": lambda path: fig2.mining_figure("net / conv1 / top-9", _mining_channels(), path, columns=4),
    "filters": lambda path: filters.filter_grid(torch.randn(12, 3, 5, 5, generator=torch.Generator().manual_seed(1)),
                                               path, title="conv1 filters"),
}


@pytest.mark.parametrize("name", sorted(_FIGURES))
def test_figure_functions_return_figures_and_write_only_when_asked(tmp_path: Path, name: str) -> None:
    fig = _FIGURES[name](None)
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
    assert _only(tmp_path) == []  # nothing written without a path
    panels = _panels(fig)
    assert panels and all(p.size for p in panels)
    assert any(_has_colour(p) for p in panels)

    assert isinstance(_FIGURES[name](tmp_path / "f.png"), Figure)
    assert _only(tmp_path) == ["f.png"]
    assert np.array_equal(_png_pixels(tmp_path / "f.png"), _drawn(fig))  # the PNG is the figure


def test_positional_path_still_works(tmp_path: Path) -> None:
    """The command line and mining pass ``path`` positionally and ignore the result."""
    grids.project_figure(*_project_args(1), tmp_path / "p.png")
    grids.grid_figure([[_image()]], tmp_path / "g.png")
    fig2.mining_figure("t", _mining_channels(1), tmp_path / "m.png")
    filters.filter_grid(torch.randn(4, 3, 3, 3), tmp_path / "f.png")
    assert _only(tmp_path) == ["f.png", "g.png", "m.png", "p.png"]


@pytest.mark.parametrize("n", [1, 9])
def test_project_figure_panels(tmp_path: Path, n: int) -> None:
    fig = _project(tmp_path / "p.png", n)
    w, h = _png_size(tmp_path / "p.png")
    assert 600 <= w <= 4000 and 200 <= h <= 4000
    assert _only(tmp_path) == ["p.png"]
    assert len(fig.axes) == 4 * n
    empty = sum(1 for b in _project_args(n)[2] if b[0] == b[2])
    assert len(_panels(fig)) == 4 * n - 2 * empty  # an empty window's two crops hold no image
    projections = [np.asarray(ax.get_images()[0].get_array()) for ax in fig.axes[1::4]]
    assert all(_has_colour(a) for a in projections)  # a projection panel is not uniform grey
    assert "net / conv1 / top channels" in [t.get_text() for t in fig.texts]
    assert [ax.get_title() for ax in fig.axes[:4]] == ["input", "projection", "input crop", "projection crop"]


def test_project_figure_empty_window_and_mismatch(tmp_path: Path) -> None:
    img = _image()
    grids.project_figure(img, [torch.zeros(3, 32, 32)], [(4, 4, 4, 4)], ["empty"], "t", tmp_path / "e.png")
    assert _png_size(tmp_path / "e.png")[0] > 0
    with pytest.raises(ValueError):
        grids.project_figure(img, [torch.zeros(3, 32, 32)], [], ["x"], "t", tmp_path / "x.png")
    with pytest.raises(ValueError):
        grids.project_figure(img, [torch.zeros(3, 16, 16)], [(0, 0, 1, 1)], ["x"], "t", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_grid_figure(tmp_path: Path) -> None:
    fig = grids.grid_figure(_grid_cells(), tmp_path / "g.png", row_labels=["conv1 ch 0", "conv1 ch 1"],
                             col_labels=["epoch 1", "epoch 5", "final"], title="evolution")
    w, h = _png_size(tmp_path / "g.png")
    assert 300 <= w <= 2000 and 200 <= h <= 2000
    assert len(fig.axes) == 4 and len(_panels(fig)) == 3  # the None cell is a blank axes
    with pytest.raises(ValueError):
        grids.grid_figure(_grid_cells(), tmp_path / "bad.png", row_labels=["only one"])


def _tile_box(fig: Figure, k: int, g: int, i: int) -> tuple[int, int, int, int]:
    """Pixel box of cell i (0..8) of group g (0: projections) of channel block k in the page image."""
    lay = fig._zfvis_layout  # type: ignore[attr-defined]
    x0, y0 = lay.origin(k)
    top = y0 + lay.label + (i // 3) * (lay.cell + lay.gap)
    left = x0 + g * (lay.grid + lay.mid_gap) + (i % 3) * (lay.cell + lay.gap)
    return top, left, top + lay.cell, left + lay.cell


def test_mining_figure_is_one_image_with_its_labels(tmp_path: Path) -> None:
    channels = _mining_channels(6)
    fig = fig2.mining_figure("net / conv1 / top-9", channels, tmp_path / "m.png", columns=4)
    w, h = _png_size(tmp_path / "m.png")
    assert 800 <= w <= 2000 and 300 <= h <= 2000
    assert len(fig.axes) == 1 and len(fig.axes[0].get_images()) == 1  # one image, not an axes per cell
    page = np.asarray(fig.axes[0].get_images()[0].get_array())[..., :3] / 255.0
    assert "net / conv1 / top-9" in [t.get_text() for t in fig.texts]
    lay = fig._zfvis_layout  # type: ignore[attr-defined]
    assert lay.labels[:2] == ["ch 0   max 9", "ch 10   max 9"] and len(lay.labels) == 6
    for k in range(len(channels)):  # each label is written in its band, dark on white, left-aligned
        x0, y0 = lay.origin(k)
        band = page[y0 : y0 + lay.label, x0 : x0 + 2 * lay.grid]
        dark = np.argwhere(band.max(axis=2) < 0.3)
        assert len(dark) > 40 and dark[:, 1].min() < 5 and dark[:, 1].max() < lay.grid, k
    for k, (_, projections, patches, _) in enumerate(channels):
        for i in range(9):
            top, left, bottom, right = _tile_box(fig, k, 0, i)
            cell = page[top:bottom, left:right]
            if i < len(projections):
                assert _has_colour(cell), (k, i)  # a projection, not grey
            else:
                assert np.allclose(cell[cell.shape[0] // 2, cell.shape[1] // 2], 240 / 255)  # a blank
    # the drawn figure shows every cell of the page image pixel for pixel (labels are drawn over the page)
    drawn = _drawn(fig)
    x0, y0 = (round(v) for v in fig.axes[0].bbox.bounds[:2])
    shown = drawn[drawn.shape[0] - y0 - page.shape[0] :, x0:]
    for k in range(len(channels)):
        for g in (0, 1):
            for i in range(9):
                top, left, bottom, right = _tile_box(fig, k, g, i)
                assert np.array_equal(shown[top:bottom, left:right], np.rint(page[top:bottom, left:right] * 255))


def test_mining_figure_tiles_keep_their_pixels() -> None:
    """Small tiles are enlarged by a whole factor: every source pixel is a sharp square."""
    p = torch.zeros(3, 6, 6)
    p[0, 2, 3] = 1.0  # one reddish pixel on grey
    patch = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    fig = fig2.mining_figure("t", [(0, [p], [patch], [1.0])], None, cell_inches=0.6)
    page = np.asarray(fig.axes[0].get_images()[0].get_array())[..., :3]
    f = 10  # 60 px / 6
    top, left, bottom, right = _tile_box(fig, 0, 1, 0)
    assert np.array_equal(page[top:bottom:f, left:right:f], render._u8(patch))
    assert np.array_equal(page[top + f - 1 : bottom : f, left + f - 1 : right : f], render._u8(patch))
    top, left, _, _ = _tile_box(fig, 0, 0, 0)
    assert tuple(page[top + 2 * f + 5, left + 3 * f + 5]) == (255, 128, 128)  # +1 in red, 0 in green, blue


def test_mining_figure_large_tiles_are_reduced(tmp_path: Path) -> None:
    channels = _mining_channels(2, side=212)  # VGG16 conv5_3's receptive field
    fig = fig2.mining_figure("vgg", channels, None, cell_inches=0.6)
    assert fig._zfvis_layout.cell == 60  # type: ignore[attr-defined]
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)  # another dpi: matplotlib resamples the page
    with Image.open(buf) as im:
        assert abs(im.size[0] - fig.get_size_inches()[0] * 50) <= 1
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # as a notebook shows a figure
    with Image.open(buf) as im:
        assert im.size[0] > 0.9 * fig.get_size_inches()[0] * layout.DPI


def test_mining_figure_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        fig2.mining_figure("t", [], tmp_path / "m.png")
    with pytest.raises(ValueError):
        fig2.mining_figure("t", _mining_channels(1), tmp_path / "m.png", columns=0)
    too_many = [(0, [torch.zeros(3, 4, 4)] * 10, [], [])]
    with pytest.raises(ValueError):
        fig2.mining_figure("t", too_many, tmp_path / "m.png")
    assert _only(tmp_path) == []


def test_filter_grid_rgb_and_grey(tmp_path: Path) -> None:
    a = filters.filter_grid(torch.randn(12, 3, 5, 5), tmp_path / "rgb.png", title="conv1 filters")
    b = filters.filter_grid(torch.randn(7, 16, 3, 3), tmp_path / "grey.png")
    assert min(_png_size(tmp_path / "rgb.png")) >= 150 and min(_png_size(tmp_path / "grey.png")) >= 150
    assert len(_panels(a)) == 12 and len(_panels(b)) == 7
    with pytest.raises(ValueError):
        filters.filter_grid(torch.randn(3, 5, 5), tmp_path / "bad.png")


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
        grids.grid_figure([[_image()]], tmp_path / "file" / "g.png")
    with pytest.raises(OSError):
        render.save_image(_image(), tmp_path / "file" / "a.png")
    assert _only(tmp_path) == ["file"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder_raises_permission_error(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            filters.filter_grid(torch.randn(4, 3, 3, 3), folder / "f.png")
        with pytest.raises(PermissionError):
            render.save_image(_image(), folder / "a.png")
        assert _only(folder) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("what", ["figure", "tile"])
def test_failure_while_writing_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    target = tmp_path / "p.png"
    target.write_bytes(b"old")

    def broken(rgb: np.ndarray, *, compress_level: int) -> Iterator[bytes]:
        yield b"\x89PNG partial"
        raise RuntimeError("disk full")

    monkeypatch.setattr(render, "_png_chunks", broken)
    with pytest.raises(RuntimeError):
        if what == "figure":
            _project(target)
        else:
            render.save_image(_image(), target)
    assert _only(tmp_path) == ["p.png"]
    assert target.read_bytes() == b"old"  # the previous file is untouched


def test_overwrite_replaces_file(tmp_path: Path) -> None:
    target = tmp_path / "f.png"
    target.write_bytes(b"old")
    filters.filter_grid(torch.randn(4, 3, 3, 3), target)
    assert _png_size(target)[0] > 0
    render.save_image(_image(), target)
    assert _png_size(target) == (32, 32)
    assert _only(tmp_path) == ["f.png"]


def test_mining_figure_shows_uint8_tiles_as_they_are() -> None:
    """uint8 tiles (as mining writes them) are drawn unchanged, an all-zero projection's grey included."""
    gen = torch.Generator().manual_seed(2)
    proj = (torch.rand(3, 6, 6, generator=gen) * 255).to(torch.uint8)
    grey = torch.full((3, 6, 6), 128, dtype=torch.uint8)  # a projection that is zero everywhere
    patch = (torch.rand(3, 6, 6, generator=gen) * 255).to(torch.uint8)
    fig = fig2.mining_figure("t", [(0, [proj, grey], [patch, patch], [1.0, 0.0])], None, cell_inches=0.6)
    page = np.asarray(fig.axes[0].get_images()[0].get_array())[..., :3]
    f = 10
    for g, i, tile in ((0, 0, proj), (0, 1, grey), (1, 0, patch)):
        top, left, bottom, right = _tile_box(fig, 0, g, i)
        assert np.array_equal(page[top:bottom:f, left:right:f], tile.permute(1, 2, 0).numpy()), (g, i)
