"""Keeps the test suite's memory bounded, and reports it.

The suite runs in one process, so a model a test module caches (``functools.cache`` on a
builder, a module-scoped fixture) stays alive until something lets go of it. This plugin,
loaded by ``conftest.py``, does that for every test module, those added later included:

* at the end of each module, every ``functools`` cache in the module's namespace is
  cleared (``cache_clear``) and the garbage collector runs, so the models one module built
  are freed before the next module starts; above ``SOFT_SHARE`` of the budget they are
  cleared after any test (a module that caches model after model is rebuilt, not grown);
* after a test that left the process more than ``COLLECT_AFTER_MB`` larger, the garbage
  collector runs (models caught in reference cycles, as fx graphs make them, are otherwise
  freed only when Python next collects, however large they are);
* every test's resident memory (after it ran) and the process's peak so far are recorded;
* at the end of the session, the peak resident memory and the wall time are printed, with
  the tests that raised the peak most and the slowest modules; a peak above the budget
  (``ZFVIS_TEST_MAX_RSS_MB``, default 3000 MiB) fails the session, naming those tests.

``ZFVIS_TEST_REPORT=FILE`` also writes one JSON line per test (``scripts/suite_report.py``
summarises it). Within one module, bound what a cache holds with :func:`bounded_model_cache`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from torch import nn

DEFAULT_BUDGET_MB = 3000
#: A test that leaves the process this much larger is followed by a garbage collection: a
#: model caught in a reference cycle is otherwise freed only when Python next collects.
COLLECT_AFTER_MB = 50
#: Above this share of the budget, a module's caches are cleared after any of its tests (its
#: models are built again when next used), not only at its end.
SOFT_SHARE = 0.6
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """The process's resident memory now, in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:  # not Linux: the peak is the best we have
        return peak_mb()


def peak_mb() -> float:
    """The process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def bounded_model_cache(max_mb: float = 1200) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """``functools.cache`` for model builders, holding at most ``max_mb`` MiB of models.

    The least recently used models are dropped first; a dropped model is built again on its
    next use. The wrapper has ``cache_clear``, so the module-end clean-up frees it too.
    """

    def decorate(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        held: dict[Any, tuple[nn.Module, int]] = {}

        @functools.wraps(build)
        def cached(*args: Any) -> nn.Module:
            if args in held:
                held[args] = held.pop(args)  # most recently used last
                return held[args][0]
            model = build(*args)
            size = model_bytes(model)
            while held and sum(s for _, s in held.values()) + size > max_mb * 2**20:
                held.pop(next(iter(held)))
                release_memory()
            held[args] = (model, size)
            return model

        cached.cache_clear = held.clear  # type: ignore[attr-defined]
        return cached

    return decorate


class MemoryGuard:
    """The pytest plugin: frees each module's caches and records memory per test."""

    def __init__(self, config: pytest.Config) -> None:
        self.budget = float(os.environ.get("ZFVIS_TEST_MAX_RSS_MB", DEFAULT_BUDGET_MB))
        path = os.environ.get("ZFVIS_TEST_REPORT")
        self.report = open(path, "w", encoding="utf-8") if path else None  # noqa: SIM115
        self.records: list[dict[str, Any]] = []
        self.start = time.monotonic()
        self.peak_at_start = peak_mb()
        self.floor = 0.0

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):  # noqa: ANN201
        before, rss_before, t0 = peak_mb(), rss_mb(), time.monotonic()
        yield
        if nextitem is None or nextitem.module is not item.module:  # the module's last test: let go of it
            free_module_caches(item.module)
            self.floor = 0.0
        elif rss_mb() > max(self.budget * SOFT_SHARE, self.floor + 500):  # a module caching model after model
            free_module_caches(item.module)
            self.floor = rss_mb()  # what the module holds otherwise: clear again only well above it
        elif rss_mb() - rss_before > COLLECT_AFTER_MB:  # a model in a reference cycle (fx graphs make them)
            release_memory()
        rec = {"test": item.nodeid, "seconds": round(time.monotonic() - t0, 3), "rss_mb": round(rss_mb(), 1),
               "peak_mb": round(peak_mb(), 1), "peak_raise_mb": round(peak_mb() - before, 1)}
        self.records.append(rec)
        if self.report:
            self.report.write(json.dumps(rec) + "\n")
            self.report.flush()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.records:
            return
        peak, wall = peak_mb(), time.monotonic() - self.start
        tr = terminalreporter
        tr.write_sep("-", f"memory: peak {peak:.0f} MiB resident (budget {self.budget:.0f}), {wall:.0f} s wall")
        for rec in sorted(self.records, key=lambda r: -r["peak_raise_mb"])[:5]:
            if rec["peak_raise_mb"] >= 1:
                tr.write_line(f"  +{rec['peak_raise_mb']:7.0f} MiB to {rec['peak_mb']:6.0f}  {rec['test']}")
        if peak > self.budget:
            tr.write_line(f"the suite's peak memory {peak:.0f} MiB exceeds ZFVIS_TEST_MAX_RSS_MB={self.budget:.0f}: "
                          "free the models the tests above keep (tests/memory_guard.py)", red=True)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.report:
            self.report.close()
        if self.records and peak_mb() > self.budget and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def free_module_caches(module: Any) -> None:
    """Clears every cache in a test module's namespace and collects the garbage."""
    for value in list(vars(module).values()) if module is not None else []:
        clear = getattr(value, "cache_clear", None)
        if callable(clear) and getattr(value, "__module__", None) == module.__name__:
            clear()
    release_memory()


def release_memory() -> None:
    """Collects the garbage and hands the freed heap back to the system (glibc keeps it
    otherwise, so the resident memory would only grow)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> Any:
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


_LIBC = _libc()
