"""The benchmark's report: paper-style Markdown tables and plots from the long-form ``results.csv``.

* ``report.md``: per dataset, the paper's Table 1 layout (methods x k; mean ± std over seeds in
  percent, the best mean of each column in bold, and in brackets the mean of the per-seed
  differences to the method's ``base`` on the same draws), then F1-max/AUPRO, then cost;
* ``per_shot_<dataset>.png``: bars per k with the std over seeds as error bars;
* ``sweep_<method>_<parameter>.png``: the paper's Fig. 5/8 curves (metric vs parameter, one line per k);
* heat-map grids and the Fig. 7 panel (:mod:`anomalib_protorefine.benchmark.figures`).

Example:
    >>> format_cell([0.9, 0.92, 0.94], [0.88, 0.90, 0.92], bold=True)
    '**92.0 ± 2.0** (+2.0)'
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from anomalib_protorefine.models.patchcore_plus.lightning_model import PATCHCORE_DEFAULT_PRESET

from .config import BenchmarkPlan, MethodSpec, parameter_value
from .job import read_results
from .line import line_table
from .rules import DecisionRules, rule_prefix

logger = logging.getLogger(__name__)

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


#: Decision columns: (metric, title); ratios are per seed, then averaged.
DECISIONS = (
    ("support_image_BAcc", "BAcc"),
    ("support_image_Recall", "detection"),
    ("support_image_FAR", "false alarms"),
    ("support_image_Precision", "precision"),
    ("support_image_F1", "F1"),
    ("support_pixel_F1", "pixel F1"),
)
FALLBACK = (
    ("fallback_image_BAcc", "BAcc"),
    ("fallback_image_Recall", "detection"),
    ("fallback_image_FAR", "false alarms"),
    ("fallback_image_F1", "F1"),
    ("fallback_pixel_F1", "pixel F1"),
)
ORACLE = (("oracle_image_BAcc", "BAcc"), ("image_F1Max", "F1-max"), ("pixel_F1Max", "pixel F1-max"))


def _ratios(runs: dict[int, float], reference: dict[int, float]) -> list[float]:
    """Per-seed ``runs / reference`` on the seeds both hold (finite values only)."""
    return [
        runs[s] / reference[s]
        for s in sorted(set(runs) & set(reference))
        if math.isfinite(runs[s]) and math.isfinite(reference[s]) and reference[s] > 0
    ]


def decision_summary(frame: pd.DataFrame) -> dict[tuple[str, str], dict[str, float]]:
    """Per (dataset, method): the goal's ratios, averaged over k and seeds, and the lowest k's.

    Returns:
        ``{(dataset, method): {"bacc_ratio", "worst_k_bacc_ratio", "pixel_f1_ratio", "worst_k_pixel_f1_ratio"}}``.

    Example:
        >>> rows = [("d", 1, 0, "m", "support_image_BAcc", 0.8), ("d", 1, 0, "m", "oracle_image_BAcc", 1.0)]
        >>> frame = pd.DataFrame(rows, columns=["dataset", "k_shot", "seed", "method", "metric", "value"])
        >>> decision_summary(frame)[("d", "m")]["bacc_ratio"]
        0.8
    """
    summary: dict[tuple[str, str], dict[str, float]] = {}
    for dataset in frame.dataset.unique():
        data = _per_seed(frame[frame.dataset == dataset])
        methods = sorted({key[0] for key in data if key[2] == "support_image_BAcc"})
        for method in methods:
            values: dict[str, float] = {}
            for name, metric, reference in (
                ("bacc", "support_image_BAcc", "oracle_image_BAcc"),
                ("pixel_f1", "support_pixel_F1", "pixel_F1Max"),
            ):
                per_k = {
                    k: _ratios(data[(m, k, metric)], data.get((m, k, reference), {}))
                    for (m, k, key) in data
                    if m == method and key == metric
                }
                per_k = {k: r for k, r in per_k.items() if r}
                if per_k:
                    every = [r for ratios in per_k.values() for r in ratios]
                    values[f"{name}_ratio"] = sum(every) / len(every)
                    values[f"worst_k_{name}_ratio"] = min(sum(r) / len(r) for r in per_k.values())
            summary[(dataset, method)] = values
    return summary


def _decision_tables(frame: pd.DataFrame) -> list[str]:
    """Markdown of the decision tables of one dataset: support thresholds, oracle, anomalib's normal-only fallback."""
    data = _per_seed(frame)
    order = {name: i for i, name in enumerate(dict.fromkeys(frame.method))}  # methods in results order
    rows = sorted(
        {(m, k) for (m, k, metric) in data if metric == "support_image_BAcc"}, key=lambda r: (order[r[0]], r[1])
    )
    if not rows:
        return []

    def cell(method: str, k: int, metric: str) -> str:
        runs = data.get((method, k, metric))
        finite = [v for v in (runs or {}).values() if math.isfinite(v)]
        return format_cell(finite, None) if finite else "n/a"

    lines = [
        'Decisions at the support thresholds (`threshold="support"`: no validation pass, no defect image), '
        "in percent; BAcc = balanced accuracy (mean of the detection rate and the pass rate of good images); "
        "false alarms = rate on good test images; (x r) = support value / oracle value, per seed, averaged:",
        "",
        "| method | k | " + " | ".join(title for _, title in DECISIONS) + " |",
        "|" + "---|" * (2 + len(DECISIONS)),
    ]
    for method, k in rows:
        cells = []
        for metric, _ in DECISIONS:
            text = cell(method, k, metric)
            reference = {"support_image_BAcc": "oracle_image_BAcc", "support_pixel_F1": "pixel_F1Max"}.get(metric)
            ratios = (
                _ratios(data.get((method, k, metric), {}), data.get((method, k, reference), {})) if reference else []
            )
            if ratios:
                text += f" (x{sum(ratios) / len(ratios):.2f})"
            cells.append(text)
        lines.append(f"| {method} | {k} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Oracle (the best threshold on the test set) and anomalib's normal-only fallback (threshold = the highest "
        "score of the support images themselves, what anomalib's F1-adaptive threshold gives on good images only):",
        "",
        "| method | k | "
        + " | ".join(f"oracle {t}" for _, t in ORACLE)
        + " | "
        + " | ".join(f"fallback {t}" for _, t in FALLBACK)
        + " |",
        "|" + "---|" * (2 + len(ORACLE) + len(FALLBACK)),
    ]
    for method, k in rows:
        cells = [cell(method, k, metric) for metric, _ in (*ORACLE, *FALLBACK)]
        lines.append(f"| {method} | {k} | " + " | ".join(cells) + " |")
    summary = decision_summary(frame)
    lines += ["", "Goal ratios (averaged over k and seeds; worst k in brackets):", ""]
    for (_, method), values in summary.items():
        if "bacc_ratio" in values:
            pixel = (
                f"; pixel F1 / F1-max {values['pixel_f1_ratio']:.2f} ({values['worst_k_pixel_f1_ratio']:.2f})"
                if "pixel_f1_ratio" in values
                else ""
            )
            lines.append(
                f"* {method}: BAcc / oracle {values['bacc_ratio']:.2f} ({values['worst_k_bacc_ratio']:.2f}){pixel}"
            )
    return [*lines, ""]


def _on_candidate(plan: BenchmarkPlan, method: MethodSpec) -> MethodSpec | None:
    """The run's method with the default refiner on the same base as the self-calibrating ``method``."""
    for other in plan.methods:
        refiner = other.init_args.get("refiner", True)
        if other.base == method.base and other.name != method.name and refiner in (True, PATCHCORE_DEFAULT_PRESET):
            return other
    return None


def calibration_summary(plan: BenchmarkPlan, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Per self-calibrating method (``refiner="auto"``) and k: its picks against both candidates on the test set.

    The candidates are the method's ``base`` (refinement off) and the run's method with the default
    refiner on the same base. A pick is *better* when the chosen candidate's image + pixel AUROC on
    the test set is at least the other's (pixel AUROC left out where the data set has no masks).

    Returns:
        One dict per (method, k): ``method``, ``on``, ``k``, ``draws``, ``refined`` (draws that kept
        refinement), ``better`` (draws whose pick was the better candidate), ``pick_gain`` and
        ``on_gain`` (mean gain of the pick / of always-on refinement over the base, AUROC points).

    Example:
        >>> methods = [MethodSpec("off", "PatchCorePlus", {"refiner": False}),
        ...     MethodSpec("on", "PatchCorePlus", {"refiner": "fused"}, base="off"),
        ...     MethodSpec("auto", "PatchCorePlus", {"refiner": "auto"}, base="off")]
        >>> plan = BenchmarkPlan("cpu", methods, [], [1], [0], Path("out"))
        >>> rows = [("off", 0.80, 0), ("on", 0.85, 1), ("auto", 0.85, 1)]
        >>> frame = pd.DataFrame([("d", 1, 0, m, metric, v) for m, auc, refined in rows
        ...     for metric, v in (("image_AUROC", auc), ("auto_refined", refined))],
        ...     columns=["dataset", "k_shot", "seed", "method", "metric", "value"])
        >>> frame = frame[~((frame.metric == "auto_refined") & (frame.method != "auto"))]
        >>> summary = calibration_summary(plan, frame)[0]
        >>> summary["refined"], summary["better"], round(summary["pick_gain"], 1)
        (1, 1, 5.0)
    """
    data = _per_seed(frame)
    metrics = ["image_AUROC"] + (["pixel_AUROC"] if frame.metric.eq("pixel_AUROC").any() else [])
    summary: list[dict[str, Any]] = []

    def total(name: str, k: int, seed: int) -> float:
        return sum(data[(name, k, metric)][seed] for metric in metrics)

    def gain(name: str, base: str, k: int, seeds: list[int]) -> float:  # mean over the draws, in points
        return 100 * sum(total(name, k, s) - total(base, k, s) for s in seeds) / len(seeds)

    for method in plan.methods:
        on = _on_candidate(plan, method)
        ks = sorted({k for (name, k, metric) in data if name == method.name and metric == "auto_refined"})
        if on is None or method.base is None or not ks:
            continue
        for k in ks:
            refined = data[(method.name, k, "auto_refined")]
            seeds = [
                s
                for s in sorted(refined)
                if all(s in data.get((n, k, metric), {}) for n in (method.base, on.name) for metric in metrics)
            ]
            if not seeds:
                continue
            better = 0
            for s in seeds:
                pick, other = (on.name, method.base) if refined[s] else (method.base, on.name)
                better += total(pick, k, s) >= total(other, k, s)
            summary.append(
                {
                    "method": method.name,
                    "on": on.name,
                    "k": k,
                    "draws": len(seeds),
                    "refined": int(sum(refined[s] for s in seeds)),
                    "better": int(better),
                    "pick_gain": gain(method.name, method.base, k, seeds),
                    "on_gain": gain(on.name, method.base, k, seeds),
                }
            )
    return summary


def _calibration_table(plan: BenchmarkPlan, frame: pd.DataFrame) -> list[str]:
    """Markdown of :func:`calibration_summary` for one dataset (nothing when no method self-calibrates)."""
    summary = calibration_summary(plan, frame)
    if not summary:
        return []
    what = "image + pixel AUROC" if frame.metric.eq("pixel_AUROC").any() else "image AUROC"
    lines = [
        f'Self-calibration (`refiner="auto"`) against its two candidates on the same draws; gains in points of {what} '
        "over the base, mean over the draws:",
        "",
        "| method | k | kept refinement | picked the better candidate | gain of the pick | gain of always on |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['method']} (vs {row['on']}) | {row['k']} | {row['refined']}/{row['draws']} | "
            f"{row['better']}/{row['draws']} | {row['pick_gain']:+.2f} | {row['on_gain']:+.2f} |"
        )
    return [*lines, ""]


def rules_summary(frame: pd.DataFrame, rules: DecisionRules) -> list[dict[str, Any]]:
    """Per rule and method: the goal's ratios (BAcc / oracle, pixel F1 / F1-max; mean and lowest k) and rates per k.

    Args:
        frame: Long-form results of one dataset.
        rules: The rules of the run.

    Returns:
        One dict per (construction, position, method) with ``bacc_ratio``, ``worst_k_bacc_ratio``,
        ``pixel_f1_ratio`` (absent without masks), ``far`` and ``detection`` (``{k: mean rate}``)
        and ``separated`` (cells whose pseudo-defects scored above the pseudo-normals, of ``cells``).
    """
    rows: list[dict[str, Any]] = []
    references = frame[frame.metric.isin(["oracle_image_BAcc", "pixel_F1Max"])]
    for held_out in rules.held_out:
        separated = frame[frame.metric == f"rule_{held_out}_separated"]
        for position in rules.positions:
            prefix = rule_prefix(held_out, position)
            part = frame[frame.metric.str.startswith(prefix)].assign(
                metric=lambda f, p=prefix: f.metric.str.removeprefix(p)
            )
            if part.empty:
                continue
            summary = decision_summary(pd.concat([part, references]))
            for (_, method), ratios in summary.items():
                mine = part[part.method == method]
                rates = {
                    name: mine[mine.metric == metric].groupby("k_shot").value.mean().to_dict()
                    for name, metric in (("far", "support_image_FAR"), ("detection", "support_image_Recall"))
                }
                flags = separated[separated.method == method].value
                rows.append(
                    {
                        "held_out": held_out,
                        "position": position,
                        "method": method,
                        **ratios,
                        **rates,
                        "separated": int(flags.sum()),
                        "cells": len(flags),
                    }
                )
    return rows


def _rules_table(plan: BenchmarkPlan, frame: pd.DataFrame) -> list[str]:
    """Markdown of :func:`rules_summary` for one dataset (nothing when the run judges no rules)."""
    if plan.decision_rules is None:
        return []
    summary = rules_summary(frame, plan.decision_rules)
    if not summary:
        return []
    ks = sorted(int(k) for k in frame.k_shot.unique())
    per_k = "/".join(str(k) for k in ks)
    lines = [
        "Support-threshold rules (`decision_rules`): construction of the pseudo-normal images and position of the "
        "image threshold between the highest pseudo-normal (0) and the median pseudo-defect score (1); the pixel "
        "threshold is the image threshold. Ratios per seed, averaged over k and seeds (lowest k beside); separated: "
        "cells whose median pseudo-defect scored above the highest pseudo-normal:",
        "",
        f"| construction | position | method | BAcc / oracle | worst k | pixel F1 / F1-max | false alarms k={per_k} "
        f"| detection k={per_k} | separated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:

        def rates(name: str, row: dict[str, Any] = row) -> str:
            return "/".join(f"{row[name].get(k, math.nan):.2f}" for k in ks)

        pixel = f"{row['pixel_f1_ratio']:.2f}" if "pixel_f1_ratio" in row else "n/a"
        lines.append(
            f"| {row['held_out']} | {row['position']:g} | {row['method']} | {row.get('bacc_ratio', math.nan):.3f} | "
            f"{row.get('worst_k_bacc_ratio', math.nan):.2f} | {pixel} | {rates('far')} | {rates('detection')} | "
            f"{row['separated']}/{row['cells']} |"
        )
    return [*lines, ""]


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text.replace("+", "plus")).strip("_").lower()


def per_shot_plot(plan: BenchmarkPlan, frame: pd.DataFrame, dataset: str, path: Path) -> None:
    """Bars per k (image and pixel AUROC), one bar per method, error bars = std over seeds."""
    part = frame[(frame.dataset == dataset) & frame.metric.isin(["image_AUROC", "pixel_AUROC"])]
    methods = [m.name for m in plan.methods if m.sweep is None and m.name in set(part.method)]
    ks = sorted(int(k) for k in part.k_shot.unique())
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=False)
    width = 0.8 / max(1, len(methods))
    for axis, metric in zip(axes, ("image_AUROC", "pixel_AUROC"), strict=True):
        for index, method in enumerate(methods):
            stats = part[(part.method == method) & (part.metric == metric)].groupby("k_shot").value.agg(["mean", "std"])
            xs = [ks.index(int(k)) + (index - (len(methods) - 1) / 2) * width for k in stats.index]
            axis.bar(xs, 100 * stats["mean"], width, yerr=100 * stats["std"].fillna(0), capsize=2, label=method)
        axis.set_xticks(range(len(ks)), [f"{k}-shot" for k in ks])
        axis.set_title(f"{dataset}: {metric.replace('_', ' ')}")
        axis.set_ylabel("%")
        low = 100 * part[part.metric == metric].value.min()
        axis.set_ylim(max(0.0, low - 5), 100)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(4, max(1, len(methods))), frameon=False)
    figure.tight_layout(rect=(0, 0.06 * math.ceil(len(methods) / 4), 1, 1))
    figure.savefig(path, dpi=90)
    plt.close(figure)


def sweep_plots(plan: BenchmarkPlan, frame: pd.DataFrame, folder: Path) -> list[Path]:
    """One figure per (swept method, parameter): metric vs value, one line per (dataset, k).

    The swept method's own setting is a point of its curve; its base method (if any) is a dashed line.
    """
    groups: dict[tuple[str, str], list] = {}
    for method in plan.methods:
        if method.sweep is not None:
            groups.setdefault(method.sweep[:2], []).append(method)
    for (base, parameter), methods in groups.items():  # the swept method itself is a point of its curve
        value = parameter_value(plan.method(base), parameter)
        if value is not None and all(float(m.sweep[2]) != float(value) for m in methods):
            origin = plan.method(base)
            methods.append(MethodSpec(origin.name, origin.class_path, origin.init_args, None, (base, parameter, value)))
    paths = []
    for (base, parameter), methods in groups.items():
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        for axis, metric in zip(axes, ("image_AUROC", "pixel_AUROC"), strict=True):
            for (dataset, k), part in frame[frame.metric == metric].groupby(["dataset", "k_shot"]):
                points = []
                for method in methods:
                    values = part[part.method == method.name].value
                    if len(values):
                        points.append((float(method.sweep[2]), 100 * values.mean(), 100 * values.std(ddof=1)))
                reference = plan.method(base).base  # e.g. PatchCore for a PatchCore+ sweep: a dashed line
                values = part[part.method == reference].value if reference else part.value.iloc[:0]
                if points and len(values):
                    axis.axhline(100 * values.mean(), linestyle="--", linewidth=1, color="gray")
                if points:
                    points.sort()
                    xs, ys, es = zip(*points, strict=True)
                    axis.errorbar(
                        xs,
                        ys,
                        yerr=[e if e == e else 0 for e in es],
                        marker="o",
                        capsize=2,
                        label=f"{dataset} {k}-shot",
                    )
            axis.set_xlabel(parameter)
            axis.set_ylabel(f"{metric.replace('_', ' ')} (%)")
            if (
                all(float(m.sweep[2]) > 0 for m in methods)
                and max(float(m.sweep[2]) for m in methods) / min(float(m.sweep[2]) for m in methods) >= 100
            ):
                axis.set_xscale("log")
        axes[0].set_title(f"{base}: {parameter}")
        axes[1].legend(fontsize=7)
        figure.tight_layout()
        path = folder / f"sweep_{_slug(base)}_{_slug(parameter)}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        paths.append(path)
    return paths


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
