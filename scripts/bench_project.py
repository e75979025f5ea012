"""Benchmark: deconvnet projections on VGG16 and ResNet-50 (random weights, 224x224, CPU).

Times (median of --repeats rounds after one warm-up round; in each round every
measurement runs back to back, and ratios are medians of the per-round ratios) a plain forward pass, one projection
from conv5_3 and conv3_3 (each including its forward pass), and nine channels projected
in one call; each as a ratio to the plain forward measured in the same run and, where
captum is importable, to captum's NeuronDeconvolution on the same activations (nine
captum calls for nine channels). Also checks that our projection equals the activation's
value times captum's attribution (captum seeds the gradient with 1).

    python scripts/bench_project.py [--model vgg16|resnet50|efficientnet_b0|convnext_tiny] [--repeats 5] [--threads 2]
                                    [--input-size 224]

A progress bar counts the measurements (the default run takes minutes on a CPU).

captum is a benchmark-only dependency (``pip install captum --no-deps``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from zfvis import Deconvnet  # noqa: E402
from zfvis.core.cone import Window  # noqa: E402
from zfvis.core.reverse import ReverseConv2d  # noqa: E402
from zfvis.io.progress import progress  # noqa: E402

#: per model: the two layers, and the goals (label, ours key, captum key, max ratio)
SETUPS = {
    "vgg16": (["conv5_3", "conv3_3"], [
        ("conv5_3 x1 vs captum", "conv5_3 x1", "captum conv5_3 x1", 0.8),
        ("conv5_3 x9 vs 9 captum", "conv5_3 x9", "captum conv5_3 x9", 0.35),
        ("conv3_3 x9 vs 9 captum", "conv3_3 x9", "captum conv3_3 x9", 0.2),
    ]),
    # SiLU / GELU models: captum passes the plain gradient through them, so deconvnet and
    # guided times are compared, and values only for the gradient rule (NeuronGradient)
    "efficientnet_b0": (["features.6", "features.4"], [
        ("features.6 x1 vs captum", "features.6 x1", "captum features.6 x1", 1.0),
        ("features.6 x9 vs 9 captum", "features.6 x9", "captum features.6 x9", 0.5),
    ]),
    "convnext_tiny": (["features.5", "features.3"], [
        ("features.5 x1 vs captum", "features.5 x1", "captum features.5 x1", 1.0),
        ("features.5 x9 vs 9 captum", "features.5 x9", "captum features.5 x9", 0.5),
    ]),
    "resnet50": (["layer3", "layer2"], [
        ("layer3 x1 vs captum", "layer3 x1", "captum layer3 x1", 0.8),
        ("layer3 x9 vs 9 captum", "layer3 x9", "captum layer3 x9", 0.4),
        ("layer2 x9 vs 9 captum", "layer2 x9", "captum layer2 x9", 0.2),
    ]),
}


def windowed_fraction(dn: Deconvnet, x: torch.Tensor, layer: str, channel: int) -> float:
    """Multiply-adds of the windowed reverse convolutions over those of dense ones."""
    rec = dn.record(x, layer)
    seeds = dn.select(rec, channel)
    out = rec.output
    top = Window.points(seeds.y, seeds.x, (out.shape[2], out.shape[3]))
    stack = dn.reverse_stack(rec)
    wins = dn._plan(rec, stack, top, 1, out.device)
    windowed = dense = 0.0
    for step in stack.steps:
        if not isinstance(step.layer, ReverseConv2d) or wins.get(step.node) is None:
            continue
        win = wins[step.node]
        per_pixel = step.layer.weight.numel()
        windowed += win.size[0] * win.size[1] * per_pixel
        dense += win.map_size[0] * win.map_size[1] * per_pixel
    return windowed / dense


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SETUPS), default="resnet50", help="model and layers to time (default resnet50)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each figure is the median (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and input (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--input-size", type=int, default=224, help="side of the random input (default 224)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    x = torch.randn(1, 3, args.input_size, args.input_size)
    dn = Deconvnet(model)
    layers, goals = SETUPS[args.model]
    channels = list(range(9))
    print(f"{args.model}, random weights, input {tuple(x.shape)}, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")

    try:
        from captum.attr import NeuronDeconvolution, NeuronGradient
    except ImportError:
        NeuronDeconvolution = NeuronGradient = None  # noqa: N806
        print("captum is not importable: no comparison (pip install captum --no-deps)")

    # every measurement of one round runs back to back, so that on a shared machine the
    # ratios compare runs under the same load; each reported time is a median over rounds
    tasks: dict[str, Callable[[], object]] = {}

    def forward() -> None:
        with torch.no_grad():
            model(x)

    tasks["forward"] = forward
    for layer in layers:
        tasks[f"{layer} x1"] = lambda layer=layer: dn.project(x, layer, channel=channels[0])
        tasks[f"{layer} x9"] = lambda layer=layer: dn.project(x, layer, channel=channels)

    exact_lines = []
    if NeuronDeconvolution is not None:
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
        # captum overrides ReLU gradients with hooks on ReLU modules (its docs: every ReLU
        # must be a module); we give it ReLUs that are not inplace, and check below that
        # the inplace model gives the same attribution
        captum_model = copy.deepcopy(model)
        for m in captum_model.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        modules = dict(captum_model.named_modules())
        for layer in layers:
            name = dn.aliases.get(layer, layer)  # a module name (captum hooks modules)
            nd = NeuronDeconvolution(captum_model, modules[name])
            rec = dn.record(x, layer)
            seeds = dn.select(rec, channels)  # each channel's strongest activation
            selectors = [(int(c), int(y), int(xx)) for c, y, xx in zip(seeds.channel, seeds.y, seeds.x)]
            tasks[f"captum {layer} x1"] = lambda nd=nd, sel=selectors[0]: nd.attribute(x, neuron_selector=sel)
            tasks[f"captum {layer} x9"] = lambda nd=nd, sels=selectors: [nd.attribute(x, neuron_selector=s) for s in sels]
            if args.model not in ("vgg16", "resnet50"):  # values: the gradient rule vs NeuronGradient
                ng = NeuronGradient(captum_model, modules[name])
                ours = dn.project(x, layer, channel=channels[:1], rule="gradient")[0]
                ref = seeds.value[0] * ng.attribute(x, neuron_selector=selectors[0])[0]
                err = ((ours[0] - ref).abs().max() / ref.abs().max()).item()
                exact_lines.append(f"exactness {layer} (gradient rule vs value*NeuronGradient): {err:.2e}")
                continue
            # exactness: ours == value * captum
            ours = dn.project(x, layer, channel=channels)[0]
            worst = 0.0
            for i, sel in enumerate(selectors):
                ref = seeds.value[i] * nd.attribute(x, neuron_selector=sel)[0]
                worst = max(worst, ((ours[i] - ref).abs().max() / ref.abs().max()).item())
            nd_inplace = NeuronDeconvolution(model, dict(model.named_modules())[name])
            ref = seeds.value[0] * nd_inplace.attribute(x, neuron_selector=selectors[0])[0]
            inplace_err = ((ours[0] - ref).abs().max() / ref.abs().max()).item()
            exact_lines.append(
                f"exactness {layer}: max |ours - value*captum| / max|value*captum| over 9 channels = {worst:.2e} "
                f"(captum on the inplace model: {inplace_err:.2e})"
            )

    times: dict[str, list[float]] = {k: [] for k in tasks}
    with progress(len(tasks) * (args.repeats + 1), "measuring (1 warm-up round)", "run") as bar:
        for fn in tasks.values():  # warm-up
            fn()
            bar.update(1)
        for _ in range(args.repeats):
            for key, fn in tasks.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
                bar.update(1)
    results = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: str, b: str) -> float:
        """Median over rounds of the per-round ratio."""
        return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))

    print()
    print(f"{'measurement':<22} {'seconds':>9} {'x forward':>10} {'x captum':>9}")
    print("-" * 53)
    for key, t in results.items():
        if key.startswith("captum"):
            continue
        cap_s = f"{ratio(key, f'captum {key}'):9.3f}" if f"captum {key}" in times else f"{'-':>9}"
        print(f"{key:<22} {t:9.3f} {ratio(key, 'forward'):10.2f} {cap_s}")
    for key, t in results.items():
        if key.startswith("captum"):
            print(f"{key:<22} {t:9.3f} {ratio(key, 'forward'):10.2f} {'':>9}")
    print()
    for layer in layers:
        frac = windowed_fraction(dn, x, layer, channels[0])
        print(f"windowed reverse convolutions, {layer}: {frac:.1%} of the dense multiply-adds")
    for line in exact_lines:
        print(line)
    if NeuronDeconvolution is not None:
        parts = []
        for label, ours, theirs, limit in goals:
            r = ratio(ours, theirs)
            parts.append(f"{label} {r:.2f} <= {limit}: {'met' if r <= limit else 'missed'}")
        print("goals: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
