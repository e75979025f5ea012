"""Top-k mining over a data set: the strongest activations of every channel (ZF Fig. 2).

A run goes through named phases, each a function of one :class:`Run`:

1. **plan** (:func:`plan`): check the settings, list the data set, read the first
   readable image, measure the layers and fix the channels. Nothing is written.
2. **probe** (:func:`_probe`): the whole pipeline on that one image (record, select, one
   reverse pass per layer, a tile and a figure drawn into a temporary folder), so that a
   model pass 2 cannot project fails in seconds, not after hours of pass 1.
3. **claim** (:func:`_claim`): lock the output folder and check what it holds; only then
   create it and write ``settings.json``. A folder holding anything but a zfvis run with
   the same settings is refused unless ``overwrite`` (or ``restart``, for a zfvis run).
4. **pass 1** (:func:`pass1`): stream the data set in batches, one forward pass per
   batch for all layers, keeping for every channel a running top-k of (value, image,
   position), at most one entry per image (the image's maximum over the channel's
   positions; ties: the smaller flat position). Ranking is by value, descending; ties by
   image path, ascending. Memory is O(layers x channels x k). Unreadable files are
   skipped and listed. The state is saved every ``state_every`` batches and at least
   every ``state_seconds``, and on Ctrl-C; the same call resumes it.
5. **merge** (:func:`merge_ranks`): under ``torch.distributed`` (torchrun), the per-rank top-k
   lists are gathered and merged exactly.
6. **feature visualization** (:func:`~zfvis.mining.synthesis.synthesize`, only when asked:
   ``feature_vis``): a synthetic image per mined channel, resumed chunk by chunk.
7. **pass 2** (:func:`pass2`): project every winner with its own image's switches, only
   over its receptive field; crop projection and image to it; tiles, figures, gallery. It
   goes a figure page (64 channels) at a time and saves each page's boxes in the state, so
   an interrupted pass 2 resumes at the page it was on.
8. **outputs** (:func:`_finish`): ``topk.json`` and a summary.

Under torchrun every rank checks in with the others at each phase boundary and after
every batch of pass 1: when one rank fails, the others stop at their next check with a
:class:`~zfvis.io.errors.RankFailedError` naming it, instead of waiting for gloo's timeout.
The caller's model is left as it was given (device, dtype, training flags).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis.feature_vis import feature_vis
from ..analysis.topk import crop_winners, image_maxima, make_seeds, merge_topk
from ..io.atomic import atomic_write_text, recording
from ..io.checks import check_device
from ..io.errors import MiningInterrupted
from ..models.zoo import Preprocess
from ..viz import render, sheets
from . import pages as mining_figures
from .identity import changed_files, check_unchanged
from .pass1 import merge_ranks, pass1, topk_table
from .pass2 import pass2, tile
from .ranks import Ranks
from .run import Progress, Run, placed, plan
from .run_folder import FolderRequest, claim, load_state
from .settings import MineSettings, MiningResult, check_inputs, resolve_settings
from .synthesis import synthesize

__all__ = [
    "MineSettings",
    "MiningResult",
    "mine",
    "merge_topk",
    "image_maxima",
    "crop_winners",
    "make_seeds",
]


# --------------------------------------------------------------------------- phase 2: probe


def _probe(run: Run) -> None:
    """Runs the whole pipeline on the first readable image before any real work: for every
    layer its strongest activation of the first channel, projected and cropped as pass 2
    does (:func:`crop_winners`), and a tile; then one figure page (all drawn into a
    temporary folder, so nothing is written where the person looks)."""
    x = run.batch(run.probe_image.unsqueeze(0))
    entry, synthetic = None, None
    with tempfile.TemporaryDirectory(prefix="zfvis-probe-") as tmp:
        for layer in run.layers.values():
            best = run.dn.select(run.dn.record(x, layer.name), layer.channels[0])
            row = (0, layer.channels[0], int(best.y[0]), int(best.x[0]), float(best.value[0]))
            [(proj, patch, _)] = crop_winners(run.dn, x, layer.name, make_seeds([row], run.device))
            pu8, iu8 = tile(run, proj, patch)
            if run.s.figures:
                render.save_image(sheets.make_sheet([(pu8, iu8)]), Path(tmp) / "sheet.png")
                render.save_image(sheets.make_thumb(pu8, iu8), Path(tmp) / "thumb.png")
                n = min(run.k, mining_figures.FIGURE_TOP)
                entry = entry or (layer.channels[0], [pu8] * n, [iu8] * n, [1.0] * n)
            if run.s.feature_vis:  # two steps of the optimisation, so that a layer it cannot reach fails now
                made = feature_vis(run.dn, layer.name, [layer.channels[0]], steps=2,
                                   size=tuple(int(v) for v in run.probe_image.shape[1:]), preprocess=run.preprocess,
                                   progress=False)
                synthetic = synthetic or [made.images[0]]
        if entry is not None:
            mining_figures.draw_page(f"{run.s.model_name} / probe", [entry], Path(tmp) / "page.png",
                                     synthetic=synthetic)


# --------------------------------------------------------------------------- phase 3: claim the folder


@contextlib.contextmanager
def _claim(run: Run) -> Iterator[list[Path]]:
    """Rank 0 claims the output folder (:func:`zfvis.mining.run_folder.claim`); every rank then
    takes the run's id and loads its saved progress, if any. The block records what it
    writes as the run's and is given the list of existing files it kept, not being the run's."""
    request = FolderRequest(run.out, run.fingerprint, run.settings, run.s.record, run.s.restart, run.s.overwrite,
                            run.s.flag, reads=run.root)
    ranks = run.ranks

    def share(run_id: str) -> str:
        return str(ranks.gather(run_id)[0]) if ranks.active else run_id

    with claim(request, lead=ranks.rank == 0, sync=ranks.check, share=share) as run.run_id, \
            recording(run.run_id, replace_foreign=run.s.overwrite) as kept:
        run.resume = _load_resume(run)
        yield kept


def _load_resume(run: Run) -> Progress | None:
    """This rank's saved progress for this run, if any (the merged final state first).

    Raises:
        DataSetChanged: An image changed since the state was saved (nothing is mixed).
    """
    layers = list(run.layers)
    final = load_state(run.state_path)
    if final is not None and final["fingerprint"] == run.fingerprint and final.get("done"):
        state = final
    else:
        state = final if run.part_path == run.state_path else load_state(run.part_path)
        if state is None or state["fingerprint"] != run.fingerprint:
            return None
    if run.identity is not None:
        changed = changed_files(run.root, run.files, run.chosen, state, run.identity)
        check_unchanged(run.out, changed, run.s.flag("restart"))
    if isinstance(state.get("winners"), dict):
        run.winners = dict(state["winners"])
    return Progress.from_state(state, layers)


# --------------------------------------------------------------------------- phase 4: pass 1



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
def _resumable(run: Run) -> Iterator[None]:
    """An interruption between the phases says, as one inside them does, how to resume."""
    try:
        yield
    except MiningInterrupted:
        raise
    except KeyboardInterrupt:
        saved = f"what is done is saved in '{run.out}'" if run.state_path.exists() else "nothing was saved"
        raise MiningInterrupted(f"stopped between the phases of the run; {saved}: run the same command again to "
                                "resume") from None


# --------------------------------------------------------------------------- phase 8: outputs


def _finish(run: Run, topk: dict[str, Any], outputs: list[Path], kept: list[Path]) -> list[Path]:
    """Writes ``topk.json`` and prints the summary (rank 0), and names the files it kept."""
    atomic_write_text(run.out / "topk.json", json.dumps(topk, indent=1, allow_nan=False) + "\n")
    outputs.insert(0, run.out / "topk.json")
    if kept:
        shown = ", ".join(_shown(run.out, p) for p in kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        print(f"kept {len(kept)} file(s) as they are, not written over: they were changed since this run wrote them, "
              f"or are not zfvis's ({shown}); move them away and run again to have zfvis's versions",
              file=sys.stderr)
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


def _shown(out: Path, p: Path) -> str:
    try:
        return str(p.relative_to(out))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------- the run


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
        model: A network the deconvnet can reverse (see :class:`~zfvis.core.deconvnet.Deconvnet`).
        preprocess: PIL image -> model input; it must give one size for every image.
        dataset: A folder of images or a text file of paths (:func:`zfvis.io.images.list_images`).
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
    s = resolve_settings(layers, settings, options)
    s.validate()
    dataset = check_inputs(model, preprocess, dataset)
    t0 = time.perf_counter()
    device = check_device(s.device, s.name("device"))
    ranks = Ranks.setup(device)
    try:
        with placed(model, device):
            run = plan(model, preprocess, dataset, s, ranks)
            ranks.check()
            if s.probe:
                _probe(run)
            ranks.check()
            with _claim(run) as kept, _sigterm_as_interrupt(), _resumable(run):
                prog, seconds, resumed = pass1(run)
                prog = merge_ranks(run, prog)
                if ranks.rank != 0:
                    return MiningResult(None, run.out, prog.images, list(prog.skipped), time.perf_counter() - t0,
                                        [], resumed, seconds)
                topk = topk_table(run, prog)
                topk["timings"] = {"pass1": round(seconds, 3)}
                if s.feature_vis:
                    prog = synthesize(run, topk, prog)
                outputs = pass2(run, topk, prog) if s.figures else []
                outputs += [run.out / f for info in topk["layers"].values()
                            for f in (info.get("synthetic") or {}).get("files", [])]
                outputs = _finish(run, topk, outputs, kept)
        return MiningResult(topk, run.out, prog.images, list(prog.skipped), time.perf_counter() - t0, outputs,
                            resumed, seconds)
    except BaseException as err:
        ranks.fail(err)
        raise
    finally:
        ranks.close()
