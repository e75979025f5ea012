"""`zfvis --help`, `zfvis CMD --help` and `zfvis --version` answer without loading torch or
matplotlib, and every command's help says what it does and shows two examples.

`python scripts/bench_cli_startup.py` times the same calls (a benchmark row, not a test)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from zfvis.cli import COMMANDS, get_args_parser

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "matplotlib", "torchvision", "PIL")
_PROBE = """
import contextlib, io, sys
from zfvis.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        status = main(sys.argv[1:])
    except SystemExit as exit_:
        status = exit_.code
print(status, len(out.getvalue()), *[m for m in {heavy!r} if m in sys.modules])
"""


def _probe(*argv: str) -> list[str]:
    """Runs ``main(argv)`` in a fresh interpreter: its status, the length of what it printed,
    and the heavy modules it loaded."""
    code = _PROBE.format(heavy=HEAVY)
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


@pytest.mark.parametrize("argv", [["--help"], ["project", "--help"], ["--version"], ["serve", "--help"]])
def test_help_and_version_load_no_torch(argv: list[str]) -> None:
    status, printed, *heavy = _probe(*argv)
    assert status == "0" and int(printed) > 10, (argv, status, printed)
    assert heavy == [], f"zfvis {' '.join(argv)} loaded {heavy}"


def test_every_command_module_is_light_and_running_one_does_load_torch() -> None:
    """All commands' help at once, and the check itself is not vacuous: a command that runs loads torch."""
    code = ("import sys; from zfvis.cli import get_args_parser; get_args_parser(); "
            f"print(*[m for m in {HEAVY!r} if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120, check=True)
    assert res.stdout.split() == [], f"building every command's parser loaded {res.stdout.split()}"
    status, _, *heavy = _probe("layers")
    assert status == "0" and "torch" in heavy


def _commands() -> dict[str, argparse.ArgumentParser]:
    for action in get_args_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no sub-commands")


def test_every_command_has_a_summary_a_description_and_two_examples() -> None:
    commands = _commands()
    assert set(commands) == set(COMMANDS) and len(commands) >= 9
    for name, parser in commands.items():
        summary = COMMANDS[name][1]
        assert 20 < len(summary) <= 100 and "\n" not in summary, name
        assert parser.description and parser.description.startswith(summary[0].upper() + summary[1:]), name
        assert len(parser.description) > len(summary) + 40, f"{name}: no description beyond the summary"
        assert parser.epilog and parser.epilog.startswith("examples:"), f"{name}: no examples"
        runs = [ln.strip() for ln in parser.epilog.splitlines() if ln.strip().startswith("zfvis ")]
        assert len(runs) >= 2, f"{name}: {len(runs)} examples"
        for line in runs:  # each example is a command the parser takes
            argv = shlex.split(line)[1:]
            assert argv[0] == name, line
            parser.parse_args(argv[1:])
        text = parser.format_help()
        assert "examples:" in text and all(line in text for line in runs), name


def test_every_option_has_help() -> None:
    for name, parser in _commands().items():
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"zfvis {name} {action.option_strings}: no help"


def test_light_copies_match_what_they_copy() -> None:
    """The names the parsers show without loading torch are the ones the code uses."""
    from zfvis.analysis.invariance import TRANSFORMS
    from zfvis.cli import _common, invariance
    from zfvis.core.ops import RULES
    from zfvis.models.zoo import list_models

    assert _common.RULES == RULES
    assert list(_common.ZOO_MODELS) == list_models()
    assert invariance.TRANSFORMS == TRANSFORMS


def test_typo_in_a_command_is_one_line_without_torch() -> None:
    code = ("import sys; from zfvis.cli import main; status = main(['projekt']); "
            "print(status, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert res.stdout.split() == ["2", "False"], res.stdout + res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "invalid choice: 'projekt'" in res.stderr


def test_every_script_option_has_help() -> None:
    import ast

    missing = []
    for script in sorted((REPO / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                if not any(k.arg == "help" for k in node.keywords):
                    missing.append(f"{script.name}:{node.lineno}")
    assert not missing, f"options without help: {missing}"


def test_make_why_figure_help_is_help_not_an_output_folder(tmp_path: Path) -> None:
    script = REPO / "scripts" / "make_why_figure.py"
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0 and "OUT_DIR" in res.stdout and not res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder named --help


@pytest.fixture()
def _one_thread_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_thread):  # noqa: ANN001, ANN202
    (tmp_path / "zfvis").symlink_to(REPO / "zfvis")  # the examples name shipped files as from a checkout
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # offline, nothing cached
    return tmp_path


def test_every_help_example_runs_as_written(_one_thread_in: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Offline, in a folder laid out like a checkout; `serve` (which serves until Ctrl-C) is parsed above."""
    from zfvis.cli import main

    quiet = {"mine", "occlude", "invariance", "correspond"}  # no progress bars in the test's output
    ran = 0
    for name, parser in _commands().items():
        if name == "serve":
            continue
        for line in (ln.strip() for ln in parser.epilog.splitlines()):
            if line.startswith("zfvis "):
                argv = shlex.split(line)[1:]
                assert main(argv + (["--no-progress"] if name in quiet else [])) == 0, line
                ran += 1
    assert ran >= 2 * (len(COMMANDS) - 1)
    capsys.readouterr()
