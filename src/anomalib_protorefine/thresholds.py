"""Decision thresholds from the k support images alone: OK or defective, and where, without a defect image.

anomalib's post-processor learns its thresholds (F1-adaptive) and its normalisation range from a
validation pass over labelled images, defects included; a few-shot user has neither. Here the
support images stand in for both (:func:`collect_support_scores`, :func:`choose_thresholds`):

1. **pseudo-normal** images: two mildly augmented copies (crop 90-97 %, brightness +-5 %) of every
   support image, scored clean against the bank of all k support images, with the model's own
   refiner, scoring and anomaly map;
2. **pseudo-defect** images: the same copies with synthetic scratches, pits and stains pasted in
   (:func:`anomalib_protorefine.calibration.pseudo_queries`), scored the same way;
3. the **rule**: the image threshold sits between the highest pseudo-normal score ``a`` and the
   median pseudo-defect score ``b`` at a position ``p`` (:data:`POSITION`; ``t = a + p (b - a)``,
   ``t = a`` when ``b <= a``); the pixel threshold is the image threshold (a pixel is defective
   where its map value exceeds what a defective image's score must exceed); the normalisation
   range is the min and max over all pseudo images (image scores and map values).

Leave-one-out folds (each support image held out of a bank of the other ``k - 1``, as
``refiner="auto"`` calibrates) are the other construction (``held_out="leave_one_out"``). They tend
to put the thresholds too high for small k, because a bank of ``k - 1`` images scores good parts
higher than the bank of ``k`` that test images meet; the comparison is in docs/benchmarks.md,
"Decisions without defect images".

Example:
    >>> import torch
    >>> scores = SupportScores(
    ...     normal_scores=torch.tensor([1.0, 2.0]), defect_scores=torch.tensor([3.0, 6.0, 8.0]),
    ...     normal_pixels=torch.tensor([0.0, 1.5]), defect_pixels=torch.tensor([2.0, 3.5, 4.0]),
    ... )
    >>> thresholds = choose_thresholds(scores, position=0.5)
    >>> thresholds.image_threshold, thresholds.pixel_threshold, thresholds.image_max, thresholds.pixel_max
    (4.0, 4.0, 8.0, 4.0)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from anomalib_protorefine.calibration import augment, fold_queries, held_out_folds

logger = logging.getLogger(__name__)

#: Values of the models' ``threshold`` argument.
THRESHOLD_SOURCES: tuple[str, ...] = ("auto", "support", "validation")
#: Where the image threshold sits between the highest pseudo-normal and the median pseudo-defect score
#: (0: the highest pseudo-normal score; 1: the median pseudo-defect score). Chosen on the benchmarks of
#: docs/benchmarks.md, "Decisions without defect images".
POSITION = 0.75
#: How the pseudo-normal images are made: augmented copies against the full bank (default), or
#: leave-one-out folds (bank of the other k - 1 images; k = 1: copies against the image's own bank).
HELD_OUT: tuple[str, ...] = ("copies", "leave_one_out")
#: Augmented copies of each support image (``held_out="copies"``).
COPIES_PER_IMAGE = 2
#: Pixels kept per clean pseudo-normal map (a seeded sample: enough for a maximum, little memory).
MAX_PIXELS_PER_MAP = 16384

#: Scores of pre-processed images ``(B, 3, H, W)``: image scores ``(B,)`` and anomaly maps ``(B, H, W)``.
ImageScorer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_threshold_source(threshold: str) -> str:
    """Return ``threshold`` after checking it is one of :data:`THRESHOLD_SOURCES`.

    Example:
        >>> check_threshold_source("best")
        Traceback (most recent call last):
        ...
        ValueError: threshold='best' is not a threshold source: use one of 'auto', 'support', 'validation'.
    """
    if threshold not in THRESHOLD_SOURCES:
        names = ", ".join(repr(name) for name in THRESHOLD_SOURCES)
        msg = f"threshold={threshold!r} is not a threshold source: use one of {names}."
        raise ValueError(msg)
    return threshold


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
    check_threshold_source(threshold)
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
        normal_scores: Image scores of the clean pseudo-normal images.
        defect_scores: Image scores of the pseudo-normal images with pasted defects.
        normal_pixels: Anomaly-map values of the clean images (a seeded sample of each map, its maximum kept).
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
        highest_normal_score: Highest pseudo-normal image score.
        num_normal: Pseudo-normal images scored.
        num_defect: Pseudo-defect images scored.
        separated: The median pseudo-defect score exceeded the highest pseudo-normal one.
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


def choose_thresholds(scores: SupportScores, position: float = POSITION) -> SupportThresholds:
    """The thresholds and normalisation range of :class:`SupportScores` (the rule of the module docstring).

    Args:
        scores: Pseudo-normal and pseudo-defect scores.
        position: Fraction of the gap between the highest pseudo-normal and the median pseudo-defect
            image score where the image threshold sits (the pixel threshold is the same value).

    Returns:
        The thresholds. When the pseudo-defects do not exceed the pseudo-normals (median defect score
        not above the highest normal one) the threshold is the highest normal score, with a warning;
        support images without spread give finite thresholds and a warning too.

    Raises:
        ValueError: ``position`` outside ``[0, 1]``, empty or non-finite scores.

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
    if isinstance(position, bool) or not isinstance(position, int | float) or not 0.0 <= float(position) <= 1.0:
        msg = (
            "position must be a number in [0, 1] (0: highest pseudo-normal score, 1: median pseudo-defect score), "
            f"got {position!r}."
        )
        raise ValueError(msg)
    for name, tensor in asdict(scores).items():
        if tensor.numel() == 0 or not bool(torch.isfinite(tensor).all()):
            msg = f"support scores {name} are empty or not finite ({tensor.numel()} values): no thresholds can be set."
            raise ValueError(msg)
    normal, defect = scores.normal_scores.double(), scores.defect_scores.double()
    highest, median = float(normal.max()), float(defect.median())  # lower median for an even count
    separated = median > highest
    threshold = highest + float(position) * (median - highest) if separated else highest
    if not separated:
        _warn(
            "support thresholds: the synthetic defects pasted into copies of the support images do not score above "
            "the clean copies (median defect score below the highest clean one), so the threshold is the highest "
            "clean score and may miss defects. The features may not see such defects on this part: check the "
            "decisions on a few known defective parts, or validate on labelled images (threshold='validation')."
        )
    if normal.numel() > 1 and float(normal.max() - normal.min()) <= 1e-6 * max(abs(highest), 1e-12):
        _warn(
            "support thresholds: the clean copies of the support images all score the same (no spread: are the "
            "support images identical?). The thresholds are finite but rest on no variation of good parts: use "
            "k_shot images of different parts, or validate on labelled images (threshold='validation')."
        )
    every = torch.cat((normal, defect))
    every_px = torch.cat((scores.normal_pixels.double(), scores.defect_pixels.double()))
    return SupportThresholds(
        image_threshold=_float32(threshold),
        pixel_threshold=_float32(threshold),
        image_min=_float32(every.min()),
        image_max=_float32(every.max()),
        pixel_min=_float32(every_px.min()),
        pixel_max=_float32(every_px.max()),
        highest_normal_score=_float32(highest),
        num_normal=int(normal.numel()),
        num_defect=int(defect.numel()),
        separated=separated,
    )


def _float32(value: float | torch.Tensor) -> float:
    """``value`` rounded to float32, the precision of the post-processor's buffers (so both hold the same number)."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def _warn(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=3)


def collect_support_scores(
    raw_images: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    fit_bank: Callable[[torch.Tensor], object],
    score: ImageScorer,
    seed: int = 0,
    variants: int = 3,
    held_out: str = "copies",
) -> SupportScores:
    """Score pseudo-normal and pseudo-defect images made from the support images (the model's own scoring).

    Args:
        raw_images: Support images ``(k, 3, H, W)`` in ``[0, 1]`` at the model's input size.
        normalize: The model's photometric pre-processing.
        fit_bank: Builds the model's support data (bank, references) from pre-processed images.
        score: Image scores and anomaly maps of pre-processed images against that support data.
        seed: Seed of the augmentations, the pasted defects and the pixel sample.
        variants: Defective copies per pseudo-normal image.
        held_out: ``"copies"`` (:data:`COPIES_PER_IMAGE` augmented copies of each image, bank of all
            k images) or ``"leave_one_out"`` (folds of
            :func:`~anomalib_protorefine.calibration.held_out_folds`).

    Returns:
        The pseudo scores. With ``"leave_one_out"`` the support data is left built from a subset:
        the caller rebuilds it from all images.

    Example:
        >>> import torch
        >>> def score(images):  # distance of each pixel to the bank's mean image
        ...     maps = (images - bank[0].mean(0)).abs().mean(1)
        ...     return maps.flatten(1).amax(1), maps
        >>> bank = []
        >>> scores = collect_support_scores(
        ...     torch.full((2, 3, 32, 32), 0.5), lambda x: x, lambda x: bank.insert(0, x), score, variants=2
        ... )
        >>> scores.normal_scores.shape, bool((scores.defect_scores > scores.normal_scores.max()).all())
        (torch.Size([4]), True)
    """
    if held_out not in HELD_OUT:
        msg = f"held_out must be one of {', '.join(repr(name) for name in HELD_OUT)}, got {held_out!r}."
        raise ValueError(msg)
    if len(raw_images) > 1 and bool((raw_images - raw_images[:1]).abs().amax() <= 1e-6):
        _warn(
            f"support thresholds: the {len(raw_images)} support images are identical (no spread between good parts). "
            "The thresholds are finite but rest on copies of one image: use k_shot images of different parts, or "
            "validate on labelled images (threshold='validation')."
        )
    if held_out == "copies":
        copies = [
            augment(image, seed * 1000 + index * COPIES_PER_IMAGE + copy)
            for index, image in enumerate(raw_images)
            for copy in range(COPIES_PER_IMAGE)
        ]
        folds = [(raw_images, torch.stack(copies))]
    else:
        folds = held_out_folds(raw_images, seed)
    generator = torch.Generator().manual_seed(seed)
    normal, defect, normal_px, defect_px = [], [], [], []
    for _, queries, masks in fold_queries(folds, seed, variants, fit_bank, normalize):
        image_scores, maps = score(queries)
        image_scores, maps = image_scores.detach().float().cpu().reshape(-1), maps.detach().float().cpu()
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
        "synthetic-defect copies of the support images)"
    )


def is_set(value: torch.Tensor | float) -> bool:
    """Whether a threshold value is set (not NaN).

    Example:
        >>> is_set(float("nan")), is_set(torch.tensor(1.0))
        (False, True)
    """
    return not math.isnan(float(value))
