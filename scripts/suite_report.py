#!/usr/bin/env python
"""Summarises the test suite's memory and time, per test and per file.

Run the suite with ``ZFVIS_TEST_REPORT=FILE`` (``tests/memory_guard.py`` writes one JSON
line per test: seconds, resident memory after it, the process's peak, how much it raised
the peak), then::

    ZFVIS_TEST_REPORT=/tmp/tests.jsonl python -m pytest -q
    python scripts/suite_report.py /tmp/tests.jsonl [--top 10]

It prints the peak, the total time, the tests that raised the peak most, the slowest tests
and each file's time and largest resident memory: where to look when the suite grows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="the ZFVIS_TEST_REPORT file of a test run")
    p.add_argument("--top", type=int, default=10, help="tests listed per table (default 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    records = [json.loads(line) for line in args.report.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        print(f"{args.report}: no tests recorded", file=sys.stderr)
        return 2
    peak = max(r["peak_mb"] for r in records)
    total = sum(r["seconds"] for r in records)
    print(f"{len(records)} tests, {total:.0f} s in tests, peak resident memory {peak:.0f} MiB")
    print("\nraised the peak most (MiB):")
    for r in sorted(records, key=lambda r: -r["peak_raise_mb"])[: args.top]:
        print(f"  +{r['peak_raise_mb']:7.0f} to {r['peak_mb']:6.0f}  {r['test']}")
    print("\nslowest (s):")
    for r in sorted(records, key=lambda r: -r["seconds"])[: args.top]:
        print(f"  {r['seconds']:8.1f}  {r['test']}")
    files: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        files[r["test"].split("::")[0]].append(r)
    print(f"\nper file: {'seconds':>8} {'max RSS MiB':>12} {'tests':>6}")
    for name, recs in sorted(files.items(), key=lambda kv: -sum(r["seconds"] for r in kv[1])):
        print(f"  {name:<40} {sum(r['seconds'] for r in recs):8.1f} {max(r['rss_mb'] for r in recs):12.0f} {len(recs):6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
