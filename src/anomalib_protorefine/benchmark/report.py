"""The benchmark's report: paper-style Markdown tables and plots from the long-form ``results.csv``.

* ``report.md``: per dataset, the paper's Table 1 layout (methods x k; mean ± std over seeds in
  percent, the best mean of each column in bold, and in brackets the mean of the per-seed
  differences to the method's ``base`` on the same draws), then F1-max/AUPRO, then cost;
* ``per_shot_<dataset>.png``: bars per k with the std over seeds as error bars;
* ``sweep_<method>_<parameter>.png``: the paper's Fig. 5/8 curves (metric vs parameter, one line per k);
* heat-map grids and the Fig. 7 panel (:mod:`anomalib_protorefine.benchmark.figures`).

The tables are :mod:`~anomalib_protorefine.benchmark.tables` (methods x k) and
:mod:`~anomalib_protorefine.benchmark.summaries` (decisions, self-calibration, rules), the plots
:mod:`~anomalib_protorefine.benchmark.plots`; this module assembles ``report.md`` and writes the
files. Their public names are importable from here too.

Example:
    >>> format_cell([0.9, 0.92, 0.94], [0.88, 0.90, 0.92], bold=True)
    '**92.0 ± 2.0** (+2.0)'
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .config import BenchmarkPlan
from .job import read_results
from .line import line_table
from .plots import _slug, per_shot_plot, sweep_plots
from .summaries import (
    DECISIONS,
    FALLBACK,
    ORACLE,
    _calibration_table,
    _decision_tables,
    _rules_table,
    calibration_summary,
    decision_summary,
    rules_summary,
)
from .tables import ACCURACY, COST, F1, _table, format_cell

logger = logging.getLogger(__name__)

__all__ = [
    "ACCURACY",
    "COST",
    "DECISIONS",
    "F1",
    "FALLBACK",
    "ORACLE",
    "calibration_summary",
    "decision_summary",
    "format_cell",
    "markdown",
    "per_shot_plot",
    "rules_summary",
    "sweep_plots",
    "write_report",
]


def markdown(plan: BenchmarkPlan, frame: pd.DataFrame) -> str:
    """The whole ``report.md``."""
    seeds = sorted(int(s) for s in frame.seed.unique())
    lines = [
        "# Few-shot benchmark",
        "",
        f"Seeds (support draws): {seeds}; every method of a (dataset, k, seed) cell saw the same support images. "
        "Cells: mean ± std over seeds, in percent; **bold**: best mean of the column; (±x): mean of the per-seed "
        "differences to the method's base on the same draws. Produced by `anomalib_protorefine.benchmark` from "
        "`results.csv`.",
        "",
    ]
    for dataset in frame.dataset.unique():
        part = frame[frame.dataset == dataset]
        n_seeds = part.seed.nunique()
        lines += [f"## {dataset} ({n_seeds} seeds)", ""]
        if not part.metric.str.startswith("pixel_").any():
            lines += ["Pixel metrics n/a: the test set of this data set has no masks (`mask_dir`).", ""]
        lines += [*_table(plan, part, ACCURACY, percent=True, paired=True), ""]
        lines += [*_table(plan, part, F1, percent=True, paired=True), ""]
        lines += ["Cost (mean ± std over seeds; time = cached backbone time + scoring time):", ""]
        lines += [*_table(plan, part, COST, percent=False, paired=False), ""]
        lines += _decision_tables(part)
        lines += _calibration_table(plan, part)
        lines += _rules_table(plan, part)
        lines += line_table(part, plan.line_simulation)
        sweeps = [m for m in plan.methods if m.sweep is not None and m.name in set(part.method)]
        if sweeps:
            lines += ["Sweeps (see the sweep plots):", ""]
            lines += _table(plan, part, ACCURACY[:2], percent=True, paired=True, sweeps=True)
            lines += [""]
    return "\n".join(lines)


def write_report(plan: BenchmarkPlan) -> Path:
    """Write ``report.md``, the plots and the figures of ``plan``'s results folder; return the Markdown path."""
    frame = read_results(plan)
    folder = plan.output
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.md"
    if frame.empty:
        path.write_text("# Few-shot benchmark\n\nNo results yet.\n")
        return path
    text = markdown(plan, frame)
    plots = []
    for dataset in frame.dataset.unique():
        plot = folder / f"per_shot_{_slug(dataset)}.png"
        per_shot_plot(plan, frame, dataset, plot)
        plots.append(plot)
    plots += sweep_plots(plan, frame, folder)
    from .figures import write_figures

    figures = write_figures(plan)
    text += "\n## Figures\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in [*plots, *figures]) + "\n"
    path.write_text(text)
    return path
