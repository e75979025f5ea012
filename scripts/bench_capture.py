"""What checking the graph against the model's own run costs: first call against steady state.

For each model (random weights): the trace, the check of the graph against what the model
ran (:mod:`zfvis.core.capture`, once per input shape, dtype, device, flags and hooks), the
first projection (trace excluded, check included) and the steady state (the check cached).

    python scripts/bench_capture.py --models vgg16 resnet50 efficientnet_b0 --size 224
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import zfvis
from zfvis.core.capture import verify

LAYERS = {"vgg16": "features.28", "resnet50": "layer3", "resnet18": "layer3", "efficientnet_b0": "features.6",
          "convnext_tiny": "features.5"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vgg16", "resnet50", "efficientnet_b0"], help="torchvision models")
    p.add_argument("--size", type=int, default=224, help="input side in pixels")
    p.add_argument("--repeats", type=int, default=3, help="steady-state calls to take the median of")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'model':<16} {'trace s':>8} {'check s':>8} {'first s':>8} {'steady s':>9} {'first/steady':>12}")
    for name in args.models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.randn(1, 3, args.size, args.size)
        layer = LAYERS.get(name, "layer3")
        t_trace = time.perf_counter()
        dn = zfvis.Deconvnet(model)
        t_trace = time.perf_counter() - t_trace
        first = _timed(lambda: dn.project(x, layer, 0))
        steady = sorted(_timed(lambda: dn.project(x, layer, 0)) for _ in range(args.repeats))[args.repeats // 2]
        dn.graph.verdicts.clear()
        check = _timed(lambda: verify(dn.graph, x))
        print(f"{name:<16} {t_trace:8.2f} {check:8.2f} {first:8.2f} {steady:9.2f} {first / steady:12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
