"""The documentation site builds strictly, shows every page, and documents every public name.

``mkdocs build --strict`` fails on a broken link, a page missing from the navigation, an
image that is not there, or a docstring mkdocstrings cannot render. The tools come with the
``test`` extra (pyproject.toml), which CI installs; without them the build is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import zfvis

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
HAVE_MKDOCS = all(importlib.util.find_spec(m) is not None for m in ("mkdocs", "material", "mkdocstrings"))


@pytest.mark.skipif(not HAVE_MKDOCS, reason="mkdocs, mkdocs-material or mkdocstrings is not installed: "
                    "pip install -e '.[docs]' (the test extra includes them)")
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                                           "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    api = (site / "reference" / "python-api" / "index.html").read_text(encoding="utf-8")
    assert 'id="zfvis.Deconvnet"' in api and "Parameters:" in api  # the docstrings were rendered
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "cli-reference" not in cli and "usage: zfvis serve" in cli  # the generated reference is in
    for page in DOCS.rglob("*.md"):
        rel = page.relative_to(DOCS).with_suffix("")
        built = site / ("index.html" if rel.name == "index" and rel.parent == Path(".") else rel / "index.html")
        assert built.is_file(), f"{page} was not built"


def test_every_page_is_in_the_navigation() -> None:
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:", 1)[1]
    listed = set(re.findall(r":\s*(\S+\.md)\s*$", nav, flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert listed <= pages, f"the navigation lists missing pages: {sorted(listed - pages)}"
    assert pages <= listed, f"pages missing from the navigation: {sorted(pages - listed)}"


def test_every_public_name_is_on_the_api_page() -> None:
    text = (DOCS / "reference" / "python-api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: zfvis\.(\w+)\s*$", text, flags=re.M))
    missing = sorted(set(zfvis.__all__) - documented - {"__version__"})
    assert not missing, f"public names missing from docs/reference/python-api.md: {missing}"
    assert {"mine", "MineSettings", "MiningResult"} <= set(re.findall(r"^::: zfvis\.mining\.(\w+)", text, flags=re.M))


def test_every_command_is_in_the_generated_reference() -> None:
    spec = importlib.util.spec_from_file_location("zfvis_cli_reference", REPO / "scripts" / "cli_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.reference()
    from zfvis.cli import COMMANDS

    for name in COMMANDS:
        assert f"## zfvis {name}\n" in text and f"usage: zfvis {name}" in text, name
    assert module.MARKER in (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")


def test_pages_link_to_images_and_pages_that_exist() -> None:
    """Also for the README and CONTRIBUTING, which GitHub shows and mkdocs does not build."""
    for page in [REPO / "README.md", REPO / "CONTRIBUTING.md", *DOCS.rglob("*.md")]:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to {target}, which does not exist"
