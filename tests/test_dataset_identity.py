"""A mining run never mixes two versions of its data set: an image replaced under the same
name between runs stops a rerun or a resume with the list of changed files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import zfvis
from zfvis.mining import mine
from zfvis.models.zoo import Preprocess

PRE = Preprocess(None, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3), nn.ReLU()).eval()


def picture(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(12, 12, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    root.mkdir()
    for i in range(6):
        picture(i).save(root / f"img{i}.bmp")  # BMP: every picture of one size has one file size
    return root


def run(data: Path, out: Path, **kw: object) -> zfvis.mining.MiningResult:
    return mine(tiny_model(), PRE, data, ["1"], out_dir=out, progress=False, top=6, batch_size=2, **kw)


def replace(path: Path, seed: int, *, keep_time: bool = False) -> None:
    st = path.stat()
    picture(seed).save(path)
    assert path.stat().st_size == st.st_size
    if keep_time:  # the same size and time: only the contents tell
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_rerun_after_an_image_was_replaced_refuses_with_its_name(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(data, out)
    topk = (out / "topk.json").read_bytes()
    assert all(e["sha256"] for c in json.loads(topk)["layers"]["1"]["channels"] for e in c)
    replace(data / "img3.bmp", 99)
    with pytest.raises(zfvis.UserInputError, match=r"1 image\(s\) differ.*img3\.bmp.*restart=True"):
        run(data, out)
    assert (out / "topk.json").read_bytes() == topk  # the old result stays, nothing mixed
    fresh = run(data, out, restart=True)
    assert fresh.topk is not None and (out / "topk.json").read_bytes() != topk


def test_a_winner_replaced_behind_the_same_size_and_time_is_caught(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(data, out)
    replace(data / "img0.bmp", 77, keep_time=True)
    with pytest.raises(zfvis.UserInputError, match="img0.bmp"):
        run(data, out)


def test_resume_after_an_image_was_replaced_refuses(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(data, out, stop_after_batches=1)  # pass 1 saved after img0, img1
    replace(data / "img1.bmp", 50)
    replace(data / "img4.bmp", 51)  # not yet mined: also named, the run would mix it too
    with pytest.raises(zfvis.UserInputError, match=r"2 image\(s\).*img1\.bmp, img4\.bmp"):
        run(data, out)
    assert not (out / "topk.json").exists()
