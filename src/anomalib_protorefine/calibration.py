"""Self-calibration: choose the refinement setting of a task from its k support images alone.

No test image and no label is needed. Synthetic defects from the package's generator
(:mod:`anomalib_protorefine.data.defects`: scratches, pits, stains) are pasted into held-out
support images, and every candidate setting scores these pseudo-queries against a bank built from
the *other* support images:

* ``k >= 2``: leave-one-out, each support image is held out once (bank: the other ``k - 1``);
* ``k = 1``: the held-out images are mildly augmented copies (crop, brightness) of the single
  support image, whose own patches form the bank.

A candidate's calibration score is the mean over folds of the patch-level AUROC of the pasted
defects (clean held-out patches are the negatives) plus the image-level AUROC (clean held-out
image vs. its defective copies). The best candidate wins; ties go to the first listed.

Example:
    >>> import torch
    >>> from anomalib_protorefine.calibration import paste_defects
    >>> image, mask = paste_defects(torch.full((3, 64, 64), 0.5), seed=0, count=1)
    >>> image.shape, mask.shape, bool(mask.any())
    (torch.Size([3, 64, 64]), torch.Size([64, 64]), True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812
from torchmetrics.functional.classification import binary_auroc
from torchvision.transforms.v2 import Compose, Normalize

from anomalib_protorefine.data.defects import DEFECT_TYPES, add_defect

#: Patch scores ``(B, m)`` of pre-processed images ``(B, 3, H, W)`` against the current bank.
Scorer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CalibrationResult:
    """Outcome of :func:`calibrate`.

    Attributes:
        choice: Name of the chosen candidate.
        scores: Calibration score of every candidate (mean patch AUROC + mean image AUROC, in [0, 2]).
    """

    choice: str
    scores: dict[str, float]


def paste_defects(image: torch.Tensor, seed: int, count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint ``count`` synthetic defects into an image ``(3, H, W)`` in ``[0, 1]``.

    Non-square images are painted on a square resampling and resampled back.

    Returns:
        The defective image ``(3, H, W)`` and its boolean mask ``(H, W)``.
    """
    rng = np.random.default_rng(seed)
    height, width = image.shape[-2:]
    size = max(height, width)
    square = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    array = square.permute(1, 2, 0).clamp(0, 1).numpy().astype(np.float32)
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(count):
        kind = DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))]
        array, defect_mask = add_defect(kind, array, rng)
        mask |= defect_mask
    painted = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
    painted = F.interpolate(painted, size=(height, width), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    mask_t = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(height, width), mode="nearest")[0, 0]
    return painted.to(image.dtype), mask_t.bool()


def augment(image: torch.Tensor, seed: int) -> torch.Tensor:
    """A mildly augmented copy of ``(3, H, W)`` in ``[0, 1]``: a 90-97 % crop resized back, brightness ±5 %."""
    gen = torch.Generator().manual_seed(int(seed))  # torch refuses numpy integers here
    height, width = image.shape[-2:]
    scale = 0.90 + 0.07 * float(torch.rand(1, generator=gen))
    crop_h, crop_w = round(height * scale), round(width * scale)
    top = int(torch.randint(0, height - crop_h + 1, (1,), generator=gen))
    left = int(torch.randint(0, width - crop_w + 1, (1,), generator=gen))
    crop = image[:, top : top + crop_h, left : left + crop_w][None].float()
    out = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
    gain = 1.0 + 0.1 * (float(torch.rand(1, generator=gen)) - 0.5)
    return (out * gain).clamp(0, 1).to(image.dtype)


def held_out_folds(raw_images: torch.Tensor, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Folds ``(bank images, held-out images)`` of the support images: leave-one-out, or augmented copies for k = 1.

    Args:
        raw_images: Support images ``(k, 3, H, W)`` in ``[0, 1]``.
        seed: Seed of the augmentations (k = 1).

    Returns:
        ``k`` folds (each image held out once, the bank the others) for ``k >= 2``; for ``k = 1`` one
        fold whose bank is the image and whose held-out images are two augmented copies of it.

    Example:
        >>> folds = held_out_folds(torch.rand(3, 3, 8, 8), seed=0)
        >>> [(len(bank), len(held)) for bank, held in folds]
        [(2, 1), (2, 1), (2, 1)]
        >>> [(len(bank), len(held)) for bank, held in held_out_folds(torch.rand(1, 3, 8, 8), seed=0)]
        [(1, 2)]
    """
    num = raw_images.shape[0]
    if num == 1:
        return [(raw_images, torch.stack([augment(raw_images[0], seed * 1000 + v) for v in range(2)]))]
    return [(raw_images[[i for i in range(num) if i != index]], raw_images[index : index + 1]) for index in range(num)]


def fold_queries(
    folds: list[tuple[torch.Tensor, torch.Tensor]],
    seed: int,
    variants: int,
    fit_bank: Callable[[torch.Tensor], Any],
    normalize: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
    """Per fold: build the bank from its bank images, then yield ``(fit_bank's result, queries, masks)``.

    The queries are :func:`pseudo_queries` of the fold's held-out images (clean, then with pasted
    defects), normalised by ``normalize`` as the model's pre-processing would; the masks mark the defects.
    """
    for fold_index, (bank_images, held_out) in enumerate(folds):
        queries, masks = pseudo_queries(held_out, seed, fold_index, variants)
        fitted = fit_bank(normalize(bank_images))
        yield fitted, normalize(queries), masks


def pseudo_queries(
    held_out: torch.Tensor, seed: int, fold_index: int, variants: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each held-out image clean, then ``variants`` copies with pasted defects, and their masks.

    Returns:
        Images ``(B, 3, H, W)`` in ``[0, 1]`` and boolean masks ``(B, H, W)`` (all-false for the clean
        images), ``B = len(held_out) * (1 + variants)``.

    Example:
        >>> images, masks = pseudo_queries(torch.full((1, 3, 32, 32), 0.5), seed=0, fold_index=0, variants=2)
        >>> images.shape, masks.flatten(1).any(1).tolist()
        (torch.Size([3, 3, 32, 32]), [False, True, True])
    """
    queries, masks = [], []
    for h_index, clean in enumerate(held_out):
        queries.append(clean)
        masks.append(torch.zeros(clean.shape[-2:], dtype=torch.bool))
        for v in range(variants):
            painted, mask = paste_defects(clean, seed=seed * 10_007 + fold_index * 101 + h_index * 11 + v)
            queries.append(painted)
            masks.append(mask)
    return torch.stack(queries), torch.stack(masks)


def split_transform(
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    what: str = "self-calibration (refiner='auto')",
    alternative: str = "a refiner preset instead of 'auto'",
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, Callable[[torch.Tensor], torch.Tensor]]:
    """Split a pre-processing transform into its geometric part and its final normalisation.

    Defects are pasted between the two (on images in ``[0, 1]`` at the model's input size).

    Args:
        transform: ``None``, or a ``Compose`` whose steps after the geometric ones start with ``Normalize``.
        what: What pastes the defects (named in the error).
        alternative: The setting that needs no split (named in the error).

    Returns:
        ``(geometric, photometric)``; ``geometric`` is ``None`` when there is none.

    Raises:
        ValueError: The transform has no ``Normalize`` step to split at, but is not ``None``.

    Example:
        >>> from torchvision.transforms.v2 import Compose, Normalize, Resize
        >>> geometric, photometric = split_transform(Compose([Resize((8, 8)), Normalize([0.5] * 3, [0.5] * 3)]))
        >>> type(geometric).__name__, type(photometric).__name__
        ('Compose', 'Compose')
    """
    if transform is None:
        return None, _identity
    steps = list(transform.transforms) if isinstance(transform, Compose) else [transform]
    cut = next((i for i, step in enumerate(steps) if isinstance(step, Normalize)), None)
    if cut is None:
        msg = (
            f"{what} pastes defects into images in [0, 1] before the pre-processor's "
            "Normalize step, but the pre-processor transform has none: use the model's default pre-processor "
            f"(or a Compose([...resize..., Normalize(...)])), or choose {alternative}."
        )
        raise ValueError(msg)
    return (Compose(steps[:cut]) if cut else None), Compose(steps[cut:])


def _identity(images: torch.Tensor) -> torch.Tensor:
    """The photometric step of a model without pre-processing."""
    return images


def _patch_labels(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch labels ``(B, h*w)``: the patch holds a defective pixel."""
    return F.adaptive_max_pool2d(masks[:, None].float(), grid).flatten(1) > 0


def calibrate(
    raw_images: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    fit_bank: Callable[[torch.Tensor], tuple[int, int]],
    scorers: Mapping[str, Scorer],
    seed: int = 0,
    variants: int = 3,
) -> CalibrationResult:
    """Choose among ``scorers`` the one that best localises defects pasted into held-out support images.

    Args:
        raw_images: Support images ``(k, 3, H, W)`` in ``[0, 1]``, resized to the model's input size.
        normalize: The model's photometric pre-processing (e.g. backbone normalisation).
        fit_bank: Builds the model's bank from pre-processed images; returns the patch grid ``(h, w)``.
        scorers: Candidate name -> patch scores ``(B, m)`` of pre-processed images against the bank.
        seed: Seed of the pasted defects and augmentations.
        variants: Defective copies per held-out image.

    Returns:
        The chosen candidate and every candidate's calibration score.

    Raises:
        ValueError: ``raw_images`` is empty or ``scorers`` is empty.
    """
    if raw_images.ndim != 4 or raw_images.shape[0] == 0:
        msg = f"raw_images must be a non-empty batch (k, 3, H, W), got shape {tuple(raw_images.shape)}."
        raise ValueError(msg)
    if not scorers:
        msg = "scorers is empty: pass at least one candidate setting to calibrate."
        raise ValueError(msg)
    folds = held_out_folds(raw_images, seed)
    totals = dict.fromkeys(scorers, 0.0)
    for grid, batch, fold_masks in fold_queries(folds, seed, variants, fit_bank, normalize):
        labels = _patch_labels(fold_masks, grid)
        image_labels = fold_masks.flatten(1).any(1)
        for name, scorer in scorers.items():
            patch = scorer(batch).float()
            # torchmetrics squashes scores outside [0, 1] with a sigmoid: min-max normalise first.
            patch = (patch - patch.min()) / (patch.max() - patch.min()).clamp_min(1e-12)
            patch_auroc = float(binary_auroc(patch.flatten(), labels.flatten().long()))
            image_auroc = float(binary_auroc(patch.amax(1), image_labels.long()))
            totals[name] += (patch_auroc + image_auroc) / len(folds)
    choice = max(totals, key=lambda name: totals[name])  # first listed wins ties
    return CalibrationResult(choice=choice, scores=totals)
