"""What a newcomer meets first: offline errors that say what to do, the shipped training
snapshots behind ``zfvis evolution``, and the API's conveniences the README uses."""

from __future__ import annotations

import json
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image

import zfvis
from zfvis.cli import main
from zfvis.models import snapshots


def _offline(*args: object, **kwargs: object) -> None:
    sys.stdout.write('Downloading: "https://download.pytorch.org/models/x.pth" to /somewhere\n')  # as torch.hub does
    raise urllib.error.URLError("[Errno -2] Name or service not known")


def test_offline_imagenet_model_says_to_try_random_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _offline)
    assert main(["project", "--model", "alexnet", "-o", str(tmp_path / "p.png")]) == 2
    out, err = capsys.readouterr()
    assert "--weights random" in err and "--weights PATH" in err and len(err.strip().splitlines()) == 1
    assert "Downloading" not in out + err  # torch.hub's line is not left above the error
    with pytest.raises(zfvis.WeightsDownloadError, match='weights="random"'):
        zfvis.load_model("alexnet")


@pytest.mark.parametrize("command", ["occlude", "invariance"])
def test_class_name_with_random_weights_says_why_and_what_to_give(command: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.png"
    assert main([command, "--model", "alexnet", "--weights", "random", "--target", "tabby", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "random" in err and "class number" in err and "--weights DEFAULT" in err, err
    assert not out.exists()


def test_shipped_snapshots_are_small_and_hold_only_the_first_layers() -> None:
    snaps = zfvis.training_snapshots()
    path = Path(snapshots.__file__).parent / "weights" / snapshots.SNAPSHOT_FILE
    assert path.stat().st_size < 1_500_000 and snaps.through == "conv2" and len(snaps.models) >= 3
    assert snaps.labels == sorted(snaps.labels, key=lambda s: int(s.split()[-1])) and snaps.command
    x = torch.randn(2, 3, 32, 32)
    dn = zfvis.Deconvnet(snaps.models[0])
    assert torch.isfinite(dn.output(x, "conv2")).all()
    assert torch.isnan(dn.output(x, "conv3")).all()  # never a plausible number past what was shipped
    first, last = (zfvis.Deconvnet(m).output(x, "conv2") for m in (snaps.models[0], snaps.models[-1]))
    assert not torch.equal(first, last)  # the epochs differ


def test_api_evolution_refuses_a_layer_the_snapshots_do_not_hold() -> None:
    snaps = zfvis.training_snapshots()
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(zfvis.UserInputError, match="not finite"):
        zfvis.evolution(snaps.models[:1], x, "conv3", [0])


def test_evolution_with_no_arguments_draws_the_shipped_snapshots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["evolution", "--limit", "20", "--channels", "0-3"]) == 0
    with Image.open(tmp_path / "zfvis_evolution.png") as im:
        assert im.size[0] > 300 and im.size[1] > 300
    settings = json.loads((tmp_path / "zfvis_evolution.json").read_text())
    assert settings["source"] == "shipped snapshots" and settings["layer"] == "conv2"
    assert settings["labels"] == zfvis.training_snapshots().labels
    assert "searched 20 images" in capsys.readouterr().out


def test_evolution_snapshots_refuse_later_layers_and_other_models(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e.png"
    assert main(["evolution", "--layer", "conv3", "-o", str(out)]) == 2
    assert "through conv2" in capsys.readouterr().err
    assert main(["evolution", "--model", "alexnet", "-o", str(out)]) == 2
    assert "zfnet-cifar10 only" in capsys.readouterr().err
    ck = tmp_path / "ck.pt"
    torch.save(zfvis.load_model("zfnet-cifar10", weights="random")[0].state_dict(), ck)
    assert main(["evolution", str(ck), "-o", str(out)]) == 2
    assert "--layer is required" in capsys.readouterr().err
    assert not out.exists()


def test_shipped_dataset_is_every_class() -> None:
    paths = zfvis.sample_images(zfvis.default_dataset())
    assert len(paths) == 500 and len({p.parent.name for p in paths}) == 10


def test_transform_images_takes_what_load_images_returns() -> None:
    _, preprocess = zfvis.load_model("zfnet-cifar10", weights="random")
    images = zfvis.load_images(zfvis.sample_images(zfvis.default_dataset(), 3), preprocess)
    torch.testing.assert_close(zfvis.transform_images(images, "scale", 1.4),
                               zfvis.transform_images(images.batch, "scale", 1.4), rtol=0, atol=0)
    with pytest.raises(zfvis.InputTypeError, match="ImageBatch"):
        zfvis.transform_images([images.batch], "scale", 1.4)  # type: ignore[arg-type]


def test_subpackages_are_attributes() -> None:
    assert zfvis.mining.mine is not None and "mining" in dir(zfvis)


# ----------------------------------------------------------------------------- what the figures say


def test_occlusion_colour_bars_say_what_their_colours_are() -> None:
    model, preprocess = zfvis.load_model("zfnet-cifar10")
    x = preprocess(zfvis.load_image(zfvis.default_image()))
    res = zfvis.occlusion(model, x, patch=16, stride=8, layer="conv5")
    fig = zfvis.occlusion_figure(res, preprocess.denormalize(x), class_names=["plane", "car", "bird", "cat"] + ["x"] * 6)
    labels = {ax.get_ylabel() for ax in fig.axes}
    assert f"sum of map {res.channel}" in labels and "p(cat)" in labels
    texts = [t.get_text() for ax in fig.axes for t in (ax.xaxis.label,)]
    assert any("occluder from row" in t for t in texts)


def test_small_probabilities_keep_their_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from zfvis.cli._analysis import format_probability

    assert format_probability(0.6701) == "0.670" and format_probability(0.00102) == "0.00102"
    assert format_probability(2.5e-6) == "2.5e-06"
    assert main(["occlude", "--model", "alexnet", "--weights", "random", "--patch", "112", "--stride", "112",
                 "--no-progress", "-o", str(tmp_path / "o.png")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "= 0.000 " not in line and "= 0.00" in line and "row" in line, line  # 1,000 classes: about 0.001 each


def test_projection_figure_says_positions_are_rows_and_columns() -> None:
    model, preprocess = zfvis.load_model("zfnet-cifar10")
    x = preprocess(zfvis.load_image(zfvis.default_image())).unsqueeze(0)
    fig = zfvis.projection_figure(zfvis.Deconvnet(model), x, "conv3", show=preprocess.denormalize)
    assert any("(row, column)" in t.get_text() for t in fig.texts)


def test_gallery_pages_explain_offset_and_fig2_pages(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("\n".join(str(p) for p in zfvis.sample_images(zfvis.default_dataset(), 20)) + "\n")
    out = tmp_path / "run"
    assert main(["mine", str(data), "--layers", "conv3", "--channels", "0-1", "--no-progress", "-o", str(out)]) == 0
    for page in (out / "index.html", out / "layers" / "conv3" / "index.html", out / "layers" / "conv3" / "c0001.html"):
        html = page.read_text(encoding="utf-8")
        assert "offset: the input row and column" in html and "Fig. 2 pages: the layer drawn" in html, page
    assert "at feature-map row" in (out / "layers" / "conv3" / "c0001.html").read_text(encoding="utf-8")


def test_a_plain_install_ships_every_subpackage_and_data_file() -> None:
    """``pip install .`` (the README's first command) installs what pyproject.toml lists:
    every package of zfvis, and every file beside the code (weights, photos, images)."""
    import fnmatch

    import tomllib

    repo = Path(__file__).resolve().parents[1]
    tool = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = tool.get("packages", {})
    include = listed["find"]["include"] if isinstance(listed, dict) else listed  # find patterns, or a plain list
    packages = {".".join(p.parent.relative_to(repo).parts) for p in (repo / "zfvis").rglob("__init__.py")}
    assert {"zfvis.core", "zfvis.models", "zfvis.viz", "zfvis.mining"} <= packages
    missing = [p for p in packages if not any(fnmatch.fnmatch(p, pat) for pat in include)]
    assert not missing, f"pyproject.toml does not ship {missing}"
    data = tool["package-data"]
    for path in (repo / "zfvis").rglob("*"):
        if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
            continue
        owners = [pkg for pkg in packages if path.is_relative_to(repo.joinpath(*pkg.split(".")))]
        owner = max(owners, key=len)
        rel = path.relative_to(repo.joinpath(*owner.split("."))).as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in data.get(owner, [])), f"pyproject.toml does not ship {path}"
