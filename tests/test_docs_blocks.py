"""Every code block of the README and of every page of the documentation site (docs/**/*.md)
runs as written, offline, as a newcomer follows it.

A page is one session, in a scratch folder laid out like the repository (``zfvis/``,
``configs/``, ``scripts/``, ``examples/`` and ``../shared`` as links): its blocks run in order,
``python`` blocks in one interpreter namespace, ``bash`` blocks command by command (continuation
lines joined, ``&&`` split, ``{a,b}`` expanded). Blocks in any other language (``text``,
``json``, ``toml``) are shown, not run.

Commands are run, not just parsed: every ``zfvis`` command in-process (the real parser, config
files included), ``python scripts/X.py`` and ``python examples/X.py`` in a subprocess. A path a
command reads must exist or be made by an earlier block: a placeholder (``photo.jpg``,
``DATASET``) fails. What cannot run in seconds is checked instead of run, and named here:
installing (``python3 -m venv``, ``pip``), training (``scripts/train.py``: its options parsed,
its data and checkpoints tracked), ``torchrun`` (parsed, its inputs checked; run with
``ZFVIS_SLOW=1``; a ``python`` block that starts torchrun agents runs with their command lines
recorded and parsed instead of started), and the whole-data-set runs of ``mine`` and
``evolution`` without ``--limit``.
Commands on the CIFAR-10 archives in ``../shared`` run on a slice of the test split when it is
there (with random-weight checkpoints standing in for a training run), and are checked
otherwise. Finally, ``.gitignore`` covers everything the commands write.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import matplotlib
import pytest
import torch
from torch.distributed.run import get_args_parser as torchrun_parser

import zfvis
from zfvis.cli import get_args_parser, main
from zfvis.cli.config import parse_command_line

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINKED = ("zfvis", "configs", "scripts", "examples")  # the repository's folders a page may read
INSTALL_PROGRAMS = {"python3", "pytest", "."}  # venv creation, pip, activation: the CI runs those verbatim
FAST_LIMIT = 60  # images used where a command on the CIFAR-10 slice asks for more
#: Words that stand for a path the reader should fill in: never in a runnable block.
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z_]{2,}(?:\.[a-z]+)?|photo\.jpg|a\.jpg|b\.jpg|parts\.json|PATH.*)$")


@dataclass
class Block:
    """A fenced code block of a page."""

    lang: str
    code: str
    line: int


def page_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```([\w+-]*)[^\n]*\n(.*?)^```\s*$", text, flags=re.S | re.M):
        blocks.append(Block(match.group(1).lower(), match.group(2), text.count("\n", 0, match.start()) + 1))
    return blocks


def _expand_braces(word: str) -> list[str]:
    match = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not match:
        return [word]
    head, tail = word[: match.start()], word[match.end() :]
    return [w for part in match.group(1).split(",") for w in _expand_braces(head + part + tail)]


def bash_commands(code: str) -> list[list[str]]:
    """The commands of a bash block, as argv lists."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(list(itertools.chain.from_iterable(_expand_braces(w) for w in words)))
    return commands


def all_commands(pages: list[Path] = PAGES) -> list[list[str]]:
    """Every command of every bash block of ``pages``."""
    return [cmd for page in pages for b in page_blocks(page) if b.lang in ("bash", "sh") for cmd in bash_commands(b.code)]


def _zfvis_argv(words: list[str]) -> list[str] | None:
    """The zfvis arguments of a command line that runs zfvis, else None."""
    prog = Path(words[0]).name
    if prog == "zfvis":
        return words[1:]
    if prog == "torchrun" and "-m" in words and words[words.index("-m") + 1] == "zfvis":
        return words[words.index("-m") + 2 :]
    return None


@contextlib.contextmanager
def _recording_popen(started: list[list[str]]) -> Iterator[None]:
    """``subprocess.Popen`` records each command line instead of starting it; each "process"
    exits with 0 (a block that starts torchrun agents, without ``ZFVIS_SLOW=1``)."""

    class Recorded:
        returncode = 0

        def __init__(self, args: list[object], *_: object, **__: object) -> None:
            started.append([str(a) for a in args])

        def wait(self, timeout: float | None = None) -> int:
            return 0

    with mock.patch.object(subprocess, "Popen", Recorded):
        yield


def _train_module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("zfvis_train_docs", REPO / "scripts" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Newcomer:
    """Follows a page in ``work`` (a scratch folder laid out like the repository), keeping
    track of what each command leaves behind."""

    def __init__(self, work: Path, run_data: bool, where: str = "") -> None:
        self.work, self.run_data, self.where = work, run_data, where
        self.dirs: set[str] = {"."}
        self.datasets: set[str] = set()
        self.checkpoints: set[str] = set()
        self.written: set[str] = set()
        self.ran: list[str] = []
        self.checked: list[str] = []  # commands checked, not run, and why
        self.ran_python = False
        self.namespace: dict[str, object] = {"__name__": "__docs__"}

    # ----------------------------------------------------------------------------- blocks

    def block(self, block: Block) -> None:
        if block.lang == "python":
            self.python(block)
        elif block.lang in ("bash", "sh"):
            for words in bash_commands(block.code):
                self.follow(words)

    def python(self, block: Block) -> None:
        code = compile(block.code, f"{self.where}:{block.line} (python block)", "exec")
        agents: list[list[str]] | None = None  # a block that starts torchrun agents: their command lines
        if "torch.distributed.run" in block.code and os.environ.get("ZFVIS_SLOW") != "1":
            agents = []
        try:
            with _recording_popen(agents) if agents is not None else contextlib.nullcontext():
                exec(code, self.namespace)  # noqa: S102 - the page's own code
        except Exception as err:  # noqa: BLE001 - report which page, which block
            pytest.fail(f"{self.where}:{block.line}: the python block fails: {type(err).__name__}: {err}")
        if agents is None:
            self.ran_python = True
        else:
            assert agents, f"{self.where}:{block.line}: the block names torch.distributed.run but starts no process"
            for argv in agents:  # parsed by torchrun's parser, then as a zfvis command (several processes)
                assert argv[1:3] == ["-m", "torch.distributed.run"], f"{self.where}:{block.line}: {argv}"
                launch = torchrun_parser().parse_args(argv[3:])
                assert launch.module and launch.training_script == "zfvis", f"{self.where}:{block.line}: {argv}"
                self.zfvis(launch.training_script_args, run=False, words=["torchrun", *argv[3:]])
        for path in re.findall(r"""path=["']([^"']+)["']""", block.code):
            assert (self.work / path).is_file(), f"{self.where}:{block.line}: the block should write {path}"

    def follow(self, words: list[str]) -> None:
        placeholders = [w for w in words[1:] if PLACEHOLDER.match(w.split("=")[-1])]
        assert not placeholders, f"{self.where}: `{' '.join(words)}` has placeholders {placeholders}"
        prog = Path(words[0]).name
        argv = _zfvis_argv(words)
        if argv is not None:
            self.zfvis(argv, run=prog != "torchrun", words=words)
        elif prog == "mkdir":
            self.dirs.update(w for w in words[1:] if not w.startswith("-"))
            for w in words[1:]:
                if not w.startswith("-"):
                    (self.work / w).mkdir(parents=True, exist_ok=True)
        elif prog == "tar":
            self.tar(words)
        elif prog == "python" and words[1:2] == ["scripts/train.py"]:
            self.train(words[2:])
        elif prog == "python" and len(words) > 1 and words[1].split("/")[0] in ("scripts", "examples"):
            self.script(words)
        elif words[0] not in INSTALL_PROGRAMS and not words[0].startswith(".venv/"):
            pytest.fail(f"{self.where}: the page runs `{' '.join(words)}`, which this test does not know how to run")

    # ----------------------------------------------------------------------------- programs

    def tar(self, words: list[str]) -> None:
        archive, target = words[words.index("-xzf") + 1], words[words.index("-C") + 1]
        assert target in self.dirs, f"{self.where}: `tar -C {target}` needs `mkdir -p {target}` before it"
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
        self.checked.append(f"`scripts/train.py {' '.join(argv)}` (training takes hours)")

    def script(self, words: list[str]) -> None:
        script = self.work / words[1]
        assert script.is_file(), f"{self.where}: {words[1]} does not exist"
        env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
        res = subprocess.run([sys.executable, *words[1:]], cwd=self.work, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, f"{self.where}: `{' '.join(words)}` failed:\n{res.stdout}\n{res.stderr}"
        self.ran.append(" ".join(words[1:]))

    def _exists(self, path: str) -> bool:
        return (self.work / path).exists() or path in self.datasets or path in self.checkpoints

    def zfvis(self, argv: list[str], run: bool, words: list[str]) -> None:
        full = argv if argv and not argv[0].startswith("-") else ["project", *argv]  # as main() does
        args = parse_command_line(get_args_parser(), full)  # raises on anything the parser refuses
        inputs = [getattr(args, k) for k in ("image", "dataset", "boxes", "config") if getattr(args, k, None)]
        inputs += [*getattr(args, "images", []), *getattr(args, "checkpoints", []), *(getattr(args, "run", None) or [])]
        missing = [str(p) for p in inputs if not self._exists(str(p))]
        assert not missing, f"{self.where}: `{' '.join(words)}` reads {missing}, which no earlier block makes"
        if args.command == "evolution":
            shipped = not args.checkpoints and args.dataset is None  # the snapshots and images zfvis ships
            assert shipped or self._exists(str(args.dataset)), args.dataset
        output = getattr(args, "output", None)
        if output:
            self.written.add(str(output))
            if args.command != "mine":
                self.written.add(str(Path(output).with_suffix(".json")))
        if not run:
            if os.environ.get("ZFVIS_SLOW") != "1":
                self.checked.append(f"`{' '.join(words)}` (several processes: run with ZFVIS_SLOW=1)")
                return
            self.script_command(words)
            return
        if any(str(p).startswith("data/") for p in [*inputs, getattr(args, "dataset", None) or ""]):
            if not self.run_data or "--limit" not in argv:  # the whole data set, or no data here
                self.checked.append(f"`{' '.join(words)}` (" + ("the whole data set" if self.run_data else
                                    "../shared/data/cifar10 is absent; it sits beside the checkout on project "
                                    "machines") + ")")
                return
            argv = self._fast(argv)
            if args.command == "evolution":
                self._stand_in_checkpoints(args.checkpoints)
        assert main([*argv, *(["--no-progress"] if args.command == "mine" else [])]) == 0, f"{self.where}: {argv}"
        if output and args.command != "mine":
            written = self.work / str(output)  # a file, or a folder of them (zfvis optimize -o OUTDIR)
            assert written.is_file() or (written.is_dir() and any(written.iterdir())), \
                f"{self.where}: `{' '.join(words)}` wrote no {output}"
        self.ran.append(" ".join(argv))

    def script_command(self, words: list[str]) -> None:
        """A torchrun line, run as written (ZFVIS_SLOW=1 only: it starts several interpreters)."""
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        runner = Path(sys.executable).parent / words[0]
        res = subprocess.run([str(runner), *words[1:]], cwd=self.work, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, f"{self.where}: `{' '.join(words)}` failed:\n{res.stderr[-3000:]}"
        self.ran.append(" ".join(words))

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


def _scratch(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, bool]:
    """A folder laid out like the repository, with ``../shared`` beside it where it exists."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in LINKED:
        if (REPO / name).exists():
            (work / name).symlink_to(REPO / name)
    has_data = (SHARED / "data" / "cifar10" / "cifar10-test.tar.gz").exists()
    if SHARED.exists():
        (tmp_path / "shared").symlink_to(SHARED)
    if has_data:  # the pages' data folder, with a slice of the test split standing in for all of it
        slice_ = request.getfixturevalue("cifar_test_slice")
        (work / "data" / "cifar10").mkdir(parents=True)
        (work / "data" / "cifar10" / "test").symlink_to(slice_)
    return work, has_data


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):  # noqa: ANN001, ANN202 - small tensors on a busy machine: one thread is faster
    yield


@pytest.fixture()
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> tuple[Path, bool]:
    work, has_data = _scratch(tmp_path, request)
    monkeypatch.chdir(work)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # nothing cached: offline as a fresh machine
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    matplotlib.use("Agg")
    return work, has_data


def _name(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_block_of_the_page_runs_as_written(page: Path, scratch: tuple[Path, bool]) -> None:
    work, has_data = scratch
    newcomer = Newcomer(work, has_data, _name(page))
    blocks = page_blocks(page)
    for block in blocks:
        newcomer.block(block)
    if page.name == "README.md":  # the README's own promises, checked on what its blocks leave behind
        assert "-o zfvis_project.png" in newcomer.ran and (work / "runs" / "mine" / "topk.json").is_file()
        assert newcomer.namespace["server"].url.startswith("http://127.0.0.1:")  # type: ignore[attr-defined]
    if newcomer.checked and not newcomer.ran and not newcomer.ran_python:
        pytest.skip(f"{_name(page)}: every command was checked, not run: {'; '.join(newcomer.checked)}")


def test_a_placeholder_path_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks are not vacuous: a command or a Python block that reads a file no earlier
    block makes fails, and so does a placeholder word."""
    monkeypatch.chdir(tmp_path)
    cases = [
        Block("bash", "zfvis project photo.jpg -o p.png\n", 1),
        Block("bash", "zfvis project cat.jpg -o p.png\n", 1),
        Block("bash", "zfvis mine DATASET --layers conv1 -o runs/x\n", 1),
        Block("bash", "torchrun --nproc_per_node 2 -m zfvis mine images/ --layers conv1 -o runs/x\n", 1),
        Block("bash", "zfvis evolution runs/a/epoch_001.pt --layer conv2 -o e.png\n", 1),
        Block("python", "import zfvis\nzfvis.load_image('my_photo.jpg')\n", 1),
        Block("bash", "wget https://example.com/weights.pt\n", 1),
        Block("python", "import subprocess, sys\nassert subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', "
                        "'--nproc-per-node', '1', '-m', 'zfvis', 'mine', 'images/', '--layers', 'conv1']).wait() == 0\n", 1),
    ]
    for block in cases:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            Newcomer(tmp_path, run_data=False, where="case").block(block)


def test_blocks_are_found_and_other_languages_are_not_run(tmp_path: Path) -> None:
    text = "a\n```bash\nzfvis layers\n```\n\n```text\nzfvis serve\n```\n```python\nx = 1\n```\n"
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    blocks = page_blocks(page)
    assert [(b.lang, b.line) for b in blocks] == [("bash", 2), ("text", 6), ("python", 9)]
    assert bash_commands("a b \\\n  c && d {1,2}.pt # note\n") == [["a", "b", "c"], ["d", "1.pt", "2.pt"]]


def test_gitignore_covers_what_the_pages_write(tmp_path: Path) -> None:
    checker = Newcomer(tmp_path, run_data=False)
    written: set[str] = set()
    for page in PAGES:
        for block in page_blocks(page):
            if block.lang == "python":
                written.update(re.findall(r"""path=["']([^"']+)["']""", block.code))
                written.update(re.findall(r"""torch\.save\([^\n]*["']([^"']+\.pt)["']\)""", block.code))
                continue
            if block.lang not in ("bash", "sh"):
                continue
            for words in bash_commands(block.code):
                argv = _zfvis_argv(words)
                if argv is not None:
                    full = argv if argv and not argv[0].startswith("-") else ["project", *argv]
                    args = parse_command_line(get_args_parser(), full)
                    output = getattr(args, "output", None)
                    if output:
                        written.add(str(output))
                        if args.command != "mine":
                            written.add(str(Path(output).with_suffix(".json")))
                elif Path(words[0]).name == "python" and words[1:2] == ["scripts/train.py"]:
                    written.add(_train_module().get_args_parser().parse_args(words[2:]).out)
                elif Path(words[0]).name == "tar":
                    written.add(words[words.index("-C") + 1])
    paths = sorted(written | checker.written | {".zfvis.lock", "runs/mine/.zfvis.lock", "data/my_images"})
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=REPO, capture_output=True, text=True)
    if inside.stdout.strip() != "true":
        pytest.skip(f"{REPO} is not a git checkout (an unpacked copy): git check-ignore cannot be asked")
    res = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    ignored = set(res.stdout.split())
    assert not set(paths) - ignored, f"not ignored by .gitignore: {sorted(set(paths) - ignored)}"


def test_example_configs_parse_and_point_at_the_pages_data() -> None:
    for cfg in sorted((REPO / "configs").glob("*.toml")):
        args = parse_command_line(get_args_parser(), ["mine", "--config", str(cfg)])
        assert args.dataset.startswith("data/") and args.output.startswith("runs/"), cfg
    text = (REPO / "docs" / "how-to" / "dataset-gallery.md").read_text(encoding="utf-8")
    assert "-C data/cifar10" in text and "data/cifar10/test" in text and "configs/mine-zfnet-cifar10.toml" in text


def test_short_training_recipe_keeps_every_class(tiny_folder: Path, tmp_path: Path) -> None:
    """``scripts/train.py --limit``: a short run, e.g. to try ``zfvis evolution`` on your own checkpoints."""
    train = _train_module()
    subset = train._Folder(tiny_folder, 32, limit=6)
    assert len(subset) == 6 and {label for _, label in subset.items} == {0, 1}
    out = tmp_path / "quick"
    assert train.main([str(tiny_folder), "--epochs", "2", "--limit", "6", "--batch-size", "4", "--save-epochs", "1,2",
                       "-o", str(out)]) == 0
    assert (out / "epoch_001.pt").is_file() and (out / "epoch_002.pt").is_file()
