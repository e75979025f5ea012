"""Top-k mining over a data set: the strongest activations of every channel (ZF Fig. 2).

A run goes through named phases, each a function of one :class:`_Run`:

1. **plan** (:func:`_plan`): check the settings, list the data set, read the first
   readable image, measure the layers and fix the channels. Nothing is written.
2. **probe** (:func:`_probe`): the whole pipeline on that one image (record, select, one
   reverse pass per layer, a tile and a figure drawn into a temporary folder), so that a
   model pass 2 cannot project fails in seconds, not after hours of pass 1.
3. **claim** (:func:`_claim`): lock the output folder and check what it holds; only then
   create it and write ``settings.json``. A folder holding anything but a zfvis run with
   the same settings is refused unless ``overwrite`` (or ``restart``, for a zfvis run).
4. **pass 1** (:func:`_pass1`): stream the data set in batches, one forward pass per
   batch for all layers, keeping for every channel a running top-k of (value, image,
   position), at most one entry per image (the image's maximum over the channel's
   positions; ties: the smaller flat position). Ranking is by value, descending; ties by
   image path, ascending. Memory is O(layers x channels x k). Unreadable files are
   skipped and listed. The state is saved every ``state_every`` batches and at least
   every ``state_seconds``, and on Ctrl-C; the same call resumes it.
5. **merge** (:func:`_merge`): under ``torch.distributed`` (torchrun), the per-rank top-k
   lists are gathered and merged exactly.
6. **pass 2** (:func:`_pass2`): project every winner with its own image's switches, only
   over its receptive field; crop projection and image to it; tiles, figures, gallery. It
   goes a figure page (64 channels) at a time and saves each page's boxes in the state, so
   an interrupted pass 2 resumes at the page it was on.
7. **outputs** (:func:`_finish`): ``topk.json`` and a summary.

Under torchrun every rank checks in with the others at each phase boundary and after
every batch of pass 1: when one rank fails, the others stop at their next check with a
:class:`~zfvis.errors.RankFailedError` naming it, instead of waiting for gloo's timeout.
The caller's model is left as it was given (device, dtype, training flags).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import mining_figures, render, sheets
from ._io import atomic_torch_save, atomic_write_text
from ._progress import progress
from .checks import check_channels, check_device, check_int, check_memory, check_number, check_path
from .data import evenly_spaced, list_images, load_image, resolve
from .distributed import Ranks
from .engine import Deconvnet, Seeds
from .errors import InputTypeError, MiningInterrupted, UserInputError, first_line
from .gallery import write_site
from .run_folder import STATE_VERSION, FolderRequest, claim, load_state, safe_name
from .topk import EMPTY as _EMPTY
from .topk import empty_topk, image_maxima, merge_topk
from .zoo import Preprocess

__all__ = [
    "MineSettings",
    "MiningResult",
    "mine",
    "merge_topk",
    "image_maxima",
    "crop_winners",
    "make_seeds",
]
_PROBE_FILES = 50  # files tried for a readable first image


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
            (:func:`zfvis.data.evenly_spaced`).
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
        for flag in ("progress", "restart", "overwrite", "figures", "probe"):
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


@dataclasses.dataclass
class _Layer:
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
class _Progress:
    """Pass 1's state after a whole number of batches (replaced, never mutated, so that an
    interruption always finds a consistent snapshot)."""

    tops: dict[str, dict[str, torch.Tensor]]
    skipped: tuple[dict[str, Any], ...]
    images: int
    batches: int
    done: bool = False
    pages: dict[str, list[list[list[int]]]] = dataclasses.field(default_factory=dict)  # pass 2: page -> boxes

    def to_state(self, fingerprint: str) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": fingerprint, "batches": self.batches,
                "images": self.images, "skipped": list(self.skipped), "topk": self.tops, "done": self.done,
                "pages": self.pages}

    @classmethod
    def from_state(cls, state: dict[str, Any], layers: Sequence[str]) -> _Progress:
        return cls({layer: dict(state["topk"][layer]) for layer in layers}, tuple(state["skipped"]),
                   int(state["images"]), int(state["batches"]), bool(state.get("done")), dict(state.get("pages") or {}))


@dataclasses.dataclass(frozen=True)
class _Winner:
    """One top-k entry of a channel on a figure page."""

    slot: int  # the channel's position on the page
    rank: int
    index: int  # image index in the sorted file list
    y: int
    x: int
    value: float


@dataclasses.dataclass
class _Run:
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
    layers: dict[str, _Layer]
    probe_image: torch.Tensor
    ranks: Ranks
    k: int = 0  # top-k slots kept: min(top, images chosen)
    fingerprint: str = ""
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    resume: _Progress | None = None
    taps: _Taps | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    projecting: float = 0.0  # pass 2's seconds spent projecting (the rest is drawing)

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


class _Files(torch.utils.data.Dataset):  # type: ignore[type-arg]
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


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, e) for i, x, e in items if x is None]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    if not ok:
        return idx, None, bad
    shapes = {tuple(x.shape) for _, x in ok}
    if len(shapes) > 1:
        raise UserInputError(f"images of different sizes in one batch {sorted(shapes)}; set an input size (--input-size)")
    return idx, torch.stack([x for _, x in ok]), bad


def _loader(ds: _Files, batch_size: int, workers: int) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate)


# --------------------------------------------------------------------------- top-k


# --------------------------------------------------------------------------- forward taps


class _Taps:
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
def _placed(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model on ``device`` in eval mode; afterwards its device and every module's
    training flag are as before (also when the run fails)."""
    flags = [(m, m.training) for m in model.modules()]
    homes = {t.device for t in [*model.parameters(), *model.buffers()]}
    if any(h.type == "meta" for h in homes):
        raise UserInputError("the model's parameters are on the meta device (they hold no values); load its "
                             "weights first (Module.to_empty() and load_state_dict())")
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


def _plan(model: nn.Module, preprocess: Preprocess, dataset: str | os.PathLike[str], s: MineSettings,
          ranks: Ranks) -> _Run:
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
    run = _Run(s, model, preprocess, root, Path(s.out_dir), device, dtype, dn, files, chosen, {}, image, ranks)
    run.taps = _Taps(dn, layers)
    shapes = run.taps.run(run.batch(image.unsqueeze(0)), lambda layer, o: tuple(o.shape[1:]))
    for layer in layers:
        wanted = s.channels.get(layer) if isinstance(s.channels, dict) else s.channels
        count = shapes[layer][0]
        chans = list(range(count)) if wanted is None else check_channels(wanted, count, layer)
        select = None if len(chans) == count else torch.tensor(chans, device=device)
        run.layers[layer] = _Layer(layer, modules[layer], shapes[layer], chans, select)
    run.k = min(s.top, len(chosen))
    _check_memory(run)
    run.settings = {
        "layers": modules, "channels": {n: lay.channels for n, lay in run.layers.items()}, "top": s.top,
        "batch_size": s.batch_size, "limit": s.limit, "input_shape": list(image.shape),
        "preprocess": repr(preprocess), "dataset": str(root.resolve()),
    }
    run.fingerprint = _fingerprint(run.settings, [files[i] for i in chosen], model)
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


def _check_memory(run: _Run) -> None:
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


# --------------------------------------------------------------------------- projection helpers


def make_seeds(entries: Sequence[tuple[int, int, int, int, float]], device: torch.device | str) -> Seeds:
    """Seeds from ``(image, channel, y, x, value)`` rows (y = x = -1: a vector layer's unit).

    The one place where mining and ``zfvis evolution`` build seeds by hand.
    """
    cols = list(zip(*entries)) if entries else [(), (), (), (), ()]
    ints = [torch.tensor(c, dtype=torch.long, device=device) for c in cols[:4]]
    return Seeds(*ints, torch.tensor(cols[4], dtype=torch.float32, device=device))


Box = tuple[int, int, int, int]


def crop_winners(dn: Deconvnet, images: torch.Tensor, layer: str, seeds: Seeds) -> list[tuple[torch.Tensor, torch.Tensor, Box]]:
    """Projects ``seeds`` of ``layer`` (images indexed within ``images``) and crops.

    Returns, per seed, (projection, image patch, box): both (C, h, w) cropped to the
    seed's receptive field clipped to the image, box = (top, left, bottom, right)
    (:meth:`~zfvis.engine.Patches.boxes`).
    """
    rec = dn.record(images, layer)
    patches = dn.reverse(rec, seeds)
    imgs = images.detach().cpu()
    out = []
    for j, (proj, (t, l, b, r)) in enumerate(zip(patches.crops(), patches.boxes())):
        out.append((proj, imgs[int(seeds.image[j]), :, t:b, l:r], (t, l, b, r)))
    return out


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _tile(run: _Run, proj: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection and its image patch as displayable uint8 images."""
    shown = run.preprocess.denormalize(patch.float())
    return _to_u8(render.normalize_projection(proj.float())), _to_u8(shown)


# --------------------------------------------------------------------------- phase 2: probe


def _probe(run: _Run) -> None:
    """Runs the whole pipeline on the first readable image before any real work: for every
    layer its strongest activation of the first channel, projected and cropped as pass 2
    does (:func:`crop_winners`), and a tile; then one figure page (all drawn into a
    temporary folder, so nothing is written where the person looks)."""
    x = run.batch(run.probe_image.unsqueeze(0))
    entry = None
    with tempfile.TemporaryDirectory(prefix="zfvis-probe-") as tmp:
        for layer in run.layers.values():
            best = run.dn.select(run.dn.record(x, layer.name), layer.channels[0])
            row = (0, layer.channels[0], int(best.y[0]), int(best.x[0]), float(best.value[0]))
            [(proj, patch, _)] = crop_winners(run.dn, x, layer.name, make_seeds([row], run.device))
            pu8, iu8 = _tile(run, proj, patch)
            if run.s.figures:
                render.save_image(sheets.make_sheet([(pu8, iu8)]), Path(tmp) / "sheet.png")
                render.save_image(sheets.make_thumb(pu8, iu8), Path(tmp) / "thumb.png")
                n = min(run.k, mining_figures.FIGURE_TOP)
                entry = entry or (layer.channels[0], [pu8] * n, [iu8] * n, [1.0] * n)
        if entry is not None:
            mining_figures.draw_page(f"{run.s.model_name} / probe", [entry], Path(tmp) / "page.png")


# --------------------------------------------------------------------------- phase 3: claim the folder


@contextlib.contextmanager
def _claim(run: _Run) -> Iterator[None]:
    """Rank 0 claims the output folder (:func:`zfvis.run_folder.claim`); every rank then
    loads its saved progress, if any."""
    request = FolderRequest(run.out, run.fingerprint, run.settings, run.s.record, run.s.restart, run.s.overwrite,
                            run.s.flag, reads=run.root)
    with claim(request, lead=run.ranks.rank == 0, sync=run.ranks.check):
        run.resume = _load_resume(run)
        yield


def _load_resume(run: _Run) -> _Progress | None:
    """This rank's saved progress for this run, if any (the merged final state first)."""
    layers = list(run.layers)
    final = load_state(run.state_path)
    if final is not None and final["fingerprint"] == run.fingerprint and final.get("done"):
        return _Progress.from_state(final, layers)
    state = final if run.part_path == run.state_path else load_state(run.part_path)
    if state is None or state["fingerprint"] != run.fingerprint:
        return None
    return _Progress.from_state(state, layers)


# --------------------------------------------------------------------------- phase 4: pass 1


class _Saver:
    """Saves pass 1's progress every ``state_every`` batches and at least every
    ``state_seconds`` (so that at most that much work is redone after a kill)."""

    def __init__(self, run: _Run, saved: int) -> None:
        self.run, self.saved, self.last = run, saved, time.monotonic()

    def maybe(self, prog: _Progress) -> None:
        s = self.run.s
        if prog.batches % s.state_every == 0 or time.monotonic() - self.last >= s.state_seconds:
            self.save(prog)

    def save(self, prog: _Progress) -> None:
        if prog.batches != self.saved:
            atomic_torch_save(prog.to_state(self.run.fingerprint), self.run.part_path)
            self.saved, self.last = prog.batches, time.monotonic()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A kill (SIGTERM) stops pass 1 as Ctrl-C does, so that its progress is saved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("terminated")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _resumable(run: _Run) -> Iterator[None]:
    """An interruption between the phases says, as one inside them does, how to resume."""
    try:
        yield
    except MiningInterrupted:
        raise
    except KeyboardInterrupt:
        saved = f"what is done is saved in '{run.out}'" if run.state_path.exists() else "nothing was saved"
        raise MiningInterrupted(f"stopped between the phases of the run; {saved}: run the same command again to "
                                "resume") from None


def _update(run: _Run, prog: _Progress, idx: torch.Tensor, batch: torch.Tensor | None,
            bad: list[tuple[int, str]]) -> _Progress:
    """The progress after one more batch (a new object: the old one stays consistent)."""
    skipped = prog.skipped + tuple({"image": run.files[i], "index": i, "error": e} for i, e in bad)
    if batch is None:
        return _Progress(prog.tops, skipped, prog.images, prog.batches + 1)
    res = run.taps.run(run.batch(batch), lambda layer, o: image_maxima(o, run.layers[layer].select))
    tops = {}
    for layer, (vals, pos) in res.items():
        cand = {"values": vals, "index": idx.view(1, -1).expand_as(vals), "pos": pos}
        tops[layer] = merge_topk([prog.tops[layer], cand], run.k)
    return _Progress(tops, skipped, prog.images + len(idx), prog.batches + 1)


def _pass1(run: _Run) -> tuple[_Progress, float, int]:
    """Streams this rank's shard; returns (progress, seconds, batches taken from a state)."""
    prog = run.resume
    if prog is not None and prog.done:
        if run.show:
            print(f"pass 1 already done in '{run.out}' (state.pt); going on with pass 2", file=sys.stderr)
        return prog, 0.0, 0
    if prog is None:
        prog = _Progress({n: empty_topk(len(lay.channels), run.k) for n, lay in run.layers.items()}, (), 0, 0)
    r, bs = run.ranks, run.s.batch_size
    shard = run.chosen[r.rank :: r.world]
    steps = math.ceil(len(run.chosen[0 :: r.world]) / bs)  # every rank takes the largest shard's steps
    first, own_steps = prog.batches, math.ceil(len(shard) / bs)
    start = min(len(shard), first * bs)
    if first and run.show:
        print(f"resuming pass 1 from '{run.part_path}': {start} of {len(shard)} images already done", file=sys.stderr)
    todo = shard[start:]
    batches = iter(_loader(_Files(run.root, [run.files[i] for i in todo], todo, run.preprocess), bs, run.s.workers))
    saver, ran, t1 = _Saver(run, first), 0, time.perf_counter()
    with progress(len(shard), "pass 1", "img", run.show, initial=start) as bar:
        try:
            for step in range(steps):
                if first <= step < own_steps:
                    idx, batch, bad = next(batches)
                    prog = _update(run, prog, idx, batch, bad)
                    ran += 1
                    bar.update(len(idx) + len(bad))
                    saver.maybe(prog)
                    if run.s.stop_after_batches is not None and ran >= run.s.stop_after_batches:
                        raise KeyboardInterrupt(f"stopped after {ran} batches (stop_after_batches)")
                r.check()
        except KeyboardInterrupt:
            saver.save(prog)
            done = min(len(shard), prog.batches * bs)
            if not run.part_path.exists():
                raise MiningInterrupted("pass 1 stopped before its first batch was done; nothing was saved") from None
            raise MiningInterrupted(
                f"pass 1 stopped after {done} of {len(shard)} images; its progress is saved in '{run.part_path}': "
                "run the same command again to resume"
            ) from None
    saver.save(prog)
    return prog, time.perf_counter() - t1, first


# --------------------------------------------------------------------------- phase 5: merge


def _merge(run: _Run, prog: _Progress) -> _Progress:
    """Gathers and merges the ranks' top-k lists; rank 0 saves the final state."""
    r = run.ranks
    if prog.done:
        r.finish()
        return prog
    merged = dataclasses.replace(prog, done=True)
    if r.world > 1:
        r.check()
        parts = r.gather({"topk": prog.tops, "skipped": list(prog.skipped), "images": prog.images})
        tops = {n: merge_topk([g["topk"][n] for g in parts], run.k) for n in run.layers}
        skipped = tuple(sorted((s for g in parts for s in g["skipped"]), key=lambda s: s["index"]))
        merged = _Progress(tops, skipped, sum(int(g["images"]) for g in parts), prog.batches, True)
    if r.rank == 0:
        atomic_torch_save(merged.to_state(run.fingerprint), run.state_path)
    r.check()  # the final state is on disk before any rank drops its part
    r.finish()
    if run.part_path != run.state_path:
        run.part_path.unlink(missing_ok=True)
    return merged


def _topk(run: _Run, prog: _Progress) -> dict[str, Any]:
    """The content of ``topk.json`` (boxes are added by pass 2)."""
    s = run.s
    topk: dict[str, Any] = {
        "model": s.model_name, "weights": s.weights, "rule": s.rule, "dataset": str(run.root), "images": prog.images,
        "files": len(run.chosen), "skipped": list(prog.skipped), "top": s.top,
        "input_shape": list(run.probe_image.shape), "layers": {},
    }
    for name, layer in run.layers.items():
        t = prog.tops[name]
        ranked = []
        for c in range(len(layer.channels)):
            entries = []
            for r in range(t["index"].shape[1]):
                i = int(t["index"][c, r])
                if i == _EMPTY:
                    break
                p = int(t["pos"][c, r])
                entries.append({"image": run.files[i], "index": i, "value": float(t["values"][c, r]),
                                "position": [p // layer.width, p % layer.width] if p >= 0 else None})
            ranked.append(entries)
        topk["layers"][name] = {"module": layer.module, "channel_count": layer.shape[0],
                                "channel_ids": layer.channels, "channels": ranked}
    return topk


# --------------------------------------------------------------------------- phase 6: pass 2


_Crops = dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, list[int]]]


@dataclasses.dataclass(frozen=True)
class _Page:
    """One figure page of pass 2: up to :data:`zfvis.mining_figures.PAGE_CHANNELS` channels
    of one layer.

    Attributes:
        layer: The layer.
        number: The page's number within the layer (from 0).
        count: The layer's number of pages.
        slots: The channels' positions in the layer's ``channel_ids``.
    """

    layer: _Layer
    number: int
    count: int
    slots: range

    @property
    def key(self) -> str:
        """Its entry in the saved state's ``pages``."""
        return f"{self.layer.name}#{self.number}"

    @property
    def figure(self) -> str:
        """Its file (``conv3.png``, ``conv3_p2.png``)."""
        return mining_figures.page_file(self.layer.name, self.number + 1, self.count)


def _pages(run: _Run) -> list[_Page]:
    out = []
    for layer in run.layers.values():
        n = len(layer.channels)
        per = mining_figures.PAGE_CHANNELS
        starts = range(0, n, per)
        out += [_Page(layer, k, len(starts), range(s, min(n, s + per))) for k, s in enumerate(starts)]
    return out


def _project_page(run: _Run, page: _Page, winners: list[_Winner], bar: Any) -> _Crops:
    """Projects a page's winners, a batch of their images at a time: (slot, rank) ->
    (projection, patch, box), the images as uint8."""
    crops: _Crops = {}
    t0 = time.perf_counter()
    needed = sorted({w.index for w in winners})
    for s in range(0, len(needed), run.s.batch_size):
        chunk = needed[s : s + run.s.batch_size]
        where = {i: j for j, i in enumerate(chunk)}
        batch = torch.stack([run.preprocess(load_image(resolve(run.root, run.files[i]))) for i in chunk])
        sel = [w for w in winners if w.index in where]
        rows = [(where[w.index], page.layer.channels[page.slots[w.slot]], w.y, w.x, w.value) for w in sel]
        for w, (proj, patch, box) in zip(sel, crop_winners(run.dn, run.batch(batch), page.layer.name,
                                                           make_seeds(rows, run.device))):
            pu8, iu8 = _tile(run, proj, patch)
            crops[(w.slot, w.rank)] = (pu8, iu8, list(box))
        bar.update(len(sel))
    run.projecting += time.perf_counter() - t0
    return crops


def _draw(run: _Run, page: _Page, info: dict[str, Any], bar: Any) -> list[list[list[int]]]:
    """Projects, tiles and draws one page; returns its boxes (per channel, per rank)."""
    ids: list[int] = info["channel_ids"]
    winners = [_Winner(k, r, e["index"], *(e["position"] or [-1, -1]), e["value"])
               for k, c in enumerate(page.slots) for r, e in enumerate(info["channels"][c])]
    crops = _project_page(run, page, winners, bar)
    tile_dir = run.out / "tiles" / safe_name(page.layer.name)
    tile_dir.mkdir(parents=True, exist_ok=True)
    entries, boxes = [], []
    for k, c in enumerate(page.slots):
        ranked = info["channels"][c]
        shown = [crops[(k, r)] for r in range(len(ranked))]
        if shown:  # a channel's tiles in two files (zfvis.sheets), not two per activation
            render.save_image(sheets.make_sheet([(p, i) for p, i, _ in shown]), tile_dir / sheets.sheet_name(ids[c]))
            render.save_image(sheets.make_thumb(shown[0][0], shown[0][1]), tile_dir / sheets.thumb_name(ids[c]))
        boxes.append([box for _, _, box in shown])
        n = mining_figures.FIGURE_TOP  # the figure's 3x3 grid; tiles and gallery keep all
        entries.append((ids[c], [p for p, _, _ in shown[:n]], [i for _, i, _ in shown[:n]],
                        [e["value"] for e in ranked[:n]]))
    title = mining_figures.page_title(run.s.model_name, page.layer.name, run.s.top, run.s.rule,
                                      [ids[c] for c in page.slots], page.number + 1, page.count)
    mining_figures.draw_page(title, entries, run.out / page.figure)
    return boxes


def _page_done(run: _Run, page: _Page, info: dict[str, Any], prog: _Progress) -> bool:
    """Whether an earlier call finished ``page``: its boxes are saved and its files exist."""
    if page.key not in prog.pages or not (run.out / page.figure).is_file():
        return False
    tile_dir = run.out / "tiles" / safe_name(page.layer.name)
    ids = info["channel_ids"]
    return all((tile_dir / name(ids[c])).is_file() for c in page.slots if info["channels"][c]
               for name in (sheets.sheet_name, sheets.thumb_name))


def _pass2(run: _Run, topk: dict[str, Any], prog: _Progress) -> list[Path]:
    """Tiles, one Fig. 2 figure per page of channels, and the gallery site; the seconds
    spent go into ``topk["timings"]``. After each page its boxes are saved in the state,
    so an interrupted pass 2 resumes at the page it was on."""
    pages = _pages(run)
    done = [p for p in pages if _page_done(run, p, topk["layers"][p.layer.name], prog)]
    if done and run.show:
        print(f"resuming pass 2 from '{run.state_path}': {len(done)} of {len(pages)} figure pages already done",
              file=sys.stderr)
    todo = [p for p in pages if p not in done]
    total = sum(len(topk["layers"][p.layer.name]["channels"][c]) for p in todo for c in p.slots)
    gallery: dict[str, list[dict[str, Any]]] = {name: [] for name in run.layers}
    t_start = time.perf_counter()
    with progress(total, "pass 2", "proj", run.show) as bar:
        for n, page in enumerate(pages):
            info = topk["layers"][page.layer.name]
            try:
                boxes = prog.pages[page.key] if page in done else _draw(run, page, info, bar)
            except KeyboardInterrupt:
                raise MiningInterrupted(
                    f"pass 2 stopped at figure page {n + 1} of {len(pages)}; pass 1 and the pages before are saved "
                    f"in '{run.state_path}': run the same command again to resume") from None
            if page not in done:
                prog = dataclasses.replace(prog, pages={**prog.pages, page.key: boxes})
                atomic_torch_save(prog.to_state(run.fingerprint), run.state_path)
            for c, channel_boxes in zip(page.slots, boxes):
                ranked = info["channels"][c]
                for e, box in zip(ranked, channel_boxes):
                    e["box"] = list(box)
                gallery[page.layer.name].append({"channel": info["channel_ids"][c], "figure": page.figure,
                                                 "entries": ranked})
    outputs = [run.out / p.figure for p in pages]
    outputs += write_site(run.out, topk, gallery, layer_info=_layer_info(run))
    timings = topk.setdefault("timings", {})
    timings["project"] = round(run.projecting, 3)
    timings["render"] = round(time.perf_counter() - t_start - run.projecting, 3)
    return outputs


def _layer_info(run: _Run) -> dict[str, dict[str, Any]]:
    """Per mined layer its output shape and receptive field, for the gallery's model page."""
    info: dict[str, dict[str, Any]] = {}
    shape = tuple(run.probe_image.shape)
    for name, layer in run.layers.items():
        rf = run.dn.receptive_field(name, shape)
        field = None if rf is None else {"size": list(rf.size), "jump": list(rf.jump), "offset": list(rf.offset)}
        info[name] = {"shape": list(layer.shape), "receptive_field": field}
    return info


# --------------------------------------------------------------------------- phase 7: outputs


def _finish(run: _Run, topk: dict[str, Any], outputs: list[Path]) -> list[Path]:
    """Writes ``topk.json`` and prints the summary (rank 0)."""
    atomic_write_text(run.out / "topk.json", json.dumps(topk, indent=1) + "\n")
    outputs.insert(0, run.out / "topk.json")
    if run.show:
        skipped = topk["skipped"]
        figs = [p for p in outputs if p.suffix == ".png" and p.parent == run.out]
        gallery = f", {run.out / 'index.html'}" if run.s.figures else ""
        seconds = time.perf_counter() - run.started
        t = topk.get("timings", {})
        phases = "; ".join(f"{k} {v:.1f} s" for k, v in t.items())
        print(f"mined {topk['images']} images ({len(skipped)} skipped) in {seconds:.1f} s ({phases}); wrote "
              f"{run.out / 'topk.json'}, {len(figs)} figure(s){gallery}", file=sys.stderr)
        for s in skipped[:10]:
            print(f"  skipped {s['image']}: {s['error']}", file=sys.stderr)
        if len(skipped) > 10:
            print(f"  ... and {len(skipped) - 10} more (see topk.json)", file=sys.stderr)
    return outputs


# --------------------------------------------------------------------------- the run


def _settings(layers: Sequence[str] | None, settings: MineSettings | None, options: dict[str, Any]) -> MineSettings:
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


def _check_inputs(model: object, preprocess: object, dataset: object) -> Path:
    """The kinds of :func:`mine`'s positional arguments; returns the data set's path."""
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(preprocess) or not callable(getattr(preprocess, "denormalize", None)):
        raise InputTypeError(f"preprocess must be a callable from a PIL image to a (C, H, W) tensor with a "
                             f"denormalize method (a zfvis.zoo.Preprocess), got {type(preprocess).__name__}")
    return check_path("dataset", dataset)


def mine(
    model: nn.Module,
    preprocess: Preprocess,
    dataset: str | os.PathLike[str],
    layers: Sequence[str] | None = None,
    *,
    settings: MineSettings | None = None,
    **options: Any,
) -> MiningResult:
    """Mines the top-``top`` activations of every channel of ``layers`` over a data set.

    Either ``layers`` and the settings as keyword arguments (``out_dir=...``, ``top=9``,
    ..., the fields of :class:`MineSettings`), or ``settings=MineSettings(...)``.
    The model is left as it was given: device, dtype and training flags.

    Args:
        model: A network the deconvnet can reverse (see :class:`~zfvis.engine.Deconvnet`).
        preprocess: PIL image -> model input; it must give one size for every image.
        dataset: A folder of images or a text file of paths (:func:`zfvis.data.list_images`).
        layers: Layer names or aliases (``conv1``, ``features.3``).
        settings: All settings at once.
        **options: The other fields of :class:`MineSettings`; ``out_dir`` is required.

    Returns:
        A :class:`MiningResult`.

    Raises:
        UserInputError: (a ``ValueError``) Bad settings, unknown layers, channels out of
            range, a data set without images, a batch too large for memory.
        OutputFolderError: (a ``UserInputError``) The output folder holds files zfvis did
            not write, a run with other settings (use ``restart``/``overwrite``), or
            another run is writing to it.
        FileNotFoundError: The data set does not exist.
        InputTypeError: (a ``UserInputError`` and ``TypeError``) An argument of the wrong
            kind (a model that is no ``nn.Module``, a layer list given as one str, ...).
        MiningInterrupted: (a ``KeyboardInterrupt``) Ctrl-C or SIGTERM in pass 1 or 2; the
            progress is saved (pass 2: page by page) and the same call resumes it.
        RankFailedError: Under torchrun, another rank failed.
    """
    s = _settings(layers, settings, options)
    s.validate()
    dataset = _check_inputs(model, preprocess, dataset)
    t0 = time.perf_counter()
    device = check_device(s.device, s.name("device"))
    ranks = Ranks.setup(device)
    try:
        with _placed(model, device):
            run = _plan(model, preprocess, dataset, s, ranks)
            ranks.check()
            if s.probe:
                _probe(run)
            ranks.check()
            with _claim(run), _sigterm_as_interrupt(), _resumable(run):
                prog, seconds, resumed = _pass1(run)
                prog = _merge(run, prog)
                if ranks.rank != 0:
                    return MiningResult(None, run.out, prog.images, list(prog.skipped), time.perf_counter() - t0,
                                        [], resumed, seconds)
                topk = _topk(run, prog)
                topk["timings"] = {"pass1": round(seconds, 3)}
                outputs = _finish(run, topk, _pass2(run, topk, prog) if s.figures else [])
        return MiningResult(topk, run.out, prog.images, list(prog.skipped), time.perf_counter() - t0, outputs,
                            resumed, seconds)
    except BaseException as err:
        ranks.fail(err)
        raise
    finally:
        ranks.close()
