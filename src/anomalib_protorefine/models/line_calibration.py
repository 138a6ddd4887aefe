"""A false-alarm rate the user sets: thresholds calibrated on unlabelled images of the line.

Example:
    >>> DEFAULT_FALSE_ALARM_RATE
    0.05
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath

import torch
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor

from anomalib_protorefine import upstream
from anomalib_protorefine.false_alarm import LineCalibration, images_needed, validate_false_alarm_rate
from anomalib_protorefine.few_shot import (
    IMAGE_EXTENSIONS,
    check_support_images,
    folder_images,
    read_named_image,
)
from anomalib_protorefine.post_processing import (
    FewShotPostProcessor,
    clear_thresholds,
    write_thresholds,
)

logger = logging.getLogger(__name__)

__all__ = ["CALIBRATION_BATCH", "DEFAULT_FALSE_ALARM_RATE", "LineCalibrationMixin"]


#: The false-alarm rate of a calibration when none is given (``calibrate_false_alarm`` without ``false_alarm_rate``).
DEFAULT_FALSE_ALARM_RATE = 0.05


#: What an unreadable calibration image's error tells the user to do.
CALIBRATION_READ_FIX = "replace it or remove it from calibration_source."


#: Calibration images scored per forward pass.
CALIBRATION_BATCH = 16


class LineCalibrationMixin:
    """``false_alarm_rate``, ``calibration_source`` and the calibration (part of :class:`~.base.FewShotModel`)."""

    # ------------------------------------------------------------------ false-alarm rate
    line_calibration: LineCalibration | None

    @property
    def false_alarm_rate(self) -> float | None:
        """The share of good parts the user accepts to see flagged (``None``: the support rule decides).

        The image threshold is set so that this share of good parts is expected above it, from the
        scores of ``calibration_source`` (:mod:`anomalib_protorefine.false_alarm`). Setting it after a
        calibration re-estimates the thresholds from the stored calibration scores (no rescoring).
        """
        return self.__dict__.get("_false_alarm_rate")

    @false_alarm_rate.setter
    def false_alarm_rate(self, value: float | None) -> None:
        rate = validate_false_alarm_rate(value)
        self._store_false_alarm_rate(rate)
        if self.line_calibration is not None and rate is not None and rate != self.line_calibration.false_alarm_rate:
            self._put_calibration_in_force(self.line_calibration.at_rate(rate))

    def _store_false_alarm_rate(self, rate: float | None) -> None:
        """Keep ``false_alarm_rate`` and its ``hparams`` entry (checkpoints, ``hparams.yaml``) in step."""
        self.__dict__["_false_alarm_rate"] = rate
        upstream.set_stored_hparam(self, "false_alarm_rate", rate)

    @property
    def calibration_source(self) -> Path | None:
        """Folder of unlabelled images from the line (mostly good) that the thresholds are calibrated on."""
        return self.__dict__.get("_calibration_source")

    @calibration_source.setter
    def calibration_source(self, value: str | Path | None) -> None:
        if value is not None and not isinstance(value, str | PurePath):
            msg = (
                f"calibration_source must be a folder path (str or Path) or None, got {type(value).__name__} "
                f"{value!r}: e.g. calibration_source='/line/first_parts' (CLI --model.calibration_source ...)."
            )
            raise TypeError(msg)
        if value is not None and getattr(self, "threshold", None) == "validation":
            msg = (
                "calibration_source sets the thresholds from images of the line, but threshold='validation' asks for "
                "anomalib's thresholds from a labelled validation pass: drop one of them (threshold='auto' with "
                "calibration_source, or no calibration_source)."
            )
            raise ValueError(msg)
        path = Path(value).expanduser() if value is not None and str(value) != "" else None
        changed = path != self.__dict__.get("_calibration_source")
        self.__dict__["_calibration_source"] = path
        upstream.set_stored_hparam(self, "calibration_source", str(path) if path is not None else None)
        if changed and self.line_calibration is not None:
            self._forget_line_calibration()

    def calibration_paths(self) -> list[str]:
        """The image files of ``calibration_source``, checked: a folder with enough images for the rate.

        Raises:
            FileNotFoundError: ``calibration_source`` is not a folder.
            ValueError: Fewer image files than the requested rate needs.
        """
        folder = self.calibration_source
        if folder is None or not folder.is_dir():
            msg = (
                f"calibration_source={str(folder)!r} is not a folder: point it to a folder of unlabelled images of "
                "parts from the line (mostly good)."
            )
            raise FileNotFoundError(msg)
        paths = folder_images(folder)
        rate = self.false_alarm_rate or DEFAULT_FALSE_ALARM_RATE
        needed = images_needed(rate)
        if len(paths) < needed:
            msg = (
                f"calibration_source={str(folder)!r} holds {len(paths)} image file(s) ({', '.join(IMAGE_EXTENSIONS)}; "
                f"subfolders are not searched), but false_alarm_rate={rate:g} "
                f"needs at least {needed}: add images of parts from the line, or raise false_alarm_rate."
            )
            raise ValueError(msg)
        return paths

    def calibrate_false_alarm(
        self, source: str | Path | Sequence[str | Path] | torch.Tensor | None = None, rate: float | None = None
    ) -> LineCalibration:
        """Set the thresholds so that ``rate`` of good parts are expected above them, from unlabelled line images.

        The images are scored with the model's own scoring against its support data (built first
        when needed), and the good-score distribution is estimated robustly from them
        (:func:`~anomalib_protorefine.false_alarm.estimate_good_threshold`): a few defective parts
        among them do not drag the threshold up. The thresholds go into the post-processor (so
        checkpoints, ``anomalib predict`` and the exports decide with them) and :attr:`line_calibration`,
        and one line goes to the log.

        Args:
            source: A folder of images, a list of image files, or images ``(N, 3, H, W)`` in ``[0, 1]``
                (any size: the pre-processor resizes them). Default: ``calibration_source``.
            rate: The false-alarm rate. Default: ``false_alarm_rate``, else 0.05.

        Returns:
            The calibration (also in :attr:`line_calibration`).

        Raises:
            ValueError: Too few images for the rate, images not in ``[0, 1]``, or a rate outside (0, 0.5].
            FileNotFoundError: The folder does not exist.
        """
        rate = validate_false_alarm_rate(rate) or self.false_alarm_rate or DEFAULT_FALSE_ALARM_RATE
        self._store_false_alarm_rate(rate)
        batches, label = self._calibration_batches(source, rate)
        self._ensure_ready()
        scores, maxima, minimum = self._score_calibration_images(batches)
        calibration = LineCalibration.from_scores(scores, maxima, minimum, rate, label)
        self._put_calibration_in_force(calibration)
        return calibration

    def _calibration_batches(
        self, source: str | Path | Sequence[str | Path] | torch.Tensor | None, rate: float
    ) -> tuple[Iterator[torch.Tensor], str]:
        """Pre-processed calibration images in batches, and where they came from (checked before any scoring)."""
        pre_processor = getattr(self, "pre_processor", None)
        transform = pre_processor.transform if isinstance(pre_processor, PreProcessor) else None
        needed = images_needed(rate)
        if isinstance(source, torch.Tensor):
            if source.ndim != 4 or source.shape[1] != 3:
                msg = f"calibration images must be a batch (N, 3, H, W) in [0, 1], got shape {tuple(source.shape)}."
                raise ValueError(msg)
            check_support_images(source, preprocessed=False)
            if len(source) < needed:
                msg = (
                    f"{len(source)} calibration image(s) given, but false_alarm_rate={rate:g} needs at least {needed}: "
                    "add images of parts from the line, or raise false_alarm_rate."
                )
                raise ValueError(msg)

            def tensor_batches() -> Iterator[torch.Tensor]:
                for chunk in source.split(CALIBRATION_BATCH):
                    yield torch.stack([transform(image) for image in chunk]) if transform is not None else chunk

            return tensor_batches(), "images"
        if source is None or isinstance(source, str | PurePath):
            if source is not None:
                self.calibration_source = source
            if self.calibration_source is None:
                msg = (
                    "no calibration images: pass a folder, a list of files or images, or set calibration_source "
                    "(CLI --model.calibration_source /line/first_parts)."
                )
                raise ValueError(msg)
            paths = self.calibration_paths()
            label = str(self.calibration_source)
        else:
            paths = [str(path) for path in source]
            if len(paths) < needed:
                msg = (
                    f"{len(paths)} calibration image file(s) given, but false_alarm_rate={rate:g} needs at least "
                    f"{needed}: add images of parts from the line, or raise false_alarm_rate."
                )
                raise ValueError(msg)
            label = f"{len(paths)} files"

        def file_batches() -> Iterator[torch.Tensor]:
            for start in range(0, len(paths), CALIBRATION_BATCH):
                chunk = paths[start : start + CALIBRATION_BATCH]
                images = [read_named_image(path, "calibration image", CALIBRATION_READ_FIX) for path in chunk]
                yield torch.stack([transform(image) if transform is not None else image for image in images])

        return file_batches(), label

    def _score_calibration_images(self, batches: Iterator[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Image scores, anomaly-map maxima and the lowest map value of pre-processed batches (the model's scoring)."""
        scores, maxima, minimum = [], [], float("inf")
        with self.calibration_scoring():
            for chunk in batches:
                output = self.model(chunk.to(self.device))
                maps = output.anomaly_map.detach().float().cpu().reshape(len(chunk), -1)
                scores.append(output.pred_score.detach().float().cpu().reshape(-1))
                maxima.append(maps.amax(1))
                minimum = min(minimum, float(maps.min()))
        return torch.cat(scores), torch.cat(maxima), minimum

    def _put_calibration_in_force(self, calibration: LineCalibration) -> None:
        """Store a line calibration, write it into the post-processor and log it in one line."""
        self.line_calibration = calibration
        post_processor = getattr(self, "post_processor", None)
        if isinstance(post_processor, PostProcessor):
            write_thresholds(post_processor, calibration, "calibration")
        logger.info("%s: calibrated thresholds %s.", type(self).__name__, calibration.describe())

    def _ensure_calibrated(self) -> None:
        """Calibrate on ``calibration_source`` once the support data is ready (nothing when done or not asked)."""
        if self.calibration_source is not None and self.line_calibration is None:
            self.calibrate_false_alarm()
        elif self.calibration_source is None and self.false_alarm_rate is not None and self.line_calibration is None:
            self._warn_rate_without_calibration()

    def _warn_rate_without_calibration(self) -> None:
        """Say once that the support images alone cannot honour ``false_alarm_rate``."""
        if self.__dict__.get("_warned_rate"):
            return
        self.__dict__["_warned_rate"] = True
        k = self.k_shot
        spread = (
            "one support image shows no spread between good parts at all"
            if k == 1
            else f"{k} support images show too little spread between good parts to estimate it"
            if k
            else "the training images are in the bank, so their scores say nothing of new good parts"
        )
        msg = (
            f"{type(self).__name__}: false_alarm_rate={self.false_alarm_rate:g} cannot be honoured from the support "
            f"images alone ({spread}); the support rule decides instead, and the share of good parts it flags is "
            "unknown (measured from a few % to most good parts: docs/benchmarks.md, 'A false-alarm rate on the "
            "line'). Set calibration_source to a folder of unlabelled parts from the line (at least "
            f"{images_needed(self.false_alarm_rate)}; CLI --model.calibration_source /line/first_parts), or call "
            "model.calibrate_false_alarm(folder)."
        )
        warnings.warn(msg, UserWarning, stacklevel=3)

    def _forget_line_calibration(self) -> None:
        """The support changed: a line calibration against the old support data no longer applies."""
        self.line_calibration = None
        post_processor = getattr(self, "post_processor", None)
        if isinstance(post_processor, FewShotPostProcessor) and post_processor.threshold_origin == "calibration":
            clear_thresholds(post_processor)
