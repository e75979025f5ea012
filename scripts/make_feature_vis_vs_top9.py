#!/usr/bin/env python
"""Draws ``docs/feature_vis_vs_top9.png``: what a channel wants beside what excites it in the data.

For conv1 .. conv5 of the shipped ``zfnet-cifar10`` (packaged weights), the first few channels of
each layer: the synthetic image that maximises the channel's mean activation, optimised in the
decorrelated Fourier parameterisation (computed by the mining run itself, ``feature_vis=True``)
and in plain pixels (the same transformations, steps and seed), beside the image patches of the
channel's top 9 over the CIFAR-10 test split (``zfvis.mining.mine``, 2,000 images evenly spaced
over the classes by default).

    mkdir -p data/cifar10 && tar -xzf ../shared/data/cifar10/cifar10-test.tar.gz -C data/cifar10
    python scripts/make_feature_vis_vs_top9.py [--steps 256] [--channels 3] [-o docs/feature_vis_vs_top9.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import zfvis  # noqa: E402
from zfvis.mining.run_folder import safe_name  # noqa: E402
from zfvis.viz import sheets  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
DPI = 100
CELL = 1.0  # inches: one synthetic image, and the 3x3 grid of patches
GAP, BLOCK_GAP, LABEL_W, HEAD, CAPTION = 0.06, 0.3, 0.75, 0.75, 0.36


def _channel(run: Path, topk: dict, layer: str, c: int) -> tuple[torch.Tensor, list[torch.Tensor], float, float]:
    """A mined channel's Fourier image, its top-9 patches, the Fourier objective and the top-1 activation."""
    info = topk["layers"][layer]
    k = info["channel_ids"].index(c)
    ranked = info["channels"][k]
    layout = sheets.SheetLayout.of([e["box"] for e in ranked])
    sheet = sheets.read_png(run / "tiles" / safe_name(layer) / sheets.sheet_name(c))
    patches = [p for _, p in sheets.cut_sheet(sheet, layout)[:9]]
    fourier = sheets.read_png(run / info["synthetic"]["files"][k])
    return fourier, patches, float(info["synthetic"]["objective"][k]), float(ranked[0]["value"]) if ranked else 0.0


def _show(fig: Figure, img: torch.Tensor, x: float, y: float, w: float, h: float, fig_w: float, fig_h: float) -> None:
    """``img`` (3, H, W) uint8 or [0, 1] at (x, y) inches from the top-left, ``w`` x ``h`` inches, sharp pixels."""
    ax = fig.add_axes((x / fig_w, 1 - (y + h) / fig_h, w / fig_w, h / fig_h))
    arr = img.float() / 255 if img.dtype == torch.uint8 else img.clamp(0, 1)
    ax.imshow(arr.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()


def _patch_grid(fig: Figure, patches: list[torch.Tensor], x: float, y: float, fig_w: float, fig_h: float) -> None:
    """The top 9 patches in a 3x3 grid of ``CELL`` inches, each at one scale (the largest side fills a cell)."""
    side = (CELL - 2 * 0.02) / 3
    big = max([max(p.shape[1:]) for p in patches] or [1])
    for r, p in enumerate(patches):
        h, w = (side * s / big for s in p.shape[1:])
        cx, cy = x + (r % 3) * (side + 0.02), y + (r // 3) * (side + 0.02)
        _show(fig, p, cx + (side - w) / 2, cy + (side - h) / 2, w, h, fig_w, fig_h)


def draw(run: Path, topk: dict, pixel: dict[str, zfvis.FeatureVisResult], channels: Sequence[int],
         images: int, steps: int, path: str) -> Figure:  # fmt: skip
    layers = list(pixel)
    block = 3 * CELL + 2 * GAP + 0.1
    fig_w = LABEL_W + len(channels) * block + (len(channels) - 1) * BLOCK_GAP + 0.2
    row = CAPTION + CELL + 0.22
    fig_h = HEAD + len(layers) * row + 0.1
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    fig.text(0.5, 1 - 0.08 / fig_h, f"zfnet-cifar10 (packaged weights): what a channel wants vs what excites it in "
             f"{images:,} CIFAR-10 test images", ha="center", va="top", fontsize=12, fontweight="bold")
    fig.text(0.5, 1 - 0.36 / fig_h, f"per channel: synthetic image, decorrelated Fourier (F) | synthetic image, "
             f"plain pixels (P), both {steps} steps, same seed | the image patches of its top 9\n"
             "F, P: the channel's mean activation each image reaches; top-1: the channel's largest activation "
             "in the data", ha="center", va="top", fontsize=9, color="#404040", linespacing=1.4)
    for i, layer in enumerate(layers):
        y = HEAD + i * row
        fig.text(0.1 / fig_w, 1 - (y + CAPTION + CELL / 2) / fig_h, layer, ha="left", va="center", fontsize=11,
                 fontweight="bold")
        for j, c in enumerate(channels):
            x = LABEL_W + j * (block + BLOCK_GAP)
            fourier, patches, f_obj, top1 = _channel(run, topk, layer, c)
            k = pixel[layer].units.index(c)
            fig.text((x + 0.02) / fig_w, 1 - (y + CAPTION - 0.06) / fig_h,
                     f"ch {c}   F {f_obj:.2f}   P {float(pixel[layer].final[k]):.2f}   top-1 {top1:.2f}",
                     ha="left", va="bottom", fontsize=9)
            _show(fig, fourier, x, y + CAPTION, CELL, CELL, fig_w, fig_h)
            _show(fig, pixel[layer].images[k], x + CELL + GAP, y + CAPTION, CELL, CELL, fig_w, fig_h)
            _patch_grid(fig, patches, x + 2 * (CELL + GAP) + 0.1, y + CAPTION, fig_w, fig_h)
    fig.savefig(path, dpi=DPI)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=str(REPO / "data" / "cifar10" / "test"),
                   help="images to mine (default: data/cifar10/test, the unpacked CIFAR-10 test split)")
    p.add_argument("--limit", type=int, default=2000, help="images used, evenly spaced (default 2000)")
    p.add_argument("--steps", type=int, default=256, help="optimisation steps (default 256)")
    p.add_argument("--channels", type=int, default=3, help="channels per layer, 0 .. N-1 (default 3)")
    p.add_argument("--layers", default=",".join(LAYERS), help="comma-separated layers (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--run", help="keep the mining run in this folder (default: a temporary one)")
    p.add_argument("-o", "--output", default=str(REPO / "docs" / "feature_vis_vs_top9.png"),
                   help="the PNG written (default: docs/feature_vis_vs_top9.png)")
    args = p.parse_args(argv)
    if not Path(args.dataset).is_dir():
        print(f"no data set at '{args.dataset}': unpack the CIFAR-10 test split first (mkdir -p data/cifar10 && "
              "tar -xzf ../shared/data/cifar10/cifar10-test.tar.gz -C data/cifar10) or pass --dataset", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model, pre = zfvis.load_model("zfnet-cifar10")
    layers, channels = args.layers.split(","), list(range(args.channels))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zfvis-fv-top9-") as tmp:
        run = Path(args.run or tmp)
        zfvis.mining.mine(model, pre, args.dataset, layers, channels=channels, limit=args.limit, out_dir=run,
                          batch_size=128, feature_vis=True, feature_vis_steps=args.steps, progress=False,
                          model_name="zfnet-cifar10", weights="packaged")
        topk = json.loads((run / "topk.json").read_text(encoding="utf-8"))
        pixel = {}
        for layer in layers:
            pixel[layer] = zfvis.feature_vis(model, layer, channels, steps=args.steps, param="pixel", preprocess=pre,
                                             seed=0, batch_size=len(channels), progress=False)
            fourier = topk["layers"][layer]["synthetic"]["objective"]
            print(f"{layer}: channel mean reached, Fourier " + " ".join(f"{v:.2f}" for v in fourier)
                  + "; pixel " + " ".join(f"{v:.2f}" for v in pixel[layer].final.tolist())
                  + "; top-1 activation " + " ".join(f"{c[0]['value']:.2f}" if c else "-"
                                                     for c in topk["layers"][layer]["channels"]))
        draw(run, topk, pixel, channels, int(topk["images"]), args.steps, args.output)
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
