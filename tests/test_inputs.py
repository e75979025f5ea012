"""Every number a person types goes through one parsing layer; the Python API's research inputs
get typed errors; correspondence's memory does not grow with the images' pairs; the
environment (Ctrl-C while torch loads, a broken matplotlib setup) never shows a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import zfvis
from zfvis.cli import main
from zfvis.io import parse

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- the parsing layer


@pytest.mark.parametrize("text", ["1e39", "-1e39", "1e-39", "nan", "inf", "²", "٣", "1,5", "", "0x10"])
def test_numbers_beyond_float32_or_not_ascii_are_refused(text: str) -> None:
    with pytest.raises(zfvis.UserInputError):
        parse.parse_number(text, "--fill")


def test_numbers_in_range_pass() -> None:
    assert parse.parse_number("-0.5", "--fill") == -0.5
    assert parse.parse_number("3e38", "--fill") == 3e38
    assert parse.parse_number("1e39", "x", dtype=torch.float64) == 1e39
    assert parse.parse_int(" 12 ", "n") == 12


@pytest.mark.parametrize("text", ["0:1e308:1e-308", "1:2:1e-320", "0:1:0", "0:1:-1", "0:10000000:1", "1:2", ""])
def test_ranges_are_bounded_before_anything_is_built(text: str) -> None:
    with pytest.raises(zfvis.UserInputError):
        parse.parse_range(text, "--scales")


def test_ranges() -> None:
    assert parse.parse_range("0:1:0.25", "r") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse.parse_range("3, 1,2", "r") == [3.0, 1.0, 2.0]


@pytest.mark.parametrize("text", ["²", "--5", "-1", "٣", ""])
def test_class_targets(text: str) -> None:
    with pytest.raises(zfvis.UserInputError):
        parse.parse_target(text, ["cat", "dog"])
    assert parse.parse_target("Dog", ["cat", "dog"]) == 1 and parse.parse_target("1", None) == 1


def test_json_files(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(zfvis.UserInputError, match="nests"):
        parse.read_json(deep, "part file")
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": [1]}).encode())
    assert parse.read_json(bom, "part file") == {"a": [1]}


@pytest.mark.parametrize("argv", [
    ["invariance", "--scales", "1e-39"],
    ["invariance", "--fill", "1e39"],
    ["invariance", "--rotations", "0:1e308:1e-308"],
    ["invariance", "--scales", "1:2:1e-320"],
    ["invariance", "--layers", ""],
    ["invariance", "--transform", ","],
    ["occlude", "--target", "²"],
    ["occlude", "--target=--5"],
    ["occlude", "--fill", "nan"],
    ["correspond", "--layers", ""],
    ["correspond", "--seed", str(2**70)],
    ["project", "--top-k", "٣"],
])
def test_cli_numbers_are_one_line_and_exit_2(argv: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / ("o.csv" if argv[0] == "correspond" else "o.png")
    rc, err = run_cli(capsys, *argv, "--no-progress" if argv[0] != "project" else "--layer=conv1", "-o", out)
    assert rc == 2
    one_line(err)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the Python API


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


def test_api_research_inputs_get_typed_errors() -> None:
    model, x = small_model(), torch.randn(2, 3, 8, 8)
    with torch.device("meta"):
        meta = small_model()
    with pytest.raises(zfvis.UserInputError, match="meta"):
        zfvis.Deconvnet(meta)
    with pytest.raises(zfvis.UserInputError, match="empty batch"):
        zfvis.Deconvnet(model).project(x[:0], "0", channel=0)
    with pytest.raises(zfvis.UserInputError, match="boxes"):
        zfvis.occlude(x[0], [])
    with pytest.raises(zfvis.ForwardPassError, match="1 channel"):
        zfvis.invariance(model, torch.randn(2, 1, 8, 8), "scale", [1.0, 1.5], ["0"])
    with pytest.raises(zfvis.InputTypeError, match="floating-point"):
        zfvis.transform_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "scale", 1.5)
    assert zfvis.transform_images(x[0], "scale", 1.5).shape == (3, 8, 8)  # one (C, H, W) image works
    with pytest.raises(zfvis.UserInputError, match="seed"):
        zfvis.correspondence(model, x, {"a": [(0, 0, 2, 2)] * 2}, ["0"], seed=2**70)
    for call in (lambda f: zfvis.correspondence(model, x, {"a": [(0, 0, 2, 2)] * 2}, ["0"], fill=f),
                 lambda f: zfvis.occlusion(model, x[0], patch=4, stride=4, fill=f),
                 lambda f: zfvis.invariance(model, x, "scale", [1.0, 1.5], ["0"], fill=f),
                 lambda f: zfvis.occlude(x, [(0, 0, 2, 2)] * 2, fill=f)):
        for bad in (float("nan"), float("inf"), 1e39, torch.tensor([0.0, float("nan"), 0.0])):
            with pytest.raises(zfvis.UserInputError, match="fill"):
                call(bad)
    with pytest.raises(zfvis.UserInputError, match="scale"):
        zfvis.invariance(model, x, "scale", [1e-39], ["0"])


def test_float16_failure_names_the_dtype() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LocalResponseNorm(2)).eval().half()  # no CPU kernel for LRN
    with pytest.raises(zfvis.ForwardPassError, match="float16 on the CPU"):
        zfvis.Deconvnet(model).output(torch.randn(1, 3, 8, 8), "1")


# ----------------------------------------------------------------------------- memory


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation makes (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel() * t.element_size())
        return out


def test_correspondence_memory_does_not_grow_with_the_pairs(monkeypatch) -> None:
    import zfvis.analysis.correspondence as corr

    monkeypatch.setattr(corr, "PAIR_BLOCK", 1 << 14)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    peaks = {}
    for n in (4, 16):
        images = torch.randn(n, 3, 16, 16)
        with LargestTensor() as mode:
            res = zfvis.correspondence(model, images, {"a": [(2, 2, 8, 8)] * n}, ["1"], batch_size=4,
                                       random_baseline=False)
        peaks[n] = mode.peak
        assert res.rows["a"]["1"].pairs.shape == (n * (n - 1) // 2,)
    # 4x the images: the kept signs and features grow 4x; the pairs (16x) must not show
    assert peaks[16] <= 4 * peaks[4] * 1.1, peaks


def test_blocked_hamming_equals_the_dense_formula(monkeypatch) -> None:
    import zfvis.analysis.correspondence as corr

    eps = torch.randn(7, 300)
    eps[eps.abs() < 0.3] = 0
    dense = (torch.sign(eps)[:, None] != torch.sign(eps)[None]).double().mean(2)
    monkeypatch.setattr(corr, "PAIR_BLOCK", 50)
    assert torch.equal(corr.sign_change_distances(eps), dense)


# ----------------------------------------------------------------------------- the environment


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPL")}
    env.update(extra)
    return env


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path: Path) -> None:
    for delay in (0.3, 0.8):
        proc = subprocess.Popen([sys.executable, "-m", "zfvis", "layers"], cwd=tmp_path, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue  # it had finished: nothing to interrupt
        # 130, or killed by the SIGINT itself (what a shell also reports as 130): interpreter
        # shutdown after a Ctrl-C inside torch's import may end by the signal
        assert proc.returncode in (130, -signal.SIGINT), err
        assert err.strip() == "zfvis: interrupted", err


def test_a_broken_matplotlib_environment_stays_quiet(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    env = _env(HOME=str(afile), MPLCONFIGDIR=str(afile), MPLBACKEND="nonsense", XDG_CONFIG_HOME="",
               XDG_CACHE_HOME="")
    good, bad = (subprocess.Popen([sys.executable, "-m", "zfvis", "filters", *argv], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for argv in (["-o", str(tmp_path / "f.png")], ["--layer", "nope", "-o", str(tmp_path / "g.png")]))
    (_, good_err), (_, bad_err) = good.communicate(timeout=300), bad.communicate(timeout=300)  # both at once
    assert good.returncode == 0 and good_err == "", good_err
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert bad.returncode == 2 and len(bad_err.strip().splitlines()) == 1, bad_err


def test_an_empty_weights_file_in_the_hub_cache(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from zfvis.models.zoo import get_spec

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub's cache is TORCH_HOME/hub
    cached = tmp_path / "hub" / "checkpoints" / Path(get_spec("resnet18").weights_enum.DEFAULT.url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    with pytest.raises(zfvis.UserInputError, match="delete"):
        zfvis.load_model("resnet18")
    rc, err = run_cli(capsys, "project", "--model", "resnet18", "-o", tmp_path / "x.png")
    assert rc == 2 and "empty" in one_line(err) and "--weights random" in err
