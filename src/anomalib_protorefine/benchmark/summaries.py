"""The benchmark report's goal summaries: decisions at the support thresholds, self-calibration, decision rules.

* :func:`decision_summary`: per (dataset, method), the goal's ratios (BAcc at the support thresholds
  over the oracle's BAcc, pixel F1 over pixel F1-max), averaged over k and seeds, and the lowest k's;
* :func:`calibration_summary`: per self-calibrating method (``refiner="auto"``) and k, how often its
  pick was the better of its two candidates on the test set, and the gain of the pick;
* :func:`rules_summary`: the goal's ratios and rates per support-threshold rule (``decision_rules``).

Each has a Markdown table for ``report.md`` (``_decision_tables``, ``_calibration_table``,
``_rules_table``), assembled by :func:`anomalib_protorefine.benchmark.report.markdown`.

Example:
    >>> import pandas as pd
    >>> from anomalib_protorefine.benchmark.summaries import decision_summary
    >>> rows = [("d", 1, 0, "m", "support_image_BAcc", 0.9), ("d", 1, 0, "m", "oracle_image_BAcc", 1.0)]
    >>> frame = pd.DataFrame(rows, columns=["dataset", "k_shot", "seed", "method", "metric", "value"])
    >>> decision_summary(frame)[("d", "m")]["bacc_ratio"]
    0.9
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .config import BenchmarkPlan, MethodSpec
from .rules import DecisionRules, rule_prefix
from .tables import _per_seed, format_cell

__all__ = [
    "DECISIONS",
    "FALLBACK",
    "ORACLE",
    "calibration_summary",
    "decision_summary",
    "rules_summary",
]


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
        model = other.model_class
        if model is None or other.base != method.base or other.name == method.name:
            continue
        if other.refiner is True or other.refiner == model.refiner_default_preset:
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
        >>> from pathlib import Path
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
