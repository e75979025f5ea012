"""Each error of issue 24 that misled or crashed is named by its real cause: one line,
exit 2 from the CLI (a UserInputError from the API), in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn

import zfvis
from zfvis.cli import main
from zfvis.io.images import load_image

REPO = Path(__file__).resolve().parents[1]
timm = pytest.importorskip("timm", reason="timm is an optional dependency (pip install 'zfvis[timm]')")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) <= 1 and "internal error" not in err and "Traceback" not in err, err
    return rc, err


@pytest.mark.parametrize(("model", "expected"), [
    ("timm:resnet18.badtag", "unknown pretrained tag 'badtag' for timm:resnet18; its tags: a1_in1k"),
    ("timm:resnet18./tmp/w.pt", "is a path"),
    ("timm:../x", "is a path"),
])
def test_timm_names_with_a_wrong_tag_or_a_path(tmp_path: Path, capsys, model: str, expected: str) -> None:
    rc, err = run_cli(capsys, "project", "--model", model, "--weights", "random", "-o", tmp_path / "p.png")
    assert rc == 2 and expected in err
    assert "Close:" not in err  # no unrelated names


def test_timm_default_weights_offline_are_refused_in_seconds(tmp_path: Path) -> None:
    """Not cached, and the hub unreachable (a black-holed address): refused at once, not
    after the hub's minute of retries."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               HF_ENDPOINT="http://192.0.2.1", HF_HUB_OFFLINE="0")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "zfvis", "project", "--model", "timm:resnet18", "-o",
                           str(tmp_path / "p.png")], env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert "not cached and 192.0.2.1 cannot be reached" in proc.stderr and "--weights" in proc.stderr
    assert seconds < 25, seconds  # startup and the model build included; the probe waits 3 s


def test_a_toml_config_with_a_bom_is_accepted(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xef\xbb\xbf" + b'layer = "conv1"\ntop-channels = 1\n')
    rc, err = run_cli(capsys, "project", "--config", config, "-o", tmp_path / "p.png")
    assert rc == 0, err
    assert (tmp_path / "p.png").is_file()


def test_an_absurd_aspect_ratio_is_refused_before_resizing(tmp_path: Path, capsys) -> None:
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 300_000), (9, 9, 9)).save(thin)
    rc, err = run_cli(capsys, "project", thin, "-o", tmp_path / "p.png")
    assert rc == 2 and "1x300000 pixels, an aspect ratio beyond 100:1" in err and "memory" not in err


def test_a_model_s_own_conv1_is_not_refused_for_an_alias_never_given(tmp_path: Path) -> None:
    from zfvis.models.zfnet import ZFNet

    _, preprocess = zfvis.load_model("zfnet-cifar10")

    class Mine(ZFNet):
        def __init__(self) -> None:
            super().__init__(num_classes=10, widths=(8, 8, 8, 8, 8), kernels=(5, 5, 3, 3, 3), strides=(1, 1),
                             fc_width=16, batch_norm=True, small_input=True)
            self.conv1 = nn.Conv2d(3, 3, 1)  # a module of its own under a paper's name

    model = Mine().eval()
    data = tmp_path / "ds"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (90 * i, 40, 200)).save(data / f"{i}.png")
    res = zfvis.mining.mine(model, preprocess, data, ["features.0"], out_dir=tmp_path / "run", progress=False,
                            top=1, channels=[0], figures=False)
    assert res.topk is not None and res.topk["layers"]["features.0"]["channels"][0]
    dn = zfvis.Deconvnet(model)  # the API and `zfvis project` alike: the zoo's aliases that fit, no refusal
    assert set(dn.aliases) < set(zfvis.layer_aliases(model)) and dn.resolve("features.0") == "features.0"
    with pytest.raises(zfvis.UserInputError, match="alias 'x'"):
        zfvis.Deconvnet(model, aliases={"x": "nope"})  # an alias the caller gives is still checked


def test_a_uniform_mid_grey_16_bit_png_loads_as_mid_grey(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    Image.new("I;16", (8, 6), 32768).save(path)
    pixels = np.asarray(load_image(path))
    assert pixels.min() == pixels.max() and 127 <= int(pixels[0, 0, 0]) <= 128
    dark = tmp_path / "dark16.png"
    Image.new("I;16", (8, 6), 1000).save(dark)  # a dark image stays dark
    assert np.asarray(load_image(dark)).max() <= 4
