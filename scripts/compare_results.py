"""Compare two few-shot benchmark results folders row by row: a behaviour-unchanged check.

Every (dataset, k, seed, method, metric) present in both ``results.csv`` files is compared; timing and
memory metrics (``*_ms``, ``*_s``, ``peak_mb``) are left out. Prints the largest difference per method
and metric and exits 1 when one exceeds the tolerance (default 1e-6), or when a row of one file is
missing from the other.

Usage:
    python scripts/compare_results.py results/benchmark/regression_before results/benchmark/regression
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

#: Metrics that measure time or memory: they differ from run to run.
TIMING_SUFFIXES = ("_ms", "_s", "peak_mb")


def read_rows(folder: Path) -> dict[tuple[str, ...], float]:
    """``(dataset, k, seed, method, metric) -> value`` of a results folder, timing metrics left out."""
    rows = {}
    with (folder / "results.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["metric"].endswith(TIMING_SUFFIXES):
                continue
            key = (row["dataset"], row["k_shot"], row["seed"], row["method"], row["metric"])
            rows[key] = float(row["value"]) if row["value"] not in ("", "nan") else math.nan
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the comparison table; 0 when every shared row agrees within the tolerance."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)
    before, after = read_rows(args.before), read_rows(args.after)
    missing = sorted(set(before) ^ set(after))
    worst: dict[tuple[str, str, str], float] = defaultdict(float)
    for key in sorted(set(before) & set(after)):
        a, b = before[key], after[key]
        diff = 0.0 if (math.isnan(a) and math.isnan(b)) else abs(a - b)
        worst[(key[0], key[3], key[4])] = max(worst[(key[0], key[3], key[4])], diff)
    print(f"{'dataset':<10} {'method':<24} {'metric':<28} max |after - before|")
    for (dataset, method, metric), diff in sorted(worst.items()):
        print(f"{dataset:<10} {method:<24} {metric:<28} {diff:.3g}")
    shared = len(set(before) & set(after))
    bad = [key for key, diff in worst.items() if not diff <= args.tolerance]
    print(
        f"{shared} rows compared, {len(missing)} in one file only, {len(bad)} (dataset, method, metric) above "
        f"{args.tolerance:g}"
    )
    for key in missing[:10]:
        print("only in", "before" if key in before else "after", key)
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
