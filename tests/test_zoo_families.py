"""The zoo's newer families (EfficientNet, MobileNetV3, ConvNeXt, RegNetY, ShuffleNetV2,
SqueezeNet, Inception v3, ResNeXt, wide ResNets) and ``timm:NAME`` models, through the
Python API and the command line, offline (random weights, or a weights file the test saves)."""

from __future__ import annotations

import gc
import importlib
import json
from pathlib import Path

import pytest
import torch
import torchvision

import zfvis
from zfvis.cli import main
from zfvis.models.zoo import get_spec

NEW = {  # name -> (weights enum, an alias the zoo gives it, or None)
    "efficientnet_b0": ("EfficientNet_B0_Weights", "stage4"),
    "efficientnet_v2_s": ("EfficientNet_V2_S_Weights", "stage3"),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights", "block8"),
    "convnext_tiny": ("ConvNeXt_Tiny_Weights", "stage2"),
    "regnet_y_400mf": ("RegNet_Y_400MF_Weights", "stage2"),
    "shufflenet_v2_x1_0": ("ShuffleNet_V2_X1_0_Weights", None),
    "squeezenet1_1": ("SqueezeNet1_1_Weights", "fire5"),
    "inception_v3": ("Inception_V3_Weights", None),
    "resnext50_32x4d": ("ResNeXt50_32X4D_Weights", "layer3"),
    "resnext101_32x8d": ("ResNeXt101_32X8D_Weights", "layer3"),
    "wide_resnet50_2": ("Wide_ResNet50_2_Weights", "layer3"),
    "wide_resnet101_2": ("Wide_ResNet101_2_Weights", "layer3"),
}
#: Small enough to build, trace and project in a test (the others are checked without building).
BUILT = ["efficientnet_b0", "mobilenet_v3_large", "convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x1_0",
         "squeezenet1_1"]


@pytest.mark.parametrize("name", sorted(NEW))
def test_new_zoo_entries_take_torchvisions_weights_and_preprocessing(name: str) -> None:
    enum_name, _ = NEW[name]
    assert name in zfvis.list_models()
    spec = get_spec(name)
    enum = getattr(torchvision.models, enum_name)
    assert spec.weights_enum is enum and spec.default_weights == "DEFAULT"
    t = enum.DEFAULT.transforms()  # the preprocessing the weights were trained with
    assert (spec.preprocess.crop, spec.preprocess.resize) == (t.crop_size[0], t.resize_size[0])
    assert list(spec.preprocess.mean) == list(t.mean) and spec.preprocess.interpolation == t.interpolation.value


@pytest.mark.parametrize("name", BUILT)
def test_new_zoo_models_trace_and_their_aliases_name_layers(name: str) -> None:
    model, pre = zfvis.load_model(name, weights="random")
    dn = zfvis.Deconvnet(model)
    alias = NEW[name][1]
    if alias is not None:
        assert alias in dn.layer_names() and dn.resolve(alias) != alias or alias in dn.layer_names()
    layer = alias or dn.layer_names()[len(dn.layer_names()) // 3]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = dn.output(x, layer)
    channel = int(out[0].flatten(1).amax(1).argmax()) if out.dim() == 4 else 0
    p = dn.project(x, layer, channel)
    assert p.shape == x.shape and torch.isfinite(p).all() and p.abs().sum() > 0
    del model, dn
    gc.collect()


def test_efficientnet_preprocessing_is_bicubic_as_trained() -> None:
    pre = get_spec("efficientnet_b0").preprocess
    img = zfvis.load_image(zfvis.default_image())
    bicubic = pre(img)
    bilinear = type(pre)(pre.resize, pre.crop, pre.mean, pre.std, "bilinear")(img)
    assert bicubic.shape == (3, 224, 224) and not torch.equal(bicubic, bilinear)


# --------------------------------------------------------------------------- timm:NAME

timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install 'zfvis[timm]'); the test extra has it")


def test_timm_models_load_with_their_pretrained_config() -> None:
    model, pre = zfvis.load_model("timm:convnext_atto", weights="random", seed=3)
    cfg = timm.models.get_pretrained_cfg("convnext_atto")
    assert pre.crop == cfg.input_size[-1] and list(pre.mean) == list(cfg.mean)
    assert pre.resize == int(cfg.input_size[-1] / cfg.crop_pct)
    again, _ = zfvis.load_model("timm:convnext_atto", weights="random", seed=3)
    first = next(iter(model.state_dict().values()))
    assert torch.equal(first, next(iter(again.state_dict().values())))  # seeded


def test_timm_weights_from_a_local_file(tmp_path: Path) -> None:
    src, _ = zfvis.load_model("timm:resnet10t", weights="random", seed=1)
    path = tmp_path / "r10t.pt"
    torch.save(src.state_dict(), path)
    model, _ = zfvis.load_model("timm:resnet10t", weights=path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))


def test_timm_offline_and_unknown_names_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(zfvis.WeightsDownloadError, match="--weights random"):
        zfvis.load_model("timm:resnet10t")
    with pytest.raises(zfvis.UserInputError, match="unknown timm model 'nosuchnet'"):
        zfvis.load_model("timm:nosuchnet")
    with pytest.raises(zfvis.UserInputError, match="unknown weights 'nosuchtag'"):
        zfvis.load_model("timm:resnet10t", weights="nosuchtag")
    assert main(["project", "--model", "timm:nosuchnet", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown timm model" in err


def test_without_timm_a_timm_name_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def no_timm(name: str, *args: object) -> object:
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_timm)
    with pytest.raises(zfvis.UserInputError, match=r"pip install 'zfvis\[timm\]'"):
        zfvis.load_model("timm:resnet10t", weights="random")


@pytest.mark.parametrize("argv", [
    ["project", "--model", "timm:convnext_atto", "--weights", "random", "--layer", "stages.1", "--input-size", "64"],
    ["project", "--model", "efficientnet_b0", "--weights", "random", "--layer", "stage3", "--input-size", "64"],
    ["layers", "--model", "timm:resnet10t", "--input-size", "64"],
    ["filters", "--model", "timm:resnet10t", "--weights", "random", "--layer", "conv1.0"],
    ["occlude", "--model", "timm:resnet10t", "--weights", "random", "--layer", "layer2", "--patch", "48",
     "--stride", "48", "--target", "3"],
])
def test_commands_run_on_timm_and_the_new_families(argv: list[str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = [] if argv[0] == "layers" else ["-o", str(tmp_path / "out.png")]
    assert main([*argv, *out]) == 0, capsys.readouterr().err
    if out:
        assert (tmp_path / "out.png").stat().st_size > 0
        settings = json.loads((tmp_path / "out.json").read_text())
        assert settings["model"] == argv[2]
    else:
        assert "layer2" in capsys.readouterr().out


# --------------------------------------------------------------------------- every command's computation

FAMILIES = [("efficientnet_b0", "stage3"), ("convnext_tiny", "stage2"), ("timm:resnet10t", "layer2")]


@pytest.fixture(scope="module")
def six_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("six")
    for i, p in enumerate(sorted(Path(zfvis.default_dataset()).rglob("*.jpg"))[::83][:6]):  # several classes
        (folder / f"{i}.jpg").write_bytes(p.read_bytes())
    return folder


@pytest.mark.parametrize("name, layer", FAMILIES)
def test_mining_occlusion_invariance_correspondence_evolution_run_exactly(name: str, layer: str, six_images: Path,
                                                                          tmp_path: Path) -> None:
    model, pre = zfvis.load_model(name, weights="random")
    pre = pre.with_size(64)
    files = sorted(six_images.glob("*.jpg"))
    x = torch.stack([pre(zfvis.load_image(p)) for p in files])
    with torch.no_grad():
        maps = zfvis.Deconvnet(model).output(x, layer)
    # mining equals a brute-force top-2 (at most one entry per image)
    zfvis.mining.mine(model, pre, six_images, [layer], out_dir=tmp_path / "run", top=2, channels=[0, 1, 2],
                      batch_size=4)
    topk = json.loads((tmp_path / "run" / "topk.json").read_text())
    for c, entries in enumerate(topk["layers"][layer]["channels"]):
        best = maps[:, c].flatten(1).amax(1)
        order = torch.argsort(best, descending=True)[:2]
        assert [Path(e["image"]).name for e in entries] == [files[int(i)].name for i in order]
        assert torch.allclose(torch.tensor([e["value"] for e in entries]), best[order], rtol=1e-4, atol=1e-5)
    # occlusion: the incremental engine (auto) equals the full recomputation
    fast = zfvis.occlusion(model, x[0], patch=32, stride=32, layer=layer, channel=1)
    full = zfvis.occlusion(model, x[0], patch=32, stride=32, layer=layer, channel=1, method="full")
    assert torch.allclose(fast.activation, full.activation, rtol=1e-4, atol=1e-4)
    assert torch.allclose(fast.class_prob, full.class_prob, rtol=1e-4, atol=1e-6)
    # invariance: rotating by 0 changes nothing
    inv = zfvis.invariance(model, x[:2], "rotation", [0, 90], [layer])
    assert torch.allclose(inv.distances[layer][:, 0].float(), torch.zeros(2), atol=1e-4)
    assert (inv.distances[layer][:, 1] > 0).all()
    # correspondence and evolution run to their end on these graphs
    boxes = {"centre": [(16, 16, 48, 48)] * len(files)}
    corr = zfvis.correspondence(model, x, boxes, [layer], random_baseline=False)
    assert set(corr.rows) == {"centre"}
    other, _ = zfvis.load_model(name, weights="random", seed=1)
    evo = zfvis.evolution([model, other], x, layer, [0, 1])
    cell = evo.cells[0][0]
    assert cell.value == pytest.approx(float(maps[:, 0].amax()), rel=1e-4)
