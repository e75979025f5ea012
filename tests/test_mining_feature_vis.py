"""A mining run with synthetic images (``feature_vis``, ``zfvis mine --feature-vis``): the images are
the optimisation's, written beside the tiles, shown on the Fig. 2 pages and in the gallery; an
interrupted run resumes without computing the finished ones again; without the flag nothing changes."""

from __future__ import annotations

import html.parser
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_mining import LAYERS, PRE, _run, make_dataset, tiny_model

import zfvis
from zfvis.cli import main
from zfvis.io import ownership
from zfvis.mining import pages as mining_figures
from zfvis.mining import pipeline, synthesis
from zfvis.viz import sheets

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 4


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_dataset(root, n=10)
    return root


class _Counting:
    """Wraps ``feature_vis``: counts the calls (and the channels asked), and stops (as Ctrl-C does)
    at call ``stop``."""

    def __init__(self, stop: int | None = None) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.stop = stop
        self.real = synthesis.feature_vis

    def __call__(self, dn, layer, channels, **kw):  # noqa: ANN001, ANN204
        self.calls.append((layer, list(channels)))
        if self.stop is not None and len(self.calls) == self.stop:
            raise KeyboardInterrupt
        return self.real(dn, layer, channels, **kw)


def _refs(page: Path) -> list[str]:
    class Refs(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.refs: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.refs += [v for k, v in attrs if k in ("src", "href") and v]

    parser = Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.refs


def test_synthetic_images_written_recorded_and_shown(data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "fv"
    res = _run(data, out, feature_vis=True, feature_vis_steps=STEPS, progress=True)
    summary = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("feature vis: 9 synthetic")]
    topk = json.loads((out / "topk.json").read_text())
    reach = {n: sum(p >= c[0]["value"] for p, c in zip(topk["layers"][n]["synthetic"]["peak"],
                                                       topk["layers"][n]["channels"])) for n in LAYERS}
    assert len(summary) == 1 and "(9 computed, 0 resumed)" in summary[0]
    assert all(f"{n} median" in summary[0] and f"{reach[n]}/{len(topk['layers'][n]['channels'])} reach the top-1"
               in summary[0] for n in LAYERS), summary
    assert "feature_vis" in topk["timings"]
    model = tiny_model()
    for layer in LAYERS:
        info = topk["layers"][layer]
        made = info["synthetic"]
        ids = info["channel_ids"]
        assert made["steps"] == STEPS and made["files"] == [f"synthetic/{layer}/c{c:04d}.png" for c in ids]
        # the images are the optimisation's: the same call gives the same objectives and pixels
        ref = zfvis.feature_vis(model, layer, ids, steps=STEPS, size=(16, 16), batch_size=len(ids), seed=0,
                                preprocess=PRE, progress=False)
        assert made["objective"] == pytest.approx(ref.final.tolist(), rel=1e-6, abs=1e-6)
        for c, f in zip(ids, made["files"]):
            assert out / f in res.outputs
            saved = sheets.read_png(out / f)
            assert torch.equal(saved, (ref.images[c].clamp(0, 1) * 255).round().to(torch.uint8))
            x = (saved.float() / 255 - torch.tensor(PRE.mean).view(3, 1, 1)) / torch.tensor(PRE.std).view(3, 1, 1)
            with torch.no_grad():  # the peak: the image's strongest activation of its channel, as written
                assert made["peak"][c] == pytest.approx(float(model[: int(layer) + 1](x[None])[0, c].max()), abs=1e-5)
            page = out / "layers" / layer / f"c{c:04d}.html"  # the channel's page shows its image
            assert f"../../{f}" in _refs(page)
        layer_refs = _refs(out / "layers" / layer / "index.html")
        assert all(f"../../{f}" in layer_refs for f in made["files"])
        # the Fig. 2 page draws them: the run's PNG is the figure drawn with them, wider than without
        fig = mining_figures.mining_page(out, layer, path=tmp_path / f"{layer}.png")
        assert fig._zfvis_layout.lead
        assert (tmp_path / f"{layer}.png").read_bytes() == (out / f"{layer}.png").read_bytes()
    for page in out.rglob("*.html"):  # every link of the site resolves
        for ref in _refs(page):
            assert (page.parent / ref.split("#")[0]).is_file() or not ref.split("#")[0], (page, ref)
    run_id = json.loads((out / "settings.json").read_text())["zfvis"]["run_id"]
    made = sorted(out.glob("synthetic/*/*.png"))
    assert len(made) == 4 + 5 and all(ownership.is_ours(f, run_id) for f in made)  # recorded as the run's
    _run(data, out, feature_vis=True, feature_vis_steps=STEPS, restart=True, channels=[0])
    assert sorted(out.glob("synthetic/*/*.png")) == [out / "synthetic" / n / "c0000.png" for n in LAYERS]


def test_resume_does_not_compute_finished_images(data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    ref = tmp_path / "ref"
    _run(data, ref, feature_vis=True, feature_vis_steps=STEPS)
    out = tmp_path / "run"
    stopping = _Counting(stop=2)  # layer "1" done, stopped in layer "4"
    monkeypatch.setattr(synthesis, "feature_vis", stopping)
    with pytest.raises(KeyboardInterrupt, match="feature visualization stopped at chunk 2 of 2"):
        _run(data, out, feature_vis=True, feature_vis_steps=STEPS)
    assert (out / "synthetic" / "1" / "c0003.png").is_file() and not (out / "synthetic" / "4").exists()
    counting = _Counting()
    monkeypatch.setattr(synthesis, "feature_vis", counting)
    _run(data, out, feature_vis=True, feature_vis_steps=STEPS)
    assert counting.calls == [("4", [0, 1, 2, 3, 4])]  # only what was left
    again = _Counting()
    monkeypatch.setattr(synthesis, "feature_vis", again)
    _run(data, out, feature_vis=True, feature_vis_steps=STEPS)
    assert again.calls == []
    for f in ref.rglob("synthetic/*/*.png"):  # the same images as an uninterrupted run
        assert (out / f.relative_to(ref)).read_bytes() == f.read_bytes()
    a, b = (json.loads((p / "topk.json").read_text()) for p in (ref, out))
    assert [a["layers"][n]["synthetic"] for n in LAYERS] == [b["layers"][n]["synthetic"] for n in LAYERS]
    # other steps are other settings: refused without restart
    with pytest.raises(zfvis.UserInputError, match="other settings"):
        _run(data, out, feature_vis=True, feature_vis_steps=STEPS + 1)


def test_without_the_flag_nothing_changes(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting()
    monkeypatch.setattr(synthesis, "feature_vis", counting)
    monkeypatch.setattr(pipeline, "feature_vis", counting)
    out = tmp_path / "plain"
    _run(data, out)
    assert counting.calls == [] and not (out / "synthetic").exists()
    topk = json.loads((out / "topk.json").read_text())
    assert all("synthetic" not in topk["layers"][n] for n in LAYERS) and "feature_vis" not in topk["timings"]
    assert "feature_vis" not in json.loads((out / "settings.json").read_text())["run"]
    assert "synthetic" not in (out / "layers" / "4" / "c0000.html").read_text()
    assert not mining_figures.mining_page(out, "4")._zfvis_layout.lead


@pytest.mark.parametrize(("value", "match"), [({"feature_vis": "yes"}, "feature_vis must be true or false"),
                                              ({"feature_vis_steps": 0}, "feature_vis_steps"),
                                              ({"feature_vis_steps": 2.5}, "feature_vis_steps")])
def test_settings_checked(data: Path, tmp_path: Path, value: dict, match: str) -> None:
    with pytest.raises(zfvis.UserInputError, match=match):
        _run(data, tmp_path / "bad", **value)
    assert not (tmp_path / "bad").exists()


def test_cli_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_dataset(tmp_path / "d", n=3)
    common = ["mine", str(tmp_path / "d"), "--weights", "random", "--layers", "conv1", "--channels", "0-1",
              "--no-progress"]
    assert main([*common, "--feature-vis", "--feature-vis-steps", "2", "-o", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli" / "synthetic" / "conv1").glob("*.png")) == ["c0000.png",
                                                                                                 "c0001.png"]
    cfg = tmp_path / "fv.toml"
    cfg.write_text("[mine]\nfeature-vis = true\nfeature-vis-steps = 2\n")
    assert main([*common, "--config", str(cfg), "-o", str(tmp_path / "cfg")]) == 0
    topk = json.loads((tmp_path / "cfg" / "topk.json").read_text())
    assert topk["layers"]["conv1"]["synthetic"]["steps"] == 2
    capsys.readouterr()
    for text, message in [("feature-vis = 1\n", "feature-vis"), ("feature-vis-steps = 0\n", "--feature-vis-steps"),
                          ("feature-vis-steps = \"many\"\n", "feature-vis-steps")]:
        cfg.write_text("[mine]\n" + text)
        assert main([*common, "--config", str(cfg), "-o", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_page_draws_each_synthetic_image_left_of_its_grids() -> None:
    """On the Fig. 2 page's grid (the pixels shown), each channel's synthetic image sits at its
    block's left, enlarged by a whole factor, and the projection grid moves right by one grid."""
    from zfvis.viz import fig2

    g = torch.Generator().manual_seed(3)
    tiles = [(torch.rand(3, 5, 5, generator=g) * 255).to(torch.uint8) for _ in range(9)]
    channels = [(c, tiles, tiles, [1.0] * 9) for c in range(3)]
    synthetic = [(torch.rand(3, 8, 8, generator=g) * 255).to(torch.uint8), None,
                 (torch.rand(3, 8, 8, generator=g) * 255).to(torch.uint8)]
    plain = fig2.mining_figure("t", channels, columns=3)
    fig = fig2.mining_figure("t", channels, columns=3, synthetic=synthetic)
    lay, base = fig._zfvis_layout, plain._zfvis_layout
    grid = torch.as_tensor(np.asarray(fig.axes[0].images[0].get_array()))  # (H, W, 3) uint8, as drawn
    f = lay.grid // 8
    for k, img in enumerate(synthetic):
        x, y = lay.origin(k)
        y += lay.label
        off = (lay.grid - 8 * f) // 2
        shown = grid[y + off : y + off + 8 * f : f, x + off : x + off + 8 * f : f].permute(2, 0, 1)
        if img is None:
            assert int(shown.min()) == int(shown.max()) == 240  # a grey blank
        else:
            assert torch.equal(shown, img)
    assert lay.width == base.width + 3 * (lay.grid + lay.mid_gap)
    with pytest.raises(ValueError, match="one image"):
        fig2.mining_figure("t", channels, synthetic=synthetic[:2])
