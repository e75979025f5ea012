"""Devices, zoo models and weights, layer names and input sizes, as the commands take them."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.checks import (
    check_device,
    check_input_size,
    check_memory,
)
from ..io.errors import (
    first_line,
    is_out_of_memory,
)
from ..models.checkpoints import check_checkpoint_file
from ..models.zoo import get_spec, list_models, load_model
from ._common import CLIError

__all__ = [
    "resolve_device",
    "check_model_name",
    "check_weights",
    "load_zoo_model",
    "resolve_layer",
    "feature_layers",
    "shapes_only",
    "fit_input_size",
]

# --------------------------------------------------------------------------- devices, models, layers


def resolve_device(name: str) -> torch.device:
    """A torch device, checked to exist (:func:`zfvis.io.checks.check_device`)."""
    return check_device(name, "--device")


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith((".pt", ".pth", ".ckpt")) or Path(weights).exists()


def check_model_name(name: str) -> None:
    """Refuses an unknown zoo model, naming the closest; ``timm:NAME`` is checked against timm."""
    if name.startswith("timm:"):
        get_spec(name)  # timm installed, and the architecture known to it
        return
    if name not in list_models():
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise CLIError(f"unknown model '{name}'.{hint} Valid: {', '.join(list_models())}")


def check_weights(model: str, weights: str | None, what: str = "--weights") -> None:
    """Checks a weights name against the model's, or a weights file's kind, before loading."""
    if weights is None:
        return
    if _looks_like_path(weights):
        check_checkpoint_file(weights, "weights file" if what == "--weights" else what)
        return
    spec = get_spec(model)
    if spec.timm is not None:
        return  # DEFAULT or a pretrained tag: timm_pretrained checks it against timm's list
    names = ["random"] + (["packaged"] if spec.packaged else [])
    if spec.weights_enum is not None:
        names += list(dict.fromkeys(["DEFAULT", *spec.weights_enum.__members__]))
    if weights not in names:
        close = difflib.get_close_matches(weights, names, n=2, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise CLIError(f"unknown weights '{weights}' for {model}.{hint} Valid: {', '.join(names)}, or the path of a .pt file")


def load_zoo_model(name: str, weights: str | None, device: torch.device) -> tuple[nn.Module, Any]:
    """``zoo.load_model`` after checking the model and weights a person named."""
    check_model_name(name)
    check_weights(name, weights)
    if weights is not None and _looks_like_path(weights):
        return load_model(name, weights=Path(weights), device=device)  # a path, whatever its name
    return load_model(name, weights=weights, device=device)


def resolve_layer(dn: Any, layer: str) -> str:
    """The engine's name for a layer the person named.

    Raises:
        UserInputError: An unknown name (the engine's message names the closest ones).
    """
    return dn.resolve(layer)


def feature_layers(dn: Any) -> tuple[list[str], list[str]]:
    """The layers the commands choose their defaults from, in execution order: the
    feature-map layers and the vector layers. For a zoo model its paper names (``conv1``..,
    ``layer1``.., ``inception3a``..; pools left out) and ``fc6``..; for another model its
    convolutions and linear layers."""
    maps = [a for a in dn.aliases if not a.startswith(("pool", "fc"))]
    vectors = [a for a in dn.aliases if a.startswith("fc")]
    if not maps:
        nodes = [n for n in dn.graph.nodes if n.carries and n.module_name]
        maps = [n.module_name for n in nodes if isinstance(n.module, nn.Conv2d)]
        vectors = [n.module_name for n in nodes if isinstance(n.module, nn.Linear)]
    return maps, vectors


def _model_place(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


class _Tally:
    """Counts the bytes of the tensors the operations inside create (views excluded)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tally = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                out = func(*args, **(kwargs or {}))
                if not getattr(func, "is_view", False):
                    seen = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                    tally.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(out)
                                       if isinstance(t, torch.Tensor) and id(t) not in seen)
                return out

        self.bytes = 0
        self.mode = Mode()


@contextlib.contextmanager
def shapes_only() -> Iterator[_Tally]:
    """Inside, tensors are fake: operations compute shapes and dtypes but allocate nothing.
    Yields a tally of the bytes those operations would have allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)  # its report of a failing op is the error we raise, not a log line
    tally = _Tally()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), tally.mode:
            yield tally
    finally:
        log.setLevel(level)


def _is_fake_failure(err: BaseException) -> bool:
    """Whether a failure in :func:`shapes_only` is the fake tensors' own limit (an op they
    cannot run without data), not the shapes'."""
    chain = [err, err.__cause__]
    return any(e is not None and type(e).__module__.startswith(("torch._subclasses", "torch.fx.experimental"))
               for e in chain)


def _forward(dn: Any, layer: str, size: int, device: torch.device, dtype: torch.dtype) -> None:
    dn.output(torch.zeros(1, 3, size, size, device=device, dtype=dtype), layer)


def _probe_size(dn: Any, layer: str, size: int, device: torch.device, dtype: torch.dtype) -> tuple[BaseException | None, int | None]:
    """A forward pass at ``size`` without allocating: (its failure or ``None``, the bytes it
    would allocate; ``None`` when fake tensors cannot run the model)."""
    try:
        with shapes_only() as tally:
            _forward(dn, layer, size, device, dtype)
    except ImportError:  # a torch without fake tensors (a private API): a real pass instead
        return None, None
    except (ValueError, RuntimeError) as err:
        if _is_fake_failure(err):
            return None, None
        return err, tally.bytes
    return None, tally.bytes


def fit_input_size(dn: Any, model: nn.Module, layer: str, size: int, default: int, model_name: str, *,
                   memory: bool = True) -> None:
    """Checks that square inputs of ``size`` reach ``layer``, and fit in memory, before any
    real work: the forward pass runs on fake tensors (shapes only, nothing allocated). The
    model's own ``default`` size is the reference: only when it works and ``size`` does not
    is the size at fault.

    Args:
        dn: The model's deconvnet.
        model: The model.
        layer: The deepest layer the command needs.
        size: The side asked for.
        default: The model's own side.
        model_name: For messages.
        memory: Also refuse a size whose forward pass needs more memory than is free.

    Raises:
        CLIError: ``size`` is out of bounds, does not fit the model up to ``layer``, or
            needs more memory than is free.
    """
    check_input_size(size)
    device, dtype = _model_place(model)
    failure, need = _probe_size(dn, layer, size, device, dtype)
    if need is None:  # fake tensors cannot run this model: a real pass, as small as it gets
        if size == default:
            return
        try:
            with torch.no_grad():
                _forward(dn, layer, size, device, dtype)
            return
        except (ValueError, RuntimeError) as err:
            if is_out_of_memory(err):
                raise
            failure = err
    if failure is None:
        if memory:
            check_memory(need, device, f"--input-size {size}: a forward pass of {model_name} up to layer {layer}",
                         "--input-size")
        return
    if size != default and _probe_size(dn, layer, default, device, dtype)[0] is None:
        raise CLIError(f"--input-size {size} does not fit {model_name} up to layer {layer} ({first_line(failure)}); "
                       f"its own input size is {default}")
    raise failure  # the model fails at its own size too: not the size's fault
