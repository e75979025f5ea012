"""Where in the model's own code a node, or a failure of the trace, comes from (and what to do)."""

from __future__ import annotations

import linecache
import re
import traceback
from pathlib import Path

import torch.fx as fx

from ..io.errors import UnsupportedModelError

__all__ = ["describe", "user_frame", "node_source", "trace_failure"]


def describe(err: BaseException) -> str:
    """``Type: first line`` of an exception."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def user_frame(err: BaseException) -> str | None:
    """``file:line: code`` of the innermost frame outside torch (the model's own code)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return None
    f = frames[-1]
    code = (f.line or linecache.getline(f.filename, f.lineno or 0)).strip()
    return f"{f.filename}:{f.lineno}: {code}"


_OWN_DIR = str(Path(__file__).resolve().parent)  # zfvis.core: not the model's code


def node_source(node: fx.Node) -> str | None:
    """``file:line: code`` of the model's own line that made the node (fx's stack trace,
    innermost frame outside torch)."""
    trace = node.stack_trace
    if not trace:
        return None
    lines = trace.splitlines()
    found = None
    for i, line in enumerate(lines):
        m = re.match(r'\s*File "([^"]+)", line (\d+)', line)
        if m and "/torch/" not in m.group(1) and not m.group(1).startswith(_OWN_DIR):
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].lstrip().startswith("File ") else ""
            found = f"{m.group(1)}:{m.group(2)}" + (f": {code}" if code else "")
    return found


def trace_failure(err: BaseException) -> UnsupportedModelError:
    """The refusal of a model whose own ``forward()`` fx cannot trace, with what to do."""
    where = user_frame(err)
    if isinstance(err, TypeError) and "does not support item assignment" in str(err):
        hint = ("write the assignment out of place (torch.cat, torch.where, Tensor.index_put), or move it into a "
                "submodule, which zfvis keeps whole and replays")
    else:
        hint = ("move tensor-dependent control flow into a submodule, or make the model's forward() a plain "
                "sequence of tensor operations")
    return UnsupportedModelError(f"cannot trace the model's forward() with torch.fx ({describe(err)})"
                                 + (f" at {where}" if where else "") + f". Hint: {hint}")
