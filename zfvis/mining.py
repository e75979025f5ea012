"""Top-k mining over a data set: the strongest activations of every channel (ZF Fig. 2).

Pass 1 streams the data set once, in batches, with one forward pass per batch for all
requested layers (forward hooks on the requested modules; the pass stops once the
deepest has run). For every channel it keeps a running top-k of (value, image, position),
at most one entry per image: the image's maximum over the channel's positions (ties: the
smaller flat position). Ranking is by value, descending; ties by image path, ascending
(the image's index in the sorted file list). Memory is O(layers x channels x k),
independent of the data set's size. Unreadable files are skipped and listed.

Pass 2 loads only the winning images, records their switches per layer and projects every
winner back to pixel space through the deconvnet, each only over its receptive field;
projection and image are cropped to the (clipped) receptive field.

The run saves its state every ``state_every`` batches (``state.pt``) and resumes from it;
under ``torch.distributed`` (or torchrun's environment) the file list is sharded by rank and
the top-k lists are gathered and merged exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import render
from ._io import atomic_torch_save, atomic_write_text
from .data import list_images, load_image, resolve
from .engine import Deconvnet, Seeds
from .recording import eval_mode
from .zoo import Preprocess

__all__ = ["MiningResult", "mine", "merge_topk", "crop_winners", "PAGE_CHANNELS"]

#: Channels per figure page; layers with more are split into ``<layer>_p1.png``, ...
PAGE_CHANNELS = 64
_STATE_VERSION = 1
_EMPTY = torch.iinfo(torch.long).max  # index of an empty top-k slot (sorts last)


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


# --------------------------------------------------------------------------- data


class _Files(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """(global index, preprocessed tensor or None, error message) per file."""

    def __init__(self, root: Path, files: Sequence[str], indices: Sequence[int], preprocess: Preprocess) -> None:
        self.root, self.files, self.indices, self.preprocess = root, list(files), list(indices), preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return self.indices[i], self.preprocess(load_image(resolve(self.root, self.files[i]))), ""
        except (OSError, ValueError) as err:
            return self.indices[i], None, str(err).splitlines()[0] if str(err) else type(err).__name__


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, e) for i, x, e in items if x is None]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    if not ok:
        return idx, None, bad
    shapes = {tuple(x.shape) for _, x in ok}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes in one batch {sorted(shapes)}; set an input size (crop)")
    return idx, torch.stack([x for _, x in ok]), bad


def _loader(ds: _Files, batch_size: int, workers: int) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate
    )


# --------------------------------------------------------------------------- top-k


def empty_topk(channels: int, k: int) -> dict[str, torch.Tensor]:
    return {
        "values": torch.full((channels, k), -math.inf),
        "index": torch.full((channels, k), _EMPTY, dtype=torch.long),
        "pos": torch.full((channels, k), -1, dtype=torch.long),
    }


def merge_topk(parts: Sequence[dict[str, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
    """Merges top-k lists (each ``values``/``index``/``pos`` of shape (C, n)) exactly.

    Order: value descending, then image index ascending; empty slots (index
    ``_EMPTY``) last. Entries of one image must occur once per channel across ``parts``.
    """
    values = torch.cat([p["values"] for p in parts], dim=1)
    index = torch.cat([p["index"] for p in parts], dim=1)
    pos = torch.cat([p["pos"] for p in parts], dim=1)
    order = torch.sort(index, dim=1, stable=True).indices  # secondary key first
    values, index, pos = (torch.gather(t, 1, order) for t in (values, index, pos))
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    values, index, pos = (torch.gather(t, 1, order) for t in (values, index, pos))
    return {"values": values[:, :k].contiguous(), "index": index[:, :k].contiguous(), "pos": pos[:, :k].contiguous()}


def image_maxima(out: torch.Tensor, channels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel the maximum over positions and its flat position (C, B)."""
    out = out.detach()
    if channels is not None:
        out = out.index_select(1, channels)
    if out.dim() == 2:
        vals = out.float()
        pos = torch.full_like(vals, -1, dtype=torch.long)
    else:
        flat = out.flatten(2).float()
        vals = flat.amax(dim=2)
        pos = (flat == vals.unsqueeze(2)).to(torch.uint8).argmax(dim=2)  # first maximum
    vals = torch.nan_to_num(vals, nan=-math.inf)
    return vals.t().cpu(), pos.t().cpu()


class _Stop(Exception):
    pass


class _Taps:
    """Forward hooks on the requested modules; one forward pass serves every layer."""

    def __init__(self, model: nn.Module, modules: dict[str, str]) -> None:
        self.model = model
        self.modules = modules  # layer as given -> module name

    def run(self, images: torch.Tensor, fn: Callable[[str, torch.Tensor], Any]) -> dict[str, Any]:
        """One forward pass, stopped once every requested module has run; ``fn(layer,
        output)`` is applied inside the hook (the output is not kept)."""
        results: dict[str, Any] = {}
        by_module: dict[str, list[str]] = {}
        for layer, name in self.modules.items():
            by_module.setdefault(name, []).append(layer)
        mods = dict(self.model.named_modules())
        handles = []

        def make(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                out = output[0] if isinstance(output, tuple) else output
                for layer in by_module[name]:
                    results[layer] = fn(layer, out)
                if len(results) == len(self.modules):
                    raise _Stop

            return hook

        try:
            for name in by_module:
                handles.append(mods[name].register_forward_hook(make(name)))
            with eval_mode(self.model), torch.no_grad():
                try:
                    self.model(images)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        missing = [layer for layer in self.modules if layer not in results]
        if missing:
            raise ValueError(f"layer(s) {', '.join(missing)} did not run in the forward pass")
        return results


# --------------------------------------------------------------------------- distributed


def _dist_setup(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and "RANK" in os.environ and dist.is_available():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


# --------------------------------------------------------------------------- fingerprint


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


def _load_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged state file
        raise ValueError(f"cannot read the saved state '{path}' ({err}); use another output folder or --restart") from None
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        raise ValueError(f"'{path}' is not a zfvis mining state; use another output folder or --restart")
    return state


# --------------------------------------------------------------------------- pass 2


def crop_winners(dn: Deconvnet, images: torch.Tensor, layer: str, seeds: Seeds) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]]:
    """Projects ``seeds`` of ``layer`` (images indexed within ``images``) and crops.

    Returns, per seed, (projection, image patch, box): both (C, h, w) cropped to the
    seed's receptive field clipped to the image, box = (top, left, bottom, right).
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


def _from_u8(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


# --------------------------------------------------------------------------- main


def mine(
    model: nn.Module,
    preprocess: Preprocess,
    dataset: str | os.PathLike[str],
    layers: Sequence[str],
    *,
    out_dir: str | os.PathLike[str],
    top: int = 9,
    channels: Sequence[int] | dict[str, Sequence[int]] | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    state_every: int = 20,
    progress: bool = True,
    restart: bool = False,
    aliases: dict[str, str] | None = None,
    model_name: str = "model",
    weights: str | None = None,
    figures: bool = True,
    stop_after_batches: int | None = None,
) -> MiningResult:
    """Mines the top-``top`` activations of every channel of ``layers`` over a data set.

    Args:
        model: A chain the deconvnet can reverse (see :class:`~zfvis.engine.Deconvnet`).
        preprocess: PIL image -> model input; it must give one size for every image.
        dataset: A folder of images or a text file of paths (:func:`zfvis.data.list_images`).
        layers: Layer names or aliases (``conv1``, ``features.3``).
        out_dir: Output folder (created): ``topk.json``, figures, tiles, ``index.html``,
            ``state.pt``.
        top: Entries per channel (9 in the paper).
        channels: Channels to mine, for every layer (a sequence) or per layer (a dict;
            missing layers: all); ``None``: all channels.
        batch_size: Images per forward pass (also for pass 2).
        workers: DataLoader worker processes for pass 1.
        device: Where the model runs.
        limit: Use only the first ``limit`` files of the sorted list.
        state_every: Save the state every this many batches of pass 1.
        progress: Show progress bars and print a summary (rank 0).
        restart: Ignore (and replace) a saved state from different settings.
        aliases: Extra layer aliases (default: the zoo's paper names).
        model_name, weights: Recorded in ``topk.json`` and in figure titles.
        figures: Write figures, tiles and the gallery (``False``: only ``topk.json``).
        stop_after_batches: Testing aid: raise KeyboardInterrupt after this many batches
            of pass 1 in this call (simulates an interrupted run).

    Returns:
        A :class:`MiningResult`.

    Raises:
        ValueError: Bad arguments, unknown layers, channels out of range, a saved state
            from other settings (use another folder or ``restart``).
        FileNotFoundError: The data set does not exist.
    """
    t0 = time.perf_counter()
    if not layers:
        raise ValueError("no layers given; name at least one (e.g. conv1)")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if state_every < 1:
        raise ValueError(f"state_every must be at least 1, got {state_every}")
    device = torch.device(device)
    root = Path(dataset)
    out = Path(out_dir)
    layers = list(dict.fromkeys(layers))
    dn = Deconvnet(model, aliases=aliases)
    modules = {layer: dn.resolve(layer) for layer in layers}
    files = list_images(root)
    chosen_files = list(range(len(files)))
    if limit is not None and limit < len(files):
        # evenly spaced over the sorted list, so a folder of class sub-folders keeps every class
        chosen_files = [i * len(files) // limit for i in range(limit)]
    model = model.to(device)

    # shapes of the layers, from a probe on the first readable image
    probe = None
    for rel in [files[i] for i in chosen_files[:50]]:
        try:
            probe = preprocess(load_image(resolve(root, rel)))
            break
        except (OSError, ValueError):
            continue
    if probe is None:
        raise ValueError(f"data set '{root}': none of the first {min(len(chosen_files), 50)} files is a readable image")
    input_shape = tuple(probe.shape)
    shapes = _Taps(model, modules).run(probe.unsqueeze(0).to(device), lambda layer, o: tuple(o.shape[1:]))
    chan_sel: dict[str, list[int]] = {}
    for layer in layers:
        count = shapes[layer][0]
        sel = channels.get(layer) if isinstance(channels, dict) else channels
        chosen = list(range(count)) if sel is None else [int(c) for c in sel]
        if not chosen:
            raise ValueError(f"layer '{layer}': empty channel list")
        bad = [c for c in chosen if not 0 <= c < count]
        if bad:
            raise ValueError(f"channel {bad[0]} is out of range: layer '{layer}' has {count} channels (0..{count - 1})")
        chan_sel[layer] = sorted(set(chosen))
    sel_tensors = {
        layer: (None if chan_sel[layer] == list(range(shapes[layer][0])) else torch.tensor(chan_sel[layer], device=device))
        for layer in layers
    }

    settings = {
        "layers": {layer: modules[layer] for layer in layers},
        "channels": chan_sel,
        "top": top,
        "batch_size": batch_size,
        "limit": limit,
        "input_shape": list(input_shape),
        "preprocess": repr(preprocess),
        "dataset": str(root.resolve()),
    }
    fingerprint = _fingerprint(settings, [files[i] for i in chosen_files], model)

    rank, world, owned = _dist_setup(device)
    try:
        out.mkdir(parents=True, exist_ok=True)
        final_path = out / "state.pt"
        part_path = final_path if world == 1 else out / f"state.rank{rank}-of-{world}.pt"
        hint = "use another output folder or --restart (restart=True)"

        state, done = None, False
        if restart:  # start afresh: forget any saved state
            for stale in {final_path, part_path}:
                stale.unlink(missing_ok=True)
        else:
            state = _load_state(final_path)
            if state is not None and state["fingerprint"] != fingerprint:
                raise ValueError(f"'{out}' holds a mining run with other settings or files; {hint}")
            done = state is not None and bool(state.get("done"))
            if not done and part_path != final_path:
                state = _load_state(part_path)
                if state is not None and state["fingerprint"] != fingerprint:
                    raise ValueError(f"'{part_path}' holds a mining run with other settings or files; {hint}")

        resumed = 0
        pass1_seconds = 0.0
        show = progress and rank == 0
        if done:
            assert state is not None
            tops = {layer: dict(state["topk"][layer]) for layer in layers}
            skipped = list(state["skipped"])
            images_ok = int(state["images"])
            if show:
                print(f"pass 1 already done in '{out}' (state.pt); skipping to pass 2", file=sys.stderr)
        else:
            shard = chosen_files[rank::world]
            batches_done = 0
            tops = {layer: empty_topk(len(chan_sel[layer]), top) for layer in layers}
            skipped = []
            images_ok = 0
            if state is not None:
                batches_done = int(state["batches"])
                tops = {layer: dict(state["topk"][layer]) for layer in layers}
                skipped = list(state["skipped"])
                images_ok = int(state["images"])
                resumed = batches_done
            start = min(len(shard), batches_done * batch_size)
            todo = shard[start:]
            ds = _Files(root, [files[i] for i in todo], todo, preprocess)
            taps = _Taps(model, modules)
            ran = 0

            def save(batches: int) -> None:
                atomic_torch_save(
                    {
                        "version": _STATE_VERSION,
                        "fingerprint": fingerprint,
                        "batches": batches,
                        "images": images_ok,
                        "skipped": skipped,
                        "topk": tops,
                        "done": False,
                    },
                    part_path,
                )

            bar = _bar(len(shard), "pass 1", show, initial=start)
            t1 = time.perf_counter()
            try:
                for idx, batch, bad in _loader(ds, batch_size, workers):
                    for i, err in bad:
                        skipped.append({"image": files[i], "index": i, "error": err})
                    if batch is not None:
                        res = taps.run(
                            batch.to(device, non_blocking=True),
                            lambda layer, o: image_maxima(o, sel_tensors[layer]),
                        )
                        for layer in layers:
                            vals, pos = res[layer]
                            cand = {"values": vals, "index": idx.view(1, -1).expand_as(vals), "pos": pos}
                            tops[layer] = merge_topk([tops[layer], cand], top)
                        images_ok += len(idx)
                    batches_done += 1
                    ran += 1
                    if bar is not None:
                        bar.update(len(idx) + len(bad))
                    if batches_done % state_every == 0:
                        save(batches_done)
                    if stop_after_batches is not None and ran >= stop_after_batches:
                        raise KeyboardInterrupt(f"stopped after {ran} batches (stop_after_batches)")
            finally:
                if bar is not None:
                    bar.close()
            save(batches_done)
            pass1_seconds = time.perf_counter() - t1

            if world > 1:
                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, {"topk": tops, "skipped": skipped, "images": images_ok})
                tops = {layer: merge_topk([g["topk"][layer] for g in gathered], top) for layer in layers}
                skipped = sorted((s for g in gathered for s in g["skipped"]), key=lambda s: s["index"])
                images_ok = sum(int(g["images"]) for g in gathered)
            if rank == 0:
                atomic_torch_save(
                    {
                        "version": _STATE_VERSION,
                        "fingerprint": fingerprint,
                        "batches": batches_done,
                        "images": images_ok,
                        "skipped": skipped,
                        "topk": tops,
                        "done": True,
                    },
                    final_path,
                )
            if part_path != final_path:
                part_path.unlink(missing_ok=True)

        if rank != 0:
            return MiningResult(None, out, images_ok, skipped, time.perf_counter() - t0, [], resumed, pass1_seconds)

        topk = {
            "model": model_name,
            "weights": weights,
            "dataset": str(root),
            "images": images_ok,
            "files": len(chosen_files),
            "skipped": skipped,
            "top": top,
            "input_shape": list(input_shape),
            "layers": {},
        }
        for layer in layers:
            t = tops[layer]
            w = shapes[layer][-1] if len(shapes[layer]) == 3 else 1
            ranked = []
            for c in range(len(chan_sel[layer])):
                entries = []
                for r in range(top):
                    i = int(t["index"][c, r])
                    if i == _EMPTY:
                        break
                    p = int(t["pos"][c, r])
                    entries.append(
                        {
                            "image": files[i],
                            "index": i,
                            "value": float(t["values"][c, r]),
                            "position": [p // w, p % w] if p >= 0 else None,
                        }
                    )
                ranked.append(entries)
            topk["layers"][layer] = {
                "module": modules[layer],
                "channel_count": shapes[layer][0],
                "channel_ids": chan_sel[layer],
                "channels": ranked,
            }
        outputs: list[Path] = []
        if figures:
            outputs += _pass2(dn, model, preprocess, root, files, topk, layers, out, batch_size, device, model_name, show)
        atomic_write_text(out / "topk.json", json.dumps(topk, indent=1) + "\n")
        outputs.insert(0, out / "topk.json")
        seconds = time.perf_counter() - t0
        if show:
            figs = [p for p in outputs if p.suffix == ".png" and p.parent == out]
            print(
                f"mined {images_ok} images ({len(skipped)} skipped) in {seconds:.1f} s; wrote "
                f"{out / 'topk.json'}, {len(figs)} figure(s), {out / 'index.html' if figures else ''}",
                file=sys.stderr,
            )
            for s in skipped[:10]:
                print(f"  skipped {s['image']}: {s['error']}", file=sys.stderr)
            if len(skipped) > 10:
                print(f"  ... and {len(skipped) - 10} more (see topk.json)", file=sys.stderr)
        return MiningResult(topk, out, images_ok, skipped, seconds, outputs, resumed, pass1_seconds)
    finally:
        if owned:
            dist.destroy_process_group()


def _bar(total: int, desc: str, show: bool, initial: int = 0, unit: str = "img") -> Any:
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def _safe(layer: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in layer)


def _pass2(
    dn: Deconvnet,
    model: nn.Module,
    preprocess: Preprocess,
    root: Path,
    files: list[str],
    topk: dict[str, Any],
    layers: list[str],
    out: Path,
    batch_size: int,
    device: torch.device,
    model_name: str,
    show: bool,
) -> list[Path]:
    outputs: list[Path] = []
    gallery: dict[str, list[dict[str, Any]]] = {}
    total = sum(len(e) for layer in layers for e in topk["layers"][layer]["channels"])
    bar = _bar(total, "pass 2", show, unit="proj")
    top = topk["top"]
    try:
        for layer in layers:
            info = topk["layers"][layer]
            ids: list[int] = info["channel_ids"]
            tile_dir = out / "tiles" / _safe(layer)
            tile_dir.mkdir(parents=True, exist_ok=True)
            pages = [range(s, min(len(ids), s + PAGE_CHANNELS)) for s in range(0, len(ids), PAGE_CHANNELS)]
            gallery[layer] = []
            for p, page in enumerate(pages):
                # winners of this page: (slot in page, rank, image index, y, x, value)
                wins = [
                    (k, r, e["index"], *(e["position"] or [-1, -1]), e["value"])
                    for k, c in enumerate(page)
                    for r, e in enumerate(info["channels"][c])
                ]
                crops: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, list[int]]] = {}
                images_needed = sorted({w[2] for w in wins})
                for s in range(0, len(images_needed), batch_size):
                    chunk = images_needed[s : s + batch_size]
                    where = {i: j for j, i in enumerate(chunk)}
                    batch = torch.stack([preprocess(load_image(resolve(root, files[i]))) for i in chunk]).to(device)
                    sel = [w for w in wins if w[2] in where]
                    seeds = Seeds(
                        torch.tensor([where[w[2]] for w in sel], device=device),
                        torch.tensor([ids[page[w[0]]] for w in sel], device=device),
                        torch.tensor([w[3] for w in sel], device=device),
                        torch.tensor([w[4] for w in sel], device=device),
                        torch.tensor([w[5] for w in sel], device=device, dtype=torch.float32),
                    )
                    for w, (proj, patch, box) in zip(sel, crop_winners(dn, batch, layer, seeds)):
                        shown = preprocess.denormalize(patch)
                        crops[(w[0], w[1])] = (_to_u8(render.normalize_projection(proj)), _to_u8(shown), list(box))
                    if bar is not None:
                        bar.update(len(sel))
                entries = []
                for k, c in enumerate(page):
                    ch = ids[c]
                    projs, pats, vals, tiles = [], [], [], []
                    for r, e in enumerate(info["channels"][c]):
                        pu8, iu8, box = crops[(k, r)]
                        e["box"] = box
                        stem = f"c{ch:04d}_r{r + 1}"
                        render.save_image(_from_u8(pu8), tile_dir / f"{stem}_proj.png")
                        render.save_image(_from_u8(iu8), tile_dir / f"{stem}_patch.png")
                        tiles.append((f"{stem}_proj.png", f"{stem}_patch.png"))
                        # a [0,1] image minus 0.5 re-normalises to itself in mining_figure
                        projs.append(_from_u8(pu8) - 0.5)
                        pats.append(_from_u8(iu8))
                        vals.append(e["value"])
                    entries.append((ch, projs, pats, vals))
                    gallery[layer].append({"channel": ch, "tiles": tiles, "entries": info["channels"][c]})
                name = f"{_safe(layer)}.png" if len(pages) == 1 else f"{_safe(layer)}_p{p + 1}.png"
                first, last = ids[page[0]], ids[page[-1]]
                title = f"{model_name} / {layer}: top-{top} activations per channel"
                if len(pages) > 1:
                    title += f" (channels {first}-{last}, page {p + 1} of {len(pages)})"
                render.mining_figure(title, entries, out / name, columns=min(4, len(entries)), cell_inches=0.6)
                outputs.append(out / name)
                for g in gallery[layer][-len(page):]:
                    g["figure"] = name
    finally:
        if bar is not None:
            bar.close()
    atomic_write_text(out / "index.html", _gallery_html(topk, gallery, layers))
    outputs.append(out / "index.html")
    return outputs


_CSS = """
body{font-family:sans-serif;margin:1em 2em;background:#fafafa;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}
nav a{margin-right:1em}
.grid{display:flex;flex-wrap:wrap;gap:6px}
.grid a{display:block;text-align:center;font-size:11px;color:#333;text-decoration:none;border:1px solid #ddd;background:#fff;padding:2px}
.grid a:hover{border-color:#06c}
img{image-rendering:pixelated}
.grid img{width:48px;height:48px;object-fit:contain;display:block}
.chan{display:none;border:2px solid #06c;background:#fff;padding:0.5em 1em;margin:1em 0}
.chan:target{display:block}
.pairs{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;text-align:center;font-size:12px}
figure img{width:128px;height:128px;object-fit:contain;background:#eee;margin:1px}
figcaption{max-width:260px;word-break:break-all}
.meta{color:#555;font-size:0.9em}
"""


def _gallery_html(topk: dict[str, Any], gallery: dict[str, list[dict[str, Any]]], layers: list[str]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>zfvis mining: {e(str(topk['model']))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Top-{topk['top']} activations per channel: {e(str(topk['model']))}</h1>",
        f'<p class="meta">weights {e(str(topk["weights"]))}; data set {e(str(topk["dataset"]))}: '
        f'{topk["images"]} images, {len(topk["skipped"])} skipped. '
        f'Click a channel to see its projections (left) and input patches (right). '
        f'<a href="topk.json">topk.json</a></p>',
        "<nav>" + "".join(f'<a href="#layer-{_safe(layer)}">{e(layer)}</a>' for layer in layers) + "</nav>",
    ]
    for layer in layers:
        sl = _safe(layer)
        figs = sorted({g["figure"] for g in gallery[layer]})
        parts.append(f'<h2 id="layer-{sl}">{e(layer)} <span class="meta">({e(topk["layers"][layer]["module"])}, '
                     f'{len(gallery[layer])} channels; figure: '
                     + ", ".join(f'<a href="{e(f)}">{e(f)}</a>' for f in figs) + ")</span></h2>")
        parts.append('<div class="grid">')
        for g in gallery[layer]:
            ch = g["channel"]
            thumb = f'<img src="tiles/{sl}/{e(g["tiles"][0][0])}" alt="">' if g["tiles"] else ""
            parts.append(f'<a href="#{sl}-c{ch}">{thumb}ch {ch}</a>')
        parts.append("</div>")
        for g in gallery[layer]:
            ch = g["channel"]
            parts.append(f'<div class="chan" id="{sl}-c{ch}"><h3>{e(layer)} channel {ch} '
                         f'<a href="#layer-{sl}" class="meta">(back)</a></h3><div class="pairs">')
            if not g["entries"]:
                parts.append("<p>no activations</p>")
            for r, (entry, (proj, patch)) in enumerate(zip(g["entries"], g["tiles"])):
                pos = entry["position"]
                parts.append(
                    f'<figure><img src="tiles/{sl}/{e(proj)}" alt="projection"><img src="tiles/{sl}/{e(patch)}" '
                    f'alt="patch"><figcaption>#{r + 1} value {entry["value"]:.4g}<br>{e(entry["image"])}'
                    f'{f" at ({pos[0]}, {pos[1]})" if pos else ""}</figcaption></figure>'
                )
            parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
