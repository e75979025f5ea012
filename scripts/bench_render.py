#!/usr/bin/env python
"""Benchmark of rendering a mining run's outputs: the Fig. 2 pages and the tile PNGs.

The workload is what ``zfvis mine`` draws for one layer of ``--channels`` channels with
their top 9 (by default 128 channels: the 1,152 projections of ``zfnet-cifar10``'s
conv5): pages of 64 channels through :func:`zfvis.viz.fig2.mining_figure` (written to
PNG), and two tile PNGs per projection through :func:`zfvis.viz.render.save_image`. The
tiles are synthetic but shaped like mining's (``(3, h, w)``, ``h, w`` in 20..32, clipped
at image borders), smooth with some noise, seeded.

Every phase writes into a new, empty folder, as a first mining run does. (Writing over the
files of an earlier run costs more on ext4, whichever way: renaming a file over another
makes the kernel flush the new file's data to disk.)

Phases (median seconds over ``--rounds`` rounds, all measured back to back each round):

- ``draw``: drawing and writing every page, from float tiles as mining passes them
  (projections as ``tile / 255 - 0.5``, patches as ``tile / 255``);
- ``draw_u8``: the same from the uint8 tiles mining keeps (no float round trip; the old
  ``mining_figure`` does not take them);
- ``tiles``: encoding and writing every tile, from float tensors;
- ``tiles_u8``: the same from uint8 ``(3, h, w)`` tensors (one file per tile, as mining
  wrote them before its sheets);
- ``sheets``: what mining writes now: per channel one sheet and one thumbnail
  (:mod:`zfvis.viz.sheets`), two files instead of eighteen;
- ``project`` (with ``--project``): the same number of conv5 projections of the shipped
  model through the public API (``record`` + ``select`` + ``reverse``), for reference.

With ``--mine DATASET`` a real ``zfvis mine`` of the shipped model's conv5 (128
channels x top 9 = 1,152 projections) runs once a round into a new folder, and its
``topk.json`` ``"timings"`` are reported: ``project`` (reading the winners' images,
projecting, cropping) against ``render`` (tiles, Fig. 2 pages, gallery).

With ``--baseline OLD_RENDER.py`` (e.g. ``git show HEAD~1:zfvis/render.py > /tmp/old.py``)
the same phases are timed with that module too, in the same rounds, and the ratios are
printed::

    OMP_NUM_THREADS=1 python scripts/bench_render.py --channels 128 --rounds 3 --baseline /tmp/old.py

The goal (issue 10) is rendering at most as long as projecting: ``render / project``
at most 1, printed last::

    python scripts/bench_render.py --project --mine cifar10/test --limit 500 --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zfvis.io.progress import progress  # noqa: E402
from zfvis.viz import (  # noqa: E402
    fig2,
    render,
    sheets,  # noqa: E402
)

PAGE = 64  # channels per page, as zfvis.mining.pages.PAGE_CHANNELS


def _tile(gen: torch.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random uint8 tile (h, w, 3) with a little noise."""
    low = torch.rand(1, 3, 4, 4, generator=gen)
    smooth = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    noisy = (smooth + 0.08 * torch.randn(3, h, w, generator=gen)).clamp(0, 1)
    return np.ascontiguousarray((noisy * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def workload(channels: int, seed: int = 0) -> list[tuple[int, list[np.ndarray], list[np.ndarray], list[float]]]:
    """Per channel: (index, 9 projection tiles, 9 patch tiles, 9 values), uint8 (h, w, 3)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for ch in range(channels):
        projs, pats = [], []
        for _ in range(9):
            h, w = (int(v) for v in torch.randint(20, 33, (2,), generator=gen))
            projs.append(_tile(gen, h, w))
            pats.append(_tile(gen, h, w))
        out.append((ch, projs, pats, [float(9 - r) for r in range(9)]))
    return out


def _from_u8(a: np.ndarray) -> torch.Tensor:
    """As mining does: a uint8 (h, w, 3) tile to a float (3, h, w) tensor in [0, 1]."""
    return torch.from_numpy(a).permute(2, 0, 1).float() / 255.0


def _u8_chw(a: np.ndarray) -> torch.Tensor:
    """As mining keeps tiles: a uint8 (3, h, w) tensor."""
    return torch.from_numpy(a).permute(2, 0, 1)


def draw_pages(mod: ModuleType, work: list[Any], out: Path, *, u8: bool = False) -> None:
    """Draws and writes the Fig. 2 pages as mining does (from float tiles) or from uint8 tiles."""
    for p, s in enumerate(range(0, len(work), PAGE)):
        entries = [(ch, [_u8_chw(a) if u8 else _from_u8(a) - 0.5 for a in pr],
                    [_u8_chw(a) if u8 else _from_u8(a) for a in pa], v)
                   for ch, pr, pa, v in work[s : s + PAGE]]
        mod.mining_figure(f"bench / conv5: top-9 activations per channel (page {p + 1})", entries,
                          out / f"page{p + 1}.png", columns=min(4, len(entries)), cell_inches=0.6)


def save_tiles(mod: ModuleType, work: list[Any], out: Path, *, u8: bool = False) -> None:
    """Writes two tile PNGs per projection as mining does (from float tensors or uint8)."""
    for ch, projs, pats, _ in work:
        for r, (a, b) in enumerate(zip(projs, pats)):
            stem = out / f"c{ch:04d}_r{r + 1}"
            mod.save_image(_u8_chw(a) if u8 else _from_u8(a), stem.with_name(stem.name + "_proj.png"))
            mod.save_image(_u8_chw(b) if u8 else _from_u8(b), stem.with_name(stem.name + "_patch.png"))


def save_sheets(mod: ModuleType, work: list[Any], out: Path) -> None:
    """Writes a sheet and a thumbnail per channel, as mining does."""
    for ch, projs, pats, _ in work:
        pairs = [(_u8_chw(a), _u8_chw(b)) for a, b in zip(projs, pats)]
        mod.save_image(sheets.make_sheet(pairs), out / sheets.sheet_name(ch))
        mod.save_image(sheets.make_thumb(*pairs[0]), out / sheets.thumb_name(ch))


def project_phase(channels: int) -> Callable[[], None] | None:
    """A callable projecting ``9 * channels`` conv5 activations of the shipped model, or None."""
    try:
        import zfvis

        model, pre = zfvis.load_model("zfnet-cifar10")
        dn = zfvis.Deconvnet(model)
        x = pre(zfvis.load_image(zfvis.default_image())).unsqueeze(0)
        n = min(channels, dn.record(x, "conv5").output.shape[1])
    except (ImportError, RuntimeError, ValueError, OSError, AttributeError) as exc:  # optional: report, go on
        print(f"project phase skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None

    def run() -> None:
        with torch.no_grad():
            rec = dn.record(x, "conv5")
            dn.reverse(rec, dn.select(rec, list(range(n)), top_k=9))

    return run


def load_module(path: Path) -> ModuleType:
    """Imports a render.py from a file, e.g. an older version, as ``render_baseline``."""
    spec = importlib.util.spec_from_file_location("render_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def mine_once(dataset: Path, limit: int | None, out: Path) -> dict[str, float]:
    """One real mining run of the shipped model's conv5 into ``out``; its ``timings``."""
    import zfvis
    from zfvis.mining import mine

    model, pre = zfvis.load_model("zfnet-cifar10")
    res = mine(model, pre, dataset, ["conv5"], out_dir=out, limit=limit, progress=False, probe=False)
    assert res.topk is not None
    return dict(res.topk["timings"])


def _timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", type=int, default=128, help="channels mined and drawn (default 128)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each figure is the median (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the projections (default 1)")
    ap.add_argument("--baseline", type=Path, help="an older render.py to time in the same rounds")
    ap.add_argument("--project", action="store_true", help="also time the projections, for reference")
    ap.add_argument("--keep", type=Path, help="write the outputs here (default: a temporary folder)")
    ap.add_argument("--mine", type=Path, metavar="DATASET", help="also time a real zfvis mine of conv5 over DATASET")
    ap.add_argument("--limit", type=int, default=500, help="images of DATASET for --mine (default 500)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = workload(args.channels)
    new = SimpleNamespace(save_image=render.save_image, mining_figure=fig2.mining_figure)  # as render.py was
    mods = {"new": new} | ({"baseline": load_module(args.baseline)} if args.baseline else {})
    phases: dict[str, Callable[[ModuleType, Path], None]] = {
        "draw": lambda m, o: draw_pages(m, work, o),
        "tiles": lambda m, o: save_tiles(m, work, o),
    }
    phases["draw_u8"] = lambda m, o: draw_pages(m, work, o, u8=True)
    phases["tiles_u8"] = lambda m, o: save_tiles(m, work, o, u8=True)
    phases["sheets"] = lambda m, o: save_sheets(m, work, o)
    proj = project_phase(args.channels) if args.project else None
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        with progress(args.rounds, "rounds", "round") as bar:
            for r in range(args.rounds):
                if proj is not None:
                    times.setdefault("project", []).append(_timed(proj))
                if args.mine is not None:
                    for key, v in mine_once(args.mine, args.limit, root / f"round{r + 1}" / "mine").items():
                        times.setdefault(f"mine.{key}", []).append(v)
                for name, mod in mods.items():
                    for phase, fn in phases.items():
                        if (phase.endswith("_u8") or phase == "sheets") and name == "baseline":
                            continue  # the old functions take float tensors only
                        out = root / f"round{r + 1}" / name / phase  # a fresh folder, as a first mining run has
                        out.mkdir(parents=True)
                        times.setdefault(f"{name}.{phase}", []).append(_timed(functools.partial(fn, mod, out)))
                bar.update(1)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.channels} channels x 9 ({9 * args.channels} projections), median of {args.rounds} rounds:")
    for k, v in med.items():
        print(f"  {k:18s} {v:7.2f} s")
    if args.baseline:
        for phase in ("draw", "tiles"):
            print(f"  {phase}: baseline / new = {med[f'baseline.{phase}'] / med[f'new.{phase}']:.1f}x")
        before = med["baseline.draw"] + med["baseline.tiles"]
        after = med["new.draw"] + med.get("new.tiles_u8", med["new.tiles"])
        print(f"  draw + tiles: {before:.2f} s -> {after:.2f} s ({before / after:.1f}x)")
    if "project" in med:
        print(f"  (draw_u8 + tiles_u8) / project = {(med['new.draw_u8'] + med['new.tiles_u8']) / med['project']:.2f}"
              f"   (draw_u8 + sheets) / project = {(med['new.draw_u8'] + med['new.sheets']) / med['project']:.2f}")
    if "mine.project" in med:
        print(f"  zfvis mine conv5: render / project = {med['mine.render'] / med['mine.project']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
