"""Invariance (ZF Fig. 5): the transformations, distances against a hand computation, the
identity, residual models, bad input, and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_occlusion import Residual, chain_model, ready
from torch import nn

import zfvis
from zfvis.analysis.invariance import invariance, transform_images
from zfvis.cli import main


def test_transforms() -> None:
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(transform_images(x, "rotation", 90), torch.rot90(x, 1, (-2, -1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(transform_images(x, "rotation", -180), torch.rot90(x, 2, (-2, -1)), rtol=0, atol=1e-12)
    for name, identity in (("translation", 0), ("scale", 1.0), ("rotation", 0.0), ("rotation", 360.0)):
        assert torch.equal(transform_images(x, name, identity), x)
    down = transform_images(x, "translation", 3, fill=-1.0)
    assert torch.equal(down[..., 3:, :], x[..., :5, :]) and bool((down[..., :3, :] == -1).all())
    up = transform_images(x, "translation", -2)
    assert torch.equal(up[..., :6, :], x[..., 2:, :]) and bool((up[..., 6:, :] == 0).all())
    dot = torch.zeros(1, 1, 9, 9)
    dot[..., 4, 4] = 1.0
    zoomed = transform_images(dot, "scale", 2.0)
    assert zoomed[0, 0, 4, 4] == 1.0 and zoomed[0, 0, 4, 5] == 0.5 and zoomed[0, 0, 3, 3] == 0.25  # bilinear, centred


def tiny_model() -> nn.Module:
    """conv (1x1, weight 2) -> ReLU -> flatten -> linear, small enough to compute by hand."""
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[3].weight.zero_()
        model[3].weight[0, 5] = 1.0  # class 0's score is feature 5 (row 1, column 1), class 1's is 0
        model[3].bias.zero_()
    return model.double().eval()


def test_distance_and_probability_follow_a_hand_computation() -> None:
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 1, 1] = 1.5
    res = invariance(tiny_model(), x, "translation", [-1, 0, 1, 2], ["0", "1"], targets=[0])
    # shifting moves the one bright pixel: conv doubles it, so two entries of +-3 differ
    expected = torch.tensor([[3 * math.sqrt(2), 0.0, 3 * math.sqrt(2), 3 * math.sqrt(2)]], dtype=torch.float64)
    torch.testing.assert_close(res.distances["0"], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.distances["1"], expected, rtol=0, atol=1e-12)
    # class 0's score is 3 (the pixel at (1, 1)) or 0 (moved away); softmax against 0
    p3 = math.exp(3) / (math.exp(3) + 1)
    torch.testing.assert_close(res.probability, torch.tensor([[0.5, p3, 0.5, 0.5]], dtype=torch.float64))
    assert res.base_probability.tolist() == pytest.approx([p3]) and res.targets.tolist() == [0]


@pytest.mark.parametrize("model_fn", [chain_model, Residual])
def test_identity_gives_zero_distance(model_fn: type) -> None:
    model = ready(model_fn())
    x = torch.randn(2, 3, 23, 21, dtype=torch.float64)
    layers = ["2", "13"] if model_fn is chain_model else ["b1.add", "b2.relu_1"]
    for transform, amounts in (("translation", [-2, 0, 3]), ("scale", [1.0, 1.3]), ("rotation", [0.0, 30.0])):
        res = invariance(model, x, transform, amounts, layers, batch_size=2)
        k = amounts.index(0 if transform != "scale" else 1.0)
        for layer in layers:
            assert bool((res.distances[layer][:, k] == 0).all())
            assert bool((res.distances[layer][:, [i for i in range(len(amounts)) if i != k]] > 0).all())
        torch.testing.assert_close(res.probability[:, k], res.base_probability, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("shear", [1.0], ["0"]), ValueError, "unknown transform"),
        (("translation", [0.5], ["0"]), ValueError, "whole pixels"),
        (("scale", [0.0], ["0"]), ValueError, "positive"),
        (("rotation", [], ["0"]), ValueError, "at least one"),
        (("rotation", [10.0], ["nope"]), ValueError, "nope"),
        (("rotation", [float("nan")], ["0"]), zfvis.UserInputError, "finite number"),
    ],
)
def test_bad_input(args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        invariance(tiny_model(), torch.zeros(1, 1, 4, 4, dtype=torch.float64), *args)
    with pytest.raises(ValueError, match="targets"):
        invariance(tiny_model(), torch.zeros(3, 1, 4, 4, dtype=torch.float64), "scale", [1.0], ["0"], targets=[0, 1])


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("rotation", ["10"], ["0"]), {}, "finite numbers"),
        (("rotation", [10.0], ["0"]), {"fill": "grey"}, "fill"),
        (("rotation", [10.0], ["0"]), {"targets": ["cat"]}, "targets"),
        ((1, [10.0], ["0"]), {}, "transform"),
    ],
)
def test_bad_types_are_typed_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(zfvis.InputTypeError, match=match):
        invariance(tiny_model(), torch.zeros(1, 1, 4, 4, dtype=torch.float64), *args, **kwargs)
    with pytest.raises(zfvis.InputTypeError, match="images"):
        invariance(tiny_model(), [[0.0]], "scale", [1.0], ["0"])  # type: ignore[arg-type]


def test_every_module_keeps_its_own_mode() -> None:
    model = ready(chain_model()).train()
    model[5].eval()  # a frozen batch norm inside a model being trained
    invariance(model, torch.randn(1, 3, 23, 21, dtype=torch.float64), "scale", [1.0, 1.2], ["2"])
    assert model.training and not model[5].training and model[0].training


def test_figure_legend_names_each_images_class() -> None:
    from zfvis.viz.analysis import invariance_figure

    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    x[1, 0, 1, 1] = 1.5
    res = invariance(tiny_model(), x, "translation", [-1, 0, 1], ["0", "1"])
    fig = invariance_figure([res], ["a.png", "b.png"], class_names=["face", "other"])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["a.png (face)", "b.png (face)"]  # ties go to class 0; b's bright pixel is class 0's feature
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_ylabel() for ax in axes] == ["Euclidean distance", "Euclidean distance", "probability"]
    assert all(len(ax.lines) == 2 for ax in axes)  # a curve per image


def test_cli_invariance(tmp_path: Path) -> None:
    out = tmp_path / "inv.png"
    assert main(["invariance", "--transform", "translation,rotation", "--translations=-4:4:4",
                 "--rotations", "0:180:90", "--target", "cat", "--no-progress", "-o", str(out)]) == 0  # fmt: skip
    with Image.open(out) as im:
        w, h = im.size
    assert w > 1000 and h > 500
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["layers"] == ["conv1", "fc7"] and [r["transform"] for r in data["results"]] == ["translation", "rotation"]
    trans = data["results"][0]
    assert trans["amounts"] == [-4.0, 0.0, 4.0] and trans["target_names"] == ["cat", "cat", "cat"]
    assert [d[1] for d in trans["distances"]["conv1"]] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("args", "match"),
    [(["--transform", "shear"], "unknown transform 'shear'"), (["--scales", "1:2:0"], "--scales"),
     (["--target", "cat", "--target", "dog"], "once per image"), (["--layers", "conv9"], "conv9")],
)  # fmt: skip
def test_cli_invariance_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str) -> None:
    assert main(["invariance", *args, "-o", str(tmp_path / "i.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
