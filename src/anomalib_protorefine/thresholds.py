"""Decision thresholds from the k support images alone: OK or defective, and where, without a defect image.

anomalib's post-processor learns its thresholds (F1-adaptive) and its normalisation range from a
validation pass over labelled images, defects included; a few-shot user has neither. Here the
support images stand in for both:

1. **pseudo-normal** images: each support image held out of a bank built from the others
   (leave-one-out, ``k >= 2``), or augmented copies of the single image (``k = 1``), scored clean;
2. **pseudo-defect** images: the same held-out images with synthetic scratches, pits and stains
   pasted in (:func:`anomalib_protorefine.calibration.pseudo_queries`), scored with the model's own
   refiner, scoring and anomaly map;
3. the **rule** (:func:`choose_thresholds`): each threshold sits between the highest pseudo-normal
   value and the median pseudo-defect value, at a measured fraction of the gap (``position``):
   image threshold from image scores, pixel threshold from the anomaly maps (normal pixels: every
   pixel of the clean maps; defect pixels: the pixels inside the pasted masks). The normalisation
   range is the min and max over all pseudo images.

Example:
    >>> import torch
    >>> scores = SupportScores(
    ...     normal_scores=torch.tensor([1.0, 2.0]), defect_scores=torch.tensor([3.0, 6.0, 8.0]),
    ...     normal_pixels=torch.tensor([0.0, 1.5]), defect_pixels=torch.tensor([2.0, 3.5, 4.0]),
    ... )
    >>> thresholds = choose_thresholds(scores, image_position=0.5, pixel_position=0.5)
    >>> thresholds.image_threshold, thresholds.pixel_threshold, thresholds.image_max
    (4.0, 2.5, 8.0)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from anomalib_protorefine.calibration import held_out_folds, pseudo_queries

logger = logging.getLogger(__name__)

#: Values of the models' ``threshold`` argument.
THRESHOLD_SOURCES: tuple[str, ...] = ("auto", "support", "validation")
#: Where the image threshold sits between the highest pseudo-normal and the median pseudo-defect score
#: (0: the highest pseudo-normal score; 1: the median pseudo-defect score). Measured: docs/benchmarks.md.
IMAGE_POSITION = 0.25
#: The same for the pixel threshold (highest pseudo-normal pixel, median pixel inside pasted defects).
PIXEL_POSITION = 0.5
#: Pixels kept per clean pseudo-normal map (a seeded sample: enough for a maximum, little memory).
MAX_PIXELS_PER_MAP = 16384

#: Scores of pre-processed images ``(B, 3, H, W)``: image scores ``(B,)`` and anomaly maps ``(B, H, W)``.
ImageScorer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def validate_threshold(threshold: str, k_shot: int | None, few_shot_source: object | None = None) -> str:
    """Return ``threshold`` after checking it is a known source and that ``"support"`` has support images.

    Example:
        >>> validate_threshold("support", k_shot=2)
        'support'
        >>> validate_threshold("best", k_shot=2)
        Traceback (most recent call last):
        ...
        ValueError: threshold='best' is not a threshold source: use one of 'auto', 'support', 'validation'.
    """
    if threshold not in THRESHOLD_SOURCES:
        names = ", ".join(repr(name) for name in THRESHOLD_SOURCES)
        msg = f"threshold={threshold!r} is not a threshold source: use one of {names}."
        raise ValueError(msg)
    if threshold == "support" and not k_shot:
        msg = (
            "threshold='support' computes the thresholds from the k support images, but k_shot is not set"
            f"{' (few_shot_source needs it too)' if few_shot_source else ''}: set k_shot (e.g. k_shot=4; CLI "
            "--model.k_shot 4) with a datamodule or few_shot_source, or use threshold='validation' (labelled "
            "validation images)."
        )
        raise ValueError(msg)
    return threshold


@dataclass(frozen=True)
class SupportScores:
    """Scores of the pseudo-normal and pseudo-defect images made from the support images.

    Attributes:
        normal_scores: Image scores of the clean held-out images.
        defect_scores: Image scores of the held-out images with pasted defects.
        normal_pixels: Anomaly-map values of the clean held-out images (a seeded sample of each map).
        defect_pixels: Anomaly-map values inside the pasted defect masks.
    """

    normal_scores: torch.Tensor
    defect_scores: torch.Tensor
    normal_pixels: torch.Tensor
    defect_pixels: torch.Tensor


@dataclass(frozen=True)
class SupportThresholds:
    """Thresholds and normalisation range in raw score units, as anomalib's post-processor keeps them.

    Attributes:
        image_threshold: An image is defective when its score is above this.
        pixel_threshold: A pixel is defective when its anomaly-map value is above this.
        image_min: Lowest pseudo image score (normalisation).
        image_max: Highest pseudo image score (normalisation).
        pixel_min: Lowest pseudo anomaly-map value (normalisation).
        pixel_max: Highest pseudo anomaly-map value (normalisation).
        highest_normal_score: Highest pseudo-normal image score (anomalib's normal-only fallback).
        num_normal: Pseudo-normal images scored.
        num_defect: Pseudo-defect images scored.
        separated: The median pseudo-defect value exceeded the highest pseudo-normal one at both levels.
    """

    image_threshold: float
    pixel_threshold: float
    image_min: float
    image_max: float
    pixel_min: float
    pixel_max: float
    highest_normal_score: float
    num_normal: int
    num_defect: int
    separated: bool

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for checkpoints and logs).

        Example:
            >>> SupportThresholds(1.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.5, 2, 6, True).as_dict()["pixel_threshold"]
            2.0
        """
        return asdict(self)


def _interpolate(normal: torch.Tensor, defect: torch.Tensor, position: float) -> tuple[float, bool]:
    """``max(normal) + position * (median(defect) - max(normal))`` (lower median), and whether the gap is positive."""
    top = float(normal.max())
    gap = float(defect.median()) - top
    return (top + position * gap if gap > 0 else top), gap > 0


def choose_thresholds(
    scores: SupportScores, image_position: float = IMAGE_POSITION, pixel_position: float = PIXEL_POSITION
) -> SupportThresholds:
    """The thresholds and normalisation range of :class:`SupportScores` (the rule of the module docstring).

    Args:
        scores: Pseudo-normal and pseudo-defect scores.
        image_position: Fraction of the gap between the highest pseudo-normal and the median
            pseudo-defect image score where the image threshold sits.
        pixel_position: The same for the pixel threshold.

    Returns:
        The thresholds. A threshold whose pseudo-defects do not exceed the pseudo-normals (median
        defect value below the highest normal one) falls back to the highest normal value, with a
        warning; so does the case of support images without spread.

    Raises:
        ValueError: A position outside ``[0, 1]``, empty or non-finite scores.

    Example:
        >>> scores = SupportScores(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.8]), torch.zeros(2), torch.ones(2))
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     choose_thresholds(scores).image_threshold
        2.0
        >>> "synthetic defects" in str(caught[0].message)
        True
    """
    for name, value in (("image_position", image_position), ("pixel_position", pixel_position)):
        if not (isinstance(value, int | float) and 0.0 <= float(value) <= 1.0):
            msg = (
                f"{name} must be a number in [0, 1] (0: highest pseudo-normal value, 1: median pseudo-defect), "
                f"got {value!r}."
            )
            raise ValueError(msg)
    for name, tensor in asdict(scores).items():
        if tensor.numel() == 0 or not bool(torch.isfinite(tensor).all()):
            msg = f"support scores {name} are empty or not finite ({tensor.numel()} values): no thresholds can be set."
            raise ValueError(msg)
    normal, defect = scores.normal_scores.double(), scores.defect_scores.double()
    normal_px, defect_px = scores.normal_pixels.double(), scores.defect_pixels.double()
    image_threshold, image_separated = _interpolate(normal, defect, float(image_position))
    pixel_threshold, pixel_separated = _interpolate(normal_px, defect_px, float(pixel_position))
    if not (image_separated and pixel_separated):
        levels = [name for name, ok in (("image", image_separated), ("pixel", pixel_separated)) if not ok]
        _warn(
            f"support thresholds: the synthetic defects pasted into the held-out support images do not score above "
            f"the clean ones at the {' and '.join(levels)} level, so the threshold is the highest clean score and "
            "may miss defects. The features may not see such defects on this part: check the decisions on a few "
            "known defective parts, or validate on labelled images (threshold='validation')."
        )
    if normal.numel() > 1 and float(normal.max() - normal.min()) <= 1e-6 * max(abs(float(normal.max())), 1e-12):
        _warn(
            "support thresholds: the held-out support images all score the same (no spread: are the support images "
            "identical?). The thresholds are finite but rest on no variation of good parts: use k_shot images of "
            "different parts, or validate on labelled images (threshold='validation')."
        )
    every = torch.cat((normal, defect))
    every_px = torch.cat((normal_px, defect_px))
    return SupportThresholds(
        image_threshold=_float32(image_threshold),
        pixel_threshold=_float32(pixel_threshold),
        image_min=_float32(every.min()),
        image_max=_float32(every.max()),
        pixel_min=_float32(every_px.min()),
        pixel_max=_float32(every_px.max()),
        highest_normal_score=_float32(normal.max()),
        num_normal=int(normal.numel()),
        num_defect=int(defect.numel()),
        separated=image_separated and pixel_separated,
    )


def _float32(value: float | torch.Tensor) -> float:
    """``value`` rounded to float32, the precision of the post-processor's buffers (so both hold the same number)."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def _warn(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=3)
    logger.warning(msg)


def collect_support_scores(
    raw_images: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    fit_bank: Callable[[torch.Tensor], object],
    score: ImageScorer,
    seed: int = 0,
    variants: int = 3,
) -> SupportScores:
    """Score pseudo-normal and pseudo-defect images made from the support images (the model's own scoring).

    Args:
        raw_images: Support images ``(k, 3, H, W)`` in ``[0, 1]`` at the model's input size.
        normalize: The model's photometric pre-processing.
        fit_bank: Builds the model's support data (bank, references) from pre-processed images.
        score: Image scores and anomaly maps of pre-processed images against that support data.
        seed: Seed of the folds' augmentations, the pasted defects and the pixel sample.
        variants: Defective copies per held-out image.

    Returns:
        The pseudo scores. The caller rebuilds its support data from all images afterwards.

    Example:
        >>> import torch
        >>> def score(images):  # distance of each pixel to the bank's mean image
        ...     maps = (images - bank[0].mean(0)).abs().mean(1)
        ...     return maps.flatten(1).amax(1), maps
        >>> bank = []
        >>> scores = collect_support_scores(
        ...     torch.full((2, 3, 32, 32), 0.5), lambda x: x, lambda x: bank.insert(0, x), score, variants=2
        ... )
        >>> scores.normal_scores.tolist(), bool((scores.defect_scores > 0).all())
        ([0.0, 0.0], True)
    """
    generator = torch.Generator().manual_seed(seed)
    normal, defect, normal_px, defect_px = [], [], [], []
    for fold_index, (bank_images, held_out) in enumerate(held_out_folds(raw_images, seed)):
        queries, masks = pseudo_queries(held_out, seed, fold_index, variants)
        fit_bank(normalize(bank_images))
        image_scores, maps = score(normalize(queries))
        image_scores, maps = image_scores.detach().float().cpu(), maps.detach().float().cpu()
        maps = maps.reshape(len(queries), *maps.shape[-2:])
        if maps.shape[-2:] != masks.shape[-2:]:
            msg = f"anomaly maps {tuple(maps.shape[-2:])} and support images {tuple(masks.shape[-2:])} differ in size."
            raise ValueError(msg)
        is_defect = masks.flatten(1).any(1)
        normal.append(image_scores[~is_defect])
        defect.append(image_scores[is_defect])
        for clean in maps[~is_defect]:
            flat = clean.flatten()
            if flat.numel() > MAX_PIXELS_PER_MAP:
                keep = torch.randperm(flat.numel(), generator=generator)[:MAX_PIXELS_PER_MAP]
                flat = torch.cat((flat[keep], flat.max()[None]))  # the maximum always in
            normal_px.append(flat)
        defect_px.append(maps[is_defect][masks[is_defect]])
    return SupportScores(
        normal_scores=torch.cat(normal),
        defect_scores=torch.cat(defect),
        normal_pixels=torch.cat(normal_px),
        defect_pixels=torch.cat(defect_px),
    )


def describe(thresholds: SupportThresholds) -> str:
    """One line for the log.

    Example:
        >>> describe(SupportThresholds(1.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.5, 2, 6, True))[:60]
        'image 1, pixel 2 (raw scores; normalisation image [0, 3], pi'
    """
    return (
        f"image {thresholds.image_threshold:.4g}, pixel {thresholds.pixel_threshold:.4g} (raw scores; normalisation "
        f"image [{thresholds.image_min:.4g}, {thresholds.image_max:.4g}], pixel [{thresholds.pixel_min:.4g}, "
        f"{thresholds.pixel_max:.4g}]; from {thresholds.num_normal} clean and {thresholds.num_defect} "
        "synthetic-defect held-out support images)"
    )


def is_set(value: torch.Tensor | float) -> bool:
    """Whether a threshold value is set (not NaN).

    Example:
        >>> is_set(float("nan")), is_set(torch.tensor(1.0))
        (False, True)
    """
    return not math.isnan(float(value))
