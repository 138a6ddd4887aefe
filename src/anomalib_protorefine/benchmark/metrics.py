"""The benchmark's metrics: anomalib's AUROC, F1-max and AUPRO on raw scores, min-max scaled over the whole set.

anomalib's metrics are meant for post-processed scores in [0, 1]; torchmetrics applies a sigmoid to
predictions outside [0, 1], and raw PatchCore distances (tens) all saturate to 1.0 in float32, so
every image ties and AUROC reads 0.5. anomalib's post-processor avoids that by normalising with
validation statistics, but it clamps, which creates ties of its own. The benchmark needs
threshold-free metrics of the raw scores: each metric here keeps its inputs and, at ``compute``,
scales them by the min and max over the whole test set, a strictly increasing map that leaves
AUROC, F1-max and AUPRO unchanged, then lets anomalib's metric compute as usual.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> metric = AUROC(fields=["pred_score", "gt_label"], prefix="image_")
    >>> metric.update(SimpleNamespace(pred_score=torch.tensor([40.0, 41.0, 42.0]), gt_label=torch.tensor([0, 0, 1])))
    >>> float(metric.compute()), metric.name
    (1.0, 'image_AUROC')
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from anomalib import metrics as anomalib_metrics
from anomalib.metrics.base import AnomalibMetric


class _WholeSetScaled:
    """Mixin before an anomalib metric: keep the inputs, scale predictions by the whole set's range at compute."""

    fields: list[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, batch: Any, *args: Any, **kwargs: Any) -> None:
        """Store the batch's predictions and targets (on the CPU)."""
        del args, kwargs
        preds, target = (getattr(batch, key, None) for key in self.fields)
        if preds is None or target is None:
            if getattr(self, "strict", True):
                msg = f"{type(self).__name__}: the batch has no {self.fields} values."
                raise ValueError(msg)
            return
        self._inputs.append((preds.detach().float().cpu(), target.detach().cpu()))

    def compute(self) -> torch.Tensor:
        """Scale all predictions to [0, 1] by their min and max, then compute anomalib's metric on them."""
        if not self._inputs:
            return super().compute()  # type: ignore[misc]
        preds = torch.cat([p.flatten() for p, _ in self._inputs])
        target = torch.cat([t.flatten() for _, t in self._inputs])
        low, high = preds.min(), preds.max()
        scaled = (preds - low) / (high - low) if high > low else torch.zeros_like(preds)
        shape = self._inputs[0][0].shape[1:]
        values = {self.fields[0]: scaled.reshape(-1, *shape), self.fields[1]: target.reshape(-1, *shape)}
        super().update(SimpleNamespace(**values))  # type: ignore[misc]
        return super().compute()  # type: ignore[misc]

    def reset(self) -> None:
        """Forget the stored inputs too."""
        super().reset()  # type: ignore[misc]
        self._inputs = []


class AUROC(_WholeSetScaled, anomalib_metrics.AUROC):  # type: ignore[misc]
    """anomalib's AUROC of whole-set-scaled raw scores."""


class F1Max(_WholeSetScaled, anomalib_metrics.F1Max):  # type: ignore[misc]
    """anomalib's F1-max of whole-set-scaled raw scores."""


class AUPRO(_WholeSetScaled, anomalib_metrics.AUPRO):  # type: ignore[misc]
    """anomalib's AUPRO (FPR limit 0.3) of whole-set-scaled raw maps."""


def benchmark_metrics() -> list[AnomalibMetric]:
    """Image and pixel AUROC, image and pixel F1-max, pixel AUPRO: threshold-free, on raw scores.

    Example:
        >>> [metric.name for metric in benchmark_metrics()]
        ['image_AUROC', 'image_F1Max', 'pixel_AUROC', 'pixel_F1Max', 'pixel_AUPRO']
    """
    return [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        F1Max(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
    ]
