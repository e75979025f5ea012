"""The command line, in-process: the main job, listings, figures and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import zfvis
from zfvis.cli import main


def _png_ok(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_main_job_with_no_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    w, h = _png_ok(tmp_path / "zfvis_project.png")
    assert w > 800 and h > 400
    settings = json.loads((tmp_path / "zfvis_project.json").read_text())
    assert settings["model"] == "zfnet-cifar10" and settings["layer"] == "conv3" and len(settings["channels"]) == 9
    assert "wrote" in capsys.readouterr().out


def test_project_options(tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    assert main(["project", str(zfvis.default_image()), "--layer", "conv2", "--channel", "3", "--channel", "5",
                 "--top-k", "2", "-o", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["channels"] == [3, 5]
    assert main(["project", "--layer", "conv1", "--channel", "0", "--position", "4,7", "-o", str(out)]) == 0
    assert main(["project", "--layer", "fc8", "--channel", "3", "-o", str(out)]) == 0
    assert main(["project", "--model", "vgg11", "--weights", "random", "--layer", "conv2_1", "--top-channels", "2",
                 "--input-size", "64", "-o", str(out)]) == 0
    _png_ok(out)


def test_config_file_supplies_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[project]\nlayer = "conv2"\ntop-channels = 2\n')
    out = tmp_path / "c.png"
    assert main(["project", "--config", str(cfg), "-o", str(out)]) == 0
    s = json.loads(out.with_suffix(".json").read_text())
    assert s["layer"] == "conv2" and len(s["channels"]) == 2
    assert main(["project", "--config", str(cfg), "--layer", "conv1", "-o", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["layer"] == "conv1"  # the command line wins


def _image_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    return {"good": good, "truncated": truncated, "text": text}


BAD_INPUTS = [
    (["project", "{tmp}/missing.png"], "does not exist"),
    (["project", "{truncated}"], "truncated"),
    (["project", "{text}"], "not an image"),
    (["project", "{tmp}"], "is a directory"),
    (["project", "{good}", "--model", "resnet999"], "unknown model"),
    (["project", "{good}", "--layer", "conv9"], "conv9"),
    (["project", "{good}", "--weights", "IMAGENET9"], "unknown weights"),
    (["project", "{good}", "--weights", "{tmp}/none.pt"], "does not exist"),
    (["project", "{good}", "--layer", "conv3", "--channel", "999"], "out of range"),
    (["project", "{good}", "--layer", "conv3", "--channel", "1", "--position", "50,2"], "outside"),
    (["project", "{good}", "--position", "a,b"], "Y,X"),
    (["project", "{good}", "--top-k", "0"], "top-k"),
    (["project", "{good}", "-o", "{tmp}/no/such/dir/out.png"], "does not exist"),
    (["project", "{good}", "-o", "{tmp}"], "is a directory"),
    (["project", "{good}", "--input-size", "0"], "--input-size must be between 1 and 4096"),
    (["project", "{good}", "--config", "{tmp}/none.toml"], "config"),
    (["layers", "--model", "nope"], "unknown model"),
    (["filters", "--layer", "fc9"], "fc9"),
    (["evolution", "{tmp}/none.pt", "--layer", "conv1"], "does not exist"),
    (["project", "--bogus"], ""),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["project", "{good}", "--device", "cuda"], "CUDA"))


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a[:3]) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    files = _image_files(tmp_path)
    argv = [a.format(tmp=tmp_path, **files) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message.lower() in err.lower()
    if message:
        assert len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written output


def test_rgba_and_16bit_and_exif_images(tmp_path: Path) -> None:
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (64, 48), (255, 0, 0, 0)).save(rgba)
    grey16 = tmp_path / "g.png"
    Image.new("I;16", (64, 48), 40000).save(grey16)
    for f in (rgba, grey16):
        assert main(["project", str(f), "--layer", "conv1", "--top-channels", "1", "-o", str(tmp_path / "o.png")]) == 0
    img = zfvis.load_image(rgba)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)  # transparent on white
    rotated = tmp_path / "r.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (60, 30)).save(rotated, exif=exif)
    assert zfvis.load_image(rotated).size == (30, 60)


def test_layers_lists_shapes_and_fields(capsys) -> None:
    assert main(["layers"]) == 0
    out = capsys.readouterr().out
    assert "conv3" in out and "128x8x8" in out and "27x27 / 4" in out and "whole input" in out
    assert main(["layers", "--model", "vgg16", "--input-size", "64"]) == 0
    assert "conv5_3" in capsys.readouterr().out


def test_filters_and_evolution(tmp_path: Path) -> None:
    assert main(["filters", "-o", str(tmp_path / "f.png")]) == 0
    _png_ok(tmp_path / "f.png")
    cks = []
    for seed in range(2):
        m, _ = zfvis.load_model("zfnet-cifar10", weights="random", seed=seed)
        torch.save(m.state_dict(), tmp_path / f"e{seed}.pt")
        cks.append(str(tmp_path / f"e{seed}.pt"))
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(5):
        Image.new("RGB", (32, 32), (i * 40, 100, 200 - i * 30)).save(data / f"{i}.png")
    out = tmp_path / "evo.png"
    assert main(["evolution", *cks, "--dataset", str(data), "--layer", "conv2", "--channels", "0-3", "-o", str(out)]) == 0
    _png_ok(out)
    assert json.loads(out.with_suffix(".json").read_text())["channels"] == [0, 1, 2, 3]
    assert main(["evolution", *cks, "--layer", "conv2", "--channels", "0-999", "-o", str(out)]) == 2


def test_python_m_zfvis_is_the_same_cli() -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "zfvis", "layers", "--model", "nope"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown model" in res.stderr and "Traceback" not in res.stderr


# --------------------------------------------------------------------------- graph models and rules


def test_project_rules_on_a_residual_model(tmp_path: Path) -> None:
    out = tmp_path / "r.png"
    assert main(["project", "--model", "resnet18", "--weights", "random", "--layer", "layer1.0.add",
                 "--top-channels", "2", "--input-size", "64", "--rule", "guided", "-o", str(out)]) == 0
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["rule"] == "guided" and settings["layer"] == "layer1.0.add"
    w_guided, _ = _png_ok(out)
    both = tmp_path / "all.png"
    assert main(["project", "--model", "resnet18", "--weights", "random", "--layer", "layer2", "--channel", "3",
                 "--input-size", "64", "--rule", "all", "-o", str(both)]) == 0
    w_all, h_all = _png_ok(both)
    assert w_all > 600 and h_all > 200
    with Image.open(both) as im:  # four columns of non-blank panels
        assert len(set(im.convert("L").tobytes())) > 50


def test_layers_and_mine_on_graph_models(tmp_path: Path, capsys) -> None:
    assert main(["layers", "--model", "googlenet", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "inception4c" in out and "cat" in out and "conv1.relu" in out
    data = tmp_path / "imgs"
    data.mkdir()
    g = torch.Generator().manual_seed(5)
    for i in range(6):
        arr = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(data / f"{i}.png")
    run = tmp_path / "run"
    assert main(["mine", str(data), "--model", "resnet18", "--weights", "random", "--layers", "layer1.0.add,layer2",
                 "--channels", "0-2", "--top", "3", "--input-size", "48", "--rule", "guided", "--no-progress",
                 "-o", str(run)]) == 0
    topk = json.loads((run / "topk.json").read_text())
    assert topk["rule"] == "guided" and set(topk["layers"]) == {"layer1.0.add", "layer2"}
    assert len(topk["layers"]["layer2"]["channels"][0]) == 3
    assert (run / "index.html").is_file() and (run / "layer2.png").is_file()
