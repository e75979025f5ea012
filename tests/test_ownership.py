"""Nothing a person made is lost: inputs are never outputs (also through the files an input
names), a file is zfvis's only while it is as zfvis wrote it, a restart deletes only its
manifest, and the outputs of a command appear together or not at all."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import zfvis
from zfvis.analysis.correspondence import default_parts_file
from zfvis.cli import main
from zfvis.io import ownership
from zfvis.io.atomic import atomic_write_bytes, output_group


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


@pytest.fixture
def parts(tmp_path: Path) -> Path:
    """The shipped part file and faces, copied: X.png is one of the images it names."""
    src = default_parts_file()
    data = json.loads(src.read_text())
    names = [k for k in data if not k.startswith("_")]
    out = {}
    for k, name in enumerate(names):
        Image.open(src.parent / name).convert("RGB").save(tmp_path / ("X.png" if k == 0 else f"face{k}.png"))
        out["X.png" if k == 0 else f"face{k}.png"] = data[name]
    path = tmp_path / "parts.json"
    path.write_text(json.dumps(out))
    return path


# ----------------------------------------------------------------------------- the ledger


def test_ledger_knows_a_file_only_as_written(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    atomic_write_bytes(f, b"zfvis", own=True)
    assert ownership.is_ours(f)
    f.write_bytes(b"edited")  # the person changed it: now it is theirs
    assert not ownership.is_ours(f)
    g = tmp_path / "b.bin"
    atomic_write_bytes(g, b"not recorded")  # own=False: not zfvis's for the ledger
    assert not ownership.is_ours(g)


def test_a_figure_the_api_wrote_is_zfvis_s_for_the_cli(tmp_path: Path, capsys) -> None:
    model, _ = zfvis.load_model("zfnet-cifar10")
    out = tmp_path / "filters.png"
    zfvis.filters_figure(model, "conv1", path=out)
    assert ownership.is_ours(out)
    rc, _, err = run_cli(capsys, "filters", "-o", out)
    assert rc == 0, err
    out.write_bytes(out.read_bytes() + b"\0")  # changed by the person
    rc, _, err = run_cli(capsys, "filters", "-o", out)
    assert rc == 2 and "--overwrite" in one_line(err)


def test_figure_path_is_checked(tmp_path: Path) -> None:
    model, _ = zfvis.load_model("zfnet-cifar10")
    with pytest.raises(IsADirectoryError) as info:
        zfvis.filters_figure(model, "conv1", path=tmp_path)
    assert str(tmp_path) in str(info.value)
    assert sorted(os.listdir(tmp_path.parent)) == sorted(os.listdir(tmp_path.parent))  # nothing beside it
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}")]
    svg = tmp_path / "fig.svg"
    zfvis.filters_figure(model, "conv1", path=svg)
    assert svg.read_text(encoding="utf-8").lstrip().startswith("<?xml")  # SVG, not PNG bytes
    with pytest.raises(zfvis.UserInputError, match="end the name"):
        zfvis.filters_figure(model, "conv1", path=tmp_path / "fig.xyz")


# ----------------------------------------------------------------------------- the command line


def test_correspond_never_replaces_an_image_its_part_file_names(parts: Path, capsys) -> None:
    before = (parts.parent / "X.png").read_bytes()
    for extra in ([], ["--overwrite"]):
        rc, _, err = run_cli(capsys, "correspond", parts, "--no-progress", "-o", parts.parent / "X.csv", *extra)
        assert rc == 2 and "X.png" in one_line(err) and "part file" in err
    assert (parts.parent / "X.png").read_bytes() == before
    assert not (parts.parent / "X.csv").exists() and not (parts.parent / "X.json").exists()


def test_an_edited_output_is_the_person_s(parts: Path, capsys) -> None:
    out = parts.parent / "table.csv"
    rc, _, err = run_cli(capsys, "correspond", parts, "--no-progress", "-o", out)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "correspond", parts, "--no-progress", "-o", out)
    assert rc == 0, err  # still exactly as zfvis wrote it: replaced
    out.write_text(out.read_text() + "my note\n")
    rc, _, err = run_cli(capsys, "correspond", parts, "--no-progress", "-o", out)
    assert rc == 2 and "table.csv" in one_line(err)
    assert out.read_text().endswith("my note\n")


def test_a_png_put_where_an_output_was_is_the_person_s(tmp_path: Path, capsys) -> None:
    out = tmp_path / "occ.png"
    args = ("occlude", "--patch", "16", "--stride", "16", "--no-progress", "-o", out)
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    Image.new("RGB", (5, 5), (1, 2, 3)).save(out)  # the person's own picture, same name
    mine = out.read_bytes()
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and "occ.png" in one_line(err)
    assert out.read_bytes() == mine


def test_every_output_is_checked_before_the_work(tmp_path: Path, capsys) -> None:
    (tmp_path / "t.json").mkdir()  # the CSV's sibling is a folder
    rc, _, err = run_cli(capsys, "correspond", "--no-progress", "-o", tmp_path / "t.csv")
    assert rc == 2 and "t.json" in one_line(err) and ".tmp" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_outputs_appear_together_or_not_at_all(tmp_path: Path, capsys, monkeypatch) -> None:
    real_fsync = os.fsync
    calls = {"n": 0}

    def full_disk(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the third file of the command: CSV and JSON are written by then
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    out = tmp_path / "t.csv"
    rc, _, err = run_cli(capsys, "correspond", "--no-progress", "-o", out)
    assert rc == 2 and "No space left on device" in one_line(err) and str(tmp_path) in err
    assert list(tmp_path.iterdir()) == []  # no CSV, no JSON, no PNG, no temporary file


def test_output_group_discards_everything_on_error(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), output_group():
        atomic_write_bytes(tmp_path / "old.txt", b"new")
        atomic_write_bytes(tmp_path / "other.txt", b"new")
        raise RuntimeError("stop")
    assert (tmp_path / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]


def test_project_twice_says_it_replaced_the_first(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run_cli(capsys, "project", "--top-channels", "1", "--layer", "conv1")
    assert rc == 0 and "replaced" not in out
    rc, out, _ = run_cli(capsys, "project", "--top-channels", "1", "--layer", "conv1")
    assert rc == 0 and "replaced the earlier zfvis outputs zfvis_project.png" in out


def test_restart_deletes_only_the_run_s_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)).save(data / f"{i}.png")
    model, preprocess = zfvis.load_model("zfnet-cifar10")
    out = tmp_path / "run"
    kw = {"out_dir": out, "channels": [0, 1], "top": 2, "progress": False, "batch_size": 4}
    zfvis.mining.mine(model, preprocess, data, ["conv1"], **kw)
    tiles = out / "tiles" / "conv1"
    assert tiles.is_dir() and (out / "layers").is_dir()
    (out / "layers" / "notes.txt").write_text("my notes")
    (tiles / "favourite.txt").write_text("c0001")
    zfvis.mining.mine(model, preprocess, data, ["conv2"], restart=True, **kw)
    assert (out / "layers" / "notes.txt").read_text() == "my notes"
    assert (tiles / "favourite.txt").read_text() == "c0001"
    assert sorted(p.name for p in tiles.iterdir()) == ["favourite.txt"]  # the run's own tiles went
    assert (out / "tiles" / "conv2").is_dir() and json.loads((out / "topk.json").read_text())["layers"].keys() == {"conv2"}


# ----------------------------------------------------------------------------- data sets


def test_one_entry_per_file_whatever_its_spelling(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeffb.png\n./a.png\na.png\n{}\nlink.png\n".format(tmp_path / "a.png").encode("utf-8"))
    files = zfvis.list_images(listing)
    assert len(files) == 2 and "b.png" in files  # the BOM is not part of the first path
    resolved = {os.path.realpath(tmp_path / f) for f in files}
    assert resolved == {str((tmp_path / "a.png").resolve()), str((tmp_path / "b.png").resolve())}


def test_part_names_never_collide_with_generated_ones(parts: Path, capsys) -> None:
    data = json.loads(parts.read_text())
    for boxes in data.values():
        boxes["random (left eye)"] = boxes["left eye"]
    parts.write_text(json.dumps(data))
    rc, _, err = run_cli(capsys, "correspond", parts, "--no-progress", "-o", parts.parent / "t.csv")
    assert rc == 2 and "random (left eye)" in one_line(err)
    images = torch.zeros(2, 3, 8, 8)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU())
    with pytest.raises(zfvis.UserInputError, match="rename"):
        zfvis.correspondence(model, images, {"random (eye)": [(0, 0, 2, 2)] * 2, "eye": [(1, 1, 3, 3)] * 2},
                             ["1"])


def test_part_file_that_is_no_file(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "parts.json"
    folder.mkdir()
    rc, _, err = run_cli(capsys, "correspond", folder, "-o", tmp_path / "t.csv")
    assert rc == 2 and "is a folder" in one_line(err)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    rc, _, err = run_cli(capsys, "correspond", fifo, "-o", tmp_path / "t.csv")
    assert rc == 2 and "not a regular file" in one_line(err)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    rc, _, err = run_cli(capsys, "correspond", deep, "-o", tmp_path / "t.csv")
    assert rc == 2 and "nests" in one_line(err)
    newline = tmp_path / "a\nb.json"
    rc, _, err = run_cli(capsys, "correspond", newline, "-o", tmp_path / "t.csv")
    assert rc == 2 and "a\\nb.json" in one_line(err)  # the whole path, escaped, on one line
    shutil.rmtree(folder)
