"""The benchmark report's plots: bars per k and sweep curves (matplotlib, ``Agg`` backend).

* ``per_shot_<dataset>.png`` (:func:`per_shot_plot`): bars per k with the std over seeds as error bars;
* ``sweep_<method>_<parameter>.png`` (:func:`sweep_plots`): the paper's Fig. 5/8 curves (metric vs
  parameter, one line per (dataset, k); the swept method's base as a dashed line).

Example:
    >>> from anomalib_protorefine.benchmark.plots import _slug
    >>> _slug("PatchCore+ (default)")
    'patchcoreplus_default'
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from .config import BenchmarkPlan, MethodSpec
from .spec import parameter_value

__all__ = ["per_shot_plot", "sweep_plots"]


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
