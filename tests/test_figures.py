"""Every figure of one model from Python (zfvis.viz.projection): what a person checks on each.

- ``projection_figure`` is the figure ``zfvis project`` writes (same pixels, panels, titles);
- a projection panel is not blank and its box is the activation's receptive field;
- ``rules_figure`` shows the same activations under each rule;
- ``filters_figure`` shows the convolution a layer stands for, found through the graph in
  execution order, not through the modules in registration order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from test_render import _drawn  # noqa: E402 - the figure's pixels, as test_render reads them
from test_render import _png_pixels as _pixels  # noqa: E402
from torch import nn

import zfvis
from zfvis.cli import main
from zfvis.viz import projection as figures
from zfvis.viz import render


def _image_of(ax) -> np.ndarray:  # noqa: ANN001 - a matplotlib Axes
    return np.asarray(ax.get_images()[0].get_array(), dtype=np.float64)[..., :3]


def _not_blank(a: np.ndarray) -> bool:
    """Whether an image panel shows something: a pixel far from the colour of the first."""
    return float(np.abs(a - a[0, 0]).max()) > 0.1


def _labels(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.texts]


def _shipped(size: int = 96) -> tuple[zfvis.Deconvnet, torch.Tensor, zfvis.Preprocess]:
    model, pre = zfvis.load_model("zfnet-cifar10")
    pre = pre.with_size(size)
    return zfvis.Deconvnet(model), pre(zfvis.load_image(zfvis.default_image())).unsqueeze(0), pre


# --------------------------------------------------------------------------- projection_figure = zfvis project


@pytest.mark.parametrize("argv, options", [
    (["--channel", "3", "--channel", "7"], {"channel": [3, 7]}),
    (["--top-k", "2"], {"top_k": 2}),  # the 9 most active channels, 2 positions each
])
def test_deconvnet_figure_is_what_zfvis_project_writes(tmp_path: Path, argv: list[str], options: dict) -> None:
    out = tmp_path / "p.png"
    assert main(["project", "--layer", "conv3", *argv, "-o", str(out)]) == 0
    dn, x, pre = _shipped()
    title = "zfnet-cifar10 (packaged) / conv3 / chelsea.png at 96x96 / deconvnet"
    fig = figures.projection_figure(dn, x, "conv3", figures.Selection(**options), show=pre.denormalize, title=title)
    assert np.array_equal(_pixels(out), _drawn(fig))  # the same figure, pixel for pixel
    # and without a title, the same panels and row titles (only the figure title is zfvis project's own)
    plain = figures.projection_figure(dn, x, "conv3", figures.Selection(**options), show=pre.denormalize)
    assert [t for t in _labels(plain) if t != plain.texts[0].get_text()] == [t for t in _labels(fig) if t != title]
    assert len(plain.axes) == len(fig.axes)
    for a, b in zip(plain.axes, fig.axes):
        assert a.get_title() == b.get_title()
        assert np.array_equal(_image_of(a), _image_of(b))


def test_projection_panels_are_not_blank_and_boxes_are_receptive_fields() -> None:
    dn, x, pre = _shipped()
    fig = figures.projection_figure(dn, x, "conv3", figures.Selection(top_k=2, top_channels=3), show=pre.denormalize)
    seeds, channels = figures.choose_seeds(dn, x, "conv3", figures.Selection(None, 2, None, 3))
    assert len(channels) == 3 and len(fig.axes) == 4 * len(seeds) == 24
    rows = [fig.axes[4 * k : 4 * k + 4] for k in range(len(seeds))]
    for k, (inp, proj, inp_crop, proj_crop) in enumerate(rows):
        for panel in (inp, proj, inp_crop, proj_crop):
            assert _not_blank(_image_of(panel)), (k, panel.get_title())
        top, left, bottom, right = dn.receptive_window("conv3", (int(seeds.y[k]), int(seeds.x[k])), (3, 96, 96))
        for ax in (inp, proj):
            [box] = ax.patches
            assert (box.get_x() + 0.5, box.get_y() + 0.5, box.get_width(), box.get_height()) == (
                left, top, right - left, bottom - top), k
        assert _image_of(inp_crop).shape[:2] == (bottom - top, right - left)
        # the projection is zero (grey) outside the receptive field and not inside it
        full = _image_of(proj)
        outside = np.ones(full.shape[:2], dtype=bool)
        outside[top:bottom, left:right] = False
        assert np.allclose(full[outside], 0.5, atol=1e-6) and not np.allclose(full[~outside], 0.5, atol=1e-3)
        row = f"ch {int(seeds.channel[k])} @ ({int(seeds.y[k])}, {int(seeds.x[k])})\nact {float(seeds.value[k]):.3g}"
        assert row in _labels(fig)


def test_rules_figure_shows_each_rule_of_the_same_activations(tmp_path: Path) -> None:
    dn, x, pre = _shipped()
    fig = figures.rules_figure(dn, x, "conv3", figures.Selection([3, 7]), show=pre.denormalize)
    assert isinstance(fig, Figure) and list(tmp_path.iterdir()) == []
    assert len(fig.axes) == 2 * (1 + len(zfvis.RULES))
    for ax in fig.axes:
        assert _not_blank(_image_of(ax))
    assert {"deconvnet", "guided", "gradient"} <= set(_labels(fig))
    rec = dn.record(x, "conv3", rule="guided")
    seeds = dn.select(rec, [3, 7])
    patches = dn.reverse(rec, seeds)
    t, l, b, r = patches.boxes()[1]
    guided = render.normalize_projection(patches.full()[1].float())[:, t:b, l:r].permute(1, 2, 0).numpy()
    assert np.allclose(_image_of(fig.axes[4 + 2]), guided, atol=1e-6)  # row 2, column "guided"
    figures.rules_figure(dn, x, "conv3", figures.Selection(3), path=tmp_path / "r.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".zfvis-written.json", "r.png"]  # and its ledger entry


# --------------------------------------------------------------------------- filters_figure


class _Swapped(nn.Module):
    """Registration order differs from execution order: ``late`` is registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Conv2d(4, 6, 3)
        self.early = nn.Conv2d(3, 4, 5)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(self.pool(self.act(self.bn(self.early(x)))))


def test_filters_figure_finds_the_convolution_in_execution_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Swapped()
    fig = zfvis.filters_figure(model, "act")  # the ReLU after early's batch norm: early's filters
    assert isinstance(fig, Figure) and list(tmp_path.iterdir()) == []
    panels = [_image_of(ax) for ax in fig.axes if ax.get_images()]
    want = render.normalize_projection(model.early.weight.detach()).permute(0, 2, 3, 1).numpy()
    assert len(panels) == 4 and all(p.shape == (5, 5, 3) for p in panels)
    assert all(np.allclose(p, w, atol=1e-6) and _not_blank(p) for p, w in zip(panels, want))
    assert "act = 'early': 4 filters 5x5" in _labels(fig)
    late = zfvis.filters_figure(zfvis.Deconvnet(model), "late", model_name="swapped", path=tmp_path / "f.png")
    assert len([ax for ax in late.axes if ax.get_images()]) == 6  # grey: the mean over 4 input channels
    assert "swapped late = 'late': 6 filters 3x3" in _labels(late)
    assert np.array_equal(_pixels(tmp_path / "f.png"), _drawn(late))
    with pytest.raises(zfvis.UserInputError, match="not a convolution"):
        zfvis.filters_figure(model, "pool")
    with pytest.raises(zfvis.InputTypeError):
        zfvis.filters_figure("model", "act")  # type: ignore[arg-type]


def test_progress_bars_are_tqdm_auto() -> None:
    """Every progress bar of the package is ``tqdm.auto``'s, which renders in a notebook too."""
    import re

    package = Path(zfvis.__file__).parent
    imports = {p.relative_to(package).as_posix(): re.findall(r"^\s*(?:from|import) (tqdm\S*)", p.read_text(), re.M)
               for p in package.rglob("*.py")}
    used = {name: found for name, found in imports.items() if found}
    assert used == {"io/progress.py": ["tqdm.auto"]}  # every bar is made in one place, by tqdm.auto
    callers = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if "progress(" in p.read_text()}
    assert {"analysis/evolution.py", "mining/pass1.py", "mining/pass2.py", "analysis/occlusion.py", "analysis/invariance.py",
            "analysis/correspondence.py"} <= callers
