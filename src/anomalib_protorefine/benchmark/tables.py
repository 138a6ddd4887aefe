"""The benchmark report's paper-style tables: methods x (k, metric), mean ± std over seeds.

The paper's Table 1 layout: one row per method (or per sweep point), one column per k and metric;
each cell is the mean ± std over seeds (in percent for accuracy metrics), the best mean of a
column in bold, and in brackets the mean of the per-seed differences to the method's ``base`` on
the same draws (:func:`format_cell`). :data:`ACCURACY`, :data:`F1` and :data:`COST` name the
metrics of the three tables of each data set in ``report.md``.

Example:
    >>> from anomalib_protorefine.benchmark.tables import format_cell
    >>> format_cell([0.9, 0.92, 0.94], [0.88, 0.90, 0.92], bold=True)
    '**92.0 ± 2.0** (+2.0)'
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from .config import BenchmarkPlan

__all__ = ["ACCURACY", "COST", "F1", "format_cell"]

#: (metric, column title, shown in percent).
ACCURACY = (("image_AUROC", "image AUROC"), ("pixel_AUROC", "pixel AUROC"), ("pixel_AUPRO", "pixel AUPRO"))
F1 = (("image_F1Max", "image F1-max"), ("pixel_F1Max", "pixel F1-max"))
COST = (
    ("time_ms", "ms / image"),
    ("head_ms", "scoring ms / image"),
    ("peak_mb", "peak MB / batch"),
    ("bank_size", "bank size"),
    ("support_s", "support s (bank + thresholds)"),
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def format_cell(values: list[float], base: list[float] | None, *, bold: bool = False, percent: bool = True) -> str:
    """``mean ± std`` of ``values`` (percent), with the mean paired difference to ``base`` in brackets."""
    scale = 100.0 if percent else 1.0
    mean, std = _mean_std(values)
    text = f"{scale * mean:.1f} ± {scale * std:.1f}"
    if bold:
        text = f"**{text}**"
    if base is not None:
        diffs = [v - b for v, b in zip(values, base, strict=True)]
        text += f" ({scale * sum(diffs) / len(diffs):+.1f})"
    return text


def _per_seed(frame: pd.DataFrame) -> dict[tuple[str, int, str], dict[int, float]]:
    """(method, k, metric) -> {seed: value}."""
    table: dict[tuple[str, int, str], dict[int, float]] = {}
    for row in frame.itertuples(index=False):
        table.setdefault((row.method, int(row.k_shot), row.metric), {})[int(row.seed)] = float(row.value)
    return table


def _table(
    plan: BenchmarkPlan,
    frame: pd.DataFrame,
    metrics: tuple[tuple[str, str], ...],
    *,
    percent: bool,
    paired: bool,
    sweeps: bool = False,
) -> list[str]:
    """Markdown lines of one table: methods (or, with ``sweeps``, the sweep points) x (k, metric)."""
    data = _per_seed(frame)
    methods = [m for m in plan.methods if (m.sweep is not None) == sweeps and any(key[0] == m.name for key in data)]
    ks = sorted({int(k) for k in frame.k_shot.unique()})
    header = ["method"] + [f"{k}-shot {title}" for k in ks for _, title in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best: dict[tuple[int, str], float] = {}
    for k in ks:
        for metric, _ in metrics:
            means = [
                _mean_std(list(data[(m.name, k, metric)].values()))[0] for m in methods if (m.name, k, metric) in data
            ]
            if means and percent:
                best[(k, metric)] = max(means)
    for method in methods:
        cells = [method.name]
        for k in ks:
            for metric, _ in metrics:
                runs = data.get((method.name, k, metric))
                if not runs:
                    cells.append("n/a")
                    continue
                base_runs = data.get((method.base, k, metric)) if paired and method.base else None
                seeds = sorted(set(runs) & set(base_runs)) if base_runs else sorted(runs)
                values = [runs[s] for s in seeds]
                bold = percent and math.isclose(_mean_std(values)[0], best.get((k, metric), math.nan))
                base = [base_runs[s] for s in seeds] if base_runs else None
                cells.append(format_cell(values, base, bold=bold, percent=percent))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
