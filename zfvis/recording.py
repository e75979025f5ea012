"""Recording a forward pass: the chain of layers, max-pool switches, the seed layer's map.

One forward pass under forward hooks on every leaf module records, for each module that
runs, its name, type and the shapes of its input and output; for every max-pool the
switches (where each maximum came from, recomputed since torchvision's pools do not
return them); and the output of the requested layer, where the pass stops. The hooks are
removed and every module's ``training`` flag restored when the pass ends, also when it
raises. Nothing in the model is changed: ``inplace`` ReLUs stay in place, which is safe
because nothing recorded is read after a later module could overwrite it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Step", "Recording", "RemovableHandles", "UnsupportedModelError", "record", "SUPPORTED_TYPES"]

#: Module types the deconvnet can reverse, with what it does with each.
SUPPORTED_TYPES: dict[type[nn.Module], str] = {
    nn.Conv2d: "transposed convolution with the same weights (bias not applied)",
    nn.ReLU: "ReLU",
    nn.MaxPool2d: "unpooling with the recorded switches (overlaps add up)",
    nn.AvgPool2d: "its transpose",
    nn.AdaptiveAvgPool2d: "its transpose",
    nn.BatchNorm2d: "folded into the preceding convolution (its per-channel scale)",
    nn.Linear: "transposed (weights only)",
    nn.Flatten: "reshape back",
    nn.LocalResponseNorm: "passed through",
    nn.Dropout: "passed through",
    nn.Dropout2d: "passed through",
    nn.Identity: "passed through",
}


class UnsupportedModelError(ValueError):
    """The model contains a module type or a topology the deconvnet cannot reverse."""


@dataclasses.dataclass
class Step:
    """One module call in the recorded chain.

    Attributes:
        name: The module's dotted name from ``named_modules()``; ``"<flatten>"`` for a
            flatten done in ``forward()`` rather than by a module.
        module: The module (``None`` for an implicit flatten).
        in_shape: Shape of its input, without the batch dimension.
        out_shape: Shape of its output, without the batch dimension.
    """

    name: str
    module: nn.Module | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        """The module's type name (``Flatten`` for an implicit flatten)."""
        return "Flatten" if self.module is None else type(self.module).__name__


@dataclasses.dataclass
class Recording:
    """What one forward pass left for the reverse pass.

    Attributes:
        layer: The module name the pass stopped at (``None``: it ran to the end).
        steps: The chain of module calls, up to and including ``layer``.
        switches: For each max-pool step index, the flat argmax indices into its input
            (N, C, H_out, W_out).
        output: The output of ``layer`` (or of the last module), (N, C, H, W) or (N, F).
        input_shape: The shape of the images, (N, C, H, W).
    """

    layer: str | None
    steps: list[Step]
    switches: dict[int, torch.Tensor]
    output: torch.Tensor
    input_shape: tuple[int, ...]


class RemovableHandles(list):  # type: ignore[type-arg]
    """A list of hook handles whose :meth:`remove` removes them all and empties it."""

    def remove(self) -> None:
        while self:
            self.pop().remove()


class _Stop(Exception):
    """Raised inside the forward pass once the requested layer has run."""


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (``None`` for inference tensors)."""
    try:
        return t._version
    except RuntimeError:
        return None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts every module in eval mode and restores each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class _Recorder:
    def __init__(self, model: nn.Module, stop_at: str | None) -> None:
        self.model = model
        self.stop_at = stop_at
        self.handles = RemovableHandles()
        self.steps: list[Step] = []
        self.switches: dict[int, torch.Tensor] = {}
        self.last: torch.Tensor | None = None
        self.last_version: int | None = None
        self.in_version: int | None = None
        self.output: torch.Tensor | None = None
        self.seen: set[str] = set()

    def register(self) -> RemovableHandles:
        self.handles.remove()
        for name, module in _leaves(self.model):
            self.handles.append(module.register_forward_pre_hook(self._pre_hook))
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self.handles

    def _pre_hook(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        # the input's version before the module runs (an inplace module bumps it)
        x = inputs[0] if inputs else None
        self.in_version = _version(x) if isinstance(x, torch.Tensor) else None

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            self._on_call(name, module, inputs, output)

        return hook

    def _on_call(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if type(module) not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"module '{name}' of type {type(module).__name__} is not supported; supported types: "
                f"{', '.join(t.__name__ for t in SUPPORTED_TYPES)}"
            )
        x = inputs[0] if inputs else None
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(f"module '{name}' does not map one tensor to one tensor")
        prev = self.last
        if prev is None:  # pragma: no cover - set to the images before every pass
            raise RuntimeError("recorder used outside record()")
        # an in-place operation between two modules (``out += identity``) keeps the tensor
        # but bumps its version counter: that is not a chain either
        prev_ok = self.in_version == self.last_version
        if not prev_ok or not _same_tensor(x, prev):
            if prev_ok and x.dim() == 2 and x.data_ptr() == prev.data_ptr() and x.numel() == prev.numel() and prev.dim() == 4:
                self.steps.append(Step("<flatten>", None, tuple(prev.shape[1:]), tuple(x.shape[1:])))
            else:
                before = f"the output of '{self.steps[-1].name}'" if self.steps else "the model's input"
                raise UnsupportedModelError(
                    f"the input of module '{name}' is not {before}: the model is not a single chain of "
                    "modules (a branch, a residual addition or a functional operation lies between them); "
                    "zfvis reverses plain chains of modules"
                )
        if name in self.seen:
            raise UnsupportedModelError(
                f"module '{name}' runs more than once in the forward pass; the deconvnet needs each "
                "layer to be its own module (give every use its own instance)"
            )
        self.seen.add(name)
        index = len(self.steps)
        self.steps.append(Step(name, module, tuple(x.shape[1:]), tuple(out.shape[1:])))
        if isinstance(module, nn.MaxPool2d):
            if isinstance(output, tuple):
                self.switches[index] = output[1]
            else:
                self.switches[index] = F.max_pool2d(
                    x,
                    module.kernel_size,
                    module.stride,
                    module.padding,
                    module.dilation,
                    ceil_mode=module.ceil_mode,
                    return_indices=True,
                )[1]
        self.last = out
        self.last_version = _version(out)
        if name == self.stop_at:
            self.output = out
            raise _Stop


def _model_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for p in model.parameters():
        return p.device, p.dtype
    return None, None


def record(model: nn.Module, images: torch.Tensor, layer: str | None = None) -> Recording:
    """Runs ``model`` on ``images`` under hooks, up to and including module ``layer``.

    Args:
        model: A chain of supported modules.
        images: A batch (N, C, H, W); moved to the model's device and dtype.
        layer: Dotted module name to stop at, or ``None`` to run the whole chain.

    Returns:
        The :class:`Recording`.

    Raises:
        UnsupportedModelError: An unsupported module type or a non-chain topology.
        ValueError: ``layer`` never ran in the forward pass.
    """
    device, dtype = _model_device_dtype(model)
    if device is not None:
        images = images.to(device=device, dtype=dtype)
    rec = _Recorder(model, layer)
    rec.last = images
    rec.last_version = _version(images)
    with eval_mode(model), torch.no_grad():
        rec.register()
        try:
            final = model(images)
        except _Stop:
            final = None
        except RuntimeError as err:
            raise ValueError(
                f"the forward pass failed on input of shape {tuple(images.shape)}: {str(err).splitlines()[0]} "
                "(does the model expect another input size or channel count?)"
            ) from err
        finally:
            rec.handles.remove()
    if layer is not None and rec.output is None:
        raise ValueError(f"layer '{layer}' did not run in the forward pass; pick a layer the model uses")
    if layer is None:
        if (
            not isinstance(final, torch.Tensor)
            or rec.last is None
            or not _same_tensor(final, rec.last)
            or _version(final) != rec.last_version
        ):
            raise UnsupportedModelError("the model's output is not the output of its last module")
        rec.output = final
    assert rec.output is not None
    return Recording(layer, rec.steps, rec.switches, rec.output, tuple(images.shape))


def leaf_names(model: nn.Module) -> list[str]:
    """Dotted names of the model's leaf modules, in ``named_modules()`` order."""
    return [n for n, _ in _leaves(model)]


def chain_summary(steps: Sequence[Step]) -> list[str]:
    """One line per step: name, type and output shape (for error messages and listings)."""
    return [f"{s.name} ({s.kind}) -> {tuple(s.out_shape)}" for s in steps]
