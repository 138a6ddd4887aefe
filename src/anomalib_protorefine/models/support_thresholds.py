"""Where a few-shot model's thresholds come from (``threshold``) and the support thresholds.

Example:
    >>> from anomalib_protorefine import PatchCorePlus
    >>> PatchCorePlus(backbone="resnet18", layers=("layer2",), pre_trained=False).threshold
    'auto'
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.post_processing import PostProcessor

from anomalib_protorefine import upstream
from anomalib_protorefine.calibration import split_transform
from anomalib_protorefine.false_alarm import validate_false_alarm_rate
from anomalib_protorefine.few_shot import (
    check_support_images,
    load_images,
)
from anomalib_protorefine.post_processing import (
    FewShotPostProcessor,
    clear_thresholds,
    write_support_thresholds,
)
from anomalib_protorefine.thresholds import (
    SupportScores,
    SupportThresholds,
    choose_thresholds,
    collect_support_scores,
    describe,
    validate_threshold,
)

logger = logging.getLogger(__name__)

__all__ = ["ThresholdMixin"]


class ThresholdMixin:
    """The ``threshold`` option and the support thresholds (part of :class:`~.base.FewShotModel`)."""

    # ------------------------------------------------------------------ thresholds
    @property
    def threshold(self) -> str:
        """Where the thresholds come from: ``"auto"``, ``"support"`` or ``"validation"``.

        Setting it checks the value as the constructor does and hands it to the post-processor.
        """
        try:
            return self.__dict__["_threshold"]
        except KeyError:
            raise AttributeError("threshold") from None

    @threshold.setter
    def threshold(self, value: str) -> None:
        value = validate_threshold(value, self.__dict__.get("_k_shot"), self.__dict__.get("_few_shot_source"))
        if value == "validation" and self.__dict__.get("_calibration_source") is not None:
            msg = (
                "threshold='validation' asks for anomalib's thresholds from a labelled validation pass, but "
                "calibration_source sets them from images of the line: set calibration_source=None first, or keep "
                "threshold='auto'."
            )
            raise ValueError(msg)
        self.__dict__["_threshold"] = value
        upstream.set_stored_hparam(self, "threshold", value)
        post_processor = getattr(self, "post_processor", None)
        if isinstance(post_processor, FewShotPostProcessor):
            post_processor.threshold = value

    support_thresholds: SupportThresholds | None

    support_scores: SupportScores | None

    def _init_thresholds(
        self,
        threshold: str,
        false_alarm_rate: float | None = None,
        calibration_source: str | Path | None = None,
    ) -> None:
        """No thresholds yet; validate the threshold options and hand ``threshold`` to the post-processor.

        Runs after ``k_shot`` is set. ``calibration_source`` is checked for its type here and for its
        images when it is used (a checkpoint made with it loads without the folder).
        """
        self.support_thresholds = None
        self.support_scores = None
        self.line_calibration = None
        self._set_threshold_source(threshold)
        self.__dict__["_false_alarm_rate"] = validate_false_alarm_rate(false_alarm_rate)
        self.calibration_source = calibration_source

    def _set_threshold_source(self, threshold: str) -> None:
        """Set ``threshold`` (constructor, checkpoint): the model's attribute and its post-processor's."""
        self.threshold = threshold

    def _wants_support_thresholds(self) -> bool:
        """Support thresholds are computed with ``threshold`` ``"support"`` or ``"auto"`` (never for "validation").

        Not with ``calibration_source``: the line calibration sets the thresholds.
        """
        return getattr(self, "threshold", "validation") != "validation" and self.calibration_source is None

    @contextlib.contextmanager
    def calibration_scoring(self) -> Iterator[None]:
        """Scoring of pseudo images: eval mode, no gradients (models with scoring state extend it)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def calibrate_thresholds(self, paths: Sequence[str]) -> SupportThresholds | None:
        """Image and pixel thresholds and the normalisation range from the support image files alone.

        The files are read and resized by the pre-processor's geometric steps, then
        :meth:`calibrate_thresholds_from_images` does the rest.

        Args:
            paths: The support image files.

        Returns:
            The thresholds, or ``None`` when ``threshold="auto"`` and the pre-processor has no
            ``Normalize`` step to paste defects before (a warning says so).

        Raises:
            ValueError: ``threshold="support"`` and the pre-processor cannot be split.
        """
        split = self._split_pre_processing()
        if split is None:
            return None
        geometric, _ = split
        return self.calibrate_thresholds_from_images(load_images(paths, geometric))

    def _split_pre_processing(self) -> tuple[Any, Any] | None:
        """The pre-processor's geometric and photometric steps (``None``: cannot split, warned under "auto")."""
        pre_processor = getattr(self, "pre_processor", None)
        transform = pre_processor.transform if pre_processor is not None else None
        what = "support thresholds (threshold='support' or 'auto')"
        try:
            return split_transform(transform, what=what, alternative="threshold='validation'")
        except ValueError as error:
            if self.threshold == "support":
                raise
            msg = f"{type(self).__name__}: no support thresholds: {error}"
            warnings.warn(msg, UserWarning, stacklevel=3)
            return None

    def calibrate_thresholds_from_images(self, images: torch.Tensor) -> SupportThresholds | None:
        """Thresholds from support images ``(k, 3, H, W)`` in ``[0, 1]`` at the model's input size (not normalised).

        Augmented copies of the support images are scored against the bank of all of them, clean and
        with synthetic defects pasted in, with the model's own refiner, scoring and anomaly map
        (:mod:`anomalib_protorefine.thresholds`); the result goes into the post-processor and
        :attr:`support_thresholds`. The support data is left built from all support images.

        Example:
            >>> import torch
            >>> from anomalib_protorefine import PatchCorePlus
            >>> model = PatchCorePlus(backbone="resnet18", layers=("layer2",), pre_trained=False, refiner=False)
            >>> support = torch.rand(2, 3, 64, 64)
            >>> thresholds = model.calibrate_thresholds_from_images(support)
            >>> model.fit_support(model.pre_processor.transform.transforms[1](support))
            >>> float(model.post_processor.image_threshold) == thresholds.image_threshold
            True
        """
        check_support_images(images, preprocessed=False)
        split = self._split_pre_processing()
        if split is None:
            return None
        _, photometric = split
        scores = self.support_pseudo_scores(images, photometric)
        thresholds = choose_thresholds(scores)
        self.support_scores = scores
        self.support_thresholds = thresholds
        post_processor = getattr(self, "post_processor", None)
        if isinstance(post_processor, PostProcessor):
            write_support_thresholds(post_processor, thresholds)
        logger.info("%s: support thresholds %s.", type(self).__name__, describe(thresholds))
        return thresholds

    def support_pseudo_scores(self, images: torch.Tensor, photometric: Any, held_out: str = "copies") -> SupportScores:
        """Pseudo-normal and pseudo-defect scores of support images, with the model's own scoring and maps.

        Args:
            images: Support images ``(k, 3, H, W)`` in ``[0, 1]`` at the model's input size.
            photometric: The pre-processor's photometric steps (applied before scoring).
            held_out: The construction of the pseudo-normal images (:data:`~anomalib_protorefine.thresholds.HELD_OUT`).

        Returns:
            The scores. With ``"copies"`` the support data is left built from all images; with
            ``"leave_one_out"`` from a subset (the caller rebuilds it).
        """

        def score(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            output = self.model(batch.to(self.device))
            return output.pred_score, output.anomaly_map

        with self.calibration_scoring():
            return collect_support_scores(
                images, photometric, self.fit_support, score, seed=self.few_shot_seed, held_out=held_out
            )

    def _forget_support_thresholds(self) -> None:
        """The support changed: support (and calibrated) thresholds no longer apply (recomputed with the support)."""
        self.support_thresholds = None
        self.support_scores = None
        if getattr(self, "line_calibration", None) is not None:
            self._forget_line_calibration()
        post_processor = getattr(self, "post_processor", None)
        if isinstance(post_processor, FewShotPostProcessor) and post_processor.threshold_origin == "support":
            clear_thresholds(post_processor)

    def _warn_if_uncalibrated(self, stage: str) -> None:
        """Warn loudly when the post-processor has no thresholds (no validation pass ran, no checkpoint)."""
        post_processor = getattr(self, "post_processor", None)
        if not isinstance(post_processor, PostProcessor):
            return
        thresholds = (post_processor.image_threshold, post_processor.pixel_threshold)
        if not any(bool(torch.isnan(threshold).all()) for threshold in thresholds):
            origin = getattr(post_processor, "threshold_origin", "none")
            sources = {
                "support": "the support images",
                "validation": "a validation pass",
                "calibration": "calibration images of the line",
            }
            logger.info(
                "%s decides with thresholds from %s: image %.4g, pixel %.4g (raw scores; pred_label = score above it).",
                type(self).__name__,
                sources.get(origin, "a checkpoint or a validation pass"),
                float(post_processor.image_threshold),
                float(post_processor.pixel_threshold),
            )
            return
        name = type(self).__name__
        msg = (
            f"{name} has no adaptive thresholds or normalisation statistics: no validation pass ran before "
            f"{stage}, no checkpoint provided them and no support thresholds were computed "
            f"(threshold={getattr(self, 'threshold', None)!r}). pred_score and anomaly_map are raw, unnormalised "
            "scores, pred_label / pred_mask are not thresholded (meaningless), and threshold-dependent metrics "
            "(F1Score) are invalid. Fix: set k_shot with threshold='auto' or 'support' (thresholds from the support "
            "images), or validate on labelled data (normal and defective images) first: "
            f"`trainer.validate(model, datamodule=...)` before `trainer.{stage}(...)`, or anomalib's `Engine` with "
            "a datamodule (it validates few-shot models first), or load a checkpoint made that way "
            "(`ckpt_path=...`, CLI `--ckpt_path`)."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
