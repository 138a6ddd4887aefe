r"""Plots of the refinement study (result files of ``refinement_study.py``): gains over plain few-shot PatchCore.

Each bar is the mean over seeds of (method - baseline) on the same support draws, with the
standard deviation of that difference as error bar.

Usage:
    python scripts/plot_study.py --results results/study/sel_*.jsonl --out docs/benchmarks/selection.png \\
        --methods paper/refined/max paper/geo_refined/max affine16/refined/max --title "BSData, seeds 0-4"
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt

METRICS = (("image_auroc", "Δ image AUROC (points)"), ("pixel_auroc", "Δ pixel AUROC (points)"))


def gains(paths: list[Path], baseline: str) -> dict[tuple[str, int, str, str], list[float]]:
    """(dataset, k, method, metric) -> per-seed differences to the baseline, in points."""
    rows: dict[tuple[str, int, str], dict[int, dict]] = defaultdict(dict)
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows[(r["dataset"], r["k"], f"{r['config']}/{r['scoring']}/{r['agg']}")][r["seed"]] = r
    out: dict[tuple[str, int, str, str], list[float]] = {}
    for (dataset, k, method), runs in rows.items():
        base = rows.get((dataset, k, baseline), {})
        for metric, _ in METRICS:
            diffs = [100 * (runs[s][metric] - base[s][metric]) for s in sorted(set(runs) & set(base))]
            if diffs:
                out[(dataset, k, method, metric)] = diffs
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def main() -> None:
    """Draw one row of panels per dataset (image, pixel AUROC gains), bars per k and method."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", required=True, help="config/scoring/agg, e.g. paper/geo_refined/max")
    parser.add_argument("--labels", nargs="+", default=None, help="legend labels of --methods")
    parser.add_argument("--baseline", default="baseline/nn/max")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = args.labels or args.methods
    data = gains(args.results, args.baseline)
    datasets = sorted({d for (d, _, _, _) in data})
    ks = sorted({k for (_, k, _, _) in data})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(9, 2.8 * len(datasets)), squeeze=False)
    width = 0.8 / len(args.methods)
    for row, dataset in enumerate(datasets):
        for col, (metric, ylabel) in enumerate(METRICS):
            ax = axes[row][col]
            for i, (method, label) in enumerate(zip(args.methods, labels, strict=True)):
                stats = [_mean_std(data.get((dataset, k, method, metric), [math.nan])) for k in ks]
                xs = [j + (i - (len(args.methods) - 1) / 2) * width for j in range(len(ks))]
                ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2, label=label)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(ks)), [f"k = {k}" for k in ks])
            ax.set_ylabel(ylabel)
            ax.set_title(dataset, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
