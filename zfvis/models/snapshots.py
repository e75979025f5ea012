"""Training snapshots shipped with zfvis: a short training run of ``zfnet-cifar10``, epoch by
epoch, for ``zfvis evolution`` (ZF Fig. 4) without a training run of one's own.

The file ``weights/zfnet_cifar10_snapshots.pt`` holds, for each saved epoch of one run of
``scripts/train.py``, the weights of the layers up to the one the figure shows (``conv2``
and everything before it: conv1, its batch norm, conv2 and its batch norm), and the
run's command and per-epoch history. ``scripts/pack_snapshots.py`` writes it.

A snapshot is a whole ``zfnet-cifar10`` whose later layers were not shipped: their
parameters are NaN, so anything computed past ``through`` is NaN, never a plausible
number, and :func:`zfvis.evolution` refuses a layer whose activations are not finite.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.errors import UserInputError
from .checkpoints import check_checkpoint_file
from .zoo import load_model

__all__ = ["SNAPSHOT_FILE", "Snapshots", "training_snapshots", "truncate_state_dict"]

#: The shipped snapshots, in ``zfvis/models/weights``.
SNAPSHOT_FILE = "zfnet_cifar10_snapshots.pt"


@dataclasses.dataclass
class Snapshots:
    """A training run's models, epoch by epoch.

    Attributes:
        model_name: The zoo architecture.
        through: The deepest layer whose weights the snapshots hold.
        labels: One label per snapshot (``epoch 1``, ...), in training order.
        models: The models, in eval mode, in training order.
        command: The command that trained them.
        history: The run's per-epoch record (loss, accuracies, seconds).
    """

    model_name: str
    through: str
    labels: list[str]
    models: list[nn.Module]
    command: str
    history: list[dict[str, Any]]


def truncate_state_dict(model: nn.Module, state: dict[str, torch.Tensor], through: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that belong to the modules up to the module ``through``
    names (a ``named_modules()`` name), in the model's module order: a chain's first
    layers."""
    order = [name for name, _ in model.named_modules() if name]
    if through not in order:
        raise UserInputError(f"'{through}' is not a module of {type(model).__name__}")
    kept = set(order[: order.index(through) + 1])
    return {k: v for k, v in state.items() if k.rpartition(".")[0] in kept}


def _nan_beyond(model: nn.Module, shipped: set[str]) -> None:
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name not in shipped and tensor.is_floating_point():
                tensor.fill_(float("nan"))


def _read(path: Path) -> dict[str, Any]:
    packed = torch.load(check_checkpoint_file(path, "snapshots file"), map_location="cpu", weights_only=True)
    if not isinstance(packed, dict) or not {"model", "through", "epochs", "command", "history"} <= set(packed):
        raise UserInputError(f"'{path}' is not a snapshots file written by scripts/pack_snapshots.py")
    return packed


def training_snapshots(path: str | Path | None = None) -> Snapshots:
    """The shipped training snapshots of ``zfnet-cifar10`` (or those packed in ``path``).

    Returns:
        The :class:`Snapshots`: the models of each saved epoch, weights through
        ``through`` (later parameters NaN), their labels, and how they were trained.

    Raises:
        FileNotFoundError: The file does not exist (reinstall zfvis).
    """
    if path is None:
        ref = resources.files("zfvis.models") / "weights" / SNAPSHOT_FILE
        with resources.as_file(ref) as file:
            packed = _read(Path(file))
    else:
        packed = _read(Path(path))
    models, labels = [], []
    for epoch, state in sorted(packed["epochs"].items()):
        model, _ = load_model(packed["model"], weights="random")
        missing = [k for k in state if k not in model.state_dict()]
        if missing:
            raise UserInputError(f"the snapshot of epoch {epoch} has keys {packed['model']} lacks: {missing[:3]}")
        model.load_state_dict(state, strict=False)
        _nan_beyond(model, set(state))
        models.append(model.eval())
        labels.append(f"epoch {epoch}")
    return Snapshots(packed["model"], packed["through"], labels, models, packed["command"], packed["history"])
