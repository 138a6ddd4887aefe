"""The line simulation: does a requested false-alarm rate hold, calibrated on unlabelled images of the line?

A few-shot test set holds about as many defects as good parts; a line holds few. For every cell
(data set, k, support seed) the benchmark's scored test images are split, ``draws`` times, into

* a **calibration stream** of ``calibration_images`` unlabelled images with a defect share ``r``
  (what the first parts after a changeover look like), and
* the **evaluation images**: every other test image, disjoint from the stream.

At each requested rate the thresholds come from the stream's scores exactly as the models compute
them (:func:`~anomalib_protorefine.false_alarm.estimate_good_threshold`), and the evaluation images
give the realised false-alarm rate (good parts flagged), the recall (defects flagged) and the
oracle recall: the best recall any threshold reaches on the same evaluation images at a
false-alarm rate no higher than the requested one. The support-only thresholds (no calibration
images) are judged on the same evaluation images. A config asks for it with::

    line_simulation: {calibration_images: 100, defect_shares: [0.0, 0.1, 0.2], rates: [0.01, 0.05, 0.1]}

Example:
    >>> import torch
    >>> good, defect = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.5, 5.0, 6.0])
    >>> oracle_recall(good, defect, rate=0.25)
    0.6666666666666666
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from anomalib_protorefine.false_alarm import FENCE, estimate_good_threshold, validate_false_alarm_rate

if TYPE_CHECKING:
    from .features import CachedTestSet
    from .methods import ScoredTestSet

__all__ = ["LineSimulation", "line_prefix", "line_summary", "line_table", "line_values", "oracle_recall", "parse_line"]


@dataclass(frozen=True)
class LineSimulation:
    """What a run simulates.

    Attributes:
        calibration_images: Images in each calibration stream.
        defect_shares: Shares of defective images in the stream.
        rates: Requested false-alarm rates.
        draws: Streams drawn per cell and share (the realised rates are means over them).
        fences: Whiskers of the estimate's skew-adjusted boxplot fence (``inf``: no outlier left out); the package's
            is :data:`~anomalib_protorefine.false_alarm.FENCE`.
    """

    calibration_images: int = 100
    defect_shares: tuple[float, ...] = (0.0, 0.1, 0.2)
    rates: tuple[float, ...] = (0.01, 0.05, 0.1)
    draws: int = 5
    fences: tuple[float, ...] = (FENCE,)


def parse_line(section: dict[str, Any] | None) -> LineSimulation | None:
    """The ``line_simulation`` entry of a benchmark config, checked (``None`` when absent).

    Raises:
        ValueError: Unknown keys or values out of range; the message names the key and the fix.

    Example:
        >>> parse_line({"calibration_images": 50, "rates": [0.05]}).rates
        (0.05,)
        >>> parse_line({"defect_shares": [0.6]})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: benchmark.line_simulation.defect_shares must be a list of numbers in [0, 0.5), got [0.6].
    """
    if section is None:
        return None
    allowed = {"calibration_images", "defect_shares", "rates", "draws", "fences"}
    if not isinstance(section, dict) or set(section) - allowed:
        msg = (
            f"benchmark.line_simulation must be a mapping with keys among {sorted(allowed)}, e.g. "
            f"{{calibration_images: 100, defect_shares: [0.0, 0.1], rates: [0.05]}}; got {section!r}."
        )
        raise ValueError(msg)
    defaults = LineSimulation()
    images = section.get("calibration_images", defaults.calibration_images)
    draws = section.get("draws", defaults.draws)
    for key, value, low in (("calibration_images", images, 20), ("draws", draws, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            msg = f"benchmark.line_simulation.{key} must be an integer >= {low}, got {value!r}."
            raise ValueError(msg)
    shares = _numbers(section, "defect_shares", defaults.defect_shares, lambda v: 0 <= v < 0.5, "[0, 0.5)")
    fences = _numbers(section, "fences", defaults.fences, lambda v: v > 0, "(0, inf]")
    rates = section.get("rates", list(defaults.rates))
    if not isinstance(rates, list | tuple) or not rates:
        msg = f"benchmark.line_simulation.rates must be a list of false-alarm rates in (0, 0.5], got {rates!r}."
        raise ValueError(msg)
    checked = tuple(validate_false_alarm_rate(rate, "benchmark.line_simulation.rates") for rate in rates)
    return LineSimulation(int(images), shares, checked, int(draws), fences)


def _numbers(section: dict[str, Any], key: str, default: tuple[float, ...], ok: Any, text: str) -> tuple[float, ...]:
    values = section.get(key, list(default))
    if (
        not isinstance(values, list | tuple)
        or not values
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and ok(float(v)) for v in values)
    ):
        msg = f"benchmark.line_simulation.{key} must be a list of numbers in {text}, got {values!r}."
        raise ValueError(msg)
    return tuple(float(v) for v in values)


def line_prefix(fence: float, share: float) -> str:
    """Metric-name prefix of one (fence, defect share) of the simulation.

    Example:
        >>> line_prefix(6.0, 0.1)
        'line_f6_r0.1_'
    """
    return f"line_f{fence:g}_r{share:g}_"


def oracle_recall(good: torch.Tensor, defect: torch.Tensor, rate: float) -> float:
    """The best recall of any threshold whose false-alarm rate on ``good`` is at most ``rate``.

    The threshold lets through all but ``floor(rate * n)`` good scores: the next highest good score.
    """
    ordered = good.double().sort(descending=True).values
    allowed = math.floor(rate * len(ordered) + 1e-9)
    threshold = float(ordered[allowed]) if allowed < len(ordered) else -math.inf
    return float((defect.double() > threshold).double().mean())


def line_values(
    scored: ScoredTestSet,
    test: CachedTestSet,
    line: LineSimulation,
    seed: int,
    support_threshold: float | None,
) -> dict[str, float]:
    """The simulation's metrics of one cell (means over the streams), keys ``line_f<fence>_r<share>_...``.

    Args:
        scored: The method's scores of the test images.
        test: The test images (labels).
        line: What to simulate.
        seed: The cell's support seed (the streams are drawn from it).
        support_threshold: The model's support image threshold (judged on the same evaluation images), if any.

    Raises:
        ValueError: The test set is too small for the stream and an evaluation set of both classes.
    """
    scores = scored.scores.double()
    labels = test.labels.bool()
    good_index, defect_index = (~labels).nonzero().flatten(), labels.nonzero().flatten()
    values: dict[str, float] = {}
    for share in line.defect_shares:
        num_defect = round(share * line.calibration_images)
        num_good = line.calibration_images - num_defect
        if num_good >= len(good_index) or num_defect >= len(defect_index):
            msg = (
                f"benchmark.line_simulation: a stream of {line.calibration_images} images with {share:.0%} defects "
                f"needs more than {num_good} good and {num_defect} defective test images (the test set has "
                f"{len(good_index)} and {len(defect_index)}): lower calibration_images or use max_test_images: null."
            )
            raise ValueError(msg)
        sums: dict[str, float] = {}
        for draw in range(line.draws):
            generator = torch.Generator().manual_seed(1_000_003 * seed + 1009 * round(share * 1000) + draw)
            goods = good_index[torch.randperm(len(good_index), generator=generator)]
            defects = defect_index[torch.randperm(len(defect_index), generator=generator)]
            stream = torch.cat((scores[goods[:num_good]], scores[defects[:num_defect]]))
            eval_good, eval_defect = scores[goods[num_good:]], scores[defects[num_defect:]]
            cell: dict[str, float] = {}
            for fence in line.fences:
                prefix = line_prefix(fence, share)
                for rate in line.rates:
                    with warnings.catch_warnings():  # counted as outliers instead of one warning per stream
                        warnings.simplefilter("ignore", UserWarning)
                        estimate = estimate_good_threshold(stream, rate, fence, what="the stream")
                    key = f"{prefix}a{rate:g}_"
                    cell[key + "FAR"] = float((eval_good > estimate.threshold).double().mean())
                    cell[key + "Recall"] = float((eval_defect > estimate.threshold).double().mean())
                    cell[key + "OracleRecall"] = oracle_recall(eval_good, eval_defect, rate)
                    cell[key + "outliers"] = float(estimate.num_outliers)
            if support_threshold is not None:
                key = f"line_support_r{share:g}_"
                cell[key + "FAR"] = float((eval_good > support_threshold).double().mean())
                cell[key + "Recall"] = float((eval_defect > support_threshold).double().mean())
            for name, value in cell.items():
                sums[name] = sums.get(name, 0.0) + value / line.draws
        values |= sums
    return values


def line_summary(frame: pd.DataFrame, line: LineSimulation) -> pd.DataFrame:
    """One row per (method, k, fence, share, rate): realised FAR, recall, oracle recall, recall / oracle (seed means).

    The support-only rows have fence and rate NaN.
    """
    rows: list[dict[str, Any]] = []
    per_seed = frame.pivot_table(index=["method", "k_shot", "seed"], columns="metric", values="value")
    for (method, k), part in per_seed.groupby(level=[0, 1], sort=False):
        for share in line.defect_shares:
            for fence in line.fences:
                for rate in line.rates:
                    key = f"{line_prefix(fence, share)}a{rate:g}_"
                    if key + "FAR" not in part:
                        continue
                    far, recall, oracle = part[key + "FAR"], part[key + "Recall"], part[key + "OracleRecall"]
                    ratio = (recall / oracle.where(oracle > 0)).mean()
                    rows.append(
                        {
                            "method": method,
                            "k": int(k),
                            "fence": fence,
                            "share": share,
                            "rate": rate,
                            "far": far.mean(),
                            "far_std": far.std(),
                            "recall": recall.mean(),
                            "oracle": oracle.mean(),
                            "ratio": ratio,
                            "outliers": part[key + "outliers"].mean(),
                            "seeds": int(far.count()),
                        }
                    )
            key = f"line_support_r{share:g}_"
            if key + "FAR" in part:
                rows.append(
                    {
                        "method": method,
                        "k": int(k),
                        "fence": math.nan,
                        "share": share,
                        "rate": math.nan,
                        "far": part[key + "FAR"].mean(),
                        "far_std": part[key + "FAR"].std(),
                        "recall": part[key + "Recall"].mean(),
                        "oracle": math.nan,
                        "ratio": math.nan,
                        "outliers": math.nan,
                        "seeds": int(part[key + "FAR"].count()),
                    }
                )
    return pd.DataFrame(rows)


def line_table(frame: pd.DataFrame, line: LineSimulation | None, fences: tuple[float, ...] | None = None) -> list[str]:
    """Markdown of :func:`line_summary` for one dataset (nothing when the run simulates no line).

    One row per (method, k, defect share, fence): at each requested rate the realised false-alarm rate
    (percent, mean ± std over seeds), the recall and its ratio to the oracle recall; the support-only
    thresholds on the same evaluation images in the last column.

    Args:
        frame: Long-form results of one dataset.
        line: What the run simulated.
        fences: Only these fences (default: all of the run's).
    """
    if line is None:
        return []
    summary = line_summary(frame, line)
    if summary.empty:
        return []
    fences = fences or line.fences
    rates = " | ".join(f"{rate:.0%}: false alarms / recall (x oracle)" for rate in line.rates)
    lines = [
        f"Line simulation (`line_simulation`): streams of {line.calibration_images} unlabelled test images with a "
        f"defect share r ({line.draws} per cell), the rest of the test images judged; percent, mean over seeds "
        "(false alarms ± std); x oracle: recall / the best recall of any threshold at a false-alarm rate no higher "
        "than the requested one on the same images (per seed, averaged). Support only: the support thresholds, "
        "no calibration images:",
        "",
        f"| method | k | r | fence | {rates} | support only: false alarms / recall |",
        "|---|---|---|---|" + "---|" * len(line.rates) + "---|",
    ]
    calibrated = summary[summary.rate.notna()]
    support = summary[summary.rate.isna()].set_index(["method", "k", "share"])
    for (method, k, share, fence), part in calibrated.groupby(["method", "k", "share", "fence"], sort=False):
        if fence not in fences:
            continue
        cells = []
        for rate in line.rates:
            row = part[part.rate == rate]
            if row.empty:
                cells.append("n/a")
                continue
            row = row.iloc[0]
            cells.append(f"{100 * row.far:.1f} ± {100 * row.far_std:.1f} / {100 * row.recall:.1f} (x{row.ratio:.2f})")
        own = support.loc[(method, k, share)] if (method, k, share) in support.index else None
        plain = f"{100 * own.far:.1f} / {100 * own.recall:.1f}" if own is not None else "n/a"
        lines.append(f"| {method} | {k} | {share:.0%} | {fence:g} | " + " | ".join(cells) + f" | {plain} |")
    return [*lines, ""]
