"""What a mining run is asked to do (:class:`MineSettings`) and what it returns (:class:`MiningResult`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.checks import check_int, check_number, check_path
from ..io.errors import InputTypeError, UserInputError

__all__ = ["MineSettings", "MiningResult", "resolve_settings", "check_inputs"]

# --------------------------------------------------------------------------- settings and records


@dataclasses.dataclass
class MineSettings:
    """What a mining run is asked to do.

    Attributes:
        layers: Layer names or aliases (``conv1``, ``features.3``).
        out_dir: Output folder: ``topk.json``, figures, tiles, ``index.html``,
            ``settings.json``, ``state.pt``.
        top: Entries per channel (9 in the paper; the figures draw the first 9).
        channels: Channels to mine, for every layer (channel numbers, or inclusive
            ``(first, last)`` ranges) or per layer (a dict; missing layers: all);
            ``None``: all channels.
        batch_size: Images per forward pass (also for pass 2).
        workers: DataLoader worker processes for pass 1.
        device: Where the model runs.
        limit: Use only ``limit`` files, evenly spaced over the sorted list
            (:func:`zfvis.io.images.evenly_spaced`).
        state_every: Save the state at least every this many batches of pass 1...
        state_seconds: ...and at least every this many seconds.
        progress: Show progress bars and print a summary (rank 0).
        restart: Discard a saved state, also one of a zfvis run with other settings.
        overwrite: Write into a folder that holds other files (zfvis replaces only its
            own file names there).
        aliases: Extra layer aliases (default: the zoo's paper names).
        rule: The ReLU rule of the projections (``deconvnet``, ``guided``, ``gradient``).
        model_name: Recorded in ``topk.json`` and in figure titles.
        weights: Recorded in ``topk.json``.
        figures: Write figures, tiles and the gallery (``False``: only ``topk.json``).
        probe: Run the whole pipeline on one image before pass 1.
        stop_after_batches: Testing aid: interrupt (as Ctrl-C does) after this many
            batches of pass 1 in this call.
        record: Further settings to record in ``settings.json`` (the command line's).
        option_names: Name settings in messages as command-line options (``--top``)
            rather than as arguments (``top``).
        feature_vis: Also compute, for every mined channel, a synthetic image that maximises
            it (feature visualization by optimization, :func:`zfvis.feature_vis`), written to
            ``synthetic/<layer>/c0042.png`` and shown beside the channel's top 9 in the figures
            and the gallery.
        feature_vis_steps: Optimisation steps of each synthetic image.
    """

    layers: Sequence[str]
    out_dir: str | os.PathLike[str]
    top: int = 9
    channels: Sequence[int] | Sequence[tuple[int, int]] | dict[str, Sequence[int]] | None = None
    batch_size: int = 64
    workers: int = 0
    device: str | torch.device = "cpu"
    limit: int | None = None
    state_every: int = 20
    state_seconds: float = 60.0
    progress: bool = True
    restart: bool = False
    overwrite: bool = False
    aliases: dict[str, str] | None = None
    rule: str = "deconvnet"
    model_name: str = "model"
    weights: str | None = None
    figures: bool = True
    probe: bool = True
    stop_after_batches: int | None = None
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    option_names: bool = False
    feature_vis: bool = False
    feature_vis_steps: int = 256

    def name(self, field: str) -> str:
        """How the person calls a setting: ``--batch-size`` or ``batch_size``."""
        return f"--{field.replace('_', '-')}" if self.option_names else field

    def flag(self, field: str) -> str:
        """How the person turns a flag on: ``--restart`` or ``restart=True``."""
        return f"--{field.replace('_', '-')}" if self.option_names else f"{field}=True"

    def validate(self) -> None:
        """Checks every setting's type and range.

        Raises:
            UserInputError: The first bad setting, named.
        """
        if isinstance(self.layers, str) or not isinstance(self.layers, Sequence) or not self.layers \
                or not all(isinstance(x, str) for x in self.layers):
            raise UserInputError(f"{self.name('layers')}: a list of at least one layer name (e.g. ['conv1']), "
                                 f"got {self.layers!r}")
        check_path(self.name("out_dir"), self.out_dir)
        check_int(self.name("top"), self.top, 1)
        check_int(self.name("batch_size"), self.batch_size, 1)
        check_int(self.name("workers"), self.workers, 0, 256)
        check_int(self.name("state_every"), self.state_every, 1)
        if self.limit is not None:
            check_int(self.name("limit"), self.limit, 1)
        check_number(self.name("state_seconds"), self.state_seconds, 0, above=True)
        self._validate_channels()
        if self.aliases is not None and not (isinstance(self.aliases, dict)
                                             and all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in self.aliases.items())):
            raise InputTypeError(f"aliases must be a dict of layer names (alias -> layer), got {self.aliases!r}")
        check_int(self.name("feature_vis_steps"), self.feature_vis_steps, 1, 100_000)
        for flag in ("progress", "restart", "overwrite", "figures", "probe", "feature_vis"):
            if not isinstance(getattr(self, flag), bool):
                raise UserInputError(f"{self.name(flag)} must be true or false, got {getattr(self, flag)!r}")


    def _validate_channels(self) -> None:
        """The kind of ``channels`` (their range is checked against each layer later)."""
        c = self.channels
        if c is None or isinstance(c, dict) and all(isinstance(k, str) for k in c):
            per_layer = list(c.values()) if isinstance(c, dict) else []
        elif isinstance(c, (list, tuple, range)):
            per_layer = [c]
        else:
            raise InputTypeError(f"{self.name('channels')} must be a list of channel numbers or (first, last) ranges, "
                                 f"or a dict layer -> list, got {c!r}")
        for chans in per_layer:
            if not isinstance(chans, (list, tuple, range)):
                raise InputTypeError(f"{self.name('channels')}: each layer's channels must be a list, got {chans!r}")


@dataclasses.dataclass
class MiningResult:
    """What :func:`mine` produced.

    Attributes:
        topk: The content of ``topk.json`` (``None`` on ranks other than 0).
        out_dir: The output folder.
        images: Images read successfully in pass 1 (all ranks).
        skipped: ``{"image", "index", "error"}`` for every file that could not be read.
        seconds: Wall time of the whole run.
        outputs: Files written (rank 0).
        resumed_batches: Batches of pass 1 taken from a saved state instead of run.
        pass1_seconds: Wall time of pass 1's loop in this call (0 when it was skipped).
    """

    topk: dict[str, Any] | None
    out_dir: Path
    images: int
    skipped: list[dict[str, Any]]
    seconds: float
    outputs: list[Path]
    resumed_batches: int = 0
    pass1_seconds: float = 0.0

def resolve_settings(layers: Sequence[str] | None, settings: MineSettings | None, options: dict[str, Any]) -> MineSettings:
    if settings is not None:
        if layers is not None or options:
            raise UserInputError("give either settings=MineSettings(...) or layers and keyword arguments, not both")
        if not isinstance(settings, MineSettings):
            raise InputTypeError(f"settings must be a zfvis.mining.MineSettings, got {type(settings).__name__}")
        return settings
    if isinstance(layers, str):
        raise InputTypeError(f"layers must be a list of layer names, e.g. ['{layers}'], not a str")
    if "out_dir" not in options:
        raise UserInputError("out_dir is required: the folder for topk.json, figures and the gallery")
    fields = {f.name for f in dataclasses.fields(MineSettings)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UserInputError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    if layers is not None and not isinstance(layers, Sequence):
        raise InputTypeError(f"layers must be a list of layer names, got {type(layers).__name__}")
    return MineSettings(layers=list(layers) if layers is not None else [], **options)


def check_inputs(model: object, preprocess: object, dataset: object) -> Path:
    """The kinds of :func:`mine`'s positional arguments; returns the data set's path."""
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(preprocess) or not callable(getattr(preprocess, "denormalize", None)):
        raise InputTypeError(f"preprocess must be a callable from a PIL image to a (C, H, W) tensor with a "
                             f"denormalize method (a zfvis.models.zoo.Preprocess), got {type(preprocess).__name__}")
    return check_path("dataset", dataset)
