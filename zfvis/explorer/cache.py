"""A least-recently-used cache bounded in entries and in bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch

__all__ = ["LRUCache", "nbytes"]

V = TypeVar("V")


def nbytes(obj: Any) -> int:
    """The bytes of the tensors and byte strings in ``obj`` (nested lists, tuples, dicts,
    dataclass-like objects with a ``__dict__``), counting each tensor's storage once.

    Args:
        obj: Anything.

    Returns:
        An estimate of the memory ``obj`` holds, in bytes.
    """
    return _walk(obj, set(), set(), 0)


def _walk(obj: Any, seen: set[int], storages: set[tuple[str, int]], depth: int) -> int:
    if depth > 6 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if isinstance(obj, torch.nn.Parameter):
            return 0  # the model's own weights: not the cache's
        storage = obj.untyped_storage()
        key = (str(obj.device), storage.data_ptr())
        if key in storages:
            return 0
        storages.add(key)
        return storage.nbytes()
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_walk(v, seen, storages, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_walk(v, seen, storages, depth + 1) for v in obj)
    if isinstance(obj, torch.nn.Module):
        return 0
    fields = getattr(obj, "__dict__", None)
    if isinstance(fields, dict):
        return sum(_walk(v, seen, storages, depth + 1) for v in fields.values())
    return 0


class LRUCache(Generic[V]):
    """A thread-safe LRU cache whose entries have a size; the least recently used go first
    when the count or the total size passes its limit.

    Args:
        max_bytes: The most bytes the entries may hold together (an entry larger than
            this is not kept at all).
        max_items: The most entries.
        size: Measures an entry (default :func:`nbytes`).
    """

    def __init__(self, max_bytes: int, max_items: int = 64, size: Callable[[V], int] = nbytes) -> None:
        self.max_bytes = int(max_bytes)
        self.max_items = int(max_items)
        self._size = size
        self._data: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        """The entry for ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> V:
        """Stores ``value`` under ``key``, evicting the least recently used entries; returns it."""
        size = self._size(value)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return value
            self._data[key] = (value, size)
            self._bytes += size
            while self._data and (self._bytes > self.max_bytes or len(self._data) > self.max_items):
                _, (_, s) = self._data.popitem(last=False)
                self._bytes -= s
        return value

    def discard(self, predicate: Callable[[Hashable], bool]) -> None:
        """Removes every entry whose key satisfies ``predicate``."""
        with self._lock:
            for key in [k for k in self._data if predicate(k)]:
                self._bytes -= self._data.pop(key)[1]

    @property
    def bytes(self) -> int:
        """The bytes the entries hold now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)
