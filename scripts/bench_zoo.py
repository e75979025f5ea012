"""Benchmark: one projection against captum's NeuronDeconvolution on models of distinct families.

For each model (random weights, CPU): the time of one projection of a deep layer's
strongest activation of channel 0 (its forward pass included), as a ratio to captum's
``NeuronDeconvolution`` on the same activation in the same round (median over rounds of
the per-round ratio), and the first call's time (trace, the check against what the model
ran, building) against the steady state. The goal: at most 1.0x captum on every model,
geometric mean at most 0.7x.

    python scripts/bench_zoo.py [--models vgg16 resnet50 ...] [--size 224] [--repeats 3] [--threads 2]

captum is a benchmark-only dependency (``pip install captum --no-deps``); timm models need timm.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from zfvis import Deconvnet  # noqa: E402
from zfvis.io.progress import progress  # noqa: E402

#: model -> the layer projected (a module name captum can hook), chosen to span the op kinds
MODELS = {
    "vgg16": "features.28",  # a plain chain
    "resnet50": "layer3",  # residual, in-place ReLU
    "densenet121": "features.denseblock3",  # concatenation
    "googlenet": "inception4e",  # branches
    "mobilenet_v3_large": "features.12",  # depthwise, squeeze-and-excitation, hardswish
    "efficientnet_b0": "features.6",  # SiLU, stochastic depth
    "convnext_tiny": "features.5",  # channels last, LayerNorm, GELU
    "regnet_y_400mf": "trunk_output.block3",  # grouped convolutions, SE
    "shufflenet_v2_x1_0": "stage3",  # channel shuffle, split
    "squeezenet1_1": "features.10",  # fire modules, ceil-mode pools
    "mnasnet1_0": "layers.12",  # inverted residuals
    "timm:dla34": "level4",  # deep layer aggregation
    "timm:mobilevit_xxs": "stages.3",  # convolution + attention hybrid
}


def _model(name: str) -> nn.Module:
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False).eval()
    import torchvision

    return getattr(torchvision.models, name)(weights=None).eval()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="models to run (default: all %(default)s)")
    p.add_argument("--size", type=int, default=224, help="input side in pixels (default: 224)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    return p


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _one(name: str, size: int, repeats: int) -> tuple[float, float, float] | None:
    """(ratio to captum, first-call seconds, steady seconds), or None where a part is missing."""
    from captum.attr import NeuronDeconvolution

    torch.manual_seed(0)
    model, layer = _model(name), MODELS[name]
    x = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    dn = Deconvnet(model)
    first = time.perf_counter() - t0 + _time(lambda: dn.project(x, layer, channel=0))
    rec = dn.record(x, layer)
    seeds = dn.select(rec, 0)
    selector = tuple(int(v) for v in (seeds.channel[0], seeds.y[0], seeds.x[0]))
    captum_model = copy.deepcopy(model)
    for m in captum_model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # captum hooks ReLU modules, which must not be in place
    nd = NeuronDeconvolution(captum_model, dict(captum_model.named_modules())[layer])
    ours: list[float] = []
    theirs: list[float] = []
    for r in range(repeats + 1):
        a = _time(lambda: dn.project(x, layer, channel=0))
        b = _time(lambda: nd.attribute(x, neuron_selector=selector))
        if r:  # the first round warms up
            ours.append(a)
            theirs.append(b)
    ratio = statistics.median(a / b for a, b in zip(ours, theirs))
    return ratio, first, statistics.median(ours)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    try:
        import captum  # noqa: F401
    except ImportError:
        print("captum is not importable: pip install captum --no-deps")
        return 2
    print(f"input (1, 3, {args.size}, {args.size}), random weights, CPU, {args.threads} threads, "
          f"torch {torch.__version__}")
    rows = []
    with progress(len(args.models), "models", "model") as bar:
        for name in args.models:
            try:
                result = _one(name, args.size, args.repeats)
            except ImportError as err:
                print(f"{name}: skipped ({err})")
                result = None
            if result is not None:
                rows.append((name, *result))
            bar.update(1)
    print(f"\n{'model':<22} {'layer':<22} {'x captum':>9} {'first s':>8} {'steady s':>9}")
    for name, ratio, first, steady in rows:
        print(f"{name:<22} {MODELS[name]:<22} {ratio:9.2f} {first:8.2f} {steady:9.3f}")
    if rows:
        ratios = [r for _, r, _, _ in rows]
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        worst = max(rows, key=lambda row: row[1])
        print(f"\ngeometric mean {geo:.2f} (goal <= 0.7: {'met' if geo <= 0.7 else 'missed'}); worst {worst[0]} "
              f"{worst[1]:.2f} (goal <= 1.0 on every model: {'met' if worst[1] <= 1.0 else 'missed'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
