"""The synthetic images of a mining run: for every mined channel, an image that maximises it.

When a run is asked for them (``feature_vis``, ``zfvis mine --feature-vis``), this phase runs
between pass 1 and pass 2 on rank 0: the channels of each layer are optimised
:data:`~zfvis.mining.run.FEATURE_VIS_CHUNK` at a time by :func:`zfvis.feature_vis` (decorrelated
Fourier parameterisation, transformation robustness, a channel's mean as the objective), and each
image is written to ``synthetic/<layer>/c0042.png`` (atomically, recorded as the run's). After
each chunk the objectives reached are saved in the state, so an interrupted run resumes at the
chunk it was on and a finished run computes none again. Pass 2 then draws each image beside its
channel's top 9 on the Fig. 2 pages and in the gallery.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..analysis.feature_vis import feature_vis
from ..io.atomic import atomic_torch_save, flush_recording
from ..io.errors import MiningInterrupted
from ..io.progress import progress
from ..viz import render, sheets
from .run import FEATURE_VIS_CHUNK, FEATURE_VIS_PARAM, FEATURE_VIS_SEED, Progress, Run
from .run_folder import safe_name

__all__ = ["synthetic_file", "synthesize"]


def synthetic_file(layer: str, channel: int) -> str:
    """A channel's synthetic image relative to the run's folder: ``synthetic/conv3/c0042.png``."""
    return f"synthetic/{safe_name(layer)}/c{int(channel):04d}.png"


def _chunks(run: Run) -> list[tuple[str, list[int]]]:
    """(layer, channels) optimised together, in a fixed split of each layer's channels."""
    return [(name, lay.channels[i : i + FEATURE_VIS_CHUNK]) for name, lay in run.layers.items()
            for i in range(0, len(lay.channels), FEATURE_VIS_CHUNK)]


def _done(run: Run, prog: Progress, layer: str, channel: int) -> bool:
    """Whether an earlier call made this image: its objective is saved and its file exists."""
    return channel in prog.synthetic.get(layer, {}) and (run.out / synthetic_file(layer, channel)).is_file()


def synthesize(run: Run, topk: dict[str, Any], prog: Progress) -> Progress:
    """Computes and writes the synthetic image of every mined channel that has none yet; records
    per layer ``{"steps", "param", "seed", "files", "objective", "peak"}`` under
    ``topk["layers"][layer]["synthetic"]`` (in ``channel_ids`` order; ``peak``: the image's strongest
    activation of its channel, comparable with the top-1) and the seconds under
    ``topk["timings"]["feature_vis"]``.

    Returns:
        The progress, with the objective of every synthetic image.

    Raises:
        MiningInterrupted: Ctrl-C or SIGTERM; the chunks done are saved, the same call resumes.
    """
    s, t0 = run.s, time.perf_counter()
    chunks = _chunks(run)
    todo = [(layer, chans) for layer, chans in chunks if not all(_done(run, prog, layer, c) for c in chans)]
    total = sum(len(c) for _, c in chunks)
    left = sum(len(c) for _, c in todo)
    if left < total and run.show:
        print(f"resuming feature visualization from '{run.state_path}': {total - left} of {total} synthetic images "
              "already done", file=sys.stderr)
    size = tuple(int(v) for v in run.probe_image.shape[1:])
    with progress(left * s.feature_vis_steps, "feature vis", "step", run.show) as bar:
        for n, (layer, chans) in enumerate(todo):
            try:
                res = feature_vis(run.dn, layer, chans, steps=s.feature_vis_steps, size=size, batch_size=len(chans),
                                  seed=FEATURE_VIS_SEED, param=FEATURE_VIS_PARAM, preprocess=run.preprocess,
                                  progress=False)
                folder = run.out / "synthetic" / safe_name(layer)
                folder.mkdir(parents=True, exist_ok=True)
                for c, image in zip(res.units, res.images):
                    render.save_image(image, run.out / synthetic_file(layer, c))
            except KeyboardInterrupt:
                raise MiningInterrupted(
                    f"feature visualization stopped at chunk {n + 1} of {len(todo)}; pass 1 and the synthetic images "
                    f"before are saved in '{run.state_path}': run the same command again to resume") from None
            reached = {**prog.synthetic.get(layer, {}), **{int(c): float(v) for c, v in zip(res.units, res.final)}}
            prog = dataclasses.replace(prog, synthetic={**prog.synthetic, layer: reached})
            atomic_torch_save(run.state(prog), run.state_path)
            flush_recording()  # the chunk's images join the run's manifest
            bar.update(len(chans) * s.feature_vis_steps)
    seconds = time.perf_counter() - t0
    _record(run, topk, prog)
    topk.setdefault("timings", {})["feature_vis"] = round(seconds, 3)
    if run.show:
        print(_summary(run, topk, left, total, seconds), file=sys.stderr)
    return prog


def _peaks(run: Run, layer: str, files: list[str], channels: list[int]) -> list[float]:
    """Each synthetic image's strongest activation of its channel (the largest over positions), as
    written (the PNG), through the model's normalisation: comparable with mining's top-1."""
    pre = run.preprocess
    mean = torch.tensor(getattr(pre, "mean", None) or (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
    std = torch.tensor(getattr(pre, "std", None) or (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
    peaks: list[float] = []
    for s in range(0, len(files), run.s.batch_size):
        images = torch.stack([sheets.read_png(run.out / f) for f in files[s : s + run.s.batch_size]]).float() / 255
        with torch.no_grad():
            out = run.dn.forward_outputs(run.batch((images - mean) / std), [layer])[layer]
        for i, c in enumerate(channels[s : s + run.s.batch_size]):
            peaks.append(float(out[i, c].max()))
    return peaks


def _record(run: Run, topk: dict[str, Any], prog: Progress) -> None:
    for layer in run.layers:
        info = topk["layers"][layer]
        reached = prog.synthetic[layer]
        ids = info["channel_ids"]
        files = [synthetic_file(layer, c) for c in ids]
        info["synthetic"] = {"steps": run.s.feature_vis_steps, "param": FEATURE_VIS_PARAM, "seed": FEATURE_VIS_SEED,
                             "files": files, "objective": [reached[c] for c in ids],
                             "peak": _peaks(run, layer, files, ids)}


def _summary(run: Run, topk: dict[str, Any], computed: int, total: int, seconds: float) -> str:
    """One line: how many images, how long, and per layer the median objective reached and how many
    images excite their channel at least as much as the data set's strongest activation (top-1)."""
    parts = []
    for layer in run.layers:
        info = topk["layers"][layer]
        made = info["synthetic"]
        values = sorted(made["objective"])
        pairs = [(p, ranked[0]["value"]) for p, ranked in zip(made["peak"], info["channels"]) if ranked]
        reach = sum(p >= top for p, top in pairs)
        parts.append(f"{layer} median {values[len(values) // 2]:.3g}, {reach}/{len(pairs)} reach the top-1")
    return (f"feature vis: {total} synthetic image(s) ({computed} computed, {total - computed} resumed), "
            f"{run.s.feature_vis_steps} steps each, in {seconds:.1f} s; objective (the channel's mean) and "
            "channels whose image's peak reaches the data set's top-1: " + "; ".join(parts)
            + f"; written under {Path(run.out) / 'synthetic'}")
