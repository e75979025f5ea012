"""One mining run's record: its layers, progress, winners, data set loader and taps, and the plan phase that fills it."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.deconvnet import Deconvnet
from ..io.checks import check_channels, check_device, check_memory
from ..io.errors import InputTypeError, UserInputError, first_line
from ..io.images import evenly_spaced, list_images, load_image, resolve
from ..models.checkpoints import check_finite
from ..models.zoo import Preprocess
from .identity import stat_files
from .ranks import Ranks
from .run_folder import STATE_VERSION
from .settings import MineSettings

__all__ = ["FEATURE_VIS_PARAM", "FEATURE_VIS_SEED", "FEATURE_VIS_CHUNK", "Layer", "Progress", "Winner", "Run", "Files", "collate", "loader", "Taps", "placed", "plan"]

_PROBE_FILES = 50  # files tried for a readable first image

#: How a mining run's synthetic images are optimised (:mod:`zfvis.mining.synthesis`): the
#: parameterisation, the seed, and the channels optimised together (a fixed split, so that a
#: resumed run computes the same images as an uninterrupted one).
FEATURE_VIS_PARAM = "fourier"
FEATURE_VIS_SEED = 0
FEATURE_VIS_CHUNK = 32


@dataclasses.dataclass
class Layer:
    """One requested layer: its module, output shape and the channels mined."""

    name: str
    module: str
    shape: tuple[int, ...]  # (C, H, W) or (F,)
    channels: list[int]
    select: torch.Tensor | None  # channel indices, None for all

    @property
    def width(self) -> int:
        return self.shape[-1] if len(self.shape) == 3 else 1


@dataclasses.dataclass(frozen=True)
class Progress:
    """Pass 1's state after a whole number of batches (replaced, never mutated, so that an
    interruption always finds a consistent snapshot)."""

    tops: dict[str, dict[str, torch.Tensor]]
    skipped: tuple[dict[str, Any], ...]
    images: int
    batches: int
    done: bool = False
    pages: dict[str, list[list[list[int]]]] = dataclasses.field(default_factory=dict)  # pass 2: page -> boxes
    synthetic: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)  # layer -> channel -> objective

    def to_state(self, fingerprint: str) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": fingerprint, "batches": self.batches,
                "images": self.images, "skipped": list(self.skipped), "topk": self.tops, "done": self.done,
                "pages": self.pages, "synthetic": self.synthetic}

    @classmethod
    def from_state(cls, state: dict[str, Any], layers: Sequence[str]) -> Progress:
        return cls({layer: dict(state["topk"][layer]) for layer in layers}, tuple(state["skipped"]),
                   int(state["images"]), int(state["batches"]), bool(state.get("done")), dict(state.get("pages") or {}),
                   {layer: dict(done) for layer, done in (state.get("synthetic") or {}).items()})


@dataclasses.dataclass(frozen=True)
class Winner:
    """One top-k entry of a channel on a figure page."""

    slot: int  # the channel's position on the page
    rank: int
    index: int  # image index in the sorted file list
    y: int
    x: int
    value: float


@dataclasses.dataclass
class Run:
    """Everything the phases share."""

    s: MineSettings
    model: nn.Module
    preprocess: Preprocess
    root: Path
    out: Path
    device: torch.device
    dtype: torch.dtype
    dn: Deconvnet
    files: list[str]
    chosen: list[int]
    layers: dict[str, Layer]
    probe_image: torch.Tensor
    ranks: Ranks
    k: int = 0  # top-k slots kept: min(top, images chosen)
    fingerprint: str = ""
    run_id: str = ""  # the id its files are recorded under (settings.json keeps it)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    resume: Progress | None = None
    taps: Taps | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    projecting: float = 0.0  # pass 2's seconds spent projecting (the rest is drawing)
    identity: torch.Tensor | None = None  # (len(chosen), 2): each image's size and mtime (ns)
    winners: dict[int, str] = dataclasses.field(default_factory=dict)  # winner image -> SHA-256

    def state(self, prog: Progress) -> dict[str, Any]:
        """The state saved for ``prog``, with what the data set was (:mod:`zfvis.mining.identity`)."""
        return {**prog.to_state(self.fingerprint), "identity": self.identity, "winners": dict(self.winners)}

    @property
    def show(self) -> bool:
        return self.s.progress and self.ranks.rank == 0

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """Images moved to the model's device and dtype."""
        return images.to(self.device, dtype=self.dtype, non_blocking=True)

    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    @property
    def part_path(self) -> Path:
        r = self.ranks
        return self.state_path if r.world == 1 else self.out / f"state.rank{r.rank}-of-{r.world}.pt"


# --------------------------------------------------------------------------- data


class Files(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """(global index, preprocessed tensor or None, error message) per file."""

    def __init__(self, root: Path, files: Sequence[str], indices: Sequence[int], preprocess: Preprocess) -> None:
        self.root, self.files, self.indices, self.preprocess = root, list(files), list(indices), preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            image = load_image(resolve(self.root, self.files[i]))
        except (OSError, UserInputError) as err:  # an unreadable file: skipped and listed
            return self.indices[i], None, first_line(err)
        return self.indices[i], self.preprocess(image), ""


def collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, e) for i, x, e in items if x is None]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    if not ok:
        return idx, None, bad
    shapes = {tuple(x.shape) for _, x in ok}
    if len(shapes) > 1:
        raise UserInputError(f"images of different sizes in one batch {sorted(shapes)}; set an input size (--input-size)")
    return idx, torch.stack([x for _, x in ok]), bad


def loader(ds: Files, batch_size: int, workers: int) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)


# --------------------------------------------------------------------------- top-k


# --------------------------------------------------------------------------- forward taps


class Taps:
    """One forward pass serves every requested layer: the engine runs the graph only as far
    as the deepest requested layer and hands back each layer's output (graph nodes, module
    names, containers and modules called several times alike).

    Args:
        dn: The deconvnet.
        layers: The layers as given.
    """

    def __init__(self, dn: Deconvnet, layers: list[str]) -> None:
        self.dn, self.layers = dn, layers

    def run(self, images: torch.Tensor, fn: Callable[[str, torch.Tensor], Any]) -> dict[str, Any]:
        """``fn(layer, output)`` for every layer, from one forward pass."""
        outputs = self.dn.forward_outputs(images, self.layers)
        return {layer: fn(layer, outputs[layer]) for layer in self.layers}

# --------------------------------------------------------------------------- the caller's model


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return True


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model on ``device`` in eval mode; afterwards its device and every module's
    training flag are as before (also when the run fails)."""
    flags = [(m, m.training) for m in model.modules()]
    homes = {t.device for t in [*model.parameters(), *model.buffers()]}
    if any(h.type == "meta" for h in homes):
        raise UserInputError("the model's parameters are on the meta device (they hold no values); load its "
                             "weights first (Module.to_empty() and load_state_dict())")
    check_finite(itertools.chain(model.named_parameters(), model.named_buffers()), "the model's weights")
    if len(homes) > 1:
        raise UserInputError(f"the model's parameters lie on several devices ({sorted(map(str, homes))}); "
                             "put it on one device first")
    home = next(iter(homes), device)
    moved = not _same_device(home, device)
    try:
        if moved:
            model.to(device)
        model.eval()
        yield model
    finally:
        if moved:
            model.to(home)
        for m, flag in flags:
            m.training = flag


# --------------------------------------------------------------------------- phase 1: plan


def plan(model: nn.Module, preprocess: Preprocess, dataset: str | os.PathLike[str], s: MineSettings,
          ranks: Ranks) -> Run:
    """Checks everything that can be checked without writing: layers, data set, the first
    readable image, layer shapes, channels, memory. Returns the run's shared state."""
    device = check_device(s.device, s.name("device"))
    dn = Deconvnet(model, aliases=s.aliases, rule=s.rule)
    layers = list(dict.fromkeys(s.layers))
    modules = {layer: dn.resolve(layer) for layer in layers}
    if isinstance(s.channels, dict) and set(s.channels) - set(layers):
        raise UserInputError(f"channels given for layers not mined: {', '.join(sorted(set(s.channels) - set(layers)))}")
    root = Path(dataset)
    files = list_images(root)
    chosen = evenly_spaced(len(files), s.limit)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    image = _first_readable(root, [files[i] for i in chosen[:_PROBE_FILES]], preprocess)
    run = Run(s, model, preprocess, root, Path(s.out_dir), device, dtype, dn, files, chosen, {}, image, ranks)
    run.taps = Taps(dn, layers)
    shapes = run.taps.run(run.batch(image.unsqueeze(0)), lambda layer, o: tuple(o.shape[1:]))
    for layer in layers:
        wanted = s.channels.get(layer) if isinstance(s.channels, dict) else s.channels
        count = shapes[layer][0]
        chans = list(range(count)) if wanted is None else check_channels(wanted, count, layer)
        select = None if len(chans) == count else torch.tensor(chans, device=device)
        run.layers[layer] = Layer(layer, modules[layer], shapes[layer], chans, select)
    run.k = min(s.top, len(chosen))
    _check_memory(run)
    run.settings = {
        "layers": modules, "channels": {n: lay.channels for n, lay in run.layers.items()}, "top": s.top,
        "batch_size": s.batch_size, "limit": s.limit, "input_shape": list(image.shape),
        "preprocess": repr(preprocess), "dataset": str(root.resolve()),
    }
    if s.feature_vis:  # (absent without it: a run without synthetic images keeps its fingerprint)
        run.settings["feature_vis"] = {"steps": s.feature_vis_steps, "param": FEATURE_VIS_PARAM,
                                       "seed": FEATURE_VIS_SEED, "chunk": FEATURE_VIS_CHUNK}
    run.fingerprint = _fingerprint(run.settings, [files[i] for i in chosen], model)
    run.identity = stat_files(root, [files[i] for i in chosen])
    return run


def _first_readable(root: Path, rels: Sequence[str], preprocess: Preprocess) -> torch.Tensor:
    errors = []
    for rel in rels:
        try:
            image = load_image(resolve(root, rel))
        except (OSError, UserInputError) as err:
            errors.append(f"{rel}: {first_line(err)}")
            continue
        x = preprocess(image)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            raise InputTypeError(f"preprocess must return a float (C, H, W) tensor, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        return x
    raise UserInputError(f"data set '{root}': none of the first {len(rels)} files is a readable image ({errors[0]})")


def _check_memory(run: Run) -> None:
    """Refuses a batch whose input and layer outputs alone exceed the free memory."""
    per_image = math.prod(run.probe_image.shape) + sum(math.prod(lay.shape) for lay in run.layers.values())
    need = 3 * run.s.batch_size * per_image * torch.finfo(run.dtype).bits // 8
    check_memory(need, run.device, f"a batch of {run.s.batch_size} images of {tuple(run.probe_image.shape)}",
                 f"{run.s.name('batch_size')} (or the input size)")


def _model_signature(model: nn.Module) -> str:
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            h.update(f"{name}{tuple(t.shape)}{float(t.double().sum()):.10e}{float(t.double().abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def _fingerprint(settings: dict[str, Any], files: Sequence[str], model: nn.Module) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update("\n".join(files).encode())
    h.update(_model_signature(model).encode())
    return h.hexdigest()
