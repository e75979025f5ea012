"""scripts/train.py on a tiny generated ImageFolder, and the shipped model on real data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import zfvis

REPO = Path(__file__).resolve().parent.parent


def _train_module():
    spec = importlib.util.spec_from_file_location("zfvis_train", REPO / "scripts" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_epoch_writes_checkpoints(tiny_folder: Path, tmp_path: Path) -> None:
    train = _train_module()
    out = tmp_path / "run"
    assert train.main([str(tiny_folder), "--val", str(tiny_folder), "--epochs", "2", "--batch-size", "8",
                       "--save-epochs", "1,2", "--preload", "-o", str(out)]) == 0
    for name in ("epoch_001.pt", "epoch_002.pt", "final.pt", "last.pt", "history.json"):
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and 0 <= history[-1]["val_acc"] <= 1
    model, _ = zfvis.load_model("zfnet-cifar10", weights="random")
    state = torch.load(out / "final.pt", weights_only=True)
    assert state["classifier.6.weight"].shape == (2, 512)  # the head follows the data set's classes
    conv1 = state["features.0.weight"]
    assert conv1.pow(2).mean(dim=(1, 2, 3)).sqrt().max() <= 0.1 + 1e-6  # ZF filter renormalisation


def test_resume_after_interruption_is_exact(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = [str(tiny_folder), "--epochs", "2", "--batch-size", "4", "--checkpoint-every", "3", "--lr", "0.01"]
    train = _train_module()
    assert train.main([*args, "-o", str(tmp_path / "straight")]) == 0  # 8 steps an epoch, no preload

    calls = {"n": 0}
    original = train._renormalise_first_filters

    def interrupt_on_step_12(model, radius):
        original(model, radius)
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_renormalise_first_filters", interrupt_on_step_12)
    with pytest.raises(KeyboardInterrupt):
        train.main([*args, "-o", str(tmp_path / "resumed")])
    last = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (2, 3)  # saved mid-epoch 2
    monkeypatch.setattr(train, "_renormalise_first_filters", original)
    assert train.main([*args, "-o", str(tmp_path / "resumed")]) == 0
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shipped_model_classifies_real_cifar10(cifar_test_slice: Path) -> None:
    """The packaged weights on 200 real CIFAR-10 test images: far better than chance (10%)."""
    model, pre = zfvis.load_model("zfnet-cifar10")
    spec = zfvis.models.zoo.get_spec("zfnet-cifar10")
    correct = total = 0
    for label, cls in enumerate(spec.classes or ()):
        files = sorted((cifar_test_slice / cls).glob("*.jpg"))
        x = torch.stack([pre(zfvis.load_image(f)) for f in files])
        with torch.no_grad():
            correct += int((model(x).argmax(1) == label).sum())
        total += len(files)
    assert total == 200
    assert correct / total >= 0.6, correct / total
