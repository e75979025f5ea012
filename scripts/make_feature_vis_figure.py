#!/usr/bin/env python
"""Draws ``docs/feature_vis_zfnet.png``: synthetic images of the shipped ``zfnet-cifar10``.

For conv1 .. conv5, a few channels each: the image that maximises the channel's mean
activation (:func:`zfvis.feature_vis`), with the decorrelated Fourier parameterisation beside
plain pixels (the same transformations, steps and seed), and the objective each reached.

    python scripts/make_feature_vis_figure.py [--steps 256] [--channels 6] [-o docs/feature_vis_zfnet.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import zfvis  # noqa: E402
from zfvis.viz.feature_vis import feature_vis_figure  # noqa: E402

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def high_frequency_share(images: torch.Tensor) -> float:
    """The mean share of each image's power (mean removed, per colour) above half the Nyquist frequency
    (0.25 cycles per pixel): how much of the image is fine detail or pixel noise."""
    h, w = images.shape[-2:]
    power = torch.fft.rfft2(images - images.mean(dim=(2, 3), keepdim=True), norm="ortho").abs() ** 2
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    high = (torch.sqrt(fx * fx + fy * fy) > 0.25).to(power.dtype)
    share = (power * high).sum(dim=(1, 2, 3)) / power.sum(dim=(1, 2, 3)).clamp(min=1e-12)
    return float(share.mean())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=256, help="optimisation steps (default 256)")
    p.add_argument("--channels", type=int, default=6, help="channels per layer (0 .. N-1)")
    p.add_argument("--layers", default=",".join(LAYERS), help="comma-separated layers (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    default = Path(__file__).resolve().parent.parent / "docs" / "feature_vis_zfnet.png"
    p.add_argument("-o", "--output", default=str(default), help="the PNG written (default: docs/feature_vis_zfnet.png)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, pre = zfvis.load_model("zfnet-cifar10")
    layers = args.layers.split(",")
    fourier, pixel = [], []
    start = time.perf_counter()
    for layer in layers:
        for param, into in (("fourier", fourier), ("pixel", pixel)):
            res = zfvis.feature_vis(model, layer, f"0-{args.channels - 1}", steps=args.steps, param=param,
                                    preprocess=pre, seed=0, progress=False)
            into.append(res)
            print(f"{layer} {param:7s}: final objective per channel "
                  + " ".join(f"{v:.2f}" for v in res.final.tolist())
                  + f"; power above 0.25 cycles/pixel {high_frequency_share(res.images):.1%}")
    labels = [f"{r.layer}\nF {r.final.mean():.2f}\nP {q.final.mean():.2f}" for r, q in zip(fourier, pixel)]
    title = (f"zfnet-cifar10 (packaged weights): images maximising a channel's mean, {args.steps} steps; "
             "decorrelated Fourier (left of each pair) vs plain pixels (right); row label: mean objective reached")
    feature_vis_figure(fourier, compare=pixel, row_labels=labels, columns=args.channels, cell_inches=1.0,
                       title=title, path=args.output)
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
