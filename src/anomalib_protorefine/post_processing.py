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
from anomalib.post_processing import PostProcessor
from lightning import LightningModule, Trainer

from anomalib_protorefine.thresholds import SupportThresholds, check_threshold_source, is_set

logger = logging.getLogger(__name__)

#: Where the thresholds in force came from (``FewShotPostProcessor.threshold_origin``).
ORIGINS = ("none", "support", "validation")


def write_support_thresholds(post_processor: PostProcessor, thresholds: SupportThresholds) -> None:
    """Copy support thresholds and normalisation range into any anomalib post-processor's buffers.

    Example:
        >>> from anomalib.post_processing import PostProcessor
        >>> post = PostProcessor()
        >>> write_support_thresholds(post, SupportThresholds(2.0, 3.0, 0.0, 4.0, 0.0, 6.0, 1.5, 2, 6, True))
        >>> float(post.pixel_threshold), float(post.pixel_max)
        (3.0, 6.0)
    """
    values = {
        "_image_threshold": thresholds.image_threshold,
        "_pixel_threshold": thresholds.pixel_threshold,
        "image_min": thresholds.image_min,
        "image_max": thresholds.image_max,
        "pixel_min": thresholds.pixel_min,
        "pixel_max": thresholds.pixel_max,
    }
    for name, value in values.items():
        buffer = getattr(post_processor, name)
        buffer.copy_(torch.tensor(value, dtype=buffer.dtype))
    if isinstance(post_processor, FewShotPostProcessor):
        post_processor.threshold_origin = "support"


def clear_thresholds(post_processor: PostProcessor) -> None:
    """Set the thresholds and normalisation range of a post-processor back to NaN (not set).

    Example:
        >>> post = FewShotPostProcessor()
        >>> write_support_thresholds(post, SupportThresholds(2.0, 3.0, 0.0, 4.0, 0.0, 6.0, 1.5, 2, 6, True))
        >>> clear_thresholds(post)
        >>> bool(post.image_threshold.isnan()), post.threshold_origin
        (True, 'none')
    """
    for name in ("_image_threshold", "_pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max"):
        getattr(post_processor, name).fill_(float("nan"))
    if isinstance(post_processor, FewShotPostProcessor):
        post_processor.threshold_origin = "none"


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
        return is_set(self._image_threshold) and is_set(self._pixel_threshold)

    def _keeps_support_thresholds(self) -> bool:
        """Whether this validation pass leaves the support thresholds in force."""
        if self.threshold_origin != "support":
            return False
        return self.threshold == "support" or (self.threshold == "auto" and self._validation_defects == 0)

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
        if self.threshold == "support" and self.threshold_origin == "support":
            return
        super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the support thresholds or compute anomalib's, and log which are in force."""
        name = type(pl_module).__name__
        seen = f"{self._validation_images} validation images, {self._validation_defects} defective"
        if self._keeps_support_thresholds():
            for metric in (
                self._image_threshold_metric,
                self._pixel_threshold_metric,
                self._image_min_max_metric,
                self._pixel_min_max_metric,
            ):
                metric.reset()
            reason = "threshold='support'" if self.threshold == "support" else "no defective validation images"
            logger.info("%s: support thresholds stay in force (%s; %s).", name, reason, seen)
            return
        super().on_validation_epoch_end(trainer, pl_module)
        if self._validation_images:
            self.threshold_origin = "validation"
            logger.info(
                "%s: thresholds from the validation pass (%s; F1-adaptive): image %.4g, pixel %.4g.",
                name,
                seen,
                float(self.image_threshold),
                float(self.pixel_threshold),
            )
            if not self._validation_defects:
                logger.warning(
                    "%s: the validation images hold no defective one: anomalib's thresholds are the highest "
                    "good-image scores (few false alarms, possibly many misses).",
                    name,
                )
