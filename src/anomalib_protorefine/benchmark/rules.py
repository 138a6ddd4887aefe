"""Support-threshold rules judged on the benchmark's cells: the study behind ``thresholds.POSITION``.

The models set their decision thresholds from the support images alone
(:mod:`anomalib_protorefine.thresholds`): pseudo-normal images (a *construction*: augmented
``copies`` against the bank of all k images, or ``leave_one_out`` folds) and pseudo-defect images
are scored, and the image threshold sits at a *position* between the highest pseudo-normal and the
median pseudo-defect score. A benchmark config with a ``decision_rules`` entry judges other
constructions and positions on every cell, from the same model and the same test scores::

    decision_rules: {held_out: [copies, leave_one_out], positions: [0.0, 0.25, 0.5, 0.75, 1.0]}

Each (construction, position) adds the support decision metrics under the prefix
:func:`rule_prefix` to the cell's row (``rule_copies_0.75_support_image_BAcc``, ...) and whether the
construction's pseudo-defects scored above its pseudo-normals (``rule_copies_separated``); the
report turns them into the goal's ratios per rule (:func:`~anomalib_protorefine.benchmark.report.rules_summary`).

Example:
    >>> rules = parse_rules({"held_out": ["copies"], "positions": [0.5, 1]})
    >>> rules.positions, rule_prefix("copies", 1.0)
    ((0.5, 1.0), 'rule_copies_1_')
    >>> parse_rules({"held_out": ["bank"], "positions": [0.5]})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: benchmark.decision_rules.held_out: unknown construction(s) ['bank']; choose from [...].
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from anomalib_protorefine.calibration import split_transform
from anomalib_protorefine.few_shot import load_images
from anomalib_protorefine.thresholds import HELD_OUT, SupportScores, choose_thresholds

from .decision import decision_values

if TYPE_CHECKING:
    from anomalib_protorefine.models import AnomalyDINOPlus, PatchCorePlus

    from .features import CachedTestSet
    from .methods import ScoredTestSet

__all__ = ["DecisionRules", "parse_rules", "rule_prefix", "rule_values"]


@dataclass(frozen=True)
class DecisionRules:
    """The constructions and positions a run judges.

    Attributes:
        held_out: Constructions of the pseudo-normal images (values of ``thresholds.HELD_OUT``).
        positions: Positions of the image threshold in the gap, each in ``[0, 1]``.
    """

    held_out: tuple[str, ...]
    positions: tuple[float, ...]


def parse_rules(section: dict[str, Any] | None) -> DecisionRules | None:
    """The ``decision_rules`` entry of a benchmark config, checked (``None`` when absent).

    Raises:
        ValueError: Unknown keys or constructions, or a position outside ``[0, 1]``; the message names the fix.
    """
    if section is None:
        return None
    if not isinstance(section, dict) or set(section) - {"held_out", "positions"}:
        msg = (
            "benchmark.decision_rules must be a mapping with `held_out` (constructions) and `positions`, e.g. "
            f"{{held_out: [copies, leave_one_out], positions: [0.5, 0.75]}}; got {section!r}."
        )
        raise ValueError(msg)
    held_out = tuple(str(name) for name in section.get("held_out", ["copies"]))
    unknown = [name for name in held_out if name not in HELD_OUT]
    if unknown or not held_out:
        msg = f"benchmark.decision_rules.held_out: unknown construction(s) {unknown}; choose from {list(HELD_OUT)}."
        raise ValueError(msg)
    positions = section.get("positions")
    if (
        not isinstance(positions, list)
        or not positions
        or not all(
            isinstance(p, numbers.Real) and not isinstance(p, bool) and math.isfinite(p) and 0 <= p <= 1
            for p in positions
        )
    ):
        msg = f"benchmark.decision_rules.positions must be a list of numbers in [0, 1], got {positions!r}."
        raise ValueError(msg)
    return DecisionRules(held_out, tuple(float(p) for p in positions))


def rule_prefix(held_out: str, position: float) -> str:
    """Metric-name prefix of one rule."""
    return f"rule_{held_out}_{position:g}_"


def _leave_one_out_scores(model: PatchCorePlus | AnomalyDINOPlus) -> SupportScores:
    """The leave-one-out pseudo scores of the model's support images; its bank is rebuilt from all of them after."""
    geometric, photometric = split_transform(model.pre_processor.transform)
    raw = load_images(model.support_paths, geometric)
    scores = model.support_pseudo_scores(raw, photometric, held_out="leave_one_out")
    model.fit_support(photometric(raw))
    return scores


def rule_values(
    model: PatchCorePlus | AnomalyDINOPlus, scored: ScoredTestSet, test: CachedTestSet, rules: DecisionRules
) -> dict[str, float]:
    """Support decision metrics of every rule on one cell (the model's support data built, its copies scored).

    Raises:
        ValueError: The model holds no support scores of its own (``threshold="validation"``).
    """
    if model.support_scores is None:
        msg = "benchmark.decision_rules needs the models' support thresholds: leave threshold at 'auto' or 'support'."
        raise ValueError(msg)
    masks = test.masks if bool(test.masks.any()) else None
    values: dict[str, float] = {}
    for held_out in rules.held_out:
        scores = model.support_scores if held_out == "copies" else _leave_one_out_scores(model)
        for position in rules.positions:
            with warnings.catch_warnings():  # counted as "separated" instead of one warning per rule
                warnings.simplefilter("ignore", UserWarning)
                thresholds = choose_thresholds(scores, position)
            values[f"rule_{held_out}_separated"] = float(thresholds.separated)  # the same at every position
            prefix = rule_prefix(held_out, position) + "support_"
            values |= decision_values(
                scored.scores,
                test.labels,
                scored.maps,
                masks,
                thresholds.image_threshold,
                thresholds.pixel_threshold,
                prefix,
            )
    return values
