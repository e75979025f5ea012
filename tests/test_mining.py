"""Tests for zfvis.mining and `zfvis mine`: top-k vs brute force, ties, resume,
two-process gloo, skipped files, the gallery, windowed crops, the CLI."""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from zfvis.analysis.topk import crop_winners, merge_topk
from zfvis.cli import main
from zfvis.core.deconvnet import Deconvnet
from zfvis.io.images import list_images, load_image
from zfvis.mining import mine
from zfvis.mining import pages as mining_figures
from zfvis.models.zoo import Preprocess
from zfvis.viz import sheets

REPO = Path(__file__).resolve().parents[1]
PRE = Preprocess(None, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
LAYERS = ["1", "4"]  # ReLU after conv1 (16x16), ReLU after conv2 (6x6)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.ReLU()
    ).eval()


def make_dataset(root: Path, n: int = 22, seed: int = 1) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        rel = f"sub/s{i:02d}.png" if i % 5 == 0 else f"img{i:02d}.png"
        arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / rel)
        names.append(rel)
    return names


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_dataset(root)
    return root


def brute_force(model: nn.Module, root: Path, layer: str, top: int) -> list[list[tuple[int, float, list[int]]]]:
    files = list_images(root)
    x = torch.stack([PRE(load_image(root / f)) for f in files])
    with torch.no_grad():
        out = model[: int(layer) + 1](x)
    n, c, h, w = out.shape
    result = []
    for ch in range(c):
        cands = []
        for i in range(n):
            flat = out[i, ch].flatten()
            v = float(flat.max())
            p = int((flat == flat.max()).nonzero()[0])
            cands.append((-v, files[i], i, p))
        cands.sort()
        result.append([(i, -nv, [p // w, p % w]) for nv, _, i, p in cands[:top]])
    return result


def _run(root: Path, out: Path, **kw):  # noqa: ANN202
    kw.setdefault("batch_size", 4)
    kw.setdefault("progress", False)
    return mine(tiny_model(), PRE, root, LAYERS, out_dir=out, **kw)


def _results(out: Path) -> dict:
    """topk.json without its timings (which differ from run to run)."""
    topk = json.loads((out / "topk.json").read_text())
    assert set(topk.pop("timings")) >= {"pass1"}
    return topk


def _ranked(topk: dict, layer: str) -> list[list[tuple[int, float, list[int]]]]:
    return [[(e["index"], e["value"], e["position"]) for e in chan] for chan in topk["layers"][layer]["channels"]]


# --------------------------------------------------------------------------- pass 1


def test_topk_equals_brute_force(data: Path, tmp_path: Path) -> None:
    res = _run(data, tmp_path / "out", top=5, figures=False)
    model = tiny_model()
    files = list_images(data)
    for layer in LAYERS:
        got = _ranked(res.topk, layer)
        want = brute_force(model, data, layer, 5)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert [e[0] for e in g] == [e[0] for e in w]
            assert [e[2] for e in g] == [e[2] for e in w]
            assert [e[1] for e in g] == pytest.approx([e[1] for e in w], rel=1e-5, abs=1e-6)
            assert len({e[0] for e in g}) == len(g)  # one entry per image at most
        first = res.topk["layers"][layer]["channels"][0][0]
        assert first["image"] == files[first["index"]]
    assert res.topk["images"] == 22 and res.topk["skipped"] == []


def test_fewer_images_than_top_and_channel_subset(data: Path, tmp_path: Path) -> None:
    res = _run(data, tmp_path / "out", top=9, limit=3, channels=[1, 3], figures=False)
    assert {e["index"] for c in res.topk["layers"]["1"]["channels"] for e in c} <= {0, 7, 14}  # evenly spaced
    info = res.topk["layers"]["4"]
    assert info["channel_ids"] == [1, 3] and info["channel_count"] == 5
    assert all(len(c) == 3 for c in info["channels"])
    with pytest.raises(ValueError, match="has 4 channels"):
        _run(data, tmp_path / "out2", channels=[7], figures=False)


def test_ties_broken_by_path(tmp_path: Path) -> None:
    root = tmp_path / "dup"
    make_dataset(root, n=6)
    src = root / "img03.png"
    for name in ("a_copy.png", "zz_copy.png", "sub/b_copy.png"):
        shutil.copy(src, root / name)
    res = _run(root, tmp_path / "out", top=9, figures=False, batch_size=3)
    files = list_images(root)
    copies = {files.index(n) for n in ("a_copy.png", "zz_copy.png", "sub/b_copy.png", "img03.png")}
    for layer in LAYERS:
        for chan in res.topk["layers"][layer]["channels"]:
            keys = [(-e["value"], e["image"]) for e in chan]
            assert keys == sorted(keys)
            dup = [e for e in chan if e["index"] in copies]
            assert len(dup) == 4 and len({e["value"] for e in dup}) == 1
            assert [e["image"] for e in dup] == sorted(e["image"] for e in dup)
            assert len({e["index"] for e in chan}) == len(chan)


def test_merge_topk_ties_and_empty_slots() -> None:
    a = {"values": torch.tensor([[3.0, 1.0]]), "index": torch.tensor([[5, 2]]), "pos": torch.tensor([[0, 1]])}
    b = {"values": torch.tensor([[3.0, float("-inf")]]), "index": torch.tensor([[4, torch.iinfo(torch.long).max]]),
         "pos": torch.tensor([[7, -1]])}
    m = merge_topk([a, b], 3)
    assert m["index"].tolist() == [[4, 5, 2]] and m["pos"].tolist() == [[7, 0, 1]]


def test_resume_after_interruption_equals_uninterrupted(data: Path, tmp_path: Path) -> None:
    _run(data, tmp_path / "ref", state_every=2, figures=False)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _run(data, out, state_every=2, stop_after_batches=3, figures=False)
    assert not (out / "topk.json").exists()
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["batches"] == 3 and not state["done"]  # saved on the interruption, not only every 2 batches
    res = _run(data, out, state_every=2, figures=False)
    assert res.resumed_batches == 3
    assert _results(out) == _results(tmp_path / "ref")
    # done: a rerun skips pass 1; other settings are refused unless restarted
    again = _run(data, out, state_every=2, figures=False)
    assert _results(out) == _results(tmp_path / "ref")
    assert again.resumed_batches == 0
    with pytest.raises(ValueError, match=r"other settings \(different: top\).*restart=True"):
        _run(data, out, top=3, figures=False)
    _run(data, out, top=3, figures=False, restart=True)
    assert len(json.loads((out / "topk.json").read_text())["layers"]["1"]["channels"][0]) == 3


def test_restart_leaves_none_of_the_old_runs_pages(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(data, out, top=2)
    old = {p.relative_to(out).as_posix() for p in (out / "layers").rglob("*.html")}
    assert "layers/4/c0004.html" in old and (out / "style.css").is_file()
    _run(data, out, top=2, channels=[0, 1], restart=True)
    new = {p.relative_to(out).as_posix() for p in (out / "layers").rglob("*.html")}
    assert "layers/4/c0004.html" not in new and "layers/4/c0001.html" in new  # no stale channel page
    assert new < old and (out / "style.css").is_file()


def test_corrupt_and_non_image_files_skipped(data: Path, tmp_path: Path) -> None:
    good = (data / "img01.png").read_bytes()
    (data / "broken.png").write_bytes(good[: len(good) // 2])
    (data / "notes.jpg").write_text("this is not an image\n")
    res = _run(data, tmp_path / "out", figures=False, workers=0)
    skipped = {s["image"] for s in res.skipped}
    assert skipped == {"broken.png", "notes.jpg"}
    assert res.topk["images"] == 22 and len(res.topk["skipped"]) == 2
    assert all(s["error"] for s in res.topk["skipped"])


# --------------------------------------------------------------------------- distributed


_WORKER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from zfvis.mining import mine
    from zfvis.models.zoo import Preprocess
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.ReLU())
    m.load_state_dict(torch.load(sys.argv[1], weights_only=True))
    pre = Preprocess(None, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    mine(m.eval(), pre, sys.argv[2], ["1", "4"], out_dir=sys.argv[3], batch_size=4, progress=False)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_gloo_equals_one_process(data: Path, tmp_path: Path) -> None:
    (data / "notes.jpg").write_text("not an image")
    ref = _run(data, tmp_path / "ref")
    weights = tmp_path / "tiny.pt"
    torch.save(tiny_model().state_dict(), weights)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "dist"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(weights), str(data), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log, _ = p.communicate(timeout=120)
        assert p.returncode == 0, log
    got = json.loads((out / "topk.json").read_text())
    want = ref.topk
    for layer in LAYERS:
        assert _ranked(got, layer) == _ranked(want, layer)
    assert got["skipped"] == want["skipped"] and got["images"] == want["images"]
    assert not list(out.glob("state.rank*"))


# --------------------------------------------------------------------------- pass 2, outputs


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()
        self.tiles: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key):
                self.refs.append(a[key])
        self.refs += re.findall(r"url\('([^']+)'\)", a.get("style") or "")  # a tile cut out of its sheet
        if a.get("role") == "img":
            self.tiles.append(a.get("aria-label") or "")


def test_outputs_and_gallery_links(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mining_figures, "PAGE_CHANNELS", 4)  # layer "4" (5 channels) gets two pages
    out = tmp_path / "out"
    res = _run(data, out)
    assert (out / "1.png").is_file() and (out / "4_p1.png").is_file() and (out / "4_p2.png").is_file()
    assert not (out / "4.png").exists()
    assert (out / "tiles" / "4" / "c0004.png").is_file() and (out / "tiles" / "4" / "c0004_top.png").is_file()
    assert len(list((out / "tiles").rglob("*.png"))) == 2 * (4 + 5)  # a sheet and a thumbnail per channel
    # the gallery is a site: every page's links resolve, every tile is shown on a channel page
    proj_refs = 0
    pages = sorted(out.rglob("*.html"))
    assert out / "index.html" in pages and len(pages) >= 1 + len(LAYERS) + 9  # model, layers, channels
    for page in pages:
        parser = _Links()
        parser.feed(page.read_text())
        assert parser.refs, page
        for ref in parser.refs:
            assert "://" not in ref
            target = ref.split("#")[0]
            if target:
                assert (page.parent / target).is_file(), (page, ref)
        proj_refs += sum(1 for t in parser.tiles if t.startswith("projection "))
    n_tiles = sum(len(c) for layer in LAYERS for c in res.topk["layers"][layer]["channels"])
    assert proj_refs >= n_tiles
    assert set(res.topk["timings"]) == {"pass1", "project", "render"}
    entry = res.topk["layers"]["4"]["channels"][0][0]
    t, l, b, r = entry["box"]
    tiles = sheets.cut_sheet(sheets.read_png(out / "tiles" / "4" / "c0000.png"),
                             sheets.SheetLayout.of([e["box"] for e in res.topk["layers"]["4"]["channels"][0]]))
    assert tuple(tiles[0][1].shape) == (3, b - t, r - l)
    # what a person checks: the box is the activation's receptive field, the projection is not blank
    dn = Deconvnet(tiny_model())
    for layer in LAYERS:
        for c, chan in enumerate(res.topk["layers"][layer]["channels"]):
            e = chan[0]
            assert tuple(e["box"]) == dn.receptive_window(layer, tuple(e["position"]), (3, 16, 16)), (layer, c)
            sheet = sheets.read_png(out / "tiles" / layer / f"c{c:04d}.png")
            proj, patch_u8 = sheets.cut_sheet(sheet, sheets.SheetLayout.of([x["box"] for x in chan]))[0]
            assert int(proj.float().mean(0).max() - proj.float().mean(0).min()) > 40, (layer, c)  # a blank one is grey
            thumb = sheets.read_png(out / "tiles" / layer / f"c{c:04d}_top.png")
            assert torch.equal(thumb, sheets.make_thumb(proj, patch_u8))  # the thumbnail is rank 1's pair
            patch = patch_u8.permute(1, 2, 0).reshape(-1, 3).float()
            x = PRE(load_image(data / e["image"]))[:, e["box"][0] : e["box"][2], e["box"][1] : e["box"][3]]
            shown = (PRE.denormalize(x).permute(1, 2, 0).reshape(-1, 3) * 255).round()
            assert torch.allclose(patch, shown, atol=1)  # the patch is the image where the box says


def test_windowed_crop_equals_dense_crop(data: Path) -> None:
    model = tiny_model()
    files = list_images(data)[:6]
    x = torch.stack([PRE(load_image(data / f)) for f in files])
    for layer in LAYERS:
        dn = Deconvnet(model)
        rec = dn.record(x, layer)
        seeds = dn.select(rec, [0, 2, 3])
        dense = Deconvnet(model, windowed=False)
        full = dense.reverse(dense.record(x, layer), seeds).full()
        crops = crop_winners(dn, x, layer, seeds)
        assert any(c[2] != (0, 0, 16, 16) for c in crops) or layer == "4"
        for j, (proj, patch, (t, l, b, r)) in enumerate(crops):
            assert torch.allclose(proj, full[j][:, t:b, l:r], atol=1e-5)
            assert float(full[j].abs().sum()) == pytest.approx(float(proj.abs().sum()), rel=1e-5)  # zero outside the box
            assert torch.equal(patch, x[int(seeds.image[j]), :, t:b, l:r])


# --------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "cif"
    g = torch.Generator().manual_seed(3)
    root.mkdir()
    for i in range(12):
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{i:02d}.png")
    out = tmp_path / "out"
    rc = main(["mine", str(root), "--model", "zfnet-cifar10", "--weights", "random", "--layers", "conv1,conv2",
               "--channels", "0-3,10", "--batch-size", "5", "--no-progress", "-o", str(out)])
    assert rc == 0
    topk = json.loads((out / "topk.json").read_text())
    assert topk["layers"]["conv1"]["channel_ids"] == [0, 1, 2, 3, 10]
    assert topk["input_shape"] == [3, 32, 32]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["input_size"] == 32 and settings["layers"] == ["conv1", "conv2"]
    assert (out / "conv1.png").is_file() and (out / "index.html").is_file()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[mine]\ndataset = "{root}"\nweights = "random"\nlayers = ["conv1"]\ntop = 2\n'
                   f'channels = "0-1"\nno-progress = true\noutput = "{tmp_path / "o2"}"\n')
    assert main(["mine", "--config", str(cfg)]) == 0
    assert len(json.loads((tmp_path / "o2" / "topk.json").read_text())["layers"]["conv1"]["channels"][0]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/data"], "does not exist"),
        (["EMPTY"], "holds no images"),
        (["DATA", "--layers", "conv9"], "conv9"),
        (["DATA", "--model", "nosuch"], "nosuch"),
        (["DATA", "--channels", "0-40"], "32 channels"),
        (["DATA", "--channels", "5-2"], "backwards"),
        (["DATA", "--channels", "a"], "not a channel"),
        (["DATA", "--top", "0"], "--top"),
    ],
)
def test_cli_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    make_dataset(tmp_path / "d", n=3)
    args = [{"EMPTY": str(tmp_path / "empty"), "DATA": str(tmp_path / "d")}.get(a, a) for a in args]
    if "--layers" not in args:
        args += ["--layers", "conv1"]
    rc = main(["mine", *args, "--weights", "random", "--no-progress", "-o", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- real data


def test_real_cifar10_200_images(cifar_test_slice: Path, tmp_path: Path) -> None:
    """zfnet-cifar10 (packaged weights) on 200 CIFAR-10 test images, 20 a class (the
    conftest fixture streams them out of ../shared; skipped, saying why, without it)."""
    out = tmp_path / "out"
    rc = main(["mine", str(cifar_test_slice), "--model", "zfnet-cifar10", "--layers", "conv1,conv3", "--limit", "200",
               "--channels", "0-11", "--batch-size", "100", "--no-progress", "-o", str(out)])
    assert rc == 0
    topk = json.loads((out / "topk.json").read_text())
    assert topk["images"] == 200 and topk["skipped"] == []
    assert (out / "conv1.png").is_file() and (out / "conv3.png").is_file() and (out / "index.html").is_file()
    assert len(topk["layers"]["conv3"]["channels"]) == 12 and topk["layers"]["conv3"]["channel_count"] == 128
    ranked = topk["layers"]["conv3"]["channels"][11]
    tiles = sheets.cut_sheet(sheets.read_png(out / "tiles" / "conv3" / "c0011.png"),
                             sheets.SheetLayout.of([e["box"] for e in ranked]))
    assert len(tiles) == len(ranked) == 9
    assert len({e["image"].split("/")[0] for c in topk["layers"]["conv3"]["channels"] for e in c}) > 1


@pytest.mark.parametrize("resumed_done", [False, True])
def test_each_rank_drops_its_part_file_once_the_final_state_is_saved(monkeypatch, tmp_path, resumed_done) -> None:
    """A rank resumed from the final state (a node killed after rank 0 saved it, before it
    dropped its part) drops its part too; it was left beside the results."""
    import types

    from zfvis.mining import pass1
    from zfvis.mining.run import Progress

    deleted: list[list[object]] = []
    monkeypatch.setattr(pass1.ownership, "delete_own", lambda paths, run_id: deleted.append([*paths, run_id]))
    monkeypatch.setattr(pass1, "flush_recording", lambda: None)
    ranks = types.SimpleNamespace(rank=1, world=2, finish=lambda: None, check=lambda: None,
                                  gather=lambda obj: [obj, obj])
    run = types.SimpleNamespace(ranks=ranks, part_path=tmp_path / "state.rank1-of-2.pt", state_path=tmp_path / "state.pt",
                                run_id="r1", layers=[], k=1)
    prog = Progress({}, (), 0, 0, done=resumed_done)
    pass1.merge_ranks(run, prog)  # type: ignore[arg-type]
    assert deleted == [[tmp_path / "state.rank1-of-2.pt", "r1"]]
