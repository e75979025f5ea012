#!/usr/bin/env python
"""Speed and reach of :func:`zfvis.feature_vis`, on the CPU.

(a) The shipped ``zfnet-cifar10``, conv3: ``--channels`` channels (default 128), ``--steps`` steps
    (default 256), batched (``--batch-size``), seconds per channel; against a plain PyTorch loop of the
    same recipe (the same Fourier parameterisation, colour decorrelation, transformations, Adam and
    learning rate), one channel at a time with the whole forward pass and a hook catching the layer, as
    Lucent's ``render_vis`` runs (Lucent itself is not installed), timed on ``--plain-channels`` channels.
(b) VGG16 (random weights), conv5_3 at ``--vgg-size`` (default 224): ``--vgg-channels`` channels,
    ``--vgg-steps`` steps (fewer than (a): the CPU is slow for VGG), seconds per channel and step, both ways.
(c) Reach: for conv1 .. conv5 of the shipped model, the fraction of channels (``--reach-channels``, the
    first ones) whose synthetic image's strongest activation (the largest over positions of the channel's
    map; the image maximises the map's mean) is at least the channel's top-1 activation over the shipped
    sample images (the largest over images and positions, as mining's top-1 is).

    python scripts/bench_feature_vis.py [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import zfvis  # noqa: E402
from zfvis.analysis.feature_vis import param as P  # noqa: E402
from zfvis.analysis.feature_vis.transforms import Robustness  # noqa: E402


def plain_loop(model: nn.Module, module: nn.Module, channel: int, *, steps: int, size: int,
               mean: Sequence[float], std: Sequence[float], seed: int = 0) -> float:  # fmt: skip
    """The recipe written out plainly for one channel; returns its final objective (the mean of the map)."""
    g = torch.Generator().manual_seed(seed)
    spectrum = (torch.randn(1, 3, size, size // 2 + 1, 2, generator=g) * 0.01).requires_grad_(True)
    scale = P.fourier_scale(size, size)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    robust = Robustness()
    caught: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda mod, args, out: caught.append(out))
    opt = torch.optim.Adam([spectrum], lr=0.05)
    try:
        for _ in range(steps):
            opt.zero_grad()
            img = torch.fft.irfft2(torch.view_as_complex(spectrum) * scale, s=(size, size), norm="ortho") / 4
            rgb = torch.sigmoid(torch.einsum("ij,njhw->nihw", P.color_matrix(), img))
            caught.clear()
            model((robust(rgb, g) - m) / s)
            loss = -caught[0][0, channel].mean()
            loss.backward()
            opt.step()
    finally:
        handle.remove()
    return -float(loss.detach())


def _time(fn, *args, **kwargs) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def bench_shipped(args: argparse.Namespace) -> None:
    model, pre = zfvis.load_model("zfnet-cifar10")
    n = args.channels
    t, res = _time(zfvis.feature_vis, model, "conv3", f"0-{n - 1}", steps=args.steps, batch_size=args.batch_size,
                   preprocess=pre, progress=False)
    print(f"(a) zfnet-cifar10 conv3, {n} channels x {args.steps} steps, batch {args.batch_size}: {t:.1f} s, "
          f"{t / n:.3f} s per channel (zfvis.feature_vis); mean final objective {float(res.final.mean()):.2f}")
    relu = dict(model.named_modules())[zfvis.Deconvnet(model).resolve("conv3")]
    k = min(args.plain_channels, n)
    tp, _ = _time(lambda: [plain_loop(model, relu, c, steps=args.steps, size=32, mean=pre.mean, std=pre.std)
                           for c in range(k)])
    print(f"    plain loop, one channel at a time, {k} channels: {tp / k:.3f} s per channel "
          f"({tp / k / (t / n):.1f}x zfvis's time per channel)")


def bench_vgg(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    n, steps, size = args.vgg_channels, args.vgg_steps, args.vgg_size
    norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    t, _ = _time(zfvis.feature_vis, model, "conv5_3", f"0-{n - 1}", steps=steps, size=size, batch_size=n,
                 preprocess=norm, progress=False)
    print(f"(b) VGG16 (random weights) conv5_3 at {size}x{size}, {n} channels x {steps} steps, batch {n}: "
          f"{t / n:.2f} s per channel, {t / n / steps * 1000:.0f} ms per channel and step (zfvis.feature_vis)")
    relu = dict(model.named_modules())[zfvis.Deconvnet(model).resolve("conv5_3")]
    tp, _ = _time(plain_loop, model, relu, 0, steps=steps, size=size, mean=norm[0], std=norm[1])
    print(f"    plain loop, one channel: {tp:.2f} s per channel, {tp / steps * 1000:.0f} ms per step "
          f"({tp / (t / n):.1f}x zfvis's time per channel)")


def top1(model: nn.Module, pre: zfvis.Preprocess, layers: Sequence[str], limit: int) -> dict[str, torch.Tensor]:
    """Each channel's strongest activation over the shipped sample images (and positions)."""
    dn = zfvis.Deconvnet(model)
    paths = sorted(zfvis.default_dataset().rglob("*.jpg"))[:limit]
    best: dict[str, torch.Tensor] = {}
    for i in range(0, len(paths), 100):
        x = torch.stack([pre(zfvis.load_image(p)) for p in paths[i:i + 100]])
        for layer, out in dn.forward_outputs(x, layers).items():
            m = out.amax(dim=(0, 2, 3))
            best[layer] = m if layer not in best else torch.maximum(best[layer], m)
    return best


def bench_reach(args: argparse.Namespace) -> None:
    model, pre = zfvis.load_model("zfnet-cifar10")
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5"]
    data = top1(model, pre, layers, args.reach_images)
    dn = zfvis.Deconvnet(model)
    which = f"channels 0-{args.reach_channels - 1}" if args.reach_channels else "all channels"
    print(f"(c) reach, zfnet-cifar10, {which} of each layer, {args.reach_steps} steps, against the top-1 "
          f"over {args.reach_images} shipped sample images:")
    for layer in layers:
        row = []
        k = args.reach_channels or int(data[layer].numel())
        for param in args.reach_params.split(","):
            res = zfvis.feature_vis(model, layer, f"0-{k - 1}", steps=args.reach_steps, preprocess=pre, param=param,
                                    progress=False)
            x = (res.images - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
            with torch.no_grad():
                out = dn.forward_outputs(x, [layer])[layer]
            peak = out[torch.arange(k), torch.arange(k)].amax(dim=(1, 2))
            reached = int((peak >= data[layer][:k]).sum())
            row.append(f"{param} {reached}/{k} ({reached / k:.0%}; median peak/top-1 "
                       f"{float((peak / data[layer][:k].clamp(min=1e-6)).median()):.2f})")
        print(f"    {layer}: reached the top-1: " + ", ".join(row))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=128, help="conv3 channels optimised in (a) (default 128)")
    p.add_argument("--steps", type=int, default=256, help="optimisation steps in (a) (default 256)")
    p.add_argument("--batch-size", type=int, default=32, help="channels optimised together (default 32)")
    p.add_argument("--plain-channels", type=int, default=8, help="channels timed with the plain PyTorch loop (default 8)")
    p.add_argument("--vgg-channels", type=int, default=4, help="VGG16 conv5_3 channels in (b) (default 4)")
    p.add_argument("--vgg-steps", type=int, default=16, help="optimisation steps in (b) (default 16)")
    p.add_argument("--vgg-size", type=int, default=224, help="VGG16 input side in (b) (default 224)")
    p.add_argument("--reach-channels", type=int, default=16, help="the first N channels of each layer in (c); 0: all")
    p.add_argument("--reach-steps", type=int, default=256, help="optimisation steps in (c) (default 256)")
    p.add_argument("--reach-params", default="fourier,pixel", help="parameterisations measured in (c)")
    p.add_argument("--reach-images", type=int, default=500, help="shipped sample images mined for the top-1 in (c) (default 500)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: a, b, c")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(args.skip.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    for part, fn in (("a", bench_shipped), ("b", bench_vgg), ("c", bench_reach)):
        if part not in skip:
            fn(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
