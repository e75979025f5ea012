"""The README's commands, as a newcomer follows them, work as written.

Every ``bash`` block of README.md is read command by command (continuation lines joined,
``&&`` split, ``{a,b}`` expanded). Each command is checked against what the commands
before it leave behind: a ``tar -C DIR`` needs DIR made by an earlier ``mkdir -p``; a data
set must be where an earlier ``tar`` puts it; checkpoints must be ones an earlier
``scripts/train.py`` saves; a ``--config`` file must exist and point at the same data.
Every ``zfvis`` command is parsed by the real parser (config files included). The cheap
ones of ``project``, ``layers``, ``filters``, ``mine`` and ``evolution`` run in-process in a scratch folder laid out like the repository: those that need no
data always, those on CIFAR-10 with a ``--limit`` when ``../shared`` is there (on a
60-image slice, with random-weight checkpoints standing in for the training run), skipped
with the reason otherwise; the whole-data-set runs (a config of five layers, training) are
checked, not run. Finally, ``.gitignore`` covers everything the commands write.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

import zfvis
from zfvis.cli import get_args_parser, main
from zfvis.cli.config import parse_command_line

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SKIPPED_PROGRAMS = {"python3", "pytest"}  # venv creation, pip, pytest: the CI runs those verbatim
FAST_LIMIT = 60  # images used where a command asks for more
#: Commands run in-process here; the analysis commands (occlude, invariance, correspond) are
#: parsed here and run by their own tests.
RUN_HERE = {"project", "layers", "filters", "mine", "evolution"}


def _expand_braces(word: str) -> list[str]:
    match = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not match:
        return [word]
    head, tail = word[: match.start()], word[match.end() :]
    return [w for part in match.group(1).split(",") for w in _expand_braces(head + part + tail)]


def readme_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, as argv lists."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)\n```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    commands.append(list(itertools.chain.from_iterable(_expand_braces(w) for w in words)))
    return commands


def _zfvis_argv(words: list[str]) -> list[str] | None:
    """The zfvis arguments of a command line that runs zfvis, else None."""
    prog = Path(words[0]).name
    if prog == "zfvis":
        return words[1:]
    if prog == "torchrun" and "-m" in words and words[words.index("-m") + 1] == "zfvis":
        return words[words.index("-m") + 2 :]
    return None


def _train_module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("zfvis_train_readme", REPO / "scripts" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Newcomer:
    """Follows the README in ``work`` (a scratch folder with ``configs/`` and ``../shared``
    as in the repository), keeping track of what each command leaves behind."""

    def __init__(self, work: Path, run_data: bool) -> None:
        self.work, self.run_data = work, run_data
        self.dirs: set[str] = {"."}
        self.datasets: set[str] = set()
        self.checkpoints: set[str] = set()
        self.written: set[str] = set()
        self.ran: list[str] = []

    def follow(self, words: list[str]) -> None:
        prog = Path(words[0]).name
        argv = _zfvis_argv(words)
        if argv is not None:
            self.zfvis(argv, placeholder=prog == "torchrun")
        elif prog == "mkdir":
            self.dirs.update(w for w in words[1:] if not w.startswith("-"))
        elif prog == "tar":
            self.tar(words)
        elif prog == "python" and words[1:2] == ["scripts/train.py"]:
            self.train(words[2:])
        elif prog not in SKIPPED_PROGRAMS and not words[0].startswith(".venv/"):
            pytest.fail(f"the README runs `{' '.join(words)}`, which this test does not know how to check")

    def tar(self, words: list[str]) -> None:
        archive, target = words[words.index("-xzf") + 1], words[words.index("-C") + 1]
        assert target in self.dirs, f"`tar -C {target}` needs `mkdir -p {target}` before it"
        assert archive.startswith("../shared/"), archive
        path = self.work / archive
        if path.exists():
            with tarfile.open(path, "r:gz") as tar:
                top = Path(tar.next().name).parts[0]  # type: ignore[union-attr]
        else:
            top = Path(archive).name.split("-")[-1].split(".")[0]  # cifar10-test.tar.gz -> test
        self.datasets.add(f"{target}/{top}")
        self.written.add(target)

    def train(self, argv: list[str]) -> None:
        args = _train_module().get_args_parser().parse_args(argv)
        assert args.data in self.datasets and (args.val is None or args.val in self.datasets), argv
        for epoch in (int(e) for e in args.save_epochs.split(",") if e.strip()):
            self.checkpoints.add(f"{args.out}/epoch_{epoch:03d}.pt")
        self.written.add(args.out)

    def zfvis(self, argv: list[str], placeholder: bool) -> None:
        full = argv if argv and not argv[0].startswith("-") else ["project", *argv]  # as main() does
        args = parse_command_line(get_args_parser(), full)  # raises on anything the parser refuses
        if args.command in ("mine",) and not placeholder:
            assert str(args.dataset) in self.datasets, f"{args.dataset}: no earlier command puts a data set there"
        if args.command == "evolution":
            missing = [c for c in args.checkpoints if c not in self.checkpoints]
            assert not missing, f"no earlier training command saves {missing}"
            shipped = not args.checkpoints and args.dataset is None  # the snapshots and images zfvis ships
            assert shipped or args.dataset in self.datasets, args.dataset
        if args.output and not placeholder:
            self.written.add(str(args.output))
            if args.command != "mine":
                self.written.add(str(Path(args.output).with_suffix(".json")))
        if not placeholder and args.command in RUN_HERE:
            self.run(args.command, argv, args)

    def run(self, command: str, argv: list[str], args) -> None:  # noqa: ANN001
        if command in ("mine", "evolution"):
            if not self.run_data or "--limit" not in argv:
                return  # without --limit: the whole data set, all layers; checked above, not run
            argv = self._fast(argv)
            if command == "evolution":
                self._stand_in_checkpoints(args.checkpoints)
        assert main([*argv, *(["--no-progress"] if command == "mine" else [])]) == 0, argv
        self.ran.append(" ".join(argv))

    def _fast(self, argv: list[str]) -> list[str]:
        argv = list(argv)
        argv[argv.index("--limit") + 1] = str(FAST_LIMIT)
        return argv

    def _stand_in_checkpoints(self, paths: list[str]) -> None:
        for seed, rel in enumerate(paths):
            path = self.work / rel
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(zfvis.load_model("zfnet-cifar10", weights="random", seed=seed)[0].state_dict(), path)


@pytest.fixture()
def newcomer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Newcomer:
    work = tmp_path / "repo"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    has_data = (SHARED / "data" / "cifar10" / "cifar10-test.tar.gz").exists()
    if SHARED.exists():
        (tmp_path / "shared").symlink_to(SHARED)
    if has_data:  # the README's data folder, with a slice of the test split standing in for all of it
        slice_ = request.getfixturevalue("cifar_test_slice")
        (work / "data" / "cifar10").mkdir(parents=True)
        (work / "data" / "cifar10" / "test").symlink_to(slice_)
    monkeypatch.chdir(work)
    return Newcomer(work, has_data)


def test_every_readme_command_works_as_written(newcomer: Newcomer) -> None:
    commands = readme_commands()
    assert len(commands) >= 10
    for words in commands:
        newcomer.follow(words)
    assert "-o zfvis_project.png" in newcomer.ran and any(r.startswith("filters") for r in newcomer.ran)
    if not newcomer.run_data:
        pytest.skip("the README's CIFAR-10 commands were checked but not run: ../shared/data/cifar10 is absent "
                    "(it sits beside the checkout on project machines)")
    assert any(r.startswith("mine data/cifar10/test") for r in newcomer.ran)
    assert sum(r.startswith("evolution") for r in newcomer.ran) == 2


def test_gitignore_covers_what_the_readme_writes(tmp_path: Path) -> None:
    checker = Newcomer(tmp_path, run_data=False)
    checker.run = lambda *a, **k: None  # type: ignore[method-assign]
    for words in readme_commands():
        if _zfvis_argv(words) is not None:
            checker.dirs.add("data/cifar10")
            checker.datasets.update({"data/cifar10/test", "data/cifar10/train"})
        checker.follow(words)
    paths = sorted(p for p in checker.written | {".zfvis.lock", "runs/mine/.zfvis.lock"})
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=REPO, capture_output=True, text=True)
    if inside.stdout.strip() != "true":
        pytest.skip(f"{REPO} is not a git checkout (an unpacked copy): git check-ignore cannot be asked")
    res = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    ignored = set(res.stdout.split())
    assert not set(paths) - ignored, f"not ignored by .gitignore: {sorted(set(paths) - ignored)}"


def test_example_configs_parse_and_point_at_the_readmes_data() -> None:
    for cfg in sorted((REPO / "configs").glob("*.toml")):
        args = parse_command_line(get_args_parser(), ["mine", "--config", str(cfg)])
        assert args.dataset.startswith("data/") and args.output.startswith("runs/"), cfg
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "-C data/cifar10" in readme and "data/cifar10/test" in readme


def test_short_training_recipe_keeps_every_class(tiny_folder: Path, tmp_path: Path) -> None:
    """``scripts/train.py --limit`` (the README's short recipe for ``zfvis evolution``)."""
    train = _train_module()
    subset = train._Folder(tiny_folder, 32, limit=6)
    assert len(subset) == 6 and {label for _, label in subset.items} == {0, 1}
    out = tmp_path / "quick"
    assert train.main([str(tiny_folder), "--epochs", "2", "--limit", "6", "--batch-size", "4", "--save-epochs", "1,2",
                       "-o", str(out)]) == 0
    assert (out / "epoch_001.pt").is_file() and (out / "epoch_002.pt").is_file()
