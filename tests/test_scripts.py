"""Every script in ``scripts/`` runs, at tiny sizes (a smoke test each).

The benchmarks' numbers are not checked here (they are ratios the scripts print, on a
shared machine); what is checked is that each script runs to its end and prints its
results. ``scripts/train.py`` has its own tests (``test_train.py``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

import zfvis

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
#: Scripts whose smoke test lives in another file.
TESTED_ELSEWHERE = {"train.py": "tests/test_train.py", "bench_feature_vis.py": "tests/test_feature_vis.py",
                    "make_feature_vis_figure.py": "tests/test_feature_vis.py"}


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"zfvis_script_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_script_has_a_smoke_test() -> None:
    text = Path(__file__).read_text(encoding="utf-8")
    for script in sorted(SCRIPTS.glob("*.py")):
        assert script.name in TESTED_ELSEWHERE or f'_script("{script.stem}")' in text, f"no smoke test runs {script.name}"


def test_bench_mine(tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _script("bench_mine").main(["--data", str(tiny_folder), "--limit", "8", "--batch-size", "4",
                                       "--memory-sizes", "8", "--repeats", "1", "--pass2-layers", "conv1"]) == 0
    out = capsys.readouterr().out
    assert "(a) pass 1 over 8 images" in out and "(b) pass 2" in out and "(c) peak resident memory" in out


def test_bench_project(capsys: pytest.CaptureFixture[str]) -> None:
    assert _script("bench_project").main(["--model", "resnet50", "--repeats", "1", "--input-size", "32",
                                          "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "layer3 x9" in out and "of the dense multiply-adds" in out


def test_bench_capture(capsys: pytest.CaptureFixture[str]) -> None:
    assert _script("bench_capture").main(["--models", "resnet18", "--size", "32", "--repeats", "1",
                                          "--threads", "1"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("resnet18"))
    assert len(row.split()) == 6 and float(row.split()[2]) > 0  # the check took time: it ran


def test_bench_zoo(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("captum", reason="captum is a benchmark-only dependency (pip install captum --no-deps)")
    assert _script("bench_zoo").main(["--models", "squeezenet1_1", "--size", "64", "--repeats", "1",
                                      "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "squeezenet1_1" in out and "geometric mean" in out


def test_bench_occlusion(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--rounds", "1", "--full", "--input-size", "64", "--patch", "32", "--stride", "32", "--batch-size", "4",
            "--threads", "1"]
    assert _script("bench_occlusion").main(args) == 0
    out = capsys.readouterr().out
    assert "round 1: zfvis" in out and "brute force" in out and "max |probability difference|" in out


def test_bench_render(capsys: pytest.CaptureFixture[str]) -> None:
    assert _script("bench_render").main(["--channels", "2", "--rounds", "1"]) == 0
    assert "2 channels x 9" in capsys.readouterr().out


def test_bench_serve(capsys: pytest.CaptureFixture[str]) -> None:
    assert _script("bench_serve").main(["--model", "zfnet-cifar10", "--click-layer", "conv3", "--layers", "conv1",
                                        "--clicks", "2", "--images", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "click / projection" in out and "served grid" in out


def test_make_rules_efficientnet_figure(tmp_path: Path) -> None:
    out = tmp_path / "rules.png"
    assert _script("make_rules_efficientnet_figure").main(["-o", str(out), "--input-size", "64"]) == 0
    assert out.stat().st_size > 10_000


def test_make_why_figure(tmp_path: Path) -> None:
    assert _script("make_why_figure").main(str(tmp_path)) == 0
    assert (tmp_path / "why.png").stat().st_size > 10_000 and (tmp_path / "why_matrix.png").stat().st_size > 10_000


def test_pack_snapshots_keeps_the_first_layers_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for epoch in (1, 2):
        model, _ = zfvis.load_model("zfnet-cifar10", weights="random", seed=epoch)
        torch.save(model.state_dict(), run / f"epoch_{epoch:03d}.pt")
    out = tmp_path / "snaps.pt"
    assert _script("pack_snapshots").main([str(run), "--epochs", "1,2", "--through", "conv2", "--command", "train",
                                           "-o", str(out)]) == 0
    snaps = zfvis.training_snapshots(out)
    assert snaps.labels == ["epoch 1", "epoch 2"] and snaps.command == "train"
    full = torch.load(run / "epoch_002.pt", weights_only=True)
    packed = torch.load(out, weights_only=True)["epochs"][2]
    assert sorted(packed) == sorted(k for k in full if k.startswith(("features.0.", "features.1.", "features.5.",
                                                                     "features.6.")))  # conv1, bn1, conv2, bn2
    x = torch.randn(1, 3, 32, 32)
    want = zfvis.Deconvnet(zfvis.load_model("zfnet-cifar10", weights=run / "epoch_002.pt")[0]).output(x, "conv2")
    torch.testing.assert_close(zfvis.Deconvnet(snaps.models[1]).output(x, "conv2"), want, rtol=0, atol=0)


def test_suite_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "tests.jsonl"
    report.write_text("\n".join([
        '{"test": "tests/test_a.py::test_one", "seconds": 2.0, "rss_mb": 900, "peak_mb": 950, "peak_raise_mb": 400}',
        '{"test": "tests/test_b.py::test_two", "seconds": 5.0, "rss_mb": 700, "peak_mb": 950, "peak_raise_mb": 0}',
    ]) + "\n")
    assert _script("suite_report").main([str(report)]) == 0
    out = capsys.readouterr().out
    assert "2 tests, 7 s in tests, peak resident memory 950 MiB" in out
    assert out.index("+    400 to    950  tests/test_a.py::test_one") < out.index("slowest")
    assert out.index("tests/test_b.py") < out.index("tests/test_a.py                    ")  # slowest file first


def test_mutants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mutants = _script("mutants")
    assert mutants.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "sub-sign" in out and f"{len(mutants.MUTANTS)} mutants" in out
    build = REPO / "zfvis" / "core" / "ops" / "build.py"
    before = build.read_bytes()
    assert mutants.main(["--only", "sub-sign", "--timeout", "120"]) == 0  # a quick one, in a copy
    out = capsys.readouterr().out
    assert re.search(r"^sub-sign +killed", out, re.MULTILINE) and "1 mutants: 1 killed, 0 survived" in out
    assert build.read_bytes() == before  # the working tree is never modified
    # a snippet that moved is stale, which fails the check
    (tmp_path / "zfvis" / "core" / "ops").mkdir(parents=True)
    (tmp_path / "zfvis" / "core" / "ops" / "build.py").write_bytes(before.replace(b"sign = -1.0 if", b"sign=-1.0 if"))
    sub_sign = next(m for m in mutants.MUTANTS if m.id == "sub-sign")
    assert mutants.apply(sub_sign, tmp_path).startswith("stale mutant: the snippet occurs 0 times")
    assert mutants.Result(sub_sign, "stale").failed and not mutants.Result(sub_sign, "killed").failed


def test_every_mutant_finds_its_snippet_once() -> None:
    """No mutant of the table is stale: each one's snippet occurs exactly once in its file (a
    snippet left behind by moved code would make the check fail only when that mutant runs)."""
    mutants = _script("mutants")
    stale = [m.id for m in mutants.MUTANTS if (REPO / m.file).read_text().count(m.original) != 1]
    assert stale == []
    assert len({m.id for m in mutants.MUTANTS}) == len(mutants.MUTANTS)  # ids are unique


def test_bench_cli_startup(capsys: pytest.CaptureFixture[str]) -> None:
    assert _script("bench_cli_startup").main(["--repeats", "1"]) == 0  # 1 would mean torch was loaded
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("zfvis ")]
    assert [r[1] for r in rows] == ["--help", "project", "--version"] and all(r[-1] == "False" for r in rows)


def test_cli_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert _script("cli_reference").main([]) == 0
    out = capsys.readouterr().out
    from zfvis.cli import COMMANDS

    assert out.startswith("## zfvis\n") and out.count("```text") == 1 + len(COMMANDS) and "usage: zfvis correspond" in out


def test_docs_roles() -> None:
    roles = _script("docs_roles")
    html = "A name from :func:<code>list_models</code>; see :class:<code>~zfvis.core.deconvnet.Deconvnet</code>."
    assert roles.strip_roles(html) == "A name from <code>list_models</code>; see <code>Deconvnet</code>."
    assert roles.strip_roles("a :mod:<code>zfvis.core.graph</code> b") == "a <code>zfvis.core.graph</code> b"
    assert roles.strip_roles("plain <code>x</code> and time 10:30") == "plain <code>x</code> and time 10:30"


def test_make_feature_vis_vs_top9(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f.png"
    assert _script("make_feature_vis_vs_top9").main(["--dataset", str(tiny_folder), "--limit", "8", "--steps", "2",
                                                     "--channels", "1", "--layers", "conv5",
                                                     "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 1000 and "conv5: channel mean reached, Fourier" in text and "top-1 activation" in text
    assert _script("make_feature_vis_vs_top9").main(["--dataset", str(tmp_path / "none"), "-o", str(out)]) == 2
