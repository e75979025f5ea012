"""Feature visualization by optimization: each part against a plain reference, the whole on the
shipped model (tiny: few steps, few channels, 32x32), the figure, the command line, the scripts."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zfvis
from zfvis.analysis.feature_vis import param as P
from zfvis.analysis.feature_vis import transforms as T
from zfvis.analysis.feature_vis.objectives import Objective, diversity_penalty
from zfvis.analysis.feature_vis.tap import LayerTap, redirected_relu
from zfvis.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped() -> tuple[nn.Module, zfvis.Preprocess]:
    return zfvis.load_model("zfnet-cifar10")


# ------------------------------------------------------------------ the parameterisation


@pytest.mark.parametrize("size", [(8, 8), (7, 10), (32, 32)])
def test_fourier_image_round_trips(size: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    scale = P.fourier_scale(*size, dtype=torch.float64)
    params = P.image_to_spectrum(img, scale)
    assert params.shape == (2, 3, size[0], size[1] // 2 + 1, 2)
    torch.testing.assert_close(P.spectrum_to_image(params, scale, size), img, rtol=0, atol=1e-12)
    # parameters -> image -> parameters: the parameters an image has come back exactly
    again = P.image_to_spectrum(P.spectrum_to_image(params, scale, size), scale)
    torch.testing.assert_close(again, params, rtol=0, atol=1e-10)


def test_one_fourier_coefficient_is_a_cosine_scaled_by_one_over_frequency() -> None:
    h, w, ky, kx = 8, 12, 1, 2
    spectrum = torch.zeros(1, 3, h, w // 2 + 1, 2, dtype=torch.float64)
    spectrum[0, :, ky, kx, 0] = 1.0
    scale = P.fourier_scale(h, w, dtype=torch.float64)
    img = P.spectrum_to_image(spectrum, scale, (h, w))[0, 0]
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    freq = math.hypot(ky / h, kx / w)
    expected = 2 / math.sqrt(h * w) * torch.cos(2 * math.pi * (ky * y / h + kx * x / w)) / freq / 4.0
    torch.testing.assert_close(img, expected, rtol=0, atol=1e-12)
    assert float(scale[0, 0]) == pytest.approx(max(h, w))  # the constant term: 1 / (1 / max(H, W))


def test_colour_decorrelation_is_invertible_and_the_fixed_matrix() -> None:
    m = P.color_matrix(torch.float64)
    ref = torch.tensor(P.COLOR_CORRELATION, dtype=torch.float64)
    torch.testing.assert_close(m * ref.norm(dim=0).max(), ref)
    assert float(m.norm(dim=0).max()) == pytest.approx(1.0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(P.rgb_to_decorrelated(P.decorrelated_to_rgb(x)), x, rtol=0, atol=1e-12)
    pixel = P.decorrelated_to_rgb(x)[1, :, 2, 3]
    torch.testing.assert_close(pixel, m @ x[1, :, 2, 3])  # each pixel's colour times the matrix


@pytest.mark.parametrize("kind", P.PARAMS)
def test_image_to_params_inverts_the_whole_parameterisation(kind: str) -> None:
    rgb = torch.rand(2, 3, 9, 10, dtype=torch.float64) * 0.9 + 0.05
    params = P.image_to_params(rgb, kind)
    torch.testing.assert_close(P.ImageParam(kind, params, (9, 10)).image(), rgb, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", P.PARAMS)
def test_gradients_flow_to_the_parameters(kind: str) -> None:
    p = P.ImageParam.random(kind, 2, (8, 8), generator=torch.Generator().manual_seed(0))
    img = p.image()
    assert img.shape == (2, 3, 8, 8) and 0 < float(img.detach().min()) and float(img.detach().max()) < 1
    (img * torch.randn_like(img)).sum().backward()
    g = p.params.grad
    assert g is not None and torch.isfinite(g).all()
    assert float((g != 0).float().mean()) > 0.9  # (irfft2 drops the imaginary parts of real coefficients)


# ------------------------------------------------------------------ the transformations


def test_pad_and_jitter_against_slicing() -> None:
    x = torch.randn(3, 2, 6, 7)
    padded = T.pad(x, 2)
    torch.testing.assert_close(padded, F.pad(x, (2, 2, 2, 2), value=T.PAD_VALUE))
    assert torch.equal(padded[:, :, 2:8, 2:9], x) and float(padded[0, 0, 0, 0]) == T.PAD_VALUE
    offsets = torch.tensor([[0, 4], [3, 1], [4, 0]])
    out = T.jitter(padded, offsets, (6, 7))
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 7])


def test_rotation_and_scale_against_plain_references() -> None:
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    one, zero = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(T.rotate_scale(x, zero, one), x, rtol=0, atol=1e-12)  # the identity
    quarter = T.rotate_scale(x, torch.full((2,), 90.0, dtype=torch.float64), one)
    torch.testing.assert_close(quarter, torch.rot90(x, 1, dims=(2, 3)), rtol=0, atol=1e-12)  # counter-clockwise
    # a zoom about the centre of a linear ramp is the ramp at (p - c) / s + c, exact for bilinear sampling
    h = w = 16
    y, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    ramp = (0.01 * y + 0.02 * xx)[None, None].expand(1, 3, h, w)
    s, c = 1.25, (h - 1) / 2
    out = T.rotate_scale(ramp, zero[:1], torch.full((1,), s, dtype=torch.float64))
    expected = 0.01 * ((y - c) / s + c) + 0.02 * ((xx - c) / s + c)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-12)


def test_robustness_keeps_the_size_is_seeded_and_off_is_the_identity() -> None:
    x = torch.rand(4, 3, 32, 32)
    rob = T.Robustness()
    a = rob(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and rob.width((32, 32)) == 2 and rob.width((224, 224)) == 14
    assert torch.equal(a, rob(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, rob(x, torch.Generator().manual_seed(4)))
    assert torch.equal(T.Robustness(pad=0, scales=(1.0,), degrees=0.0)(x, torch.Generator()), x)
    with pytest.raises(zfvis.UserInputError, match="scale"):
        T.Robustness(scales=(0.0,))


# ------------------------------------------------------------------ objectives and the tap


def test_objective_values_against_the_definitions() -> None:
    acts = torch.randn(3, 4, 5, 6)
    rows = torch.tensor([2, 0, 1])
    w = torch.eye(4)[[1, 3, 0]]
    ch = Objective("channel", w, [1, 3, 0]).values(acts, rows)
    torch.testing.assert_close(ch, torch.stack([acts[0, 0].mean(), acts[1, 1].mean(), acts[2, 3].mean()]))
    unit = Objective("unit", w, [1, 3, 0], (2, 5)).values(acts, rows)
    torch.testing.assert_close(unit, torch.stack([acts[0, 0, 2, 5], acts[1, 1, 2, 5], acts[2, 3, 2, 5]]))
    d = torch.randn(2, 4)
    vals = Objective("direction", d, [0, 1]).values(acts[:2], torch.tensor([1, 0]))
    torch.testing.assert_close(vals[0], (acts[0] * d[1][:, None, None]).sum(0).mean())


def test_diversity_penalty_is_the_mean_pairwise_gram_cosine() -> None:
    acts = torch.randn(4, 3, 5, 5)
    grams = [F.normalize((a.reshape(3, -1) @ a.reshape(3, -1).T).flatten(), dim=0) for a in acts]
    expected = sum(2 * float(grams[g * 2] @ grams[g * 2 + 1]) / 2 for g in range(2))
    assert float(diversity_penalty(acts, 2)) == pytest.approx(expected, rel=1e-5)
    assert float(diversity_penalty(acts, 1)) == 0.0


def test_redirected_relu_passes_gradients_that_raise_a_dead_unit() -> None:
    x = torch.tensor([-1.0, -1.0, 2.0], requires_grad=True)
    y = redirected_relu(x)
    assert torch.equal(y, torch.relu(x))
    (g,) = torch.autograd.grad(y, x, torch.tensor([-1.0, 1.0, 1.0]))
    assert g.tolist() == [-1.0, 0.0, 1.0]  # descending the loss raises x[0]: passed; x[1] would fall: blocked


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        return F.relu(self.b(y) + y).mean((2, 3))


def test_tap_of_a_function_node_runs_the_cut_graph_with_gradients() -> None:
    model = _Branchy().eval()
    dn = zfvis.Deconvnet(model)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    tap = LayerTap(dn, "add")  # a function call: x + y
    assert tap.graph_module is not None and tap.module is None
    out = tap(x)
    with torch.no_grad():
        y = F.relu(model.a(x))
        torch.testing.assert_close(out, model.b(y) + y)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.abs().sum() > 0
    relu_tap = LayerTap(dn, "relu_1")  # a functional ReLU: its input is caught, the caller rectifies
    assert relu_tap.rectify
    torch.testing.assert_close(torch.relu(relu_tap(x)), F.relu(model.b(y) + y))


# ------------------------------------------------------------------ the whole, on the shipped model


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool], list[int], list[bool]]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def test_feature_vis_rises_is_seeded_and_leaves_the_model_unchanged(shipped) -> None:
    model, pre = shipped
    model.train()
    model.features[3].training = False  # a mixed state, to see each flag restored
    before = _state(model)
    try:
        res = zfvis.feature_vis(model, "conv3", "0-3", steps=24, preprocess=pre, seed=5, progress=False)
        after = _state(model)
    finally:
        model.eval()
    assert res.images.shape == (4, 3, 32, 32) and 0 <= float(res.images.min()) and float(res.images.max()) <= 1
    assert res.values.shape == (24, 4) and res.units == [0, 1, 2, 3]
    assert float(res.values[-6:].mean()) > 1.5 * float(res.values[:6].mean())  # rises on average
    assert (res.final > res.values[0]).all()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1:] == after[1:]
    assert all(p.grad is None for p in model.parameters())
    again = zfvis.feature_vis(model, "conv3", "0-3", steps=24, preprocess=pre, seed=5, progress=False)
    assert torch.equal(res.images, again.images) and torch.equal(res.values, again.values)
    other = zfvis.feature_vis(model, "conv3", "0-3", steps=24, preprocess=pre, seed=6, progress=False)
    assert not torch.equal(res.images, other.images)
    assert "4 channels of layer conv3, 24 steps (fourier)" in res.summary()


def test_synthetic_images_reach_the_data_sets_top_1_on_conv3(shipped) -> None:
    """A modest bound (the full measurement is scripts/bench_feature_vis.py (c)): after 32 steps, at least
    3 of 4 channels' strongest activation on their image beats their strongest over 100 shipped images."""
    model, pre = shipped
    dn = zfvis.Deconvnet(model)
    paths = sorted(zfvis.default_dataset().rglob("*.jpg"))[::5]
    with torch.no_grad():  # (feature_vis turns gradients on for itself)
        top = dn.output(torch.stack([pre(zfvis.load_image(p)) for p in paths]), "conv3").amax(dim=(0, 2, 3))
        res = zfvis.feature_vis(model, "conv3", "0-3", steps=32, preprocess=pre, progress=False)
        mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
        peak = dn.output((res.images - mean) / std, "conv3")[torch.arange(4), torch.arange(4)].amax(dim=(1, 2))
    assert len(paths) == 100 and int((peak >= top[:4]).sum()) >= 3


def test_batches_do_not_change_what_is_optimised(shipped) -> None:
    model, pre = shipped
    whole = zfvis.feature_vis(model, "conv2", [1, 2, 3], steps=3, preprocess=pre, transforms=False, progress=False)
    split = zfvis.feature_vis(model, "conv2", [1, 2, 3], steps=3, preprocess=pre, transforms=False, batch_size=1,
                              progress=False)
    torch.testing.assert_close(whole.images, split.images, rtol=0, atol=1e-5)


def test_other_objectives_and_diversity(shipped) -> None:
    model, pre = shipped
    unit = zfvis.feature_vis(model, "conv4", 7, objective="unit", steps=8, preprocess=pre, progress=False)
    assert unit.position == (4, 4) and float(unit.final[0]) > float(unit.values[0, 0])
    direction = torch.randn(2, 128)
    d = zfvis.feature_vis(model, "conv5", objective="direction", direction=direction, steps=8, preprocess=pre,
                          progress=False, param="pixel")
    assert d.units == [0, 1] and d.images.shape[0] == 2
    logit = zfvis.feature_vis(model, None, [3], objective="logit", steps=8, preprocess=pre, progress=False)
    with torch.no_grad():
        x = (logit.images - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
        assert float(model(x)[0, 3]) == pytest.approx(float(logit.final[0]), rel=1e-4)
    div = zfvis.feature_vis(model, "conv3", 0, images_per_unit=2, diversity=1.0, steps=6, preprocess=pre,
                            progress=False)
    assert div.units == [0, 0] and not torch.equal(div.images[0], div.images[1])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"layer": "conv9"}, "not a layer"),
    ({"layer": "conv3", "channels": 128}, "out of range"),
    ({"layer": "conv3", "param": "wavelet"}, "param"),
    ({"layer": "conv3", "steps": 0}, "steps"),
    ({"layer": "conv3", "objective": "unit", "position": (9, 0)}, "outside"),
    ({"layer": "conv3", "objective": "logit"}, "layer=None"),
    ({"layer": "conv3", "objective": "direction", "direction": torch.ones(5)}, "shape"),
    ({"layer": "fc6", "size": 40}, "forward pass failed"),
])
def test_bad_input_is_a_typed_error(shipped, kwargs: dict, match: str) -> None:
    model, pre = shipped
    kwargs = {"channels": 0, "steps": 2, **kwargs}
    with pytest.raises(zfvis.UserInputError, match=match):
        zfvis.feature_vis(model, preprocess=pre, progress=False, **kwargs)


def test_figure_draws_pairs_and_refuses_mismatches(shipped, tmp_path: Path) -> None:
    model, pre = shipped
    a = zfvis.feature_vis(model, "conv1", "0-2", steps=2, preprocess=pre, progress=False)
    b = zfvis.feature_vis(model, "conv1", "0-2", steps=2, preprocess=pre, progress=False, param="pixel")
    fig = zfvis.feature_vis_figure([a], compare=[b], title="t", path=tmp_path / "f.png", columns=2)
    assert (tmp_path / "f.png").stat().st_size > 1000 and len(fig.axes) == 6
    c = zfvis.feature_vis(model, "conv1", "3-5", steps=1, preprocess=pre, progress=False)
    with pytest.raises(zfvis.UserInputError, match="not the same"):
        zfvis.feature_vis_figure(a, compare=c)


# ------------------------------------------------------------------ the command line and the scripts


def test_cli_writes_the_grid_and_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["optimize", "--layers", "conv1,conv2", "--channels", "0-1", "--steps", "3", "--param", "both",
                 "--no-progress", "-o", str(out)]) == 0
    data = json.loads((out / "feature_vis.json").read_text())
    assert set(data["result"]) == {"fourier", "pixel"} and data["result"]["pixel"]["conv2"]["channels"] == [0, 1]
    assert (out / "feature_vis.png").stat().st_size > 1000 and "wrote" in capsys.readouterr().out
    assert main(["optimize", "--layers", "conv1", "--channels", "0", "--steps", "1", "--no-progress",
                 "-o", str(out)]) == 0  # its own earlier output is replaced


@pytest.mark.parametrize(("args", "message"), [
    (["--channels", "0-999"], "out of range"),
    (["--layers", "conv9"], "not a layer"),
    (["--channels", "x"], "--channels"),
    (["--steps", "0"], "--steps"),
    (["--seed", str(2**70)], "--seed"),
    (["--layers", "fc6", "--input-size", "40"], "--input-size 40 does not fit"),
    (["--input-size", "4"], "--input-size"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                             message: str) -> None:
    assert main(["optimize", *args, "--no-progress", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_cli_keeps_a_persons_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "feature_vis.png").write_text("mine")
    assert main(["optimize", "--layers", "conv1", "--channels", "0", "--steps", "1", "--no-progress",
                 "-o", str(tmp_path)]) == 2
    assert (tmp_path / "feature_vis.png").read_text() == "mine" and "--overwrite" in capsys.readouterr().err


def test_cli_interrupted_leaves_no_new_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zfvis.analysis.feature_vis as package  # the command imports it when it runs

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(package, "feature_vis", interrupted)
    assert main(["optimize", "--channels", "0", "--no-progress", "-o", str(tmp_path / "new")]) == 130
    assert not (tmp_path / "new").exists()


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"zfvis_script_{name}", REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_make_feature_vis_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f.png"
    assert _script("make_feature_vis_figure").main(["--steps", "2", "--channels", "2", "--layers", "conv1,conv5",
                                                    "-o", str(out)]) == 0
    assert out.stat().st_size > 1000 and "conv5 pixel" in capsys.readouterr().out


def test_script_bench_feature_vis(capsys: pytest.CaptureFixture[str]) -> None:
    assert _script("bench_feature_vis").main(["--channels", "4", "--steps", "2", "--vgg-channels", "1",
                                              "--vgg-steps", "1", "--vgg-size", "32", "--reach-steps", "2",
                                              "--reach-channels", "2", "--reach-images", "20"]) == 0
    out = capsys.readouterr().out
    assert "per channel" in out and "plain loop" in out and "reached the top-1" in out


def test_feature_vis_under_inference_mode_equals_it_outside() -> None:
    """Its optimisation needs autograd, also where the caller runs under torch.inference_mode()."""
    model = _Branchy().eval()
    outside = zfvis.feature_vis(model, "add", "0-1", steps=3, size=16, seed=1, progress=False)
    with torch.inference_mode():
        inside = zfvis.feature_vis(model, "add", "0-1", steps=3, size=16, seed=1, progress=False)
    assert torch.equal(outside.images, inside.images) and torch.equal(outside.values, inside.values)
