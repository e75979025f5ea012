"""The model zoo: builders, layer contracts, weights from every source, preprocessing."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import zfvis
from zfvis.models import zoo

# A declared contract per zoo model (timm style): alias -> (channels, reduction: the
# receptive field's jump) for a 224 input (32 for zfnet-cifar10, 64 for the VGGs and the graph models: neither depends on it), checked against real outputs below.
CONTRACTS = {
    "zfnet": (224, {"conv1": (96, 2), "pool1": (96, 4), "conv2": (256, 8), "pool2": (256, 16), "conv5": (256, 16), "pool3": (256, 32)}),
    "zfnet-cifar10": (32, {"conv1": (32, 1), "conv2": (64, 2), "conv3": (128, 4), "conv5": (128, 4), "pool3": (128, 8)}),
    "alexnet": (224, {"conv1": (64, 4), "conv2": (192, 8), "conv5": (256, 16)}),
    "vgg11": (64, {"conv1_1": (64, 1), "conv3_2": (256, 4), "conv5_2": (512, 16), "pool5": (512, 32)}),
    "vgg16": (64, {"conv1_2": (64, 1), "conv3_3": (256, 4), "conv5_3": (512, 16)}),
    "vgg19_bn": (64, {"conv4_4": (512, 8), "conv5_4": (512, 16)}),
    "resnet18": (64, {"stem": (64, 2), "layer1": (64, 4), "layer2": (128, 8), "layer3.1": (256, 16), "layer4": (512, 32)}),
    "resnet50": (64, {"layer1": (256, 4), "layer2.0.add": (512, 8), "layer4": (2048, 32)}),
    "googlenet": (64, {"conv1": (64, 2), "inception3a": (256, 8), "inception4c": (512, 16), "inception5b": (1024, 32)}),
    "densenet121": (64, {"conv1": (64, 2), "denseblock1": (256, 4), "transition1": (128, 8), "denseblock4": (1024, 32)}),
    "mobilenet_v2": (64, {"conv1": (32, 2), "block3": (24, 4), "block6": (32, 8), "block13": (96, 16), "block17": (320, 32)}),
}


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_layer_contract(name: str) -> None:
    size, contract = CONTRACTS[name]
    model, _ = zfvis.load_model(name, weights="random")
    dn = zfvis.Deconvnet(model)
    x = torch.zeros(1, 3, size, size)
    for alias, (channels, reduction) in contract.items():
        out = dn.record(x, alias).output
        assert out.shape[1] == channels, alias
        rf = dn.receptive_field(alias, (3, size, size))
        assert rf is not None and rf.jump == (reduction, reduction), alias


def test_zfnet_has_paper_map_sizes() -> None:
    model, _ = zfvis.load_model("zfnet", weights="random")
    steps = zfvis.Deconvnet(model).trace((3, 224, 224))
    sizes = [s.out_shape[-1] for s in steps if isinstance(s.module, (nn.Conv2d, nn.MaxPool2d))]
    assert sizes == [110, 55, 26, 13, 13, 13, 13, 6]
    assert steps[-1].out_shape == (1000,)


#: The families whose stems are not a ReLU and some of whose heads are convolutions; their
#: entries, aliases and projections are tested in tests/test_zoo_families.py.
NEWER = {"efficientnet_b0", "efficientnet_v2_s", "mobilenet_v3_large", "convnext_tiny", "regnet_y_400mf",
         "shufflenet_v2_x1_0", "squeezenet1_1", "inception_v3", "resnext50_32x4d", "resnext101_32x8d",
         "wide_resnet50_2", "wide_resnet101_2"}


@pytest.mark.parametrize("name", [m for m in zfvis.list_models() if m not in NEWER])
def test_every_model_builds_with_aliases(name: str) -> None:
    model, pre = zfvis.load_model(name, weights="random")
    assert not model.training
    aliases = zfvis.layer_aliases(model)
    stem = next(a for a in ("conv1", "conv1_1", "stem") if a in aliases)
    head = "fc8" if "fc8" in aliases else "fc"
    assert isinstance(dict(model.named_modules())[aliases[head]], nn.Linear)
    dn = zfvis.Deconvnet(model)  # every alias names a layer of the traced model
    node = dn.graph.by_name[dn.resolve(stem)]
    assert node.op is not None and node.op.name in ("relu", "relu6")  # the rectified output


def test_random_weights_are_seeded() -> None:
    a, _ = zfvis.load_model("zfnet-cifar10", weights="random")
    b, _ = zfvis.load_model("zfnet-cifar10", weights="random")
    c, _ = zfvis.load_model("zfnet-cifar10", weights="random", seed=1)
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_unknown_model_and_weights() -> None:
    with pytest.raises(ValueError, match="Did you mean .*'vgg16'"):
        zfvis.load_model("vgg61")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        zfvis.load_model("vgg11", weights="IMAGENET_V9")
    with pytest.raises(ValueError, match="no torchvision weights"):
        zfvis.load_model("zfnet", weights="DEFAULT")
    with pytest.raises(TypeError):
        zfvis.load_model(16)  # type: ignore[arg-type]


def test_local_state_dict_and_checkpoint(tmp_path: Path) -> None:
    src, _ = zfvis.load_model("zfnet-cifar10", weights="random", seed=3)
    torch.save(src.state_dict(), tmp_path / "sd.pt")
    torch.save({"epoch": 4, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ck.pth")
    for f in ("sd.pt", "ck.pth"):
        model, _ = zfvis.load_model("zfnet-cifar10", weights=tmp_path / f)
        assert torch.equal(model.features[0].weight, src.features[0].weight)


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "extra": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="could run code"):
        zfvis.load_model("zfnet-cifar10", weights=tmp_path / "evil.pt")


def test_mismatched_and_missing_checkpoints(tmp_path: Path) -> None:
    state = zfvis.load_model("zfnet-cifar10", weights="random")[0].state_dict()
    state.pop("features.0.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing keys: features\.0\.weight.*unexpected keys: extra\.weight"):
        zfvis.load_model("zfnet-cifar10", weights=tmp_path / "bad.pt")
    other = zfvis.load_model("zfnet-cifar10", weights="random")[0].state_dict()
    other["classifier.6.weight"] = torch.zeros(3, 512)
    torch.save(other, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="has shape"):
        zfvis.load_model("zfnet-cifar10", weights=tmp_path / "shape.pt")
    with pytest.raises(FileNotFoundError):
        zfvis.load_model("zfnet-cifar10", weights=tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        zfvis.load_model("zfnet-cifar10", weights=tmp_path / "junk.pt")


def test_torchvision_weights_from_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's own loading path, offline: the file sits in TORCH_HOME's hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision

    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    src, _ = zfvis.load_model("alexnet", weights="random", seed=5)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(src.state_dict(), cache / os.path.basename(url))
    model, pre = zfvis.load_model("alexnet", weights="IMAGENET1K_V1")
    assert torch.equal(model.features[0].weight, src.features[0].weight)
    model, _ = zfvis.load_model("alexnet")  # DEFAULT is IMAGENET1K_V1
    assert torch.equal(model.features[0].weight, src.features[0].weight)


def test_download_failure_says_how_to_pass_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(zfvis.WeightsDownloadError, match="--weights PATH"):
        zfvis.load_model("vgg11")


def test_packaged_weights_load_offline_and_are_small() -> None:
    path = Path(zoo.__file__).parent / "weights" / "zfnet_cifar10.pt"
    assert path.stat().st_size <= 10 * 1024 * 1024
    model, pre = zfvis.load_model("zfnet-cifar10")
    random_model, _ = zfvis.load_model("zfnet-cifar10", weights="random")
    assert not torch.equal(model.features[0].weight, random_model.features[0].weight)
    assert pre.crop == 32


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "RGB"])
def test_preprocess_accepts_any_mode(mode: str) -> None:
    img = Image.new("RGB", (50, 40), (200, 30, 10)).convert(mode) if mode != "I;16" else Image.new("I;16", (50, 40), 1000)
    _, pre = zfvis.load_model("zfnet-cifar10", weights="random")
    x = pre(img)
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    back = pre.denormalize(x)
    assert back.min() >= 0 and back.max() <= 1


def test_preprocess_of_a_real_photo_of_any_size() -> None:
    model, pre = zfvis.load_model("zfnet-cifar10")
    x = pre(zfvis.load_image(zfvis.default_image())).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    assert model(x).shape == (1, 10)


def test_corrupt_cached_torchvision_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision

    url = torchvision.models.VGG11_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / os.path.basename(url)).write_bytes(b"truncated download")
    with pytest.raises(ValueError, match="delete '.*vgg11-8a719046.pth' and retry, or pass --weights random"):
        zfvis.load_model("vgg11")


def test_a_torchvision_model_built_by_hand_knows_the_papers_layer_names() -> None:
    """``zfvis.Deconvnet(torchvision.models.vgg16())`` takes ``conv5_3`` without the zoo being
    imported (a fresh interpreter: in this one other tests have imported it)."""
    code = ("import torch, torchvision, zfvis, sys; dn = zfvis.Deconvnet(torchvision.models.vgg16()); "
            "print(tuple(dn.output(torch.randn(1, 3, 32, 32), 'conv5_3').shape), 'zfvis.models.zoo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["(1,", "512,", "2,", "2)", "False"], out.stdout + out.stderr
