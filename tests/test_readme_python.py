"""Every Python block of the README runs as written, offline, on what zfvis ships.

The blocks are one session, as a newcomer pastes them one after the other into Python:
each runs in the namespace the blocks before it left, in a scratch folder (the figures
they write land there). Nothing outside the package is read: the model, the photos, the
images and the training snapshots are the ones zfvis ships.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    """The README's ``python`` blocks, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)\n```", text, flags=re.S)


def test_the_readme_has_python_blocks_that_use_the_api() -> None:
    blocks = readme_python_blocks()
    assert len(blocks) >= 4
    assert blocks[0].lstrip().startswith("import zfvis"), "the first block must start the session"


def test_every_readme_python_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # nothing cached: offline as a fresh machine
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, block in enumerate(readme_python_blocks(), 1):
        code = compile(block, f"README.md python block {i}", "exec")
        try:
            exec(code, namespace)  # noqa: S102 - the README's own code
        except Exception as err:  # noqa: BLE001 - report which block, which line
            pytest.fail(f"README python block {i} fails: {type(err).__name__}: {err}")
    # what the blocks promise, checked on what they left behind
    for name in ("rules.png", "filters.png", "evolution.png", "runs/mine/topk.json"):
        assert (tmp_path / name).is_file(), f"the README's Python blocks should write {name}"
    evo = namespace["evo"]
    assert evo.labels == namespace["snaps"].labels and len(evo.labels) >= 3  # type: ignore[attr-defined]
    x = namespace["x"]
    assert isinstance(x, torch.Tensor) and tuple(x.shape) == (1, 3, 32, 32)
    assert str(namespace["res"].format_table()).count("\n") >= 4  # type: ignore[attr-defined]
