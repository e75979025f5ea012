"""The test suite's memory guard (``tests/memory_guard.py``) frees what it promises to."""

from __future__ import annotations

import functools
import types
import weakref

import memory_guard
from torch import nn


def test_bounded_model_cache_keeps_within_its_budget() -> None:
    built: list[int] = []

    @memory_guard.bounded_model_cache(max_mb=1.5)
    def build(k: int) -> nn.Module:
        built.append(k)
        return nn.Linear(512, 512)  # about 1 MiB of float32

    a = build(1)
    assert build(1) is a and built == [1]  # cached
    gone = weakref.ref(a)
    del a
    build(2)  # 2 MiB would exceed 1.5: model 1 is dropped and freed
    assert gone() is None
    build(1)
    assert built == [1, 2, 1]
    build.cache_clear()  # type: ignore[attr-defined]
    build(1)
    assert built == [1, 2, 1, 1]


def test_module_caches_are_cleared_at_the_end_of_a_module() -> None:
    module = types.ModuleType("fake_test_module")

    def build() -> nn.Module:
        return nn.Linear(4, 4)

    build.__module__ = module.__name__
    cached = functools.cache(build)
    module.get_model = cached  # type: ignore[attr-defined]
    model = cached()
    gone = weakref.ref(model)
    del model
    memory_guard.free_module_caches(module)
    assert gone() is None and cached.cache_info().currsize == 0


def test_memory_is_measured() -> None:
    assert 0 < memory_guard.rss_mb() <= memory_guard.peak_mb() + 1
