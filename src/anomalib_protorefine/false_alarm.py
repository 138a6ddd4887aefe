"""A false-alarm rate the user sets, and gets: thresholds from unlabelled images of the line.

With 1-4 good images there is no spread between good parts to learn from, so no rule on the
support images alone can promise a false-alarm rate. Right after a changeover, though, the line
makes many parts, nearly all good and unlabelled. Their scores show the spread of good scores, if
the estimate tolerates the few defective parts among them. This module holds that estimate:

1. **outliers**: scores above the upper fence of the skew-adjusted boxplot (Hubert and Vandervieren,
   2008), ``Q3 + FENCE * exp(3 MC) * IQR`` (``exp(4 MC)`` for a negative medcouple ``MC``, the
   robust skewness), are taken as defective parts and left out. Good-part scores are right-skewed
   (maxima of patch distances, a long tail of unusual good parts); the fence widens with that skew,
   so it leaves out parts far beyond the good tail without cutting into it. The quartiles and the
   medcouple have a breakdown point of 25 %: up to :data:`TOLERATED_DEFECT_SHARE` of defective
   images cannot move the fence into the good scores;
2. **threshold**: the split-conformal quantile of the remaining ``n`` scores, the
   ``ceil((n + 1) (1 - rate))``-th lowest. For a new good part exchangeable with the good calibration
   parts, the chance to score above it is at most ``rate`` (and at least ``rate - 1 / (n + 1)``).
   It needs ``n >= 1 / rate - 1`` inliers (99 for 1 %, 19 for 5 %); with fewer the threshold is the
   highest inlier and a warning says the rate cannot be resolved.

Defective parts that score inside the fence stay in the estimate and can only raise the threshold:
the realised false-alarm rate stays at or below the requested one, whatever their share, and what
they cost is recall (measured: docs/benchmarks.md, "A false-alarm rate on the line"). Where more
than :data:`TOLERATED_DEFECT_SHARE` of the images lie above the fence, the images may not be mostly
good parts (another product, a drifting line, a wrong folder) and a loud warning gives the share seen.

Example:
    >>> import torch
    >>> good = torch.linspace(1.0, 2.0, 99)
    >>> estimate = estimate_good_threshold(torch.cat((good, torch.tensor([50.0]))), rate=0.05)
    >>> estimate.num_outliers, round(estimate.threshold, 4)
    (1, 1.9592)
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "FENCE",
    "MIN_CALIBRATION_IMAGES",
    "TOLERATED_DEFECT_SHARE",
    "GoodScoreEstimate",
    "LineCalibration",
    "conformal_rank",
    "estimate_good_threshold",
    "images_needed",
    "medcouple",
    "upper_fence",
    "validate_false_alarm_rate",
]

#: Whisker of the skew-adjusted boxplot beyond which a calibration score counts as a defective part
#: (3: the boxplot's "far out" values; chosen on BSData support seeds 0-4, docs/benchmarks.md).
FENCE = 3.0
#: Fewest calibration images at any rate (the median and lower quartile need a few dozen values).
MIN_CALIBRATION_IMAGES = 20
#: Largest share of calibration images above the fence that the estimate tolerates without a warning.
TOLERATED_DEFECT_SHARE = 0.25
#: Lower-half spreads above the median from which a score counts as far above the good ones (for the warning).
FAR_ABOVE = 10.0
#: Normal-consistency factor of the distance between the median and the lower quartile.
_QUARTILE_Z = 0.6744897501960817
#: Most scores the medcouple is computed from (an evenly spaced subset of the sorted scores beyond it: memory n^2).
MEDCOUPLE_MAX_SCORES = 2000


def validate_false_alarm_rate(rate: object, name: str = "false_alarm_rate") -> float | None:
    """Return ``rate`` as a float in (0, 0.5] (or ``None``), else raise an error naming ``name`` and the fix.

    Example:
        >>> validate_false_alarm_rate(0.02), validate_false_alarm_rate(None)
        (0.02, None)
        >>> validate_false_alarm_rate(0.7)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: false_alarm_rate must be a number in (0, 0.5] (the share of good parts ... got 0.7.
    """
    if rate is None:
        return None
    fix = "(the share of good parts you accept to see flagged, e.g. 0.02 for 2 %)"
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        msg = f"{name} must be a number in (0, 0.5] {fix}, got {type(rate).__name__} {rate!r}."
        raise TypeError(msg)
    value = float(rate)
    if not math.isfinite(value) or not 0.0 < value <= 0.5:
        msg = f"{name} must be a number in (0, 0.5] {fix}, got {rate!r}."
        raise ValueError(msg)
    return value


def conformal_rank(num_scores: int, rate: float) -> int:
    """1-based rank of the split-conformal threshold among ``num_scores`` good scores: ``ceil((n + 1)(1 - rate))``.

    Example:
        >>> conformal_rank(100, 0.05), conformal_rank(19, 0.05), conformal_rank(98, 0.01)
        (96, 19, 99)
    """
    return math.ceil((num_scores + 1) * (1.0 - rate) - 1e-9)


def images_needed(rate: float) -> int:
    """Fewest good calibration images that resolve ``rate`` (the conformal rank stays within them), at least 20.

    Example:
        >>> images_needed(0.05), images_needed(0.01), images_needed(0.2)
        (20, 99, 20)
    """
    return max(MIN_CALIBRATION_IMAGES, math.ceil(1.0 / rate - 1.0 - 1e-9))


@dataclass(frozen=True)
class GoodScoreEstimate:
    """The threshold above which ``rate`` of good parts are expected, and how it was estimated.

    Attributes:
        threshold: Score above which a part is flagged.
        rate: The requested false-alarm rate.
        expected_rate: The rate the threshold gives good parts like the inliers: ``1 - rank / (n + 1)``.
        location: Median of all calibration scores.
        scale: Interquartile range of all calibration scores.
        medcouple: Robust skewness of all calibration scores (0: symmetric).
        fence: Scores above it were left out as defective.
        num_images: Calibration scores given.
        num_outliers: Scores above the fence.
        resolved: The inliers were enough for the rate (``n >= 1 / rate - 1``); else the threshold is the highest.
    """

    threshold: float
    rate: float
    expected_rate: float
    location: float
    scale: float
    medcouple: float
    fence: float
    num_images: int
    num_outliers: int
    resolved: bool

    @property
    def outlier_share(self) -> float:
        """Share of the calibration images above the fence."""
        return self.num_outliers / self.num_images


def medcouple(values: torch.Tensor) -> float:
    """The medcouple (Brys, Hubert and Struyf, 2004): a robust skewness in [-1, 1], 0 for a symmetric sample.

    The median over pairs ``x_i <= m <= x_j`` of ``((x_j - m) - (m - x_i)) / (x_j - x_i)``; pairs with
    ``x_i == x_j`` (both at the median) are left out. Samples beyond :data:`MEDCOUPLE_MAX_SCORES` use an
    evenly spaced subset of their sorted values.

    Example:
        >>> medcouple(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])), round(medcouple(torch.tensor([1.0, 2.0, 3.0, 10.0])), 4)
        (0.0, 0.3333)
    """
    ordered = values.double().flatten().sort().values
    if ordered.numel() > MEDCOUPLE_MAX_SCORES:
        ordered = ordered[torch.linspace(0, ordered.numel() - 1, MEDCOUPLE_MAX_SCORES).round().long()]
    median = float(ordered.quantile(0.5))
    low, high = ordered[ordered <= median], ordered[ordered >= median]
    width = high[None, :] - low[:, None]
    kernel = ((high[None, :] - median) - (median - low[:, None])) / width.where(width > 0, torch.ones_like(width))
    kept = kernel[width > 0]
    return float(kept.quantile(0.5)) if kept.numel() else 0.0


def upper_fence(values: torch.Tensor, whisker: float = FENCE) -> tuple[float, float, float, float]:
    """The upper fence of the skew-adjusted boxplot, with the median, the interquartile range and the medcouple.

    Example:
        >>> fence, median, iqr, mc = upper_fence(torch.arange(1.0, 10.0))
        >>> fence, median, iqr, mc
        (19.0, 5.0, 4.0, 0.0)
    """
    q1, median, q3 = (float(values.quantile(q)) for q in (0.25, 0.5, 0.75))
    iqr = q3 - q1
    if iqr <= 0.0:  # a flat majority: no spread to judge outliers by
        return math.inf, median, iqr, 0.0
    skew = medcouple(values)
    return q3 + whisker * math.exp((3.0 if skew >= 0 else 4.0) * skew) * iqr, median, iqr, skew


def _far_above_lower_half(values: torch.Tensor) -> int:
    """Scores far above the lower half (median + 10 lower-quartile spreads): a count that holds up to 50 % outliers.

    The boxplot fence breaks down beyond 25 % defective images (its upper quartile lands among them); this
    count, from the lower half alone, still sees them, so that the warning about too many does not break down too.
    """
    median = float(values.quantile(0.5))
    spread = (median - float(values.quantile(0.25))) / _QUARTILE_Z
    if spread <= 0.0:
        return 0
    return int((values > median + FAR_ABOVE * spread).sum())


def estimate_good_threshold(
    scores: torch.Tensor, rate: float, fence: float = FENCE, *, what: str = "calibration_source"
) -> GoodScoreEstimate:
    """The threshold that ``rate`` of good parts exceed, from unlabelled, mostly good scores (module docstring).

    Args:
        scores: Scores of the calibration images ``(N,)``, any units (higher: more anomalous).
        rate: The requested false-alarm rate, in (0, 0.5].
        fence: Whisker of the skew-adjusted boxplot beyond which a score is left out (``inf``: none).
        what: Where the scores came from (named in errors and warnings).

    Returns:
        The estimate.

    Raises:
        ValueError: ``rate`` outside (0, 0.5], fewer than :func:`images_needed` scores, or a score that is not finite.

    Example:
        >>> estimate = estimate_good_threshold(torch.arange(1.0, 21.0), rate=0.1)
        >>> estimate.threshold, estimate.num_outliers, round(estimate.expected_rate, 4)
        (19.0, 0, 0.0952)
    """
    rate = validate_false_alarm_rate(rate, "rate")
    values = torch.as_tensor(scores).detach().double().flatten().cpu()
    needed = images_needed(rate)
    if values.numel() < needed:
        msg = (
            f"{what} gave {values.numel()} image(s), but a false-alarm rate of {rate:g} needs at least {needed} "
            f"(the threshold is the ceil((n + 1) (1 - rate))-th lowest good score): add images of parts from the "
            "line, or raise false_alarm_rate."
        )
        raise ValueError(msg)
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        msg = f"{what}: {bad} image score(s) are not finite (NaN or inf): check those images; nothing was calibrated."
        raise ValueError(msg)
    limit, location, scale, skew = upper_fence(values, fence) if math.isfinite(fence) else (math.inf, 0.0, 0.0, 0.0)
    if not math.isfinite(fence):
        location = float(values.quantile(0.5))
    inliers = values[values <= limit]
    count = int(inliers.numel())
    rank = conformal_rank(count, rate)
    resolved = rank <= count
    ordered = inliers.sort().values
    threshold = float(ordered[min(rank, count) - 1])
    expected = 1.0 - min(rank, count) / (count + 1)
    estimate = GoodScoreEstimate(
        threshold=threshold,
        rate=rate,
        expected_rate=expected,
        location=location,
        scale=scale,
        medcouple=skew,
        fence=limit,
        num_images=int(values.numel()),
        num_outliers=int(values.numel()) - count,
        resolved=resolved,
    )
    far = max(estimate.num_outliers, _far_above_lower_half(values))
    if far > TOLERATED_DEFECT_SHARE * estimate.num_images:
        _warn(
            f"{what}: {far} of {estimate.num_images} calibration images "
            f"({far / estimate.num_images:.0%}) score far above the others, more than the estimate tolerates "
            f"({TOLERATED_DEFECT_SHARE:.0%}): these may not be mostly good parts of this product (another product, "
            "a drifting line, a defect batch, a wrong folder). The threshold rests on the lower scores only: check "
            "the folder, or calibrate on parts known to be mostly good."
        )
    if not resolved:
        _warn(
            f"{what}: {count} good-looking calibration images cannot resolve a false-alarm rate of {rate:g} "
            f"(it needs {math.ceil(1 / rate - 1 - 1e-9)}): the threshold is the highest of them, which good parts "
            f"exceed about {1 / (count + 1):.1%} of the time. Add images of parts from the line, or raise "
            "false_alarm_rate."
        )
    return estimate


@dataclass(frozen=True)
class LineCalibration:
    """Thresholds from calibration images of the line at a requested false-alarm rate, as the post-processor holds them.

    The image threshold is :func:`estimate_good_threshold` of the image scores; the pixel threshold the
    same estimate on each image's highest anomaly-map value (so a part whose map stays below it shows
    no flagged pixel at the same rate). The normalisation range is the range of what was scored.

    Attributes:
        image_threshold: An image is defective when its score is above this.
        pixel_threshold: A pixel is defective when its anomaly-map value is above this.
        image_min: Lowest calibration image score (normalisation).
        image_max: Highest calibration image score (normalisation).
        pixel_min: Lowest calibration anomaly-map value (normalisation).
        pixel_max: Highest calibration anomaly-map value (normalisation).
        false_alarm_rate: The requested rate.
        expected_rate: The rate the image threshold gives good parts like the inliers.
        num_images: Calibration images scored.
        num_outliers: Images whose score was above the fence (left out as defective).
        location: Median image score.
        scale: Interquartile range of the image scores.
        source: Where the images came from (a folder, or ``"images"``).
        image_scores: The calibration image scores (a new rate is estimated from them without rescoring).
        map_maxima: The highest anomaly-map value of each calibration image.
    """

    image_threshold: float
    pixel_threshold: float
    image_min: float
    image_max: float
    pixel_min: float
    pixel_max: float
    false_alarm_rate: float
    expected_rate: float
    num_images: int
    num_outliers: int
    location: float
    scale: float
    source: str
    image_scores: tuple[float, ...]
    map_maxima: tuple[float, ...]

    @classmethod
    def from_scores(
        cls,
        image_scores: torch.Tensor,
        map_maxima: torch.Tensor,
        map_minimum: float,
        rate: float,
        source: str,
    ) -> LineCalibration:
        """Estimate both thresholds at ``rate`` from the calibration images' scores and map maxima.

        Example:
            >>> scores = torch.linspace(1.0, 2.0, 40)
            >>> line = LineCalibration.from_scores(scores, scores * 0.8, 0.0, rate=0.05, source="images")
            >>> round(line.image_threshold, 4), round(line.pixel_threshold, 4), line.num_outliers
            (1.9744, 1.5795, 0)
        """
        what = f"calibration_source={source!r}" if source != "images" else "the calibration images"
        image = estimate_good_threshold(image_scores, rate, what=what)
        maxima = torch.as_tensor(map_maxima).detach().double().flatten().cpu()
        scores = torch.as_tensor(image_scores).detach().double().flatten().cpu()
        inlier_maxima = maxima[scores <= image.fence]
        with warnings.catch_warnings():  # the image estimate has warned about the same images already
            warnings.simplefilter("ignore", UserWarning)
            pixel = estimate_good_threshold(inlier_maxima, rate, fence=math.inf, what=what)
        return cls(
            image_threshold=_float32(image.threshold),
            pixel_threshold=_float32(pixel.threshold),
            image_min=_float32(scores.min()),
            image_max=_float32(scores.max()),
            pixel_min=_float32(min(float(map_minimum), float(maxima.min()))),
            pixel_max=_float32(maxima.max()),
            false_alarm_rate=float(rate),
            expected_rate=image.expected_rate,
            num_images=image.num_images,
            num_outliers=image.num_outliers,
            location=image.location,
            scale=image.scale,
            source=source,
            image_scores=tuple(float(v) for v in scores),
            map_maxima=tuple(float(v) for v in maxima),
        )

    def at_rate(self, rate: float) -> LineCalibration:
        """The same calibration images at another false-alarm rate (no rescoring).

        Example:
            >>> scores = torch.linspace(1.0, 2.0, 40)
            >>> line = LineCalibration.from_scores(scores, scores, 0.0, rate=0.05, source="images")
            >>> round(line.at_rate(0.25).image_threshold, 4)
            1.7692
        """
        map_minimum = self.pixel_min
        return LineCalibration.from_scores(
            torch.tensor(self.image_scores), torch.tensor(self.map_maxima), map_minimum, rate, self.source
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for checkpoints and logs)."""
        values = asdict(self)
        values["image_scores"] = list(self.image_scores)
        values["map_maxima"] = list(self.map_maxima)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LineCalibration:
        """Rebuild from :meth:`as_dict` (a checkpoint)."""
        values = dict(values)
        values["image_scores"] = tuple(values.get("image_scores", ()))
        values["map_maxima"] = tuple(values.get("map_maxima", ()))
        return cls(**values)

    def describe(self) -> str:
        """One line for the log.

        Example:
            >>> scores = torch.linspace(1.0, 2.0, 40)
            >>> LineCalibration.from_scores(scores, scores, 0.0, 0.05, "images").describe()[:57]
            'image 1.974, pixel 1.974 (raw scores) from 40 calibration'
        """
        return (
            f"image {self.image_threshold:.4g}, pixel {self.pixel_threshold:.4g} (raw scores) from "
            f"{self.num_images} calibration images of {self.source} ({self.num_outliers} left out as defective; "
            f"median {self.location:.4g}, interquartile range {self.scale:.4g}); requested false-alarm rate "
            f"{self.false_alarm_rate:.2%}, expected {self.expected_rate:.2%}"
        )


def _float32(value: float | torch.Tensor) -> float:
    """``value`` rounded to float32, the precision of the post-processor's buffers."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def _warn(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=3)
