"""Every script in examples/ runs, and so does every code cell of the notebook, in order.

The scripts run in-process (``runpy``) in a scratch folder, as ``python examples/X.py`` from
the repository's root would: what they write lands there. The notebook needs no Jupyter: its
JSON is read and its code cells are executed in one namespace, in order, as a kernel would.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import matplotlib
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
#: What each script must leave behind (besides printing without error).
WRITES = {
    "torchvision_model.py": ["resnet18_layer3.png"],
    "timm_model.py": ["mobilenetv3_rules.png"],
    "own_model.py": ["own_model.png"],
    "mine_folder.py": ["runs/example_mine/topk.json", "runs/example_mine/index.html"],
    "serve_from_notebook.py": [],
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):  # noqa: ANN001, ANN202 - small tensors on a busy machine: one thread is faster
    yield


@pytest.fixture()
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "zfvis").symlink_to(REPO / "zfvis")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # offline, nothing cached
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    matplotlib.use("Agg")
    return tmp_path


def test_every_example_is_listed() -> None:
    assert {p.name for p in SCRIPTS} == set(WRITES), "a new example needs its outputs listed in WRITES"
    assert (EXAMPLES / "quickstart.ipynb").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_runs(script: Path, scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if script.name == "timm_model.py":
        pytest.importorskip("timm", reason="timm is an optional extra (the test extra installs it)")
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip(), f"{script.name} printed nothing"
    for rel in WRITES[script.name]:
        assert (scratch / rel).is_file(), f"{script.name} should write {rel}"
    if script.name == "serve_from_notebook.py":
        assert "serving" in out and "stopped" in out


def test_the_notebook_runs_cell_by_cell(scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notebook = json.loads((EXAMPLES / "quickstart.ipynb").read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5 and all(not c.get("outputs") for c in cells), "commit the notebook without outputs"
    namespace: dict[str, object] = {"__name__": "__main__"}
    for i, cell in enumerate(cells, 1):
        source = "".join(cell["source"])
        exec(compile(source, f"quickstart.ipynb code cell {i}", "exec"), namespace)  # noqa: S102 - our notebook
    assert "p(cat) unoccluded" in capsys.readouterr().out
    assert type(namespace["fig"]).__name__ == "Figure"
