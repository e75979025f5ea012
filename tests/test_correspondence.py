"""Correspondence (ZF Fig. 8, Table 1): Delta against a direct computation of the formula, the
random baseline, part files, and the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_occlusion import Residual, chain_model, ready
from torch import nn

import zfvis
from zfvis.analysis.correspondence import correspondence, default_parts_file, load_parts, sign_change_distances
from zfvis.cli import main


def direct_delta(
    model: nn.Module, images: torch.Tensor, boxes: list[tuple[int, int, int, int]], layer: str
) -> tuple[float, list[float]]:
    """The paper's formula, written out with loops: eps_i = x_i - x~_i (x~: part occluded with
    0), Delta = sum over i != j of the Hamming distance of the signs, divided by the length."""
    dn = zfvis.Deconvnet(model)
    n = len(images)
    eps = []
    for i in range(n):
        occluded = images[i].clone()
        t, l, b, r = boxes[i]
        occluded[:, t:b, l:r] = 0.0
        feats = dn.record(torch.stack([images[i], occluded]), layer).output.reshape(2, -1)
        eps.append(feats[0] - feats[1])
    delta, pairs = 0.0, []
    for i in range(n):
        for j in range(n):
            if i != j:
                hamming = sum(int(a != b) for a, b in zip(torch.sign(eps[i]).tolist(), torch.sign(eps[j]).tolist()))
                delta += hamming / len(eps[i])
                if i < j:
                    pairs.append(hamming / len(eps[i]))
    return delta, pairs


@pytest.mark.parametrize("model_fn", [chain_model, Residual])
def test_delta_follows_the_formula(model_fn: type) -> None:
    model = ready(model_fn())
    torch.manual_seed(1)
    images = torch.randn(3, 3, 23, 21, dtype=torch.float64)
    boxes = {"eye": [(2, 3, 7, 8), (4, 4, 9, 9), (3, 10, 8, 15)], "nose": [(12, 8, 18, 13)] * 3}
    layers = ["6", "13"] if model_fn is chain_model else ["b1.add", "b2.relu_1"]
    res = correspondence(model, images, boxes, layers, seed=3)
    assert list(res.rows) == ["eye", "nose", "random (eye)", "random (nose)"]
    for label in res.rows:
        for layer in layers:
            delta, pairs = direct_delta(model, images, res.boxes[label], layer)
            score = res.rows[label][layer]
            assert score.delta == pytest.approx(delta, abs=1e-12) and 0 < score.delta < 6
            assert score.pairs.tolist() == pytest.approx(pairs, abs=1e-12)
            assert score.mean == pytest.approx(sum(pairs) / 3, abs=1e-12)
            mean = sum(pairs) / 3
            assert score.std == pytest.approx((sum((p - mean) ** 2 for p in pairs) / 3) ** 0.5, abs=1e-12)


def test_figure_draws_each_part_and_its_baseline() -> None:
    model = ready(chain_model())
    torch.manual_seed(1)
    images = torch.randn(3, 3, 23, 21, dtype=torch.float64)
    boxes = {"eye": [(2, 3, 7, 8), (4, 4, 9, 9), (3, 10, 8, 15)], "nose": [(12, 8, 18, 13)] * 3}
    res = correspondence(model, images, boxes, ["6", "13"], seed=3)
    shown = (images - images.min()) / (images.max() - images.min())
    fig = zfvis.correspondence_figure(res, list(shown), ["a", "b", "c"])
    pictures = [ax for ax in fig.axes if ax.images]
    assert len(pictures) == 3 and all(len(ax.patches) == 2 for ax in pictures)  # a box per part
    assert all(float(ax.images[0].get_array().std()) > 0 for ax in pictures)  # not blank
    plots = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split(":")[0] for ax in plots] == ["6", "13"]
    for ax, layer in zip(plots, ["6", "13"]):
        heights = [round(b.get_height(), 12) for b in ax.patches]
        want = [res.rows[p][layer].mean for p in ["eye", "nose", "random (eye)", "random (nose)"]]
        assert heights == pytest.approx(want, abs=1e-9) and max(heights) > 0


def test_sign_change_distances() -> None:
    eps = torch.tensor([[1.0, -2.0, 0.0, 3.0], [2.0, -1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    d = sign_change_distances(eps)
    assert d.tolist() == [[0.0, 0.5, 0.75], [0.5, 0.0, 1.0], [0.75, 1.0, 0.0]]


def test_random_boxes_are_seeded_and_same_size() -> None:
    model = ready(chain_model())
    images = torch.randn(2, 3, 23, 21, dtype=torch.float64)
    boxes = {"eye": [(2, 3, 7, 8), (4, 4, 10, 9)]}
    a = correspondence(model, images, boxes, ["6"], seed=0)
    b = correspondence(model, images, boxes, ["6"], seed=0)
    c = correspondence(model, images, boxes, ["6"], seed=1)
    assert a.boxes["random (eye)"] == b.boxes["random (eye)"] != c.boxes["random (eye)"]
    for (t, l, bt, r), (t0, l0, b0, r0) in zip(a.boxes["random (eye)"], boxes["eye"]):
        assert (bt - t, r - l) == (b0 - t0, r0 - l0) and 0 <= t and bt <= 23 and 0 <= l and r <= 21
    assert list(correspondence(model, images, boxes, ["6"], random_baseline=False).rows) == ["eye"]


def test_bad_boxes() -> None:
    model, images = ready(chain_model()), torch.randn(2, 3, 23, 21, dtype=torch.float64)
    with pytest.raises(ValueError, match="outside"):
        correspondence(model, images, {"eye": [(2, 3, 7, 8), (20, 4, 25, 9)]}, ["6"])
    with pytest.raises(ValueError, match="one per image"):
        correspondence(model, images, {"eye": [(2, 3, 7, 8)]}, ["6"])
    with pytest.raises(ValueError, match="at least 2"):
        correspondence(model, images[:1], {"eye": [(2, 3, 7, 8)]}, ["6"])


def test_bad_types_are_typed_errors() -> None:
    model, images = ready(chain_model()), torch.randn(2, 3, 23, 21, dtype=torch.float64)
    with pytest.raises(zfvis.InputTypeError, match="4 ints"):
        correspondence(model, images, {"eye": [(2, 3, 7, 8), ("a", 4, 10, 9)]}, ["6"])
    with pytest.raises(zfvis.InputTypeError, match="images"):
        correspondence(model, images.long(), {"eye": [(2, 3, 7, 8)] * 2}, ["6"])
    with pytest.raises(zfvis.InputTypeError, match="seed"):
        correspondence(model, images, {"eye": [(2, 3, 7, 8)] * 2}, ["6"], seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(zfvis.UserInputError, match="shape"):
        correspondence(model, images[0], {"eye": [(2, 3, 7, 8)] * 2}, ["6"])


def test_shipped_faces_map_through_the_preprocessing() -> None:
    _, preprocess = zfvis.load_model("zfnet-cifar10")
    parts = load_parts(default_parts_file(), preprocess)
    assert parts.names == ["chelsea.png", "astronaut_face.jpg", "grace_hopper_face.jpg"]
    assert parts.images.shape == (3, 3, 32, 32) and set(parts.boxes) == {"left eye", "right eye", "nose", "mouth"}
    for k in range(3):
        left, right, nose, mouth = (parts.boxes[p][k] for p in ("left eye", "right eye", "nose", "mouth"))
        assert left[3] <= right[1] + 1 and left[0] < nose[0] < mouth[0]  # eyes side by side, above nose and mouth
        assert all(0 <= b[0] < b[2] <= 32 and 0 <= b[1] < b[3] <= 32 for b in (left, right, nose, mouth))
    # chelsea (451x300) is resized to 48x32 and cropped at column 8: her left eye [85, 132, 148, 212]
    assert parts.boxes["left eye"][0] == (9, 6, 16, 15)


def test_part_files_bad_input(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "b.png")
    _, preprocess = zfvis.load_model("zfnet-cifar10")
    ok = [10, 15, 20, 25]
    cases = [
        ({"a.png": {"eye": ok}, "b.png": {"eye": [10, 15, 31, 25]}}, "outside the 40x30 image 'b.png'"),
        ({"a.png": {"eye": ok}, "b.png": {"eye": [10, 0, 20, 3]}}, "falls outside the model's input"),
        ({"a.png": {"eye": ok}, "b.png": {"nose": ok}}, "same parts"),
        ({"a.png": {"eye": ok}}, "at least 2"),
        ({"a.png": {"eye": [0, 0, 5]}, "b.png": {"eye": ok}}, "top, left, bottom, right"),
    ]
    for data, match in cases:
        (tmp_path / "p.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match=match):
            load_parts(tmp_path / "p.json", preprocess)


def test_cli_correspond(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "table.csv"
    assert main(["correspond", "--layers", "conv3,conv5", "--no-progress", "-o", str(out)]) == 0
    assert main(["correspond", "--layers", "conv3,conv5", "--no-progress", "-o", str(out)]) == 0  # its own files: rewritten
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 16 and {r["layer"] for r in rows} == {"conv3", "conv5"}
    assert {r["part"] for r in rows if r["kind"] == "part"} == {"left eye", "right eye", "nose", "mouth"}
    assert all(0 <= float(r["mean"]) <= 1 and int(r["pairs"]) == 3 for r in rows)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["images"] == ["chelsea.png", "astronaut_face.jpg", "grace_hopper_face.jpg"] and len(data["rows"]) == 16
    with Image.open(out.with_suffix(".png")) as im:
        assert im.size[0] > 800 and im.size[1] > 600
    printed = capsys.readouterr().out
    assert "left eye" in printed and "random (mouth)" in printed and "conv5: Delta" in printed


def test_cli_correspond_keeps_a_figure_zfvis_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.png").write_bytes(b"someone's picture")
    assert main(["correspond", "--no-progress", "-o", str(tmp_path / "t.csv")]) == 2
    assert "t.png" in capsys.readouterr().err and (tmp_path / "t.png").read_bytes() == b"someone's picture"
    assert not (tmp_path / "t.csv").exists()


def test_cli_correspond_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    (tmp_path / "p.json").write_text(json.dumps({"a.png": {"eye": [0, 0, 5, 50]}, "b.png": {"eye": [0, 0, 5, 5]}}))
    table = str(tmp_path / "t.csv")
    cases = [
        (["missing.json", "-o", table], "does not exist"),
        ([str(tmp_path / "p.json"), "-o", table], "outside the 40x30 image"),
        (["-o", str(tmp_path / "t.txt")], ".csv"),
        (["--layers", "conv9", "-o", table], "conv9"),
    ]
    for args, match in cases:
        assert main(["correspond", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
