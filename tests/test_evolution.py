"""zfvis.analysis.evolution: the strongest activation of each feature map at each checkpoint (ZF Fig. 4)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

import zfvis
from zfvis.viz import render

LAYER = "4"  # the second convolution's ReLU


def _model(seed: int, dead: int | None = None) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.ReLU())
    if dead is not None:
        with torch.no_grad():
            model[3].bias[dead] = -1e4  # this feature map never fires
    return model.eval()


def _images(n: int = 7) -> torch.Tensor:
    return torch.rand(n, 3, 14, 14, generator=torch.Generator().manual_seed(n))


def test_each_cell_is_the_strongest_activation_projected_and_cropped() -> None:
    images = _images()
    models = [_model(0), _model(1, dead=2)]
    evo = zfvis.evolution(models, images, LAYER, [(0, 2), 4], labels=["early", "late"])
    assert evo.channels == [0, 1, 2, 4] and evo.labels == ["early", "late"] and len(evo.cells) == 2
    for k, model in enumerate(models):
        dn = zfvis.Deconvnet(model)
        out = dn.output(images, LAYER)  # (N, C, H, W)
        for r, c in enumerate(evo.channels):
            cell = evo.cells[k][r]
            flat = out[:, c].flatten(1)
            assert cell.value == pytest.approx(float(flat.max()))
            if cell.value <= 0:
                assert cell.projection is None  # never active: nothing to project
                continue
            i = cell.image
            y, x = cell.position
            assert float(out[i, c, y, x]) == pytest.approx(float(flat.max()))
            full = dn.project(images[i : i + 1], LAYER, channel=c, position=(y, x))[0]
            assert cell.box == dn.receptive_window(LAYER, (y, x), (3, 14, 14))
            t, l, b, rr = cell.box
            assert torch.allclose(cell.projection, full[:, t:b, l:rr], atol=1e-5)
            assert float(cell.projection.abs().max()) > 0
    assert evo.cells[1][2].projection is None and evo.cells[0][2].projection is not None


def test_models_are_taken_one_at_a_time_and_labels_default() -> None:
    seen: list[int] = []

    def lazily() -> Iterator[nn.Module]:
        for seed in range(3):
            seen.append(seed)
            yield _model(seed)

    evo = zfvis.evolution(lazily(), _images(), LAYER, range(5))
    assert seen == [0, 1, 2] and evo.labels == ["checkpoint 1", "checkpoint 2", "checkpoint 3"]
    with pytest.raises(zfvis.UserInputError, match="out of range"):
        zfvis.evolution([_model(0)], _images(), LAYER, [7])
    with pytest.raises(zfvis.UserInputError, match="one label per checkpoint"):
        zfvis.evolution([_model(0)], _images(), LAYER, [0], labels=["a", "b"])
    with pytest.raises(zfvis.UserInputError, match="at least one model"):
        zfvis.evolution([], _images(), LAYER, [0])
    with pytest.raises(zfvis.InputTypeError):
        zfvis.evolution(["model.pt"], _images(), LAYER, [0])  # type: ignore[list-item]


def test_evolution_figure_rows_are_feature_maps_and_columns_checkpoints(tmp_path: Path) -> None:
    evo = zfvis.evolution([_model(0), _model(1, dead=2)], _images(), LAYER, [1, 2], labels=["e1", "e9"])
    fig = zfvis.evolution_figure(evo)
    assert isinstance(fig, Figure) and list(tmp_path.iterdir()) == []
    assert len(fig.axes) == 4  # 2 feature maps x 2 checkpoints
    texts = [t.get_text() for t in fig.texts]
    assert {"ch 1", "ch 2", "e1", "e9"} <= set(texts)
    for ax, cell in zip(fig.axes, [evo.cells[0][0], evo.cells[1][0], evo.cells[0][1], evo.cells[1][1]]):
        if cell.projection is None:
            assert ax.get_images() == []  # a blank cell: never active
            continue
        shown = np.asarray(ax.get_images()[0].get_array())
        assert np.allclose(shown, render.normalize_projection(cell.projection).permute(1, 2, 0).numpy())
        assert float(np.abs(shown - 0.5).max()) > 0.1  # not blank grey
    assert fig.axes[3].get_images() == []
    assert texts[0] == "4: strongest activation per feature map, by checkpoint (blank: never active)"
    named = zfvis.evolution_figure(evo, model_name="tiny", path=tmp_path / "e.png")
    assert named.texts[0].get_text().startswith("tiny 4: strongest")
    with Image.open(tmp_path / "e.png") as im:
        assert im.size[0] > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == [".zfvis-written.json", "e.png"]  # and its ledger entry


def test_sample_images_spread_over_the_whole_data_set(tmp_path: Path) -> None:
    for c in "abcdefghij":
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.new("RGB", (8, 8), (25 * i, 0, 0)).save(tmp_path / c / f"{i}.png")
    paths = zfvis.sample_images(tmp_path, 10)
    assert [p.parent.name for p in paths] == list("abcdefghij")  # one from every class, the last included
    assert all(p.is_file() for p in paths) and len(zfvis.sample_images(tmp_path)) == 100
    (tmp_path / "j" / "broken.png").write_bytes(b"not a png")
    pre = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)  # noqa: E731
    got = zfvis.load_images([paths[0], tmp_path / "j" / "broken.png", paths[-1]], pre)
    assert got.batch.shape == (2, 3, 8, 8) and got.paths == [paths[0], paths[-1]]
    assert got.skipped == [tmp_path / "j" / "broken.png"]
    with pytest.raises(zfvis.UserInputError, match="readable"):
        zfvis.load_images([tmp_path / "j" / "broken.png"], pre)
