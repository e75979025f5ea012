"""A ledger is an input too: zfvis deletes and replaces only what this run wrote, inside
its own folder, still as written; an odd ledger is refused before anything is written;
devices, FIFOs and sockets are never replaced. One test per case of issue 24, and a
property test over generated ledgers."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import zfvis
from zfvis.cli import main
from zfvis.io import ownership
from zfvis.io.atomic import atomic_write_bytes
from zfvis.mining import mine
from zfvis.models.zoo import Preprocess

REPO = Path(__file__).resolve().parents[1]
PRE = Preprocess(None, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
LEDGER = ".zfvis-written.json"


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3), nn.ReLU()).eval()


def make_data(root: Path, n: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    for i in range(n):
        arr = (torch.rand(12, 12, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"img{i}.png")
    return root


def run_mine(data: Path, out: Path, layers: list[str] | None = None, **kw: object) -> zfvis.mining.MiningResult:
    kw.setdefault("batch_size", 8)
    return mine(tiny_model(), PRE, data, layers or ["1"], out_dir=out, progress=False, top=2, **kw)


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file below ``folder`` (ledgers aside) -> its bytes (a link -> its target)."""
    out: dict[str, bytes | str] = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = Path(root) / name
            if name == LEDGER:
                continue
            out[str(p.relative_to(folder))] = os.readlink(p) if p.is_symlink() else p.read_bytes()
    return out


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def own_file(path: Path, data: bytes) -> Path:
    """A file written and recorded by zfvis outside any mining run (another command)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, own=True)
    assert ownership.is_ours(path)
    return path


def ledger_doc(folder: Path) -> dict:
    return json.loads((folder / LEDGER).read_text())


def add_entries(folder: Path, entries: dict[str, dict]) -> None:
    doc = ledger_doc(folder)
    doc["files"].update(entries)
    (folder / LEDGER).write_text(json.dumps(doc))


def entry_for(path: Path, run: object) -> dict:
    return {"sha256": ownership.digest_file(path), "size": path.stat().st_size, "run": run}


def run_id(out: Path) -> object:
    return json.loads((out / "settings.json").read_text())["zfvis"].get("run_id")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_data(tmp_path / "ds")


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fails a test that waits more than 30 s (on a FIFO), instead of hanging the suite."""

    def stop(signum: int, frame: object) -> None:
        raise TimeoutError("hung for 30 s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(30)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- deleting


def test_restart_never_follows_a_ledger_out_of_its_folder(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_mine(data, out)
    figs = tmp_path / "figs"
    cat = own_file(figs / "cat.png", b"a figure")
    before = (figs / LEDGER).read_bytes()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"mine")
    add_entries(out, {"../figs/cat.png": entry_for(cat, run_id(out)), str(outside): entry_for(outside, run_id(out))})
    run_mine(data, out, ["4"], restart=True)
    assert cat.read_bytes() == b"a figure" and outside.read_bytes() == b"mine"
    assert (figs / LEDGER).read_bytes() == before  # a ledger outside the run is not rewritten


def test_restart_keeps_other_runs_other_commands_and_the_data_set(data: Path, tmp_path: Path, monkeypatch) -> None:
    top = tmp_path / "top"
    shutil.copytree(data, top / "ds")
    run_mine(top / "ds", top / "other_run")
    own_file(top / "figs" / "f.png", b"figure")
    own_file(top / "ds" / "zz_projection.png", b"projection beside the data")
    keep = snapshot(top)
    run_mine(top / "ds", top, overwrite=True, limit=4)
    run_mine(top / "ds", top, ["4"], restart=True, limit=4)
    after = snapshot(top)
    for name, content in keep.items():
        assert after.get(name) == content, name
    assert "tiles/4/c0000.png" in after and "tiles/1/c0000.png" not in after  # the run's own files were replaced


def test_restart_and_overwrite_keep_another_command_s_output(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    run_mine(data, out)
    rc, err = run_cli(capsys, "project", "--top-channels", "1", "--layer", "conv1", "-o", out / "cat.png")
    assert rc == 0, err
    mine_cat = (out / "cat.png").read_bytes(), (out / "cat.json").read_bytes()
    run_mine(data, out, ["4"], restart=True)
    run_mine(data, out, ["1"], overwrite=True)
    assert ((out / "cat.png").read_bytes(), (out / "cat.json").read_bytes()) == mine_cat


def test_restart_keeps_copies_a_copied_ledger_claims(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_mine(data, out)
    figs = tmp_path / "figs"
    own_file(figs / "a.png", b"a")
    own_file(figs / "topk.json", b"{}")  # a name the run writes too
    ours = ledger_doc(out)["files"]
    shutil.copytree(figs, out, dirs_exist_ok=True)  # cp -r figs/. run/ (the ledger too)
    doc = ledger_doc(out)  # the copied ledger, with the run's own entries merged back in
    doc["files"] = {**ours, **doc["files"]}
    (out / LEDGER).write_text(json.dumps(doc))
    run_mine(data, out, ["4"], restart=True)
    assert (out / "a.png").read_bytes() == b"a" and (out / "topk.json").read_bytes() == b"{}"


def test_rerun_keeps_edited_pages_and_says_so(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    run_mine(data, out)
    index, channel = out / "index.html", out / "layers" / "1" / "c0000.html"
    index.write_text(index.read_text() + "<!-- my note -->")
    channel.write_text("my channel page")
    capsys.readouterr()
    run_mine(data, out)  # the same run, finished again
    assert index.read_text().endswith("<!-- my note -->") and channel.read_text() == "my channel page"
    err = capsys.readouterr().err
    assert "kept 2 file(s)" in err and "index.html" in err and "c0000.html" in err


def test_restart_keeps_an_edited_topk(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    run_mine(data, out)
    topk = out / "topk.json"
    topk.write_text(topk.read_text().replace('"top": 2', '"top": 2, "note": "mine"'))
    edited = topk.read_bytes()
    run_mine(data, out, ["4"], restart=True)
    assert topk.read_bytes() == edited
    assert "topk.json" in capsys.readouterr().err


def test_restart_reads_each_ledger_once(data: Path, tmp_path: Path) -> None:
    """600 entries of one layer: the restart is linear (a count of ledger reads, not a timing)."""
    out = tmp_path / "run"
    run_mine(data, out)
    many = out / "tiles" / "many"
    many.mkdir(parents=True)
    entries = {}
    for i in range(600):
        p = many / f"c{i:04d}.png"
        p.write_bytes(b"%d" % i)
        entries[p.name] = {"sha256": ownership.digest(b"%d" % i), "size": p.stat().st_size, "run": run_id(out)}
    (many / LEDGER).write_text(json.dumps({"version": 2, "files": entries}))
    opened: list[str] = []
    _AUDIT.append(opened)
    try:
        run_mine(data, out, ["4"], restart=True)
    finally:
        _AUDIT.remove(opened)
    assert not many.exists()  # every one of them was the run's, and deleted
    reads = [p for p in opened if p.endswith(LEDGER)]
    assert len(reads) < 40, len(reads)  # a few per folder, not one per entry


_AUDIT: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if _AUDIT and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _AUDIT[-1].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


# ----------------------------------------------------------------------------- odd ledgers


def _odd_ledgers(folder: Path) -> list[tuple[str, object]]:
    return [("truncated", lambda p: p.write_text('{"version": 1, "files": {"a.png": {"sha2')),
            ("a FIFO", lambda p: os.mkfifo(p)),
            ("a link to /dev/zero", lambda p: p.symlink_to("/dev/zero")),
            ("a folder", lambda p: p.mkdir()),
            ("too large", lambda p: p.write_bytes(b" " * (ownership.MAX_BYTES + 1)))]


@pytest.mark.parametrize("case", range(5), ids=["truncated", "fifo", "dev-zero", "folder", "large"])
def test_project_refuses_an_odd_ledger_before_writing(tmp_path: Path, capsys, case: int, no_hang: None) -> None:
    name, make = _odd_ledgers(tmp_path)[case]
    folder = tmp_path / "figs"
    folder.mkdir()
    make(folder / LEDGER)
    rc, err = run_cli(capsys, "project", "--top-channels", "1", "--layer", "conv1", "-o", folder / "p.png")
    assert rc == 2 and "ledger" in one_line(err) and "move it away" in err, (name, err)
    assert sorted(p.name for p in folder.iterdir()) == [LEDGER]


def test_mine_refuses_a_truncated_ledger_before_writing(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_mine(data, out, ["4"])
    ledger = out / LEDGER
    ledger.write_bytes(ledger.read_bytes()[:40])
    before = snapshot(out)
    with pytest.raises(ownership.LedgerError, match="damaged"):
        run_mine(data, out, ["1"], restart=True)
    assert snapshot(out) == before and ledger.read_bytes() and (out / "4.png").exists()


def test_mine_refuses_a_fifo_ledger_in_a_sub_folder(data: Path, tmp_path: Path, no_hang: None) -> None:
    out = tmp_path / "run"
    run_mine(data, out)
    ledger = out / "tiles" / "1" / LEDGER
    ledger.unlink()
    os.mkfifo(ledger)
    before = snapshot(out)
    with pytest.raises(zfvis.UserInputError, match="FIFO"):
        run_mine(data, out, ["4"], restart=True)
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- special files


def test_a_fifo_or_socket_is_never_replaced(tmp_path: Path, capsys, no_hang: None) -> None:
    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    rc, err = run_cli(capsys, "project", "--top-channels", "1", "--layer", "conv1", "-o", fifo, "--overwrite")
    assert rc == 2 and "FIFO" in one_line(err)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(zfvis.UserInputError, match="socket"):
            atomic_write_bytes(sock_path, b"png", own=True)
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)


def test_a_device_is_never_replaced(tmp_path: Path) -> None:
    dev = tmp_path / "null.png"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError) as err:
        pytest.skip(f"cannot make a device here ({err})")
    with pytest.raises(zfvis.UserInputError, match="character device"):
        zfvis.filters_figure(zfvis.load_model("zfnet-cifar10")[0], "conv1", path=dev)
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc on this system")
def test_an_unwritable_folder_names_the_output_not_a_temporary_file(capsys) -> None:
    rc, err = run_cli(capsys, "project", "--top-channels", "1", "--layer", "conv1", "-o", "/proc/x.png")
    assert rc == 2 and "/proc/x.png" in one_line(err) and ".tmp" not in err


# ----------------------------------------------------------------------------- the property


def _generated_case(rng: random.Random, root: Path) -> tuple[Path, str]:
    """An output folder with files, sub-folders, links in and out, and ledgers of random
    entries: good and wrong hashes, this run's id and others, names with ``..``, absolute
    paths, folders and links."""
    out, outside = root / "out", root / "outside"
    for d in (out / "sub", outside):
        d.mkdir(parents=True)
    for d, n in ((out, 5), (out / "sub", 3), (outside, 3)):
        for i in range(n):
            (d / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(0, 20)))
    (out / "link_out.bin").symlink_to(outside / "f0.bin")
    (out / "link_in.bin").symlink_to(out / "f1.bin")
    (out / "dir_out").symlink_to(outside)
    run = "r" * 32
    for folder in (out, out / "sub"):
        names = [p.name for p in folder.iterdir()] + ["../outside/f1.bin", str(outside / "f2.bin"), "sub/f0.bin",
                                                      "dir_out/f0.bin", "..", ".", "", "missing.bin"]
        entries = {}
        for name in rng.sample(names, rng.randint(0, len(names))):
            target = Path(name) if os.path.isabs(name) else folder / name
            try:
                sha, size = ownership.digest(Path(target).read_bytes()), Path(target).stat().st_size
            except OSError:
                sha, size = "0" * 64, 0
            if rng.random() < 0.2:
                sha = "f" * 64
            entries[name] = {"sha256": sha, "size": size, "run": rng.choice([run, run, "other", None])}
        (folder / LEDGER).write_text(json.dumps({"version": 2, "files": entries}))
    return out, run


def test_generated_ledgers_never_reach_past_this_run(tmp_path: Path) -> None:
    rng = random.Random(24)
    for case in range(30):
        root = tmp_path / f"c{case}"
        out, run = _generated_case(rng, root)
        outside_before = snapshot(root / "outside")
        before = snapshot(out)
        ledgers = {f: ownership.ledger(f) for f in (out, out / "sub")}
        ownership.discard(out, run)
        assert snapshot(root / "outside") == outside_before
        after = snapshot(out)
        for rel, content in before.items():
            if rel in after:
                assert after[rel] == content, rel  # nothing is changed
                continue
            p = out / rel  # deleted: a plain file of this run, listed in its own folder, as written
            entry = ledgers[p.parent][p.name]
            assert entry.run == run and not isinstance(content, str) and ownership.digest(content) == entry.sha256
            assert p.parent in (out, out / "sub") and not os.path.islink(p)
        shutil.rmtree(root)


def test_writes_within_a_run_never_replace_what_it_did_not_write(tmp_path: Path) -> None:
    """The recording of a run replaces only its own files, as written; it keeps the rest."""
    from zfvis.io.atomic import recording

    rng = random.Random(7)
    for case in range(20):
        root = tmp_path / f"c{case}"
        out, run = _generated_case(rng, root)
        before, outside_before = snapshot(out), snapshot(root / "outside")
        ledger = ownership.ledger(out)
        names = [p.name for p in out.iterdir() if p.name != LEDGER and not p.is_dir()]
        with recording(run) as kept:
            for name in names:
                atomic_write_bytes(out / name, b"new", sync=False)
        assert snapshot(root / "outside") == outside_before
        for name in names:
            p = out / name
            if name in [k.name for k in kept]:
                assert snapshot(out)[name] == before[name]
            else:  # replaced: it was this run's own plain file, as written
                entry = ledger[name]
                assert entry.run == run and not isinstance(before[name], str)
                assert ownership.digest(before[name]) == entry.sha256 and p.read_bytes() == b"new"
        shutil.rmtree(root)


@pytest.mark.parametrize("replacements", [1, 2, 3])
def test_a_ledger_another_process_replaces_while_it_is_read_is_read_again(tmp_path: Path, monkeypatch,
                                                                         replacements: int) -> None:
    """Another zfvis process (a mining rank) writes a new ledger and renames it over the old one
    between this one's look and its open: the new one is read (it was "changed while it was
    read", and the rank stopped); replaced at every one of three tries, it is refused."""
    kept = tmp_path / "a.bin"
    kept.write_bytes(b"x")
    ownership.record([(kept, None)], "run-a")
    real_open = os.open
    left = [replacements]

    def racing_open(path, flags, *args, **kwargs):
        if Path(path).name == ownership.LEDGER and left[0]:
            left[0] -= 1
            (tmp_path / "b.bin").write_bytes(b"y")
            ownership._CACHE.clear()
            with monkeypatch.context() as m:
                m.setattr(os, "open", real_open)
                ownership.record([(tmp_path / "b.bin", None)], "run-b")  # a new ledger, renamed over the old
        return real_open(path, flags, *args, **kwargs)

    ownership._CACHE.clear()
    monkeypatch.setattr(os, "open", racing_open)
    if replacements < 3:
        files = ownership.ledger(tmp_path)
        assert set(files) == {"a.bin", "b.bin"}
    else:
        with pytest.raises(ownership.LedgerError, match="changed while it was read"):
            ownership.ledger(tmp_path)
