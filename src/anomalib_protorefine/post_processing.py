"""anomalib's post-processor with thresholds that may come from the support images.

:class:`FewShotPostProcessor` is anomalib's :class:`~anomalib.post_processing.PostProcessor` (same
buffers, normalisation, sensitivities, checkpointing and export) with one more setting,
``threshold``, that says where the thresholds and the normalisation range come from:

* ``"support"``: from the support images (:mod:`anomalib_protorefine.thresholds`), written in when the
  models build their support data; a validation pass leaves them alone;
* ``"validation"``: anomalib's behaviour, F1-adaptive thresholds from labelled validation images;
* ``"auto"``: the support thresholds, replaced by anomalib's when a validation pass with defective
  images runs (a validation set of good images only keeps the support thresholds, where anomalib
  would fall back to the highest good score).

Thresholds calibrated on unlabelled images of the line at a requested false-alarm rate
(:mod:`anomalib_protorefine.false_alarm`, origin ``"calibration"``) stay in force through any
validation pass: the user asked for that rate.

Two things differ from anomalib's post-processor, in eager mode and in the exported graphs alike:

* **normalisation keeps the ranking**: a score ``x`` maps to ``0.5 + 0.5 z / (1 + |z|)`` with
  ``z = (x - threshold) / (max - min)`` (:func:`normalize_scores`), strictly increasing on the
  whole real line, so nothing is clamped and nothing ties: the metrics of normalised scores equal
  those of the raw scores, and ``0.5`` is still the threshold;
* **decisions fail safe and agree**: a score that is NaN (a part that could not be scored) is
  flagged defective; with support or calibrated thresholds a part judged OK has no flagged pixel
  and a part judged defective has at least its peak pixel flagged.

Example:
    >>> from anomalib_protorefine.thresholds import SupportThresholds
    >>> post = FewShotPostProcessor(threshold="support")
    >>> post.set_support_thresholds(SupportThresholds(2.0, 3.0, 0.0, 4.0, 0.0, 6.0, 1.5, 2, 6, True))
    >>> float(post.image_threshold), post.threshold_origin
    (2.0, 'support')
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from anomalib.data import Batch, InferenceBatch
from anomalib.post_processing import PostProcessor
from lightning import LightningModule, Trainer

from anomalib_protorefine import upstream
from anomalib_protorefine.false_alarm import LineCalibration
from anomalib_protorefine.thresholds import SupportThresholds, check_threshold_source, is_set

logger = logging.getLogger(__name__)

#: Where the thresholds in force came from (``FewShotPostProcessor.threshold_origin``).
ORIGINS = ("none", "support", "calibration", "validation")
#: Origins whose decisions are made consistent (an OK part has no flagged pixel, a defective one its peak).
CONSISTENT_ORIGINS = ("support", "calibration")


def normalize_scores(
    preds: torch.Tensor, norm_min: torch.Tensor, norm_max: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    """Map raw scores into ``(0, 1)`` strictly increasingly, the threshold to ``0.5``.

    ``0.5 + 0.5 z / (1 + |z|)`` with ``z = (x - threshold) / (max - min)``: no clamp, so the ranking of
    the raw scores (and any threshold-free metric) is kept; a value one range above the threshold maps
    to 0.75, ten ranges above to about 0.955. NaN stays NaN. Without a range (NaN min or max) the raw
    scores are returned, as anomalib does; a zero range counts as a range of one.

    Example:
        >>> x = torch.tensor([-100.0, 0.0, 1.0, 2.0, 3.0, 1e4])
        >>> [round(v, 5) for v in normalize_scores(x, torch.tensor(0.0), torch.tensor(2.0), torch.tensor(1.0)).tolist()]
        [0.00971, 0.33333, 0.5, 0.66667, 0.75, 0.9999]
    """
    threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
    value_range = norm_max - norm_min
    safe_range = torch.where(value_range > 0, value_range, torch.ones_like(value_range))
    z = (preds - threshold) / safe_range
    normalized = 0.5 + 0.5 * z / (1.0 + z.abs())
    has_range = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
    return torch.where(has_range, normalized, preds)


def write_thresholds(
    post_processor: PostProcessor, thresholds: SupportThresholds | LineCalibration, origin: str
) -> None:
    """Copy thresholds and normalisation range into any anomalib post-processor's buffers.

    Example:
        >>> from anomalib.post_processing import PostProcessor
        >>> post = PostProcessor()
        >>> write_thresholds(post, SupportThresholds(2.0, 3.0, 0.0, 4.0, 0.0, 6.0, 1.5, 2, 6, True), "support")
        >>> float(post.pixel_threshold), float(post.pixel_max)
        (3.0, 6.0)
    """
    if origin not in ORIGINS:
        msg = f"origin must be one of {ORIGINS}, got {origin!r}."
        raise ValueError(msg)
    for name, buffer in upstream.decision_buffers(post_processor).items():
        buffer.copy_(torch.tensor(getattr(thresholds, name), dtype=buffer.dtype))
    if isinstance(post_processor, FewShotPostProcessor):
        post_processor.threshold_origin = origin


def write_support_thresholds(post_processor: PostProcessor, thresholds: SupportThresholds) -> None:
    """Copy support thresholds and normalisation range into any anomalib post-processor's buffers.

    Example:
        >>> from anomalib.post_processing import PostProcessor
        >>> post = PostProcessor()
        >>> write_support_thresholds(post, SupportThresholds(2.0, 3.0, 0.0, 4.0, 0.0, 6.0, 1.5, 2, 6, True))
        >>> float(post.pixel_threshold), float(post.pixel_max)
        (3.0, 6.0)
    """
    write_thresholds(post_processor, thresholds, "support")


def clear_thresholds(post_processor: PostProcessor) -> None:
    """Set the thresholds and normalisation range of a post-processor back to NaN (not set).

    Example:
        >>> post = FewShotPostProcessor()
        >>> write_support_thresholds(post, SupportThresholds(2.0, 3.0, 0.0, 4.0, 0.0, 6.0, 1.5, 2, 6, True))
        >>> clear_thresholds(post)
        >>> bool(post.image_threshold.isnan()), post.threshold_origin
        (True, 'none')
    """
    for buffer in upstream.decision_buffers(post_processor).values():
        buffer.fill_(float("nan"))
    if isinstance(post_processor, FewShotPostProcessor):
        post_processor.threshold_origin = "none"


def consistent_masks(pred_label: torch.Tensor, pred_mask: torch.Tensor, anomaly_map: torch.Tensor) -> torch.Tensor:
    """Masks that agree with the image decisions: empty for OK parts, at least the peak for defective ones.

    Pixels that are NaN in the map are flagged with their image (they could not be scored).

    Example:
        >>> maps = torch.tensor([[[0.2, 0.4]], [[0.3, 0.45]], [[0.6, 0.9]]])
        >>> consistent_masks(torch.tensor([False, True, True]), maps > 0.5, maps).tolist()
        [[[False, False]], [[False, True]], [[True, True]]]
    """
    extra = (1,) * (pred_mask.ndim - pred_label.ndim)
    label = pred_label.reshape(*pred_label.shape, *extra).bool()
    peak = anomaly_map.flatten(pred_label.ndim).amax(-1).reshape(*pred_label.shape, *extra)
    return (pred_mask.bool() | (anomaly_map >= peak) | torch.isnan(anomaly_map)) & label


class FewShotPostProcessor(PostProcessor):
    """anomalib's post-processor whose thresholds can come from the support images (see the module docstring).

    Args:
        threshold: ``"auto"``, ``"support"`` or ``"validation"``.
        **kwargs: anomalib's ``PostProcessor`` arguments (``image_sensitivity``, ``pixel_sensitivity``, ...).
    """

    def __init__(self, threshold: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = check_threshold_source(threshold)
        self.threshold_origin = "none"
        self._validation_images = 0
        self._validation_defects = 0

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        """Anomalib's keys plus the threshold source and the origin of the thresholds in force."""
        return (*super()._checkpoint_config_keys, "threshold", "threshold_origin")

    def set_support_thresholds(self, thresholds: SupportThresholds) -> None:
        """Put support thresholds in force (see :func:`write_support_thresholds`)."""
        write_support_thresholds(self, thresholds)

    @property
    def has_thresholds(self) -> bool:
        """Both thresholds are set."""
        buffers = upstream.decision_buffers(self)
        return is_set(buffers["image_threshold"]) and is_set(buffers["pixel_threshold"])

    def set_calibrated_thresholds(self, calibration: LineCalibration) -> None:
        """Put thresholds calibrated on images of the line in force (they stay through validation passes)."""
        write_thresholds(self, calibration, "calibration")

    def _keeps_support_thresholds(self) -> bool:
        """Whether this validation pass leaves the support (or calibrated) thresholds in force."""
        if self.threshold_origin == "calibration":
            return True
        if self.threshold_origin != "support":
            return False
        return self.threshold == "support" or (self.threshold == "auto" and self._validation_defects == 0)

    def _fixed(self) -> bool:
        """The thresholds in force are not for a validation pass to change."""
        return self.threshold_origin == "calibration" or (
            self.threshold == "support" and self.threshold_origin == "support"
        )

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None, norm_min: torch.Tensor, norm_max: torch.Tensor, threshold: torch.Tensor
    ) -> torch.Tensor | None:
        """Strictly increasing normalisation (:func:`normalize_scores`) instead of anomalib's clamped one."""
        if preds is None:
            return preds
        return normalize_scores(preds, norm_min, norm_max, threshold)

    @staticmethod
    def _apply_threshold(preds: torch.Tensor | None, threshold: torch.Tensor) -> torch.Tensor | None:
        """``preds > threshold`` as anomalib applies it, NaN flagged (a part that cannot be scored never passes)."""
        if preds is None:
            return preds
        if not torch.compiler.is_compiling() and torch.isnan(threshold).item():
            return preds
        return (preds > threshold) | torch.isnan(preds)

    @property
    def consistent_decisions(self) -> bool:
        """Masks follow the image decisions (support or calibrated thresholds in force)."""
        return self.enable_thresholding and self.threshold_origin in CONSISTENT_ORIGINS

    def forward(self, predictions: InferenceBatch) -> InferenceBatch:
        """Post-process as anomalib does (also in exported graphs), with masks that agree with the image decisions."""
        output = super().forward(predictions)
        if self.consistent_decisions and output.pred_mask is not None and output.pred_label is not None:
            output = output._replace(
                pred_mask=consistent_masks(output.pred_label, output.pred_mask, output.anomaly_map)
            )
        return output

    def threshold_batch(self, batch: Batch) -> None:
        """Threshold a batch as anomalib does, with masks that agree with the image decisions."""
        super().threshold_batch(batch)
        if self.consistent_decisions and batch.pred_mask is not None and batch.pred_label is not None:
            batch.pred_mask = consistent_masks(batch.pred_label, batch.pred_mask, batch.anomaly_map)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start counting the validation images and the defective ones among them."""
        del trainer, pl_module
        self._validation_images = 0
        self._validation_defects = 0

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any, **kwargs: Any
    ) -> None:
        """Count the batch's images and defects, then update anomalib's metrics (unless the support ones stay)."""
        labels = getattr(outputs, "gt_label", None)
        if labels is not None:
            self._validation_images += int(labels.numel())
            self._validation_defects += int((labels > 0).sum())
        if self._fixed():
            return
        super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the support thresholds or compute anomalib's, and log which are in force."""
        name = type(pl_module).__name__
        seen = f"{self._validation_images} validation images, {self._validation_defects} defective"
        if self._keeps_support_thresholds():
            for metric in upstream.threshold_metrics(self):
                metric.reset()
            if self.threshold_origin == "calibration":
                kind, reason = "calibrated", "set at the requested false-alarm rate"
            else:
                kind = "support"
                reason = "threshold='support'" if self.threshold == "support" else "no defective validation images"
            logger.info("%s: %s thresholds stay in force (%s; %s).", name, kind, reason, seen)
            return
        pixel_seen = upstream.pixel_threshold_seen(self)
        previous = self.threshold_origin
        super().on_validation_epoch_end(trainer, pl_module)
        if self._validation_images:
            self.threshold_origin = "validation"
            pixel_origin = (
                "F1-adaptive"
                if pixel_seen
                else f"kept from the {previous} thresholds: the validation images have no masks"
                if previous != "none"
                else "the image threshold: the validation images have no masks"
            )
            logger.info(
                "%s: image threshold from the validation pass (%s; F1-adaptive): %.4g; pixel threshold %.4g (%s).",
                name,
                seen,
                float(self.image_threshold),
                float(self.pixel_threshold),
                pixel_origin,
            )
            if not self._validation_defects:
                logger.warning(
                    "%s: the validation images hold no defective one: anomalib's thresholds are the highest "
                    "good-image scores (few false alarms, possibly many misses).",
                    name,
                )
