"""The few-shot model base: what PatchCorePlus, AnomalyDINOPlus and WinClipPlus share (see docs/architecture.md).

Example:
    >>> from anomalib_protorefine import AnomalyDINOPlus, PatchCorePlus, WinClipPlus
    >>> all(issubclass(model, FewShotModel) for model in (PatchCorePlus, AnomalyDINOPlus, WinClipPlus))
    True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_protorefine import upstream
from anomalib_protorefine.post_processing import FewShotPostProcessor
from anomalib_protorefine.reporting import PredictionReport
from anomalib_protorefine.visualization import DecisionVisualizer

from .callbacks import (
    RefinementStatsCallback,
    UnreadableImageNote,
    install_checkpoint_notice_filter,
    warn_about_flat_images,
)
from .checkpoints import CheckedCheckpointIO, CheckpointMixin
from .export import FewShotExportMixin
from .line_calibration import LineCalibrationMixin
from .support import SupportMixin
from .support_thresholds import ThresholdMixin

logger = logging.getLogger(__name__)

__all__ = ["FewShotModel"]


class FewShotModel(SupportMixin, ThresholdMixin, LineCalibrationMixin, CheckpointMixin, FewShotExportMixin):
    """The few-shot model base: construction order, support, thresholds, checkpoints, export, owned once.

    A model lists it before its upstream anomalib model in its bases (``class PatchCorePlus(FewShotModel,
    AnomalibModule)``) and fills in the contract:

    * construction, in this order: validate the arguments, build the refiner (:func:`make_refiner` with
    :attr:`refiner_presets` / :attr:`refiner_default_preset`), the upstream constructor, the torch model,
    then ``_store_plain_hparams()``, ``k_shot``, ``few_shot_seed``, ``few_shot_source``,
    ``support_augmentation``, ``support_paths = ()`` and last ``_init_thresholds(threshold,
    false_alarm_rate, calibration_source)`` (each setter checks itself against the ones before it);
    * :meth:`fit_support` (build the support data from pre-processed images), :meth:`_ensure_ready`
    (draw and build it when missing), :meth:`_support_ready` and :meth:`_reset_support`;
    * :attr:`score_options`: the options a checkpoint restores (:class:`~.checkpoints.ScoreOption`);
    * a torch model that implements :class:`~anomalib_protorefine.models.contract.FewShotTorchModel`.

    What anomalib or Lightning do not promise goes through :mod:`anomalib_protorefine.upstream`.
    """

    #: Whether the few-shot benchmark scores the model on cached test features (``MemoryBankTorchModel``).
    cached_features: ClassVar[bool] = False
    #: The constructor arguments that determine the test features (with the image size), for feature caches.
    feature_arguments: ClassVar[tuple[str, ...]] = ()
    #: Whether building the model loads weights that may be missing here (checked before a benchmark runs).
    loads_hub_weights: ClassVar[bool] = False
    #: Whether the torch model honours anomalib's tiler (``model.model.tiler``).
    tiles: ClassVar[bool] = False

    model: Any

    support_paths: tuple[str, ...]

    hparams: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A pre-processor module passed by the user (not ``True``, the model's default) is the input size
        # they asked for; a checkpoint that replaces it with another size is then worth a warning.
        self.__dict__["_pre_processor_given"] = not isinstance(kwargs.get("pre_processor", True), bool)

    @classmethod
    def pre_processor_for(cls, image_size: tuple[int, int] | None, arguments: dict[str, Any]) -> Any:
        """The pre-processor of a model built with ``arguments`` at ``image_size`` (``None``: the model's default)."""
        del arguments
        return cls.configure_pre_processor(image_size)  # type: ignore[attr-defined]

    def fit_support(self, images: torch.Tensor) -> None:
        """Build the support data from pre-processed support images ``(k, 3, H, W)`` (implemented by the model)."""
        raise NotImplementedError

    def _ensure_ready(self, datamodule: object | None = None) -> None:
        """Prepare the support data before evaluation (implemented by the model)."""
        raise NotImplementedError

    def _support_ready(self) -> bool:
        """Whether the support data (bank, references) is built (implemented by the model)."""
        raise NotImplementedError

    def _reset_support(self) -> None:
        """Forget the support data (memory bank / reference embeddings) so it is rebuilt (implemented by the model)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Check a ``ckpt_path`` file before Lightning loads it; skip validation when the data has none.

        Lightning runs this hook before the restore and after the datamodule's ``setup``. anomalib's
        ``Engine`` validates few-shot models before testing and predicting, and ``fit`` validates after
        the epoch; a datamodule built with ``val_split_mode="none"`` (good images only) has no
        validation set, where anomalib would fail with ``AttributeError: ... 'val_data'``. Validation
        is then skipped for this run: the thresholds come from the support images or ``calibration_source``.
        """
        super().setup(stage)  # type: ignore[misc]
        trainer = self.trainer  # type: ignore[attr-defined]
        upstream.wrap_checkpoint_loader(trainer, CheckedCheckpointIO, CheckedCheckpointIO)
        datamodule = getattr(trainer, "datamodule", None)
        if stage == "validate" and datamodule is None:
            self._skip_validation_without_data(trainer)
            return
        if stage not in {"fit", "validate"} or datamodule is None:
            return
        if not self._set_validation_skipped(trainer, skip=not len(upstream.validation_data_of(datamodule) or ())):
            return
        logger.info(
            "%s: the datamodule has no validation images (e.g. val_split_mode='none'): no validation pass; the "
            "thresholds come from %s.",
            type(self).__name__,
            "calibration_source" if self.calibration_source is not None else "the support images",
        )
        if stage == "validate" and self.k_shot:
            # anomalib's Engine.fit of a few-shot model is this validation pass: build what it would have
            # built, and write the checkpoint its checkpoint callback writes at the end of validation.
            self._ensure_ready()
            self._ensure_calibrated()
            self.__dict__["_checkpoint_at_teardown"] = True

    def _skip_validation_without_data(self, trainer: Any) -> None:
        """Skip a validation pass that has neither a datamodule nor dataloaders (only :meth:`val_dataloader`'s none).

        anomalib's ``Engine.predict(model, data_path=...)`` / ``anomalib predict --data <folder>`` (and
        ``Engine.test`` with dataloaders) validate few-shot models first; Lightning would then ask the
        model for its empty list and warn "Total length of `list` across ranks is zero". The pass is
        skipped instead; the support data and thresholds are built when the run starts.
        """
        self._set_validation_skipped(trainer, skip=upstream.validation_source_is(trainer, self))

    def _set_validation_skipped(self, trainer: Any, *, skip: bool) -> bool:
        """Skip this run's validation (``limit_val_batches=0``) or restore the limit a skipped run replaced."""
        saved = self.__dict__.get("_limit_val_batches")
        if not skip:
            if saved is not None:  # a run without validation data before: this one has some again
                upstream.set_validation_batches(trainer, saved)
                self.__dict__["_limit_val_batches"] = None
            return False
        if saved is None:
            self.__dict__["_limit_val_batches"] = upstream.validation_batches(trainer)
        upstream.set_validation_batches(trainer, 0)
        return True

    def teardown(self, stage: str) -> None:
        """Write the checkpoint of a validation pass that was skipped for want of validation images (see ``setup``)."""
        super().teardown(stage)  # type: ignore[misc]
        if self.__dict__.pop("_checkpoint_at_teardown", False):
            self._write_checkpoint("no validation images")

    def on_fit_end(self) -> None:
        """Write the checkpoint that anomalib's checkpoint callback writes after validation, when none was written."""
        super().on_fit_end()  # type: ignore[misc]
        self._write_checkpoint("no validation pass")

    def _write_checkpoint(self, reason: str) -> None:
        """Save to the trainer's checkpoint callback file (``weights/lightning/model.ckpt``) unless it saved already.

        anomalib saves few-shot models at the end of a validation pass; a fit on good images only
        (``val_split_mode="none"``) has none, and the bank, thresholds and options would never be saved.
        """
        trainer = self.trainer  # type: ignore[attr-defined]
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None or callback.best_model_path or callback.last_model_path:
            return
        path = Path(callback.dirpath) / f"{callback.filename or 'model'}{callback.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        upstream.mark_checkpoint_written(callback, str(path))
        logger.info("%s: checkpoint written to %s (%s to trigger it).", type(self).__name__, path, reason)

    def on_validation_start(self) -> None:
        """Prepare the support data (and the line calibration) before validation."""
        self._forget_support_of_another_datamodule()
        self._ensure_ready()
        self._ensure_calibrated()

    def on_test_start(self) -> None:
        """Prepare the support data (and the line calibration) before testing."""
        self._forget_support_of_another_datamodule()
        self._ensure_ready()
        self._ensure_calibrated()
        self._warn_if_uncalibrated("test")

    def on_predict_start(self) -> None:
        """Prepare the support data (and the line calibration) before prediction."""
        self._forget_support_of_another_datamodule()
        self._ensure_ready()
        self._ensure_calibrated()
        self._warn_if_uncalibrated("predict")

    def val_dataloader(self) -> list:
        """No validation data of the model's own: used only when neither a datamodule nor dataloaders are given.

        ``Engine.predict(model, data_path=...)`` (and ``anomalib predict --data <folder>``) validate
        few-shot models first without any validation data; Lightning then asks the model. Returning
        no batches skips that validation: the support images come from ``few_shot_source`` and the
        missing thresholds are reported by a warning when prediction starts.
        """
        return []

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:  # noqa: ANN002, ANN003
        """Score a batch (refined or plain) and attach ``pred_score`` and ``anomaly_map``."""
        del args, kwargs
        warn_about_flat_images(batch)
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def test_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:  # noqa: ANN002, ANN003
        """Anomalib's test step, after a check for images read as one flat value."""
        warn_about_flat_images(batch)
        return super().test_step(batch, batch_idx, *args, **kwargs)  # type: ignore[misc]

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:
        """Anomalib's predict step, after a check for images read as one flat value."""
        warn_about_flat_images(batch)
        return super().predict_step(batch, batch_idx, dataloader_idx)  # type: ignore[misc]

    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        """Anomalib's component callbacks, the refinement statistics and the per-image report of predictions.

        :class:`~anomalib_protorefine.reporting.PredictionReport` writes ``predictions.csv`` / ``.json``
        beside the pictures and one console line "N of M parts flagged" (predict only). A report the
        user gave the trainer is kept (Lightning would replace it by the model's).
        :class:`UnreadableImageNote` names the file behind an image decoding error of the dataloader.
        """
        callbacks = [*super().configure_callbacks(), RefinementStatsCallback(), UnreadableImageNote()]  # type: ignore[misc]
        try:
            given = self.trainer.callbacks  # type: ignore[attr-defined]
        except RuntimeError:  # not attached to a trainer
            given = []
        if not any(isinstance(callback, PredictionReport) for callback in given):
            callbacks.append(PredictionReport())
        return callbacks

    @classmethod
    def configure_visualizer(cls) -> DecisionVisualizer:
        """Pictures that show the decision: score, OK / defective, colour bar, flagged outline, the peak."""
        return DecisionVisualizer()

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing to optimise: the models are training-free."""
        return

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """The post-processor: :class:`FewShotPostProcessor` (thresholds may come from the support images)."""
        return FewShotPostProcessor()


install_checkpoint_notice_filter()
