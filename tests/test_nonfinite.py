"""No non-finite number reaches an output: NaN or infinite weights or input pixels are a
clear error, and every JSON output is strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import zfvis
from zfvis.cli import main
from zfvis.core.deconvnet import Deconvnet
from zfvis.mining import mine


def _strict(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a JSON output")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 90, 200 - 50 * i)).save(root / f"{i}.png")
    return root


def test_mining_with_nan_weights_is_refused_before_writing(data: Path, tmp_path: Path) -> None:
    model, preprocess = zfvis.load_model("zfnet-cifar10")
    with torch.no_grad():
        model.features[5].weight[0, 0, 0, 0] = float("nan")
    out = tmp_path / "run"
    with pytest.raises(zfvis.UserInputError, match=r"NaN or infinite values in features\.5\.weight \(1 of"):
        mine(model, preprocess, data, ["conv1"], out_dir=out, progress=False, top=2)
    assert not out.exists()
    assert torch.isnan(model.features[5].weight[0, 0, 0, 0])  # the model is left as it was given


def test_a_weights_file_with_inf_is_refused(tmp_path: Path, capsys) -> None:
    model, _ = zfvis.load_model("zfnet-cifar10")
    state = model.state_dict()
    state["features.1.bias"][1] = float("inf")
    torch.save(state, tmp_path / "w.pt")
    rc = main(["project", "--weights", str(tmp_path / "w.pt"), "-o", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "features.1.bias" in err and "NaN or infinite" in err and "Traceback" not in err
    assert not (tmp_path / "p.png").exists()


def test_a_nan_input_pixel_is_refused() -> None:
    model, _ = zfvis.load_model("zfnet-cifar10")
    x = torch.rand(2, 3, 32, 32)
    x[1, 2, 5, 7] = float("nan")
    dn = Deconvnet(model)
    with pytest.raises(zfvis.UserInputError, match=r"1 NaN and 0 infinite value\(s\).*\(1, 2, 5, 7\)"):
        dn.record(x, "conv1")
    with pytest.raises(zfvis.UserInputError, match="NaN"):
        dn.forward_outputs(x, ["conv1"])


def test_a_meta_device_input_is_a_typed_error() -> None:
    model, _ = zfvis.load_model("zfnet-cifar10")
    with pytest.raises(zfvis.InputTypeError, match="meta device"):
        Deconvnet(model).record(torch.empty(1, 3, 32, 32, device="meta"), "conv1")


def test_json_outputs_are_strict(data: Path, tmp_path: Path) -> None:
    model, preprocess = zfvis.load_model("zfnet-cifar10")
    out = tmp_path / "run"
    mine(model, preprocess, data, ["conv1"], out_dir=out, progress=False, top=2, channels=[0, 1])
    for name in ("topk.json", "settings.json"):
        _strict((out / name).read_text())
