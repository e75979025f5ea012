"""Occlusion sensitivity (ZF Fig. 7): both methods equal the brute-force loop, on a chain and
a residual model, in float64; bad input; the command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.overrides import TorchFunctionMode

import zfvis
from zfvis.analysis.incremental import IncrementalOcclusion
from zfvis.analysis.occlusion import OcclusionResult, occlude, occluder_positions, occlusion
from zfvis.cli import main

# ----------------------------------------------------------------------------- small models


def chain_model() -> nn.Module:
    """VGG-like, 23x21 inputs: convolutions (padded, dilated, strided), LRN, batch norm, both
    pools (padded, ceil mode, count_include_pad=False), a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.LocalResponseNorm(3),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.Conv2d(6, 8, 3, padding=2, dilation=2), nn.ReLU(),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Dropout(), nn.Linear(8 * 3 * 3, 10),
    )  # fmt: skip


class Block(nn.Module):
    """A ResNet basic block (F.relu, ``x + y``, ``.relu()``), with a strided 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return (y + (x if self.down is None else self.down(x))).relu()


class Residual(nn.Module):
    """Residual blocks, a channel concatenation, and a GroupNorm (no incremental rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.relu, self.pool = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        self.b1, self.b2 = Block(6, 6, 1), Block(6, 8, 2)
        self.side = nn.Conv2d(8, 4, 1)
        self.gn = nn.GroupNorm(2, 12)
        self.b3 = Block(12, 12, 1)
        self.head = nn.Linear(12, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b2(self.b1(self.pool(self.relu(self.stem(x)))))
        x = self.b3(self.gn(torch.cat([x, self.side(x)], dim=1)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def ready(model: nn.Module) -> nn.Module:
    """Seeded weights, non-trivial batch-norm statistics, float64, eval mode."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0, 0.4)
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


def brute_force(model: nn.Module, x: torch.Tensor, patch: tuple[int, int], stride: tuple[int, int],
                fill: torch.Tensor, layer: str, channel: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The definition: occlude, run the whole model, softmax; the layer's map total via a hook."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hook = modules[layer].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach().clone()))
    probs, totals = [], []
    try:
        for t in range(0, x.shape[1] - patch[0] + 1, stride[0]):
            for l in range(0, x.shape[2] - patch[1] + 1, stride[1]):
                occluded = x.clone()
                occluded[:, t : t + patch[0], l : l + patch[1]] = fill.view(-1, 1, 1)
                with torch.no_grad():
                    probs.append(torch.softmax(model(occluded[None]), dim=1)[0])
                totals.append(seen["out"][0, channel].sum())
    finally:
        hook.remove()
    return torch.stack(probs), torch.stack(totals)


def assert_matches(res: OcclusionResult, probs: torch.Tensor, totals: torch.Tensor) -> None:
    rows, cols = res.shape
    assert len(probs) == rows * cols
    torch.testing.assert_close(res.class_prob, probs[:, res.target].reshape(rows, cols), rtol=0, atol=1e-10)
    torch.testing.assert_close(res.activation, totals.reshape(rows, cols), rtol=0, atol=1e-10)
    assert torch.equal(res.top_class, probs.argmax(dim=1).reshape(rows, cols))
    torch.testing.assert_close(res.top_prob, probs.amax(dim=1).reshape(rows, cols), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method", ["incremental", "full"])
@pytest.mark.parametrize(("patch", "stride"), [((5, 4), (4, 3)), (3, 2), ((23, 21), 1)])
def test_chain_equals_brute_force(method: str, patch: object, stride: object) -> None:
    model = ready(chain_model())
    x = torch.randn(3, 23, 21, dtype=torch.float64)
    fill = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    res = occlusion(model, x, patch=patch, stride=stride, fill=fill, layer="6", channel=2, batch_size=7, method=method)
    p, s = (patch, patch) if isinstance(patch, int) else patch, (stride, stride) if isinstance(stride, int) else stride
    assert res.method == method
    assert_matches(res, *brute_force(model, x, p, s, fill, "6", 2))  # type: ignore[arg-type]


def test_positions_reach_the_borders() -> None:
    tops, lefts = occluder_positions((23, 21), (5, 4), (4, 3))
    assert tops.tolist() == [0, 4, 8, 12, 16] and lefts.tolist() == [0, 3, 6, 9, 12, 15]  # (23-5)/4 is not whole
    res = occlusion(ready(chain_model()), torch.randn(3, 23, 21, dtype=torch.float64), patch=(5, 4), stride=(4, 3))
    assert res.shape == (5, 6) and res.box(4, 5) == (16, 15, 21, 19)


def test_residual_equals_brute_force() -> None:
    model = ready(Residual())
    x = torch.randn(3, 30, 27, dtype=torch.float64)
    fill = torch.tensor([0.2, 0.0, -0.4], dtype=torch.float64)
    for layer in ("b1.c2", "b2.b2"):
        res = occlusion(model, x, patch=(5, 4), stride=(4, 3), fill=fill, layer=layer, channel=1, batch_size=6)
        assert res.method == "incremental"
        assert_matches(res, *brute_force(model, x, (5, 4), (4, 3), fill, layer, 1))


@pytest.mark.parametrize(("size", "patch", "stride"), [((30, 26), 6, 4), ((17, 19), (5, 7), (3, 4))])
def test_residual_positions_on_every_border(size: tuple[int, int], patch: object, stride: object) -> None:
    """The last occluders touch the bottom and right borders (H - patch and W - patch are
    multiples of the stride), where windows are clamped and padding is read."""
    model = ready(Residual())
    x = torch.randn(3, *size, dtype=torch.float64)
    p, s = (patch, patch) if isinstance(patch, int) else patch, (stride, stride) if isinstance(stride, int) else stride
    res = occlusion(model, x, patch=patch, stride=stride, layer="b1", channel=2, method="incremental")
    assert res.box(res.shape[0] - 1, res.shape[1] - 1)[2:] == size  # type: ignore[comparison-overlap]
    assert_matches(res, *brute_force(model, x, p, s, torch.zeros(3, dtype=torch.float64), "b1", 2))  # type: ignore[arg-type]


def test_residual_graph_layers_and_border_patch() -> None:
    """Layers that are function nodes (an addition) and a one-pixel occluder whose changes a
    strided 1x1 shortcut skips at some positions."""
    model = ready(Residual())
    x = torch.randn(3, 22, 19, dtype=torch.float64)
    res = occlusion(model, x, patch=1, stride=5, layer="b2.add", channel=3, method="incremental")
    full = occlusion(model, x, patch=1, stride=5, layer="b2.add", channel=3, method="full")
    torch.testing.assert_close(res.class_prob, full.class_prob, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.activation, full.activation, rtol=0, atol=1e-10)
    probs, _ = brute_force(model, x, (1, 1), (5, 5), torch.zeros(3, dtype=torch.float64), "b2.c2", 0)
    torch.testing.assert_close(res.class_prob.reshape(-1), probs[:, res.target], rtol=0, atol=1e-10)


def test_incremental_plan_recomputes_windows_and_falls_back() -> None:
    """The occluder's cone: early layers are recomputed over windows smaller than their maps;
    the GroupNorm (no incremental rule) and everything after it run whole."""
    model = ready(Residual())
    x = torch.randn(3, 30, 27, dtype=torch.float64)
    graph = zfvis.Deconvnet(model).graph
    grid = torch.cartesian_prod(*occluder_positions(x.shape, 4, 4))
    inc = IncrementalOcclusion(graph, x, None, grid, (4, 4), torch.zeros(3, dtype=x.dtype))
    names = {gn.fx_node: gn.name for gn in graph.nodes}
    plans = {names.get(n, n.name): inc.plans[n] for n in inc.nodes}
    assert plans["stem"].mode == "patch" and plans["stem"].size == (6, 6)  # 4x4 occluder + the 3x3 kernel's reach
    assert plans["b1.add"].mode == "patch" and plans["cat"].mode in ("patch", "full")
    assert plans["gn"].mode == "full" and plans["head"].mode == "full"


class ConvCount(TorchFunctionMode):
    """Counts the outputs (per image, channel, y, x) every batched 2-D convolution computes
    (a batch of one image is the unoccluded pass, not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[int] = []

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "conv2d" and out.shape[0] > 1:
            self.outputs.append(out.numel())
        return out


def conv_work(model: nn.Module, x: torch.Tensor, method: str, patch: int, stride: int) -> tuple[list[int], OcclusionResult]:
    counter = ConvCount()
    with counter:
        res = occlusion(model, x, patch=patch, stride=stride, batch_size=1000, method=method)
    return counter.outputs, res


@pytest.mark.parametrize(("model_fn", "size"), [(chain_model, (23, 21)), (Residual, (30, 27))])
def test_incremental_recomputes_only_the_cone(model_fn: Callable[[], nn.Module], size: tuple[int, int]) -> None:
    """Counted, not timed: the convolutions of the incremental pass compute far fewer output
    positions than full re-inference, and the first one exactly the occluder's window plus
    its 3x3 kernel's reach, per position. Switching incrementality off fails this test."""
    model = ready(model_fn())
    x = torch.randn(3, *size, dtype=torch.float64)
    full, ref = conv_work(model, x, "full", 4, 3)
    inc, res = conv_work(model, x, "incremental", 4, 3)
    positions = ref.shape[0] * ref.shape[1]
    assert res.method == "incremental" and torch.equal(res.top_class, ref.top_class)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert inc[0] == positions * first_conv.out_channels * 6 * 6  # 4x4 occluder + 1 pixel each side
    assert full[0] == positions * first_conv.out_channels * size[0] * size[1]
    assert sum(inc) < 0.6 * sum(full)


class ViewThenInplace(nn.Module):
    """Overwrites, in place, a view of a tensor that it reads again afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Linear(4 * 10 * 10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.relu(y.flatten(1))  # changes y too
        return self.fc(z + y.flatten(1))


def test_inplace_write_to_a_tensor_read_again_falls_back_to_full() -> None:
    model = ViewThenInplace().double().eval()
    x = torch.randn(3, 10, 10, dtype=torch.float64)
    res = occlusion(model, x, patch=3, stride=2, layer="conv", channel=0)
    assert res.method == "full"
    assert_matches(res, *brute_force(model, x, (3, 3), (2, 2), torch.zeros(3, dtype=torch.float64), "conv", 0))
    with pytest.raises(zfvis.UserInputError, match="in place .* method='full'"):
        occlusion(model, x, patch=3, stride=2, method="incremental")


class Branchy(nn.Module):
    """Data-dependent control flow inside a submodule: the engine keeps it as one opaque node."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3), nn.Linear(4, 3)
        self.odd = Untraceable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        return self.fc(self.conv2(y).mean(dim=(2, 3))) + self.odd(y[:, :3])


def test_opaque_submodule_falls_back_from_there_on() -> None:
    model = ready(Branchy())
    x = torch.randn(3, 12, 11, dtype=torch.float64)
    res = occlusion(model, x, patch=3, stride=2, layer="conv2", channel=1)
    assert res.method == "incremental"
    assert_matches(res, *brute_force(model, x, (3, 3), (2, 2), torch.zeros(3, dtype=torch.float64), "conv2", 1))


def test_inplace_modules_leave_the_model_and_cache_alone() -> None:
    model = ready(chain_model())
    x = torch.randn(3, 23, 21, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    a = occlusion(model, x, patch=4, stride=4)
    b = occlusion(model, x, patch=4, stride=4, method="full")
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(a.class_prob, b.class_prob, rtol=0, atol=1e-12)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = -y
        return self.fc(y.mean(dim=(2, 3)))


def test_untraceable_model_falls_back_to_full() -> None:
    model = Untraceable().double()
    x = torch.randn(3, 9, 9, dtype=torch.float64)
    res = occlusion(model, x, patch=3, stride=3)
    probs, _ = brute_force(model, x, (3, 3), (3, 3), torch.zeros(3, dtype=torch.float64), "conv", 0)
    assert res.method == "full"
    torch.testing.assert_close(res.class_prob.reshape(-1), probs[:, res.target], rtol=0, atol=1e-12)
    for kwargs in ({"method": "incremental"}, {"layer": "conv"}):
        with pytest.raises(zfvis.UserInputError, match="trace"):
            occlusion(model, x, patch=3, stride=3, **kwargs)


def test_default_target_channel_and_base() -> None:
    model = ready(chain_model())
    x = torch.randn(3, 23, 21, dtype=torch.float64)
    res = occlusion(model, x, patch=4, stride=4, layer="6")
    with torch.no_grad():
        probs = torch.softmax(model(x[None]), dim=1)[0]
        out = zfvis.Deconvnet(model).record(x[None], "6").output[0]
    assert res.target == int(probs.argmax()) == res.base_class
    assert res.base_prob == pytest.approx(float(probs.max()))
    assert res.channel == int(out.flatten(1).amax(dim=1).argmax())
    assert res.base_activation == pytest.approx(float(out[res.channel].sum()))


def test_occlude_helper() -> None:
    x = torch.zeros(3, 6, 6)
    out = occlude(x, [(1, 2, 3, 5), (0, 0, 6, 6)], torch.tensor([1.0, 2.0, 3.0]))
    assert out.shape == (2, 3, 6, 6) and torch.equal(x, torch.zeros(3, 6, 6))
    assert out[0, :, 1:3, 2:5].sum() == 6 * 6 and out[0].sum() == 36 and out[1, 2].unique().tolist() == [3.0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patch": 22, "stride": 1}, zfvis.UserInputError, "larger than"),
        ({"patch": 4, "stride": 0}, zfvis.UserInputError, "stride"),
        ({"patch": 4, "stride": 2, "target": 10}, zfvis.UserInputError, "out of range"),
        ({"patch": 4, "stride": 2, "channel": 1}, zfvis.UserInputError, "layer"),
        ({"patch": 4, "stride": 2, "layer": "6", "channel": 99}, zfvis.UserInputError, "out of range"),
        ({"patch": 4, "stride": 2, "layer": "nope"}, zfvis.UserInputError, "nope"),
        ({"patch": 4, "stride": 2, "method": "fast"}, zfvis.UserInputError, "method"),
        ({"patch": 4, "stride": 2, "fill": torch.zeros(2)}, zfvis.UserInputError, "fill"),
        ({"patch": 4, "stride": 2, "batch_size": 0}, zfvis.UserInputError, "batch_size"),
        ({"patch": 2.5, "stride": 2}, zfvis.InputTypeError, "patch"),
        ({"patch": 4, "stride": 2, "target": 1.0}, zfvis.InputTypeError, "target"),
        ({"patch": 4, "stride": 2, "layer": "6", "channel": "1"}, zfvis.InputTypeError, "channel"),
        ({"patch": 4, "stride": 2, "fill": "grey"}, zfvis.InputTypeError, "fill"),
        ({"patch": 4, "stride": 2, "layer": 6}, zfvis.InputTypeError, "layer"),
    ],
)
def test_bad_input(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        occlusion(ready(chain_model()), torch.randn(3, 23, 21, dtype=torch.float64), **kwargs)


def test_bad_images_and_boxes_are_typed_errors() -> None:
    model = ready(chain_model())
    for image in (torch.zeros(3, 23, 21, dtype=torch.long), [[0.0]]):
        with pytest.raises(zfvis.InputTypeError, match="image"):
            occlusion(model, image, patch=4, stride=2)  # type: ignore[arg-type]
    with pytest.raises(zfvis.UserInputError, match="images\\[0\\]"):
        occlusion(model, torch.zeros(1, 3, 23, 21), patch=4, stride=2)
    with pytest.raises(zfvis.InputTypeError, match="4 ints"):
        occlude(torch.zeros(3, 6, 6), [(0, 0, 2)])
    with pytest.raises(zfvis.UserInputError, match="outside"):
        occlude(torch.zeros(3, 6, 6), [(0, 0, 2, 7)])


def test_progress_bar_counts_positions(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("zfvis.io.progress.DELAY", 0.0)  # shown at once, not after a second
    occlusion(ready(chain_model()), torch.randn(3, 23, 21, dtype=torch.float64), patch=4, stride=2, progress=True)
    err = capsys.readouterr().err
    assert "occlusion" in err and "/90" in err and "pos" in err  # 10 x 9 positions
    occlusion(ready(chain_model()), torch.randn(3, 23, 21, dtype=torch.float64), patch=4, stride=2)
    assert capsys.readouterr().err == ""


def test_class_names_for_the_legend() -> None:
    from zfvis.cli._analysis import class_names

    assert class_names("zfnet-cifar10", None)[:3] == ["airplane", "automobile", "bird"]  # type: ignore[index]
    imagenet = class_names("vgg16", None)  # torchvision's DEFAULT weights: their categories
    assert imagenet is not None and len(imagenet) == 1000 and imagenet[281] == "tabby"
    assert class_names("vgg16", "random") is None and class_names("zfnet", None) is None


def test_wrong_input_size_is_bad_input() -> None:
    with pytest.raises(ValueError, match="forward pass failed"):
        occlusion(ready(chain_model()), torch.randn(3, 16, 16, dtype=torch.float64), patch=4, stride=4)


# ----------------------------------------------------------------------------- command line


def test_cli_occlude(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "occ.png"
    assert main(["occlude", "--patch", "12", "--stride", "5", "--target", "dog", "--fill", "gray",
                 "--no-progress", "-o", str(out)]) == 0  # fmt: skip
    with Image.open(out) as im:
        w, h = im.size
    assert w > 1200 and h > 350
    data = json.loads(out.with_suffix(".json").read_text())
    res = data["result"]
    assert data["layer"] == "conv5" and res["target"] == 5 and res["target_name"] == "dog"
    assert len(res["class_prob"]) == 5 and len(res["class_prob"][0]) == 5 and len(res["activation"]) == 5
    assert "p(dog)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--patch", "40"], "larger than"),
        (["--stride", "0"], "at least 1"),
        (["--target", "catt"], "unknown class name 'catt'. Did you mean 'cat'"),
        (["--target", "12"], "out of range"),
        (["--fill", "pink"], "--fill"),
        (["--layer", "conv9"], "conv9"),
    ],
)
def test_cli_occlude_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str) -> None:
    assert main(["occlude", *args, "--no-progress", "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def test_figure_is_returned_and_written_only_with_a_path(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from zfvis.viz.analysis import occlusion_figure

    model = ready(chain_model())
    x = torch.randn(3, 23, 21, dtype=torch.float64)
    res = occlusion(model, x, patch=5, stride=4)  # no layer: panels (b) and (c) are left out
    fig = occlusion_figure(res, torch.rand(3, 23, 21), class_names=[f"c{k}" for k in range(10)])
    assert isinstance(fig, Figure) and not list(tmp_path.iterdir())
    assert len([ax for ax in fig.axes if ax.images]) == 3  # (a), (d), (e): no blank panels
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert legend == {f"c{int(k)}" for k in res.top_class.unique()}
    occlusion_figure(res, torch.rand(3, 23, 21), path=tmp_path / "f.png")
    with Image.open(tmp_path / "f.png") as im:
        assert im.size[0] > 1000
