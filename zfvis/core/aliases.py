"""Friendly layer names: a small registry from model classes to their papers' names.

The zoo registers, for each architecture it knows, a function that maps the papers'
names (``conv1``, ``conv3_3``, ``fc6``, ``inception4c``) to layer names of the model
(``named_modules()`` or graph node names). :class:`zfvis.Deconvnet` asks this registry
for a model's aliases unless it is given its own.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["register_aliases", "layer_aliases"]

AliasFn = Callable[[nn.Module], dict[str, str]]
_REGISTRY: list[tuple[type[nn.Module], AliasFn]] = []


def register_aliases(cls: type[nn.Module], fn: AliasFn) -> None:
    """Registers ``fn(model) -> {alias: layer name}`` for instances of ``cls``."""
    _REGISTRY.append((cls, fn))


def layer_aliases(model: nn.Module) -> dict[str, str]:
    """The registered aliases of ``model``'s architecture (``{}`` for unknown models)."""
    for cls, fn in _REGISTRY:
        if isinstance(model, cls):
            return fn(model)
    return {}
