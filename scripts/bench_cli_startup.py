#!/usr/bin/env python
"""Times `zfvis --help`, `zfvis project --help` and `zfvis --version`: wall time and peak memory
of each in a fresh interpreter, and whether it loaded torch (it must not).

    python scripts/bench_cli_startup.py [--repeats 5]

Each row is the median and the range over the repeats. Timings depend on the machine and its
load (a loaded machine's disk cache and CPU); run it on an idle one to compare with the goal
(under 1 s each).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CALLS = (["--help"], ["project", "--help"], ["--version"])
_PROBE = ("import sys; from zfvis.cli import main\n"
          "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
          "print('torch' in sys.modules, file=sys.stderr)")


def _once(argv: list[str]) -> tuple[float, float, bool]:
    """(wall seconds, peak resident MiB, whether torch was loaded) of one call in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far (KiB)
    return wall, max(peak, before) / 1024, res.stderr.strip().splitlines()[-1] == "True"


def main(argv: list[str] | None = None) -> int:
    """Prints one row per call; returns the exit status (1 if any call loaded torch)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs of each call; the median is shown (default 5)")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.node()}: {os.cpu_count()} CPUs, load {load:.1f}, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'command':<24} {'median s':>9} {'range s':>13} {'peak MiB':>9}  torch loaded")
    heavy = False
    for call in CALLS:
        runs = [_once(call) for _ in range(args.repeats)]
        walls = [r[0] for r in runs]
        loaded = any(r[2] for r in runs)
        heavy |= loaded
        print(f"{'zfvis ' + ' '.join(call):<24} {statistics.median(walls):>9.3f} "
              f"{min(walls):>6.3f}-{max(walls):<6.3f} {max(r[1] for r in runs):>9.0f}  {loaded}")
    return 1 if heavy else 0


if __name__ == "__main__":
    sys.exit(main())
