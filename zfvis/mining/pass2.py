"""Pass 2 of mining: project every winner with its own image's switches, crop, draw tiles and pages, page by page."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..analysis.topk import crop_winners, make_seeds
from ..io.atomic import atomic_torch_save, flush_recording
from ..io.errors import MiningInterrupted
from ..io.images import load_image, resolve
from ..io.progress import progress
from ..viz import render, sheets
from . import pages as mining_figures
from .gallery import write_site
from .run import Layer, Progress, Run, Winner
from .run_folder import safe_name

__all__ = ["tile", "pass2"]


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def tile(run: Run, proj: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection and its image patch as displayable uint8 images."""
    shown = run.preprocess.denormalize(patch.float())
    return _to_u8(render.normalize_projection(proj.float())), _to_u8(shown)


# --------------------------------------------------------------------------- phase 6: pass 2


_Crops = dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, list[int]]]


@dataclasses.dataclass(frozen=True)
class _Page:
    """One figure page of pass 2: up to :data:`zfvis.mining.pages.PAGE_CHANNELS` channels
    of one layer.

    Attributes:
        layer: The layer.
        number: The page's number within the layer (from 0).
        count: The layer's number of pages.
        slots: The channels' positions in the layer's ``channel_ids``.
    """

    layer: Layer
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


def _pages(run: Run) -> list[_Page]:
    out = []
    for layer in run.layers.values():
        n = len(layer.channels)
        per = mining_figures.PAGE_CHANNELS
        starts = range(0, n, per)
        out += [_Page(layer, k, len(starts), range(s, min(n, s + per))) for k, s in enumerate(starts)]
    return out


def _project_page(run: Run, page: _Page, winners: list[Winner], bar: Any) -> _Crops:
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
            pu8, iu8 = tile(run, proj, patch)
            crops[(w.slot, w.rank)] = (pu8, iu8, list(box))
        bar.update(len(sel))
    run.projecting += time.perf_counter() - t0
    return crops


def _draw(run: Run, page: _Page, info: dict[str, Any], bar: Any) -> list[list[list[int]]]:
    """Projects, tiles and draws one page; returns its boxes (per channel, per rank)."""
    ids: list[int] = info["channel_ids"]
    winners = [Winner(k, r, e["index"], *(e["position"] or [-1, -1]), e["value"])
               for k, c in enumerate(page.slots) for r, e in enumerate(info["channels"][c])]
    crops = _project_page(run, page, winners, bar)
    tile_dir = run.out / "tiles" / safe_name(page.layer.name)
    tile_dir.mkdir(parents=True, exist_ok=True)
    entries, boxes = [], []
    for k, c in enumerate(page.slots):
        ranked = info["channels"][c]
        shown = [crops[(k, r)] for r in range(len(ranked))]
        if shown:  # a channel's tiles in two files (zfvis.viz.sheets), not two per activation
            render.save_image(sheets.make_sheet([(p, i) for p, i, _ in shown]), tile_dir / sheets.sheet_name(ids[c]))
            render.save_image(sheets.make_thumb(shown[0][0], shown[0][1]), tile_dir / sheets.thumb_name(ids[c]))
        boxes.append([box for _, _, box in shown])
        n = mining_figures.FIGURE_TOP  # the figure's 3x3 grid; tiles and gallery keep all
        entries.append((ids[c], [p for p, _, _ in shown[:n]], [i for _, i, _ in shown[:n]],
                        [e["value"] for e in ranked[:n]]))
    title = mining_figures.page_title(run.s.model_name, page.layer.name, run.s.top, run.s.rule,
                                      [ids[c] for c in page.slots], page=page.number + 1, pages=page.count)
    made = info.get("synthetic")  # feature visualization's images (zfvis.mining.synthesis), if asked
    synthetic = None if not made else [sheets.read_png(run.out / made["files"][c]) for c in page.slots]
    mining_figures.draw_page(title, entries, run.out / page.figure, synthetic=synthetic)
    return boxes


def _page_done(run: Run, page: _Page, info: dict[str, Any], prog: Progress) -> bool:
    """Whether an earlier call finished ``page``: its boxes are saved and its files exist."""
    if page.key not in prog.pages or not (run.out / page.figure).is_file():
        return False
    tile_dir = run.out / "tiles" / safe_name(page.layer.name)
    ids = info["channel_ids"]
    return all((tile_dir / name(ids[c])).is_file() for c in page.slots if info["channels"][c]
               for name in (sheets.sheet_name, sheets.thumb_name))


def pass2(run: Run, topk: dict[str, Any], prog: Progress) -> list[Path]:
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
                atomic_torch_save(run.state(prog), run.state_path)
                flush_recording()  # the page's files join the run's manifest
            for c, channel_boxes in zip(page.slots, boxes):
                ranked = info["channels"][c]
                for e, box in zip(ranked, channel_boxes):
                    e["box"] = list(box)
                entry = {"channel": info["channel_ids"][c], "figure": page.figure, "entries": ranked}
                if info.get("synthetic"):
                    made = info["synthetic"]
                    entry["synthetic"] = {"file": made["files"][c], "objective": made["objective"][c],
                                          "steps": made["steps"]}
                gallery[page.layer.name].append(entry)
    outputs = [run.out / p.figure for p in pages]
    outputs += write_site(run.out, topk, gallery, layer_info=_layer_info(run))
    timings = topk.setdefault("timings", {})
    timings["project"] = round(run.projecting, 3)
    timings["render"] = round(time.perf_counter() - t_start - run.projecting, 3)
    return outputs


def _layer_info(run: Run) -> dict[str, dict[str, Any]]:
    """Per mined layer its output shape and receptive field, for the gallery's model page."""
    info: dict[str, dict[str, Any]] = {}
    shape = tuple(run.probe_image.shape)
    for name, layer in run.layers.items():
        rf = run.dn.receptive_field(name, shape)
        field = None if rf is None else {"size": list(rf.size), "jump": list(rf.jump), "offset": list(rf.offset)}
        info[name] = {"shape": list(layer.shape), "receptive_field": field}
    return info
