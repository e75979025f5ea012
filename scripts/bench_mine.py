"""Benchmark of `zfvis mine` on the CIFAR-10 test split with zfnet-cifar10 (conv1..conv5, top 9).

(a) pass-1 throughput as a ratio to plain inference (forward only, same batch size, same
    loading, same run); also compute-only on preloaded tensors;
(b) pass-2 projection time (windowed, batched) vs one full-size reverse pass per top
    activation (Deconvnet(windowed=False), one seed per call) for conv1..conv3;
(c) peak resident memory of pass 1 in a fresh subprocess for 1,000 and 10,000 images.

    .venv/bin/python scripts/bench_mine.py [--data DIR] [--limit N] [--batch-size B]

A progress bar counts each phase's runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from zfvis.analysis.topk import crop_winners, image_maxima  # noqa: E402
from zfvis.core.deconvnet import Deconvnet  # noqa: E402
from zfvis.core.seeds import Seeds  # noqa: E402
from zfvis.io.images import list_images, load_image, resolve  # noqa: E402
from zfvis.io.progress import progress  # noqa: E402
from zfvis.mining import mine  # noqa: E402
from zfvis.mining.run import Files as _Files
from zfvis.mining.run import Taps as _Taps
from zfvis.mining.run import collate as _collate  # noqa: E402
from zfvis.models.zoo import load_model  # noqa: E402

LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5"]
TAR = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-test.tar.gz"

_CHILD = """
import resource, sys, time
sys.path.insert(0, sys.argv[1])
from zfvis.mining import mine
from zfvis.models.zoo import load_model
import torch
torch.set_num_threads(int(sys.argv[7]))
model, pre = load_model("zfnet-cifar10")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
r = mine(model, pre, sys.argv[2], sys.argv[4].split(","), out_dir=sys.argv[3], limit=int(sys.argv[5]),
         batch_size=int(sys.argv[6]), progress=False, figures=False, restart=True)
print(r.images, time.perf_counter() - t, base)
"""


def _loader(root: Path, files: list[str], pre, batch_size: int):  # noqa: ANN001, ANN202
    ds = _Files(root, files, list(range(len(files))), pre)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=_collate)


def bench_pass1(model, pre, root: Path, limit: int, batch_size: int, out: Path, repeats: int = 2) -> dict:  # noqa: ANN001
    files = list_images(root)
    chosen = [files[i * len(files) // limit] for i in range(limit)] if limit < len(files) else files
    # plain inference, same loader and batch size; alternated and repeated (best of
    # `repeats`) because the CPU is shared
    plain = mined = 0.0
    res = None
    with progress(2 * repeats, "(a) pass 1: plain, mining", "run") as bar:
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                for _, x, _ in _loader(root, chosen, pre, batch_size):
                    model(x)
            plain = max(plain, len(chosen) / (time.perf_counter() - t))
            bar.update(1)
            res = mine(model, pre, root, LAYERS, out_dir=out, limit=limit, batch_size=batch_size,
                       progress=False, figures=False, restart=True)
            mined = max(mined, res.images / res.pass1_seconds)  # pass 1's loop (setup excluded)
            bar.update(1)
    assert res is not None
    # compute only: preloaded tensors
    batches = [x for _, x, _ in _loader(root, chosen[: 4 * batch_size], pre, batch_size)]
    dn = Deconvnet(model)
    taps = _Taps(dn, LAYERS)
    n = sum(len(x) for x in batches) * repeats
    with torch.no_grad():
        model(batches[0])
        t = time.perf_counter()
        for x in batches * repeats:
            model(x)
        plain_c = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for x in batches * repeats:
            taps.run(x, lambda layer, o: image_maxima(o, None))
        mined_c = n / (time.perf_counter() - t)
    return {"images": res.images, "plain": plain, "mined": mined, "plain_c": plain_c, "mined_c": mined_c,
            "topk": res.topk}


def bench_pass2(model, pre, root: Path, topk: dict, layers: list[str], batch_size: int, repeats: int = 2) -> list[tuple]:  # noqa: ANN001
    files = list_images(root)
    dn = Deconvnet(model)
    dense = Deconvnet(model, windowed=False)
    rows = []
    for layer in layers:
        info = topk["layers"][layer]
        wins = [(c, e["index"], *e["position"], e["value"]) for c, chan in zip(info["channel_ids"], info["channels"])
                for e in chan]

        def batched() -> None:  # zfvis: unique winning images in batches, all seeds of a batch at once
            needed = sorted({w[1] for w in wins})
            for s in range(0, len(needed), batch_size):
                chunk = needed[s : s + batch_size]
                where = {i: j for j, i in enumerate(chunk)}
                x = torch.stack([pre(load_image(resolve(root, files[i]))) for i in chunk])
                sel = [w for w in wins if w[1] in where]
                seeds = Seeds(torch.tensor([where[w[1]] for w in sel]), torch.tensor([w[0] for w in sel]),
                              torch.tensor([w[2] for w in sel]), torch.tensor([w[3] for w in sel]),
                              torch.tensor([w[4] for w in sel]))
                crop_winners(dn, x, layer, seeds)

        def one_by_one() -> None:  # baseline: one full-size reverse pass per activation
            for c, i, y, xx, v in wins:
                x = pre(load_image(resolve(root, files[i]))).unsqueeze(0)
                rec = dense.record(x, layer)
                seed = Seeds(torch.tensor([0]), torch.tensor([c]), torch.tensor([y]), torch.tensor([xx]),
                             torch.tensor([v]))
                dense.reverse(rec, seed).full()

        fast = slow = float("inf")
        with progress(2 * repeats, f"(b) pass 2 {layer}: zfvis, baseline", "run") as bar:
            for _ in range(repeats):  # alternated, best of `repeats` (the CPU is shared)
                t = time.perf_counter()
                batched()
                fast = min(fast, time.perf_counter() - t)
                bar.update(1)
                t = time.perf_counter()
                one_by_one()
                slow = min(slow, time.perf_counter() - t)
                bar.update(1)
        rows.append((layer, len(wins), fast, slow))
    return rows


def peak_rss(root: Path, n: int, batch_size: int, out: Path, threads: int) -> tuple[float, float, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(REPO), str(root), str(out), ",".join(LAYERS), str(n),
                             str(batch_size), str(threads)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout = proc.stdout.read() if proc.stdout else ""
    if status != 0:
        raise RuntimeError(f"child failed: {proc.stderr.read() if proc.stderr else ''}")
    fields = stdout.split()
    return usage.ru_maxrss / 1024.0, float(fields[1]), float(fields[2]) / 1024.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="CIFAR-10 test folder (default: extract ../shared/data/cifar10/cifar10-test.tar.gz)")
    ap.add_argument("--limit", type=int, default=2000, help="images for (a) and (b) (default 2000)")
    ap.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    ap.add_argument("--memory-sizes", default="1000,10000", help="image counts for (c)")
    ap.add_argument("--repeats", type=int, default=2, help="timings of (a) and (b): best of this many")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared CPU)")
    ap.add_argument("--skip-baseline", action="store_true", help="skip (b)'s slow baseline")
    ap.add_argument("--pass2-layers", default="conv1,conv2,conv3", help="layers timed in (b) (default conv1,conv2,conv3)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the memory subprocesses
    with tempfile.TemporaryDirectory(prefix="bench_mine_") as tmp:
        tmp_path = Path(tmp)
        if args.data:
            root = Path(args.data)
        else:
            if not TAR.is_file():
                print(f"no --data and no archive at {TAR}", file=sys.stderr)
                return 2
            print(f"extracting {TAR} ...", file=sys.stderr)
            with tarfile.open(TAR) as tar:
                tar.extractall(tmp_path, filter="data")
            root = tmp_path / "test"
        model, pre = load_model("zfnet-cifar10")
        print(f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}, data {root}")
        a = bench_pass1(model, pre, root, args.limit, args.batch_size, tmp_path / "out", args.repeats)
        print(f"\n(a) pass 1 over {a['images']} images, {len(LAYERS)} layers, top 9")
        print(f"    {'':24s}{'plain img/s':>12s}{'mining img/s':>14s}{'ratio':>8s}")
        print(f"    {'with JPEG loading':24s}{a['plain']:12.0f}{a['mined']:14.0f}{a['mined'] / a['plain']:8.2f}")
        print(f"    {'compute only':24s}{a['plain_c']:12.0f}{a['mined_c']:14.0f}{a['mined_c'] / a['plain_c']:8.2f}")
        if not args.skip_baseline:
            rows = bench_pass2(model, pre, root, a["topk"], args.pass2_layers.split(","), args.batch_size, args.repeats)
            print("\n(b) pass 2 projections (load + record + reverse + crop)")
            print(f"    {'layer':8s}{'seeds':>7s}{'zfvis s':>10s}{'baseline s':>12s}{'speed-up':>10s}")
            for layer, n, fast, slow in rows:
                print(f"    {layer:8s}{n:7d}{fast:10.2f}{slow:12.2f}{slow / fast:9.1f}x")
            tot_f, tot_s = sum(r[2] for r in rows), sum(r[3] for r in rows)
            print(f"    {'total':8s}{sum(r[1] for r in rows):7d}{tot_f:10.2f}{tot_s:12.2f}{tot_s / tot_f:9.1f}x")
        print("\n(c) peak resident memory of pass 1 (fresh process, all 5 layers)")
        print(f"    {'images':>8s}{'max RSS MiB':>13s}{'before pass 1':>15s}{'growth':>8s}{'seconds':>9s}")
        sizes = [int(v) for v in args.memory_sizes.split(",")]
        with progress(len(sizes), "(c) fresh processes", "run") as bar:
            for n in sizes:
                rss, sec, base = peak_rss(root, n, args.batch_size, tmp_path / f"mem{n}", args.threads)
                bar.write(f"    {n:8d}{rss:13.0f}{base:15.0f}{rss - base:8.0f}{sec:9.1f}")
                bar.update(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
