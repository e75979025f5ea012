"""The package layout: which subpackage may import which, no import cycles, sizes that fit a screen.

The subpackages stand in layers, each importing only from its own layer or lower ones
(the table :data:`LAYERS`): ``io`` < ``core`` < ``models`` < ``analysis`` < ``viz`` <
``mining`` < ``cli`` < ``serve``. Every module of the package is read as an AST (imports
inside functions count too), so a new module is checked without being listed anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zfvis"

#: Each subpackage (or top-level module) -> its layer; a module may import from its own
#: layer or lower ones. ``__init__``/``__main__`` of the package are the entry points, above all.
LAYERS = {
    "_version": 0,
    "io": 0,
    "core": 1,
    "models": 2,
    "analysis": 3,
    "viz": 4,
    "mining": 5,
    "cli": 6,
    "serve": 7,
    "__init__": 9,
    "__main__": 9,
}

#: Functions whose positional parameters are fixed by the API they override.
OVERRIDES = {("core/graph.py", "create_proxy")}  # torch.fx.Tracer.create_proxy

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_POSITIONAL = 6


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(source: str, module: str, *, package: bool = False) -> list[tuple[str, bool]]:
    """The zfvis modules ``source`` (the text of ``module``) imports, each with whether the
    import runs at run time (``False``: only under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(source)
    typing_only = _type_checking_lines(tree)
    here = module.split(".") if package else module.split(".")[:-1]
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        runtime = node.lineno not in typing_only if isinstance(node, ast.stmt) else True
        if isinstance(node, ast.Import):
            found += [(a.name, runtime) for a in node.names if a.name.split(".")[0] == "zfvis"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "zfvis":
                base = node.module or ""
            else:
                continue
            for alias in node.names:  # `from .core import deconvnet` imports a module
                sub = f"{base}.{alias.name}"
                found.append((sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                              or _is_package(sub) else base, runtime))
    return found


def layer_of(module: str) -> str:
    """The entry of :data:`LAYERS` a module belongs to (``zfvis.core.graph`` -> ``core``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def wrong_way(importer: str, imported: str) -> bool:
    """Whether ``importer`` imports from a higher layer than its own (or the package root)."""
    if imported == "zfvis" and importer != "zfvis":
        return True  # the public API is for users: inside the package, import the defining module
    return LAYERS[layer_of(imported)] > LAYERS[layer_of(importer)]


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = imports_of(path.read_text(), name, package=path.name == "__init__.py")
        graph[name] = {d for d, runtime in deps if runtime and d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


# --------------------------------------------------------------------------- the tests


def test_every_subpackage_has_a_layer_and_says_what_it_owns() -> None:
    for path in PACKAGE.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            assert path.name in LAYERS, f"subpackage {path.name} has no layer in LAYERS"
            doc = ast.get_docstring(ast.parse((path / "__init__.py").read_text()))
            assert doc and len(doc) > 40, f"zfvis/{path.name}/__init__.py needs a docstring saying what it owns"
        elif path.suffix == ".py":
            assert path.stem in LAYERS, f"top-level module {path.name} has no layer in LAYERS"


def test_imports_point_down_the_layers() -> None:
    bad = []
    for name, path in _modules().items():
        for dep, _ in imports_of(path.read_text(), name, package=path.name == "__init__.py"):
            if wrong_way(name, dep):
                bad.append(f"{name} imports {dep}")
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_the_direction_check_catches_an_upward_import() -> None:
    """The check above is not vacuous: an upward import, relative or absolute, at module level
    or in a function, and an import of the package root are each found."""
    cases = {
        "from ..viz import render\n": "zfvis.viz.render",
        "def f():\n    from ..mining.pipeline import mine\n": "zfvis.mining.pipeline",
        "import zfvis.cli.project\n": "zfvis.cli.project",
        "from .. import Deconvnet\n": "zfvis",
    }
    for source, target in cases.items():
        deps = [d for d, _ in imports_of(source, "zfvis.core.deconvnet")]
        assert deps == [target], (source, deps)
        assert wrong_way("zfvis.core.deconvnet", target)
    assert not wrong_way("zfvis.viz.render", "zfvis.core.deconvnet")  # downward is fine
    assert not wrong_way("zfvis.core.ops", "zfvis.core.reverse")  # so is sideways within a layer


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles: {cycles}"
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]  # the finder finds one


def test_the_core_loads_no_drawing_code() -> None:
    code = ("import sys, zfvis.core, zfvis.core.deconvnet; "
            "print(','.join(m for m in ('matplotlib', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import zfvis.core loaded {out.stdout.strip()}"
    code = "import sys, zfvis; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]  # import zfvis is quick: names load on first use


def test_every_public_name_resolves_and_is_listed() -> None:
    import zfvis

    for name in zfvis.__all__:
        assert getattr(zfvis, name) is not None, name
    assert {"Deconvnet", "occlusion", "mining_page", "projection_figure", "load_model"} <= set(zfvis.__all__)
    import zfvis.mining

    assert callable(zfvis.mining.mine)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        zfvis.nonexistent  # noqa: B018


def _sizes() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            problems.append(f"{rel}: {len(text.splitlines())} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                problems.append(f"{rel}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
            params = node.args.posonlyargs + node.args.args
            positional = len(params) - (1 if params and params[0].arg in ("self", "cls") else 0)
            if positional > MAX_POSITIONAL and (rel, node.name) not in OVERRIDES:
                problems.append(f"{rel}:{node.lineno} {node.name}: {positional} positional parameters "
                                f"(at most {MAX_POSITIONAL}; make the rest keyword-only)")
    return problems


def test_modules_and_functions_fit_a_screen() -> None:
    problems = _sizes()
    assert not problems, "\n".join(problems)
