"""Decision metrics of the benchmark: what a threshold decides on the test set, next to the best any threshold could.

At a given image threshold (an image is called defective when its score is above it):
balanced accuracy (mean of the detection rate on defective and the pass rate on good images),
precision, recall (the detection rate), F1 and the false-alarm rate on good images; at a pixel
threshold, the pixel F1. The oracle is the best balanced accuracy any threshold reaches on the test
set (from torchmetrics' ROC curve); the pixel oracle is the F1-max the benchmark already reports.

Example:
    >>> import torch
    >>> scores, labels = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1])
    >>> image_decisions(scores, labels, 2.5)["BAcc"], best_balanced_accuracy(scores, labels)
    (1.0, 1.0)
    >>> image_decisions(scores, labels, 1.5)["FAR"]
    0.5
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_roc


def image_decisions(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    """Balanced accuracy, precision, recall, F1 and false-alarm rate of ``score > threshold``.

    Precision is NaN when nothing is flagged (undefined); rates are NaN when a class is absent.

    Example:
        >>> out = image_decisions(torch.tensor([0.0, 5.0, 6.0]), torch.tensor([0, 0, 1]), 4.0)
        >>> out["Precision"], out["Recall"], out["FAR"], round(out["F1"], 3)
        (0.5, 1.0, 0.5, 0.667)
    """
    flagged = scores.double() > threshold
    defect = labels.bool()
    tp = int((flagged & defect).sum())
    fp = int((flagged & ~defect).sum())
    fn = int((~flagged & defect).sum())
    tn = int((~flagged & ~defect).sum())
    nan = float("nan")
    recall = tp / (tp + fn) if tp + fn else nan
    far = fp / (fp + tn) if fp + tn else nan
    precision = tp / (tp + fp) if tp + fp else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    return {"BAcc": (recall + 1 - far) / 2, "Precision": precision, "Recall": recall, "F1": f1, "FAR": far}


def best_balanced_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The highest balanced accuracy any threshold reaches (the oracle), from the ROC curve.

    Example:
        >>> best_balanced_accuracy(torch.tensor([1.0, 3.0, 2.0, 4.0]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    values = scores.double()
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else torch.zeros_like(values)  # no sigmoid in torchmetrics
    fpr, tpr, _ = binary_roc(scaled, labels.long())
    return float(((tpr + 1 - fpr) / 2).max())


def pixel_f1(maps: torch.Tensor, masks: torch.Tensor, threshold: float) -> float:
    """Pixel F1 of ``map > threshold`` against the ground-truth masks (all images pooled).

    Example:
        >>> pixel_f1(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([[0, 1], [0, 0]]), 0.5)
        0.6666666666666666
    """
    flagged = maps > threshold
    truth = masks.bool()
    tp = int((flagged & truth).sum())
    wrong = int((flagged ^ truth).sum())
    return 2 * tp / (2 * tp + wrong) if tp + wrong else float("nan")


def decision_values(
    scores: torch.Tensor,
    labels: torch.Tensor,
    maps: torch.Tensor | None,
    masks: torch.Tensor | None,
    image_threshold: float,
    pixel_threshold: float,
    prefix: str,
) -> dict[str, float]:
    """Image decisions at ``image_threshold`` and pixel F1 at ``pixel_threshold``, keys ``<prefix>image_<name>``.

    Example:
        >>> values = decision_values(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]), None, None, 2.0, 2.0, "support_")
        >>> values["support_image_BAcc"], "support_pixel_F1" in values
        (1.0, False)
    """
    values = {
        f"{prefix}image_{name}": value for name, value in image_decisions(scores, labels, image_threshold).items()
    }
    if maps is not None and masks is not None and bool(masks.any()):
        values[f"{prefix}pixel_F1"] = pixel_f1(maps, masks, pixel_threshold)
    return values
