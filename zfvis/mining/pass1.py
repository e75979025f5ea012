"""Pass 1 of mining: stream the data set, keep every channel's running top-k, merge the ranks' lists."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import torch

from ..analysis.topk import EMPTY as _EMPTY
from ..analysis.topk import empty_topk, image_maxima, merge_topk
from ..io import ownership
from ..io.atomic import atomic_torch_save, flush_recording
from ..io.errors import MiningInterrupted, UserInputError
from ..io.progress import progress
from .identity import hash_files
from .run import Files, Progress, Run, loader

__all__ = ["Saver", "pass1", "merge_ranks", "topk_table"]


class Saver:
    """Saves pass 1's progress every ``state_every`` batches and at least every
    ``state_seconds`` (so that at most that much work is redone after a kill)."""

    def __init__(self, run: Run, saved: int) -> None:
        self.run, self.saved, self.last = run, saved, time.monotonic()

    def maybe(self, prog: Progress) -> None:
        s = self.run.s
        if prog.batches % s.state_every == 0 or time.monotonic() - self.last >= s.state_seconds:
            self.save(prog)

    def save(self, prog: Progress) -> None:
        if prog.batches != self.saved:
            atomic_torch_save(self.run.state(prog), self.run.part_path)
            self.saved, self.last = prog.batches, time.monotonic()



def _update(run: Run, prog: Progress, idx: torch.Tensor, batch: torch.Tensor | None,
            bad: list[tuple[int, str]]) -> Progress:
    """The progress after one more batch (a new object: the old one stays consistent)."""
    skipped = prog.skipped + tuple({"image": run.files[i], "index": i, "error": e} for i, e in bad)
    if batch is None:
        return Progress(prog.tops, skipped, prog.images, prog.batches + 1)
    res = run.taps.run(run.batch(batch), lambda layer, o: image_maxima(o, run.layers[layer].select))
    tops = {}
    for layer, (vals, pos) in res.items():
        cand = {"values": vals, "index": idx.view(1, -1).expand_as(vals), "pos": pos}
        tops[layer] = merge_topk([prog.tops[layer], cand], run.k)
    return Progress(tops, skipped, prog.images + len(idx), prog.batches + 1)


def pass1(run: Run) -> tuple[Progress, float, int]:
    """Streams this rank's shard; returns (progress, seconds, batches taken from a state)."""
    prog = run.resume
    if prog is not None and prog.done:
        if run.show:
            print(f"pass 1 already done in '{run.out}' (state.pt); going on with pass 2", file=sys.stderr)
        return prog, 0.0, 0
    if prog is None:
        prog = Progress({n: empty_topk(len(lay.channels), run.k) for n, lay in run.layers.items()}, (), 0, 0)
    r, bs = run.ranks, run.s.batch_size
    shard = run.chosen[r.rank :: r.world]
    steps = math.ceil(len(run.chosen[0 :: r.world]) / bs)  # every rank takes the largest shard's steps
    first, own_steps = prog.batches, math.ceil(len(shard) / bs)
    start = min(len(shard), first * bs)
    if first and run.show:
        print(f"resuming pass 1 from '{run.part_path}': {start} of {len(shard)} images already done", file=sys.stderr)
    todo = shard[start:]
    batches = iter(loader(Files(run.root, [run.files[i] for i in todo], todo, run.preprocess), bs, run.s.workers))
    saver, ran, t1 = Saver(run, first), 0, time.perf_counter()
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


def merge_ranks(run: Run, prog: Progress) -> Progress:
    """Gathers and merges the ranks' top-k lists; rank 0 saves the final state."""
    r = run.ranks
    if prog.done:  # resumed from the final state: a rank stopped before dropping its part may have left it
        r.finish()
        _drop_part(run)
        return prog
    merged = dataclasses.replace(prog, done=True)
    if r.world > 1:
        r.check()
        parts = r.gather({"topk": prog.tops, "skipped": list(prog.skipped), "images": prog.images})
        tops = {n: merge_topk([g["topk"][n] for g in parts], run.k) for n in run.layers}
        skipped = tuple(sorted((s for g in parts for s in g["skipped"]), key=lambda s: s["index"]))
        merged = Progress(tops, skipped, sum(int(g["images"]) for g in parts), prog.batches, True)
    if r.rank == 0:
        won = [int(i) for t in merged.tops.values() for i in t["index"].flatten().tolist() if i != _EMPTY]
        run.winners = hash_files(run.root, run.files, won)
        atomic_torch_save(run.state(merged), run.state_path)
    r.check()  # the final state is on disk before any rank drops its part
    r.finish()
    _drop_part(run)
    return merged


def _drop_part(run: Run) -> None:
    """Deletes this rank's part file (several ranks; the final state is on disk)."""
    if run.part_path != run.state_path:
        flush_recording()  # the part file joins the ledger, to be deleted as the run's own
        ownership.delete_own([run.part_path], run.run_id)


def topk_table(run: Run, prog: Progress) -> dict[str, Any]:
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
                p, value = int(t["pos"][c, r]), float(t["values"][c, r])
                if not math.isfinite(value):
                    raise UserInputError(f"layer '{name}' channel {layer.channels[c]}: its activation on "
                                         f"'{run.files[i]}' is {value}, not a finite number (the model overflows in "
                                         f"{run.dtype}?); nothing is ranked: use a wider dtype or check the model")
                entries.append({"image": run.files[i], "index": i, "value": value,
                                "position": [p // layer.width, p % layer.width] if p >= 0 else None,
                                "sha256": run.winners.get(i)})
            ranked.append(entries)
        topk["layers"][name] = {"module": layer.module, "channel_count": layer.shape[0],
                                "channel_ids": layer.channels, "channels": ranked}
    return topk
