"""Nothing a person does breaks zfvis or loses their work (issue 8).

Every case of the issue, run in-process through ``zfvis.cli.main`` where it is a command
line: the exit status and the one line on stderr are checked, and where files are at
stake they are compared before and after.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import zfvis
from zfvis.cli import main
from zfvis.io.atomic import FolderLock
from zfvis.io.checks import check_channels, parse_channel_spec
from zfvis.io.errors import UserInputError
from zfvis.io.images import evenly_spaced
from zfvis.mining import mine, pass1, pass2
from zfvis.mining.settings import MineSettings
from zfvis.models.zoo import Preprocess

REPO = Path(__file__).resolve().parents[1]
PRE = Preprocess(None, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.ReLU()).eval()


def make_images(root: Path, n: int = 12, side: int = 16, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{i:02d}.png")
    return root


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", 12, 32)


MINE = ["mine", "--weights", "random", "--layers", "conv1", "--channels", "0-3", "--no-progress"]


# --------------------------------------------------------------------------- sizes and ranges, before allocation


@pytest.mark.parametrize("argv", [
    ["project", "--input-size", "100000"],
    ["layers", "--input-size", "100000"],
    ["evolution", "CKPT", "--layer", "conv1", "--input-size", "100000"],
    ["mine", "DATA", "--layers", "conv1", "--input-size", "100000", "-o", "OUT"],
])
def test_huge_input_size_refused_at_once(argv: list[str], tmp_path: Path, data: Path, capsys) -> None:
    ckpt = tmp_path / "m.pt"
    torch.save(zfvis.load_model("zfnet-cifar10", weights="random")[0].state_dict(), ckpt)
    argv = [{"CKPT": ckpt, "DATA": data, "OUT": tmp_path / "out"}.get(a, a) for a in argv]
    t0 = time.perf_counter()
    rc, err = run_cli(capsys, *argv, *(["-o", tmp_path / "x.png"] if argv[0] in ("project", "evolution") else []))
    assert rc == 2 and "at most 4096" in one_line(err)
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["mine", "evolution"])
def test_huge_channel_range_refused_without_building_it(command: str, tmp_path: Path, data: Path, capsys) -> None:
    spec = "0-99999999999999"
    if command == "mine":
        argv = [*MINE[:5], data, "--channels", spec, "-o", tmp_path / "out"]
    else:
        ckpt = tmp_path / "m.pt"
        torch.save(zfvis.load_model("zfnet-cifar10", weights="random")[0].state_dict(), ckpt)
        argv = ["evolution", ckpt, "--layer", "conv1", "--channels", spec, "-o", tmp_path / "e.png"]
    rc, err = run_cli(capsys, *argv)
    assert rc == 2 and "99999999999999" in one_line(err)
    with pytest.raises(UserInputError, match="has 32 channels"):  # checked arithmetically, not by a range()
        check_channels([(0, 10**15 - 1)], 32, "conv1")
    assert parse_channel_spec("0-3,7") == [(0, 3), (7, 7)]


def test_out_of_memory_is_one_line_naming_what_to_lower(data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: not enough memory: you tried "
                           "to allocate 98304000000 bytes.")

    monkeypatch.setattr(pass1, "_update", oom)
    rc, err = run_cli(capsys, *MINE, data, "-o", tmp_path / "out")
    line = one_line(err)
    assert rc == 2 and "out of memory" in line and "--batch-size" in line
    assert not (tmp_path / "out").exists()  # failed before any result: no half-made folder

    def gpu_oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(zfvis.core.deconvnet.Deconvnet, "reverse", gpu_oom)
    rc, err = run_cli(capsys, "project", "--layer", "conv1", "-o", tmp_path / "p.png")
    assert rc == 2 and "--input-size" in one_line(err)


# --------------------------------------------------------------------------- images


def test_decompression_bomb_refused_in_project_and_skipped_in_mine(data: Path, tmp_path: Path, capsys,
                                                                   monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # data: 32x32 = 1024 px; the bombs: 40x40, 60x60
    Image.new("RGB", (40, 40)).save(data / "warn_bomb.png")  # over the limit: Pillow warns
    Image.new("RGB", (60, 60)).save(data / "zz_bomb.png")  # over twice the limit: Pillow raises
    for bomb in ("warn_bomb.png", "zz_bomb.png"):
        rc, err = run_cli(capsys, "project", data / bomb, "-o", tmp_path / "p.png")
        assert rc == 2 and bomb in one_line(err) and "1,500" in err
    rc, err = run_cli(capsys, *MINE, data, "-o", tmp_path / "out")
    assert rc == 0, err
    topk = json.loads((tmp_path / "out" / "topk.json").read_text())
    assert {s["image"] for s in topk["skipped"]} == {"warn_bomb.png", "zz_bomb.png"}
    assert topk["images"] == 12


def test_mine_on_one_image_is_refused_clearly(data: Path, tmp_path: Path, capsys) -> None:
    rc, err = run_cli(capsys, *MINE, data / "00.png", "-o", tmp_path / "out")
    assert rc == 2 and "is an image, not a data set" in one_line(err)
    binary = tmp_path / "list.txt"
    binary.write_bytes(b"\x89\xff\x00garbage")
    rc, err = run_cli(capsys, *MINE, binary, "-o", tmp_path / "out")
    assert rc == 2 and "not UTF-8" in one_line(err)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe[mine]\n", "not UTF-8 text"),
    (b'[mien]\nlayers = "conv1"\n', "unknown table [mien]. Did you mean [mine]?"),
    (b'[mine]\nrestart = "false"\n', "restart must be true or false"),
    (b'[mine]\ntop = "9"\n', "top must be a whole number"),
    (b'[mine]\nlayres = "conv1"\n', "did you mean 'layers'?"),
    (b'[mine]\nlayers = "conv1"\n[mine.extra]\nx = 1\n', "[mine.extra] is a table"),
    (b'[mine]\nmodel = ["vgg16"]\n', "model takes one value"),
])
def test_config_values_checked_against_their_options(content: bytes, message: str, tmp_path: Path, data: Path,
                                                     capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(content)
    rc, err = run_cli(capsys, "mine", data, "--config", cfg, "-o", tmp_path / "out")
    line = one_line(err)
    assert rc == 2 and message in line and str(cfg) in line
    assert not (tmp_path / "out").exists()


def test_config_int_for_a_list_option_and_command_line_wins(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[project]\nlayer = "conv2"\nchannel = 3\n')
    out = tmp_path / "p.png"
    rc, err = run_cli(capsys, "project", "--config", cfg, "-o", out)
    assert rc == 0, err
    assert json.loads(out.with_suffix(".json").read_text())["channels"] == [3]
    rc, err = run_cli(capsys, "project", "--config", cfg, "--channel", "5", "-o", out)
    assert rc == 0 and json.loads(out.with_suffix(".json").read_text())["channels"] == [5]
    rc, err = run_cli(capsys, "project", "--config", cfg, "--top-channels", "2", "-o", out)  # exclusive with channel
    assert rc == 0 and len(json.loads(out.with_suffix(".json").read_text())["channels"]) == 2


def test_config_supplies_positionals_and_required_options(tmp_path: Path, capsys) -> None:
    cks = []
    for seed in range(2):
        cks.append(tmp_path / f"e{seed}.pt")
        torch.save(zfvis.load_model("zfnet-cifar10", weights="random", seed=seed)[0].state_dict(), cks[-1])
    cfg = tmp_path / "evo.toml"
    cfg.write_text(f'[evolution]\nlayer = "conv1"\nchannels = [0, "2-3"]\nlimit = 20\ncheckpoints = ["{cks[0]}", "{cks[1]}"]\n')
    out = tmp_path / "evo.png"
    rc, err = run_cli(capsys, "evolution", "--config", cfg, "-o", out)
    assert rc == 0, err
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["checkpoints"] == [str(c) for c in cks] and settings["channels"] == [0, 2, 3]
    rc, err = run_cli(capsys, "evolution", cks[1], "--config", cfg, "-o", out)  # the command line wins
    assert rc == 0 and json.loads(out.with_suffix(".json").read_text())["checkpoints"] == [str(cks[1])]


# --------------------------------------------------------------------------- checkpoints


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.pt"
    text.write_text("epoch 1: loss 2.3\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    folder = tmp_path / "run.pt"
    folder.mkdir()
    torch.save({"w": torch.zeros(1)}, folder / "epoch_001.pt")
    return {"a text file": text, "is empty": empty, "is a folder": folder}


@pytest.mark.parametrize("what", ["a text file", "is empty", "is a folder"])
def test_bad_checkpoint_files_say_what_they_are(what: str, tmp_path: Path, capsys) -> None:
    path = _bad_checkpoints(tmp_path)[what]
    for argv in (["project", "--weights", path, "-o", tmp_path / "p.png"],
                 ["evolution", path, "--layer", "conv1", "-o", tmp_path / "e.png"]):
        rc, err = run_cli(capsys, *argv)
        line = one_line(err)
        assert rc == 2 and what in line and "torch.save" in line, line
    if what == "is a folder":
        assert "epoch_001.pt" in line


class _Custom:
    pass


def test_refused_pickle_does_not_suggest_unsafe_loading(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"model": _Custom()}, path)
    rc, err = run_cli(capsys, "project", "--weights", path, "-o", tmp_path / "p.png")
    line = one_line(err)
    assert rc == 2 and "refused" in line and "_Custom" in line
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line


# --------------------------------------------------------------------------- commands that did the wrong thing


def test_filters_refuses_a_layer_that_is_not_a_convolution(tmp_path: Path, capsys) -> None:
    for layer in ("fc8", "pool2"):
        rc, err = run_cli(capsys, "filters", "--layer", layer, "-o", tmp_path / "f.png")
        assert rc == 2 and "not a convolution" in one_line(err) and "conv5" in err
    assert not (tmp_path / "f.png").exists()
    rc, err = run_cli(capsys, "filters", "--layer", "conv3", "-o", tmp_path / "f.png")
    assert rc == 0 and json.loads((tmp_path / "f.json").read_text())["module"] == "features.10"


def test_layers_input_size_zero_refused(capsys) -> None:
    rc, err = run_cli(capsys, "layers", "--input-size", "0")
    assert rc == 2 and "--input-size" in one_line(err)


# --------------------------------------------------------------------------- lost work


def test_mine_never_touches_a_persons_folder(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.html").write_text("<p>my own page</p>")
    (out / "settings.json").write_text('{"mine": true}')
    before = snapshot(out)
    rc, err = run_cli(capsys, *MINE, data, "-o", out)
    assert rc == 2 and "--overwrite" in one_line(err)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["index.html", "settings.json"]
    (out / "notes.txt").write_text("keep me")
    rc, err = run_cli(capsys, *MINE, data, "--overwrite", "-o", out)
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "keep me" and (out / "topk.json").is_file()


def test_mine_refuses_a_run_with_other_settings_before_writing(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert run_cli(capsys, *MINE, data, "-o", out)[0] == 0
    before = snapshot(out)
    rc, err = run_cli(capsys, *MINE, data, "--top", "3", "-o", out)
    line = one_line(err)
    assert rc == 2 and "other settings (different: top)" in line and "--restart" in line and "restart=True" not in line
    assert snapshot(out) == before  # settings.json included
    rc, err = run_cli(capsys, *MINE, data, "-o", out)  # the same settings: accepted (pass 1 is done)
    assert rc == 0
    rc, err = run_cli(capsys, *MINE[:5], data, "--layers", "conv2", "--channels", "0-1", "--restart", "-o", out)
    assert rc == 0, err
    assert not (out / "conv1.png").exists() and not (out / "tiles" / "conv1").exists()  # the old run's outputs went


def test_failed_start_leaves_no_folder(data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "new" / "deeper"
    rc, err = run_cli(capsys, *MINE[:5], data, "--layers", "conv9", "-o", out)
    assert rc == 2 and not (tmp_path / "new").exists()

    def broken(*args, **kwargs):
        raise UserInputError("images of different sizes in one batch")

    monkeypatch.setattr(pass1, "_update", broken)  # fails in pass 1, before any state is saved
    rc, err = run_cli(capsys, *MINE, data, "-o", out)
    assert rc == 2 and not (tmp_path / "new").exists()


def test_two_runs_cannot_write_one_folder(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    with FolderLock(out):  # as another process holding it does
        rc, err = run_cli(capsys, *MINE, data, "-o", out)
        assert rc == 2 and f"pid {os.getpid()}" in one_line(err) and "another zfvis run" in err
        assert sorted(p.name for p in out.iterdir()) == [FolderLock.NAME]
    assert not list(out.iterdir())  # the lock goes with its holder
    assert run_cli(capsys, *MINE, data, "-o", out)[0] == 0
    assert not (out / FolderLock.NAME).exists()


def test_single_file_outputs_never_replace_a_persons_files(tmp_path: Path, capsys) -> None:
    mine_png = tmp_path / "figure.png"
    Image.new("RGB", (8, 8)).save(mine_png)
    before = mine_png.read_bytes()
    rc, err = run_cli(capsys, "project", "--layer", "conv1", "--top-channels", "1", "-o", mine_png)
    assert rc == 2 and "--overwrite" in one_line(err) and mine_png.read_bytes() == before
    own_json = tmp_path / "result.json"
    own_json.write_text('{"accuracy": 0.9}')
    rc, err = run_cli(capsys, "filters", "-o", tmp_path / "result.png")
    assert rc == 2 and "result.json" in one_line(err) and own_json.read_text() == '{"accuracy": 0.9}'
    out = tmp_path / "ours.png"
    for _ in range(2):  # zfvis replaces its own output
        assert run_cli(capsys, "project", "--layer", "conv1", "--top-channels", "1", "-o", out)[0] == 0
    assert run_cli(capsys, "project", "--layer", "conv1", "--top-channels", "1", "--overwrite", "-o", mine_png)[0] == 0
    rc, err = run_cli(capsys, "project", out, "--overwrite", "-o", out)
    assert rc == 2 and "input" in one_line(err) and "image" in one_line(err)


# --------------------------------------------------------------------------- failing early, the caller's model


def test_pipeline_probed_before_pass_1(data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    batches = []
    monkeypatch.setattr(pass1, "_update", lambda *a, **k: batches.append(1))

    def cannot(*args, **kwargs):
        raise zfvis.UnsupportedModelError("module 'features.3' (Foo) cannot be reversed")

    monkeypatch.setattr(zfvis.core.deconvnet.Deconvnet, "reverse", cannot)
    rc, err = run_cli(capsys, *MINE, data, "-o", tmp_path / "out")
    assert rc == 2 and "cannot be reversed" in one_line(err)
    assert batches == [] and not (tmp_path / "out").exists()


def test_mine_leaves_the_callers_model_as_given(tmp_path: Path) -> None:
    make_images(tmp_path / "d", 6)
    model = tiny_model().double().train()
    model[2].eval()
    flags = [m.training for m in model.modules()]
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    res = mine(model, PRE, tmp_path / "d", ["1", "4"], out_dir=tmp_path / "out", batch_size=4, progress=False,
               figures=False)
    assert res.images == 6
    assert [m.training for m in model.modules()] == flags
    for n, p in model.named_parameters():
        assert p is params[n][0] and p.dtype == torch.float64 and torch.equal(p, params[n][1])
    if torch.cuda.is_available():
        mine(model, PRE, tmp_path / "d", ["1"], out_dir=tmp_path / "gpu", device="cuda", progress=False, figures=False)
        assert all(p.device.type == "cpu" for p in model.parameters())


# --------------------------------------------------------------------------- the error boundary


def test_internal_errors_ask_for_a_report_and_debug_shows_the_traceback(tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:
    import zfvis.viz.projection as projection  # zfvis project imports it when it runs

    for bug in (TypeError("unsupported operand"), KeyError("lost"), ValueError("bad state"), RuntimeError("oops")):
        def broken(*args, bug=bug, **kwargs):
            raise bug

        monkeypatch.setattr(projection, "projection_figure", broken)
        rc, err = run_cli(capsys, "project", "--layer", "conv1", "-o", tmp_path / "p.png")
        line = one_line(err)
        assert rc == 1 and line.startswith(f"zfvis: internal error: {type(bug).__name__}") and "report" in line
        assert "--debug" in line
    for argv in (["--debug", "project"], ["project", "--debug"]):
        rc, err = run_cli(capsys, *argv, "--layer", "conv1", "-o", tmp_path / "p.png")
        assert rc == 1 and "Traceback" in err and "RuntimeError: oops" in err


def test_usage_errors_and_warnings_leave_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    rc, err = run_cli(capsys, "project", "--top-k", "x")
    assert rc == 2 and one_line(err).startswith("zfvis project: error: argument --top-k: invalid int value")
    import zfvis.io.images as images  # zfvis project imports it when it runs

    def noisy(path):
        warnings.warn("a torch warning", UserWarning, stacklevel=2)
        raise UserInputError(f"cannot decode image '{path}'")

    monkeypatch.setattr(images, "load_image", noisy)
    rc, err = run_cli(capsys, "project", "-o", tmp_path / "p.png")
    assert rc == 2 and one_line(err).startswith("zfvis: error: cannot decode")


# --------------------------------------------------------------------------- Ctrl-C and resuming


def test_ctrl_c_says_how_to_resume_and_the_rerun_says_where(data: Path, tmp_path: Path, capsys,
                                                            monkeypatch) -> None:
    out = tmp_path / "out"
    argv = [*MINE[:-1], data, "--batch-size", "4", "-o", out]
    real = pass1._update
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pass1, "_update", interrupted)
    rc, err = run_cli(capsys, *argv)
    last = err.strip().splitlines()[-1]
    assert rc == 130 and "run the same command again to resume" in last and "4 of 12 images" in last
    monkeypatch.setattr(pass1, "_update", real)
    rc, err = run_cli(capsys, *argv)
    assert rc == 0 and "resuming pass 1 from" in err and "4 of 12 images already done" in err


def test_state_saved_by_time_as_well_as_by_batches(tmp_path: Path, monkeypatch) -> None:
    make_images(tmp_path / "d", 12)
    saves: list[int] = []
    real = pass1.atomic_torch_save
    monkeypatch.setattr(pass1, "atomic_torch_save", lambda obj, path: (saves.append(obj["batches"]), real(obj, path)))
    settings = dict(out_dir=tmp_path / "a", batch_size=2, state_every=1000, progress=False, figures=False)
    mine(tiny_model(), PRE, tmp_path / "d", ["1"], state_seconds=1e-9, **settings)
    assert saves[:6] == [1, 2, 3, 4, 5, 6]  # every batch: the time limit passed each time
    saves.clear()
    mine(tiny_model(), PRE, tmp_path / "d", ["1"], state_seconds=3600, **{**settings, "out_dir": tmp_path / "b"})
    assert saves == [6, 6]  # the end of pass 1 and the final state only
    assert MineSettings(layers=["1"], out_dir="x").state_seconds == 60  # at most a minute redone by default


# --------------------------------------------------------------------------- one place for each


def test_evenly_spaced_subsampling_covers_the_end(tmp_path: Path) -> None:
    idx = evenly_spaced(10_000, 3_000)
    assert len(idx) == 3_000 and idx[0] == 0 and idx[-1] >= 9_000  # CIFAR-10 test: the trucks are 9000..9999
    for c in "abcdefghij":
        make_images(tmp_path / "cls" / c, 10, 8)
    classes = {p.parent.name for p in zfvis.sample_images(tmp_path / "cls", 30)}
    assert classes == set("abcdefghij")


# --------------------------------------------------------------------------- distributed


_FAILING_WORKER = textwrap.dedent(
    """
    import os, sys, time, torch
    from torch import nn
    from zfvis.io.errors import RankFailedError
    from zfvis.mining import mine
    from zfvis.models.zoo import Preprocess
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.ReLU())
    rank, calls = int(os.environ["RANK"]), [0]
    class Failing(Preprocess):
        def __call__(self, img):
            calls[0] += 1
            if rank == 1 and calls[0] > 4:
                print("FAILED", time.time(), flush=True)
                raise RuntimeError("simulated failure on rank 1")
            if rank == 0:
                time.sleep(0.05)
            return super().__call__(img)
    pre = Failing(None, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    try:
        mine(m.eval(), pre, sys.argv[1], ["1", "4"], out_dir=sys.argv[2], batch_size=2, progress=False)
    except RankFailedError as err:
        print("STOPPED", time.time(), err, flush=True)
        sys.exit(3)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_one_failed_rank_stops_every_rank_within_seconds(tmp_path: Path) -> None:
    make_images(tmp_path / "d", 24)
    script = tmp_path / "worker.py"
    script.write_text(_FAILING_WORKER)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "d"), str(tmp_path / "out")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]  # gloo's own timeout would be 30 minutes
    assert procs[1].returncode != 0 and "simulated failure on rank 1" in logs[1], logs[1]
    assert procs[0].returncode == 3, logs[0]
    stopped = next(line for line in logs[0].splitlines() if line.startswith("STOPPED"))
    failed = next(line for line in logs[1].splitlines() if line.startswith("FAILED"))
    assert "rank 1 of 2 failed: RuntimeError: simulated failure on rank 1" in stopped
    assert float(stopped.split()[1]) - float(failed.split()[1]) < 15


# --------------------------------------------------------------------------- found by the second battery


CANNOT_ALLOCATE = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                   "tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")


def _broken_batch_norm(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    """A failure inside the forward pass of the zoo model (its batch norms)."""

    def forward(self, x):  # noqa: ANN001, ANN202
        raise err

    monkeypatch.setattr(nn.BatchNorm2d, "forward", forward)


@pytest.mark.parametrize("command", ["project", "mine"])
def test_out_of_memory_inside_the_forward_pass_says_so(command: str, data: Path, tmp_path: Path, capsys,
                                                       monkeypatch) -> None:
    # the engine passes a failing forward pass on as "another input size?"; running out of memory is not that
    _broken_batch_norm(monkeypatch, RuntimeError(CANNOT_ALLOCATE))
    argv = [*MINE, data, "-o", tmp_path / "out"] if command == "mine" else ["project", "-o", tmp_path / "p.png"]
    rc, err = run_cli(capsys, *argv)
    line = one_line(err)
    assert rc == 2 and line.startswith("zfvis: error: out of memory") and "lower --" in line
    assert "input size or channel count" not in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["project", "mine"])
def test_a_failing_forward_pass_of_a_zoo_model_is_our_bug(command: str, data: Path, tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    _broken_batch_norm(monkeypatch, RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"))
    argv = [*MINE, data, "-o", tmp_path / "out"] if command == "mine" else ["project", "-o", tmp_path / "p.png"]
    rc, err = run_cli(capsys, *argv)
    line = one_line(err)
    assert rc == 1 and line.startswith("zfvis: internal error: the forward pass failed") and "report" in line
    rc, err = run_cli(capsys, "--debug", *argv)
    assert rc == 1 and "Traceback" in err and "must match the size" in err


def test_bugs_behind_user_looking_errors_are_reported_as_bugs(data: Path, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise TypeError("resolve() got an unexpected keyword")

    monkeypatch.setattr(zfvis.core.deconvnet.Deconvnet, "resolve", broken)  # was turned into a one-line user error
    rc, err = run_cli(capsys, "filters", "-o", tmp_path / "f.png")
    assert rc == 1 and one_line(err).startswith("zfvis: internal error: TypeError")
    monkeypatch.undo()

    def bad_preprocess(self, image):  # noqa: ANN001, ANN202
        raise ValueError("a bug in the preprocessing")

    monkeypatch.setattr(zfvis.models.zoo.Preprocess, "__call__", bad_preprocess)  # was "no readable image"
    rc, err = run_cli(capsys, *MINE, data, "-o", tmp_path / "out")
    line = one_line(err)
    assert rc == 1 and "internal error: ValueError: a bug in the preprocessing" in line and "readable" not in line


def test_os_errors_name_the_fix(tmp_path: Path, capsys, monkeypatch) -> None:
    import zfvis.cli.project as project_cli

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "p.json"))

    monkeypatch.setattr(project_cli, "write_settings", full)
    rc, err = run_cli(capsys, "project", "--layer", "conv1", "--top-channels", "1", "-o", tmp_path / "p.png")
    assert rc == 2 and "No space left on device" in one_line(err) and "free some space" in err


def test_input_size_checked_on_shapes_alone(tmp_path: Path, capsys, monkeypatch) -> None:
    t0 = time.perf_counter()  # a real 4096x4096 forward pass of zfnet-cifar10 takes a minute and gigabytes
    rc, err = run_cli(capsys, "project", "--layer", "fc8", "--input-size", "4096", "-o", tmp_path / "p.png")
    assert rc == 2 and "does not fit zfnet-cifar10 up to layer fc8" in one_line(err)
    rc, err = run_cli(capsys, "layers", "--input-size", "4096")  # every layer but the classifier fits
    assert rc == 2 and "does not fit" in one_line(err)
    assert time.perf_counter() - t0 < 10
    monkeypatch.setattr(zfvis.io.checks, "free_memory", lambda device: 2**20)  # 1 MiB free
    rc, err = run_cli(capsys, "project", "--layer", "conv2", "--input-size", "512", "-o", tmp_path / "p.png")
    line = one_line(err)
    assert rc == 2 and "needs about" in line and "GiB free" in line and "lower --input-size" in line
    assert not (tmp_path / "p.png").exists()
    rc, err = run_cli(capsys, "layers", "--input-size", "32")  # shapes only: no memory needed, none checked
    assert rc == 0, err
    data = make_images(tmp_path / "d", 4, 32)
    rc, err = run_cli(capsys, *MINE, data, "--batch-size", "4096", "-o", tmp_path / "out")
    assert rc == 2 and "a batch of 4096 images" in one_line(err) and "lower --batch-size" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["project", "--layer", "", "-o", "P"], "layer '' is not a layer"),  # was: silently the default layer
    (["project", "--device", "mps", "-o", "P"], "MPS"),  # was: an internal error
    (["project", "--device", "cuda:0", "-o", "P"], "CUDA"),
    (["project", "--model", "alexnet", "--weights", "IMAGENET", "-o", "P"], "Valid: random, DEFAULT, IMAGENET1K_V1,"),
    # the analysis commands: sizes and numbers checked before any work
    (["invariance", "--transform", "rotation", "--rotations", "0:1e12:1", "-o", "P"], "1,000,000,000,001 values"),
    (["invariance", "--transform", "rotation", "--rotations", "0:inf:1", "-o", "P"], "must be a finite number"),
    (["invariance", "--transform", "rotation", "--rotations", "nan", "-o", "P"], "must be a finite number"),
    (["invariance", "--transform", "rotation", "--rotations", "0:90:0", "-o", "P"], "the step must be non-zero"),
    (["invariance", "--transform", "scale", "--scales", "1:2", "-o", "P"], "must be START:STOP:STEP"),
    (["correspond", "--seed", "1" + "0" * 30, "-o", "P.csv"], "--seed must be between 0 and"),
    (["occlude", "--fill", "nan", "-o", "P"], "--fill must be a finite number"),
    (["occlude", "--layer", "", "-o", "P"], "layer '' is not a layer"),  # was: silently the default layer
])
def test_more_bad_options(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    if "mps" in argv and torch.backends.mps.is_available() or "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("the device exists here")
    rc, err = run_cli(capsys, *[{"P": tmp_path / "p.png", "P.csv": tmp_path / "p.csv"}.get(a, a) for a in argv])
    line = one_line(err)
    assert rc == 2 and message in line and line.count("DEFAULT") <= 1


@pytest.mark.parametrize("content, message", [
    (b'[mine]\nbatch_size = 2\nbatch-size = 3\n', "'batch_size' and 'batch-size' set the same option"),
    (b'[project]\nlayerz = "conv1"\n[mine]\ntop = 2\n', "unknown setting 'layerz' for `zfvis project`"),
    (b'[project]\ntop-k = "2"\n', "top-k must be a whole number"),
    (b'[mine]\ntop = 100000\n', "--top must be between 1 and 1000, got 100000 (set by 'top' in config file"),
])
def test_config_files_checked_whole(content: bytes, message: str, tmp_path: Path, data: Path, capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(content)
    rc, err = run_cli(capsys, *MINE, data, "--config", cfg, "-o", tmp_path / "out")
    assert rc == 2 and message in one_line(err)
    assert not (tmp_path / "out").exists()


def test_config_given_twice_is_refused(tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[project]\nlayer = "conv1"\n')
    b.write_text('[project]\nlayer = "conv2"\n')
    rc, err = run_cli(capsys, "project", "--config", a, f"--config={b}", "-o", tmp_path / "p.png")
    assert rc == 2 and "--config is given 2 times" in one_line(err)


# --------------------------------------------------------------------------- outputs never replace inputs


def test_outputs_never_replace_what_the_command_reads(tmp_path: Path, data: Path, capsys) -> None:
    ckpt = tmp_path / "epoch_1.pt"
    torch.save(zfvis.load_model("zfnet-cifar10", weights="random")[0].state_dict(), ckpt)
    listed = tmp_path / "list.txt"
    listed.write_text("data/00.png\ndata/01.png\n")
    cfg = tmp_path / "evo.toml"
    cfg.write_text('[evolution]\nlayer = "conv1"\nchannels = "0-1"\n')
    before = snapshot(tmp_path)
    evo = ["evolution", ckpt, "--config", cfg, "--overwrite"]
    for argv, what in [
        ([*evo, "-o", ckpt], "the input file"),  # was: the checkpoint replaced by the figure
        ([*evo, "--dataset", listed, "-o", data / "00.png"], "the image"),  # an image of the list
        ([*evo, "--dataset", data, "-o", data / "new.png"], "inside the data set"),  # would join the data set
        ([*evo, "-o", tmp_path / "evo.toml"], "config file"),
        (["project", "--weights", ckpt, "--overwrite", "-o", tmp_path / "epoch_1.png"], None),  # no clash: runs
    ]:
        rc, err = run_cli(capsys, *argv)
        if what is None:
            assert rc == 0, err
            continue
        assert rc == 2 and what in one_line(err) and "choose another -o" in err, err
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before


def test_correspond_part_file_is_not_replaced_by_its_results(tmp_path: Path, capsys) -> None:
    parts = tmp_path / "parts.json"
    parts.write_text(zfvis.default_parts_file().read_text())
    before = parts.read_bytes()
    rc, err = run_cli(capsys, "correspond", parts, "--overwrite", "-o", tmp_path / "parts.csv")
    assert rc == 2 and "parts.json" in one_line(err) and "settings" in err
    assert parts.read_bytes() == before


def test_companion_outputs_are_checked_like_the_output(tmp_path: Path) -> None:
    from zfvis.cli._common import CLIError
    from zfvis.cli.outputs import check_output

    figure = tmp_path / "table.png"
    figure.write_bytes(b"my own figure")
    with pytest.raises(CLIError, match="table.png.*where the png of 'table.csv' go"):
        check_output(tmp_path / "table.csv", overwrite=False, also=(".png",))
    assert check_output(tmp_path / "table.csv", overwrite=True, also=(".png",)) == tmp_path / "table.csv"
    assert check_output(tmp_path / "table.csv", overwrite=False) == tmp_path / "table.csv"  # no companion asked


@pytest.mark.parametrize("where", ["the", "inside the"])
def test_mine_never_writes_into_its_data_set(where: str, data: Path, capsys) -> None:
    before = snapshot(data)
    out = data if where == "the" else data / "mined"
    rc, err = run_cli(capsys, *MINE, data, "--overwrite", "-o", out)
    assert rc == 2 and f"is {where} data set" in one_line(err)
    assert snapshot(data) == before and not (data / "mined").exists()


# --------------------------------------------------------------------------- pass 2 resumes


PAGED = ["mine", "--weights", "random", "--layers", "conv3", "--channels", "0-65", "--top", "2", "--no-progress"]


def _topk_without_timings(out: Path) -> dict:
    topk = json.loads((out / "topk.json").read_text())
    topk.pop("timings")
    return topk


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_pass_2_interrupted_resumes_at_its_page(how: str, tmp_path: Path, capsys, monkeypatch) -> None:
    import signal

    data = make_images(tmp_path / "d", 6, 32)
    assert run_cli(capsys, *PAGED, data, "-o", tmp_path / "whole")[0] == 0
    real, drawn = pass2._draw, []

    def interrupted(run, page, *args):  # noqa: ANN001, ANN202
        if page.number == 1:  # the second of conv3's two pages (64 + 2 channels)
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        drawn.append(page.number)
        return real(run, page, *args)

    monkeypatch.setattr(pass2, "_draw", interrupted)
    out = tmp_path / "out"
    rc, err = run_cli(capsys, *PAGED[:-1], data, "-o", out)
    last = err.strip().splitlines()[-1]
    assert rc == 130 and "pass 2 stopped at figure page 2 of 2" in last and "run the same command again" in last
    assert drawn == [0] and (out / "conv3_p1.png").is_file() and not (out / "topk.json").exists()
    monkeypatch.setattr(pass2, "_draw", lambda run, page, *a: (drawn.append(page.number), real(run, page, *a))[1])
    rc, err = run_cli(capsys, *PAGED[:-1], data, "-o", out)
    assert rc == 0 and "resuming pass 2" in err and "1 of 2 figure pages already done" in err
    assert drawn == [0, 1]  # the first page was not drawn again
    assert _topk_without_timings(out) == _topk_without_timings(tmp_path / "whole")


# --------------------------------------------------------------------------- the Python API


class _Strings(Preprocess):
    def __call__(self, image):  # noqa: ANN001, ANN204
        return "x"


def _api_cases(tmp_path: Path, data: Path) -> list[tuple[str, object]]:
    model = tiny_model()
    kw = dict(out_dir=tmp_path / "api", progress=False, figures=False)
    meta = tiny_model().to("meta")
    return [
        ("layers must be a list", lambda: mine(model, PRE, data, "1", **kw)),
        ("out_dir must be a path", lambda: mine(model, PRE, data, ["1"], **{**kw, "out_dir": None})),
        ("dataset must be a path", lambda: mine(model, PRE, None, ["1"], **kw)),
        ("model must be a torch.nn.Module", lambda: mine("vgg16", PRE, data, ["1"], **kw)),
        ("preprocess must be a callable", lambda: mine(model, None, data, ["1"], **kw)),
        ("preprocess must be a callable", lambda: mine(model, lambda im: im, data, ["1"], **kw)),
        ("preprocess must return a float", lambda: mine(model, _Strings(None, None, (0.5,) * 3, (0.25,) * 3), data,
                                                        ["1"], **kw)),
        ("channels must be a list", lambda: mine(model, PRE, data, ["1"], channels=2, **kw)),
        ("aliases must be a dict", lambda: mine(model, PRE, data, ["1"], aliases=["a"], **kw)),
        ("settings must be a zfvis.mining.MineSettings", lambda: mine(model, PRE, data, settings={"layers": ["1"]})),
        ("unknown device", lambda: mine(model, PRE, data, ["1"], device="gpu", **kw)),
        ("state_seconds must be a finite number", lambda: mine(model, PRE, data, ["1"], state_seconds=float("nan"),
                                                               **kw)),
        ("meta device", lambda: mine(meta, PRE, data, ["1"], **kw)),
        ("image path must be a path", lambda: zfvis.load_image(3)),
        ("data set must be a path", lambda: zfvis.io.images.list_images(None)),
        ("limit must be at least 1", lambda: evenly_spaced(10, 0)),
        ("unknown device", lambda: zfvis.load_model("zfnet-cifar10", weights="random", device="gpu")),
        ("seed must be a whole number", lambda: zfvis.load_model("zfnet-cifar10", weights="random", seed="x")),
        ("weights file must be a path", lambda: zfvis.models.checkpoints.read_checkpoint(3)),
        ("preprocess takes a PIL image", lambda: PRE("cat.png")),
        ("input size", lambda: PRE.with_size(10**6)),
    ]


def test_api_refuses_wrong_kinds_with_typed_errors(tmp_path: Path) -> None:
    data = make_images(tmp_path / "d", 3)
    for message, call in _api_cases(tmp_path, data):
        with pytest.raises(UserInputError, match=message):
            call()  # type: ignore[operator]
    assert not (tmp_path / "api").exists()
    from zfvis.io.errors import InputTypeError

    with pytest.raises(InputTypeError):  # a TypeError too, as documented
        mine(tiny_model(), PRE, data, "1", out_dir=tmp_path / "api")


def test_a_failing_preprocess_in_pass_1_is_not_an_unreadable_file(tmp_path: Path) -> None:
    data = make_images(tmp_path / "d", 6)
    calls = []

    class Flaky(Preprocess):  # the caller's own preprocessing, failing on the third image
        def __call__(self, image):  # noqa: ANN001, ANN204
            calls.append(1)
            if len(calls) == 4:  # the probe's image, then pass 1's first, second, third
                raise ValueError("my preprocessing broke")
            return super().__call__(image)

    flaky = Flaky(None, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    with pytest.raises(ValueError, match="my preprocessing broke") as caught:
        mine(tiny_model(), flaky, data, ["1"], out_dir=tmp_path / "out", batch_size=2, progress=False,
             figures=False)
    assert not isinstance(caught.value, UserInputError)  # the caller's bug, not a skipped file


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs a device file (/dev/zero)")
def test_devices_are_not_called_missing_nor_text(tmp_path: Path, capsys) -> None:
    for argv, message in [
        (["project", "/dev/zero", "-o", tmp_path / "p.png"], "image '/dev/zero' is not a regular file"),
        (["project", "--weights", "/dev/zero", "-o", tmp_path / "p.png"], "is not a regular file"),
        ([*MINE, "/dev/zero", "-o", tmp_path / "out"], "data set '/dev/zero' is not a regular file"),
    ]:
        rc, err = run_cli(capsys, *argv)
        assert rc == 2 and message in one_line(err)
    zeros = tmp_path / "zeros.pt"
    zeros.write_bytes(bytes(600))
    rc, err = run_cli(capsys, "project", "--weights", zeros, "-o", tmp_path / "p.png")
    assert rc == 2 and "a binary file of an unknown format" in one_line(err)  # was: "a text file"
