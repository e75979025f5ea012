"""Benchmark: occlusion sensitivity on VGG16 (random weights, 224x224, CPU).

Slides a 32x32 occluder with stride 16 (13 x 13 = 169 positions) over one image and
measures, back to back in each round (in alternating order), zfvis's incremental occlusion
(cached unoccluded pass, only each occluder's forward cone recomputed, batched) and
captum's ``Occlusion`` on the same windows (the same batch size per forward pass). Each
includes its own unoccluded pass. Every reported ratio is a median of the per-round
ratios measured in the same run, of wall-clock time and of the process's CPU time (which
other processes on a shared machine disturb less; with ``--threads 1`` it is the work
done). It also checks that both give the same numbers: captum's forward outputs are
recorded and compared position by position with zfvis's probabilities. ``--full`` adds
zfvis's brute-force method (occlude, run the whole model) as a second reference. First it
prints the share of each convolution's map that the incremental pass recomputes per
position (its plan, not a timing).

    python scripts/bench_occlusion.py [--rounds 1] [--batch-size 32] [--threads 2] [--full] [--input-size 224]

captum is a benchmark-only dependency, not one of zfvis's:
``pip install captum --no-deps``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from zfvis import Deconvnet  # noqa: E402
from zfvis.analysis.incremental import IncrementalOcclusion  # noqa: E402
from zfvis.analysis.occlusion import occluder_positions, occlusion  # noqa: E402
from zfvis.io.progress import progress  # noqa: E402

GOAL = 0.33  # zfvis's time / captum's time


def _timed(fn: Callable[[], Any]) -> tuple[tuple[float, float], Any]:
    """((wall seconds, CPU seconds), result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def _captum(model: torch.nn.Module, x: torch.Tensor, target: int, args: argparse.Namespace) -> torch.Tensor:
    """captum's Occlusion; returns the target's probability for each window as a (rows, cols) map."""
    from captum.attr import Occlusion

    seen: list[torch.Tensor] = []

    def forward(inp: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(model(inp), dim=1)
        seen.append(probs[:, target])
        return probs

    with torch.no_grad():
        Occlusion(forward).attribute(
            x[None],
            sliding_window_shapes=(3, args.patch, args.patch),
            strides=(3, args.stride, args.stride),
            baselines=0.0,
            target=target,
            perturbations_per_eval=args.batch_size,
        )
    n = (x.shape[-1] - args.patch) // args.stride + 1
    return torch.cat(seen[1:]).reshape(n, n).t()  # the first call is the unoccluded image; captum goes column by column


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds (default 1; each takes minutes on a CPU)")
    ap.add_argument("--batch-size", type=int, default=32, help="positions per forward pass, both methods (default 32)")
    ap.add_argument("--patch", type=int, default=32, help="occluder side in pixels (default 32)")
    ap.add_argument("--stride", type=int, default=16, help="step between occluder positions (default 16)")
    ap.add_argument("--input-size", type=int, default=224, help="side of the random image (default 224)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--full", action="store_true", help="also time zfvis's brute-force method (the baseline "
                    "when captum is not installed)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and image (default 0)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import captum
    except ImportError:
        captum = None
        print("captum is not installed; it is the baseline of this benchmark but not a zfvis dependency "
              "(pip install captum --no-deps)" + ("; comparing with zfvis's brute force only" if args.full else ""))
        if not args.full:
            return 1

    torch.manual_seed(args.seed)
    model = torchvision.models.vgg16(weights=None).eval()
    side = args.input_size
    x = torch.randn(3, side, side)
    n = (side - args.patch) // args.stride + 1
    print(f"VGG16, random weights, {side}x{side}, patch {args.patch}, stride {args.stride} ({n}x{n} = {n * n} "
          f"positions), batch {args.batch_size}, CPU, torch {torch.__version__}, "
          f"captum {captum.__version__ if captum else '-'}, {torch.get_num_threads()} threads")

    def ours(method: str) -> Any:
        return occlusion(model, x, patch=args.patch, stride=args.stride, batch_size=args.batch_size, method=method)

    _print_plan(model, x, args)
    rounds = []
    names = ["ours", *(["captum"] if captum else [])]
    with progress(args.rounds * (len(names) + args.full), "rounds of measurements", "run") as bar:
        for r in range(args.rounds):
            runs: dict[str, Any] = {}
            order = names if r % 2 == 0 else names[::-1]
            for name in order + (["full"] if args.full else []):
                if name == "ours":
                    runs[name] = _timed(lambda: ours("incremental"))
                elif name == "captum":
                    target = runs["ours"][1].target if "ours" in runs else _target(model, x)
                    runs[name] = _timed(lambda: _captum(model, x, target, args))
                else:
                    runs[name] = _timed(lambda: ours("full"))
                bar.update(1)
            rounds.append(runs)
            bar.write(_round_line(r, runs))
    _print_summary(rounds)
    return 0


def _print_plan(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace) -> None:
    """What share of each convolution's map the incremental pass recomputes per position."""
    grid = torch.cartesian_prod(*occluder_positions(x.shape, args.patch, args.stride))
    dn = Deconvnet(model)
    with torch.no_grad():
        work = IncrementalOcclusion(dn.graph, x, None, grid, (args.patch, args.patch), torch.zeros(3)).work()
    shares = [f"{alias} {100 * work[node][1]:.0f}%" for alias, node in dn.aliases.items()
              if alias.startswith("conv") and node in work]  # fmt: skip
    print("recomputed per position (share of the map): " + ", ".join(shares))


def _target(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[None]).argmax())


def _round_line(r: int, runs: dict[str, Any]) -> str:
    ours_t, res = runs["ours"]
    line, diff = f"round {r + 1}: zfvis {ours_t[0]:.1f} s ({ours_t[1]:.1f} s CPU)", 0.0
    if "captum" in runs:
        captum_t, probs = runs["captum"]
        diff = (probs - res.class_prob).abs().max().item()
        line += (f", captum {captum_t[0]:.1f} s ({captum_t[1]:.1f} s CPU), ratio {ours_t[0] / captum_t[0]:.3f} "
                 f"({ours_t[1] / captum_t[1]:.3f} CPU)")
    if "full" in runs:
        full_t, full = runs["full"]
        diff = max(diff, (full.class_prob - res.class_prob).abs().max().item())
        line += f"; brute force {full_t[0]:.1f} s ({full_t[1]:.1f} s CPU)"
    return line + f"; max |probability difference| {diff:.2e} (largest probability {res.class_prob.max():.3g})"


def _print_summary(rounds: list[dict[str, Any]]) -> None:
    def ratio(a: str, b: str, k: int) -> float:
        return statistics.median(r[a][0][k] / r[b][0][k] for r in rounds)

    if "captum" in rounds[0]:
        wall, cpu = ratio("ours", "captum", 0), ratio("ours", "captum", 1)
        verdict = "OK" if wall <= GOAL else "MISSED"
        print(f"\nzfvis incremental / captum Occlusion: {wall:.3f} wall-clock, {cpu:.3f} CPU time "
              f"(median of {len(rounds)} round(s); goal <= {GOAL})  {verdict}")
    if "full" in rounds[0]:
        print(f"zfvis incremental / zfvis brute force: {ratio('ours', 'full', 0):.3f} wall-clock, "
              f"{ratio('ours', 'full', 1):.3f} CPU time")
    for name in rounds[0]:
        print(f"median {name}: {statistics.median(r[name][0][0] for r in rounds):.1f} s wall-clock, "
              f"{statistics.median(r[name][0][1] for r in rounds):.1f} s CPU")


if __name__ == "__main__":
    sys.exit(main())
