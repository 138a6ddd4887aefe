"""Lightning glue shared by the refined few-shot models (PatchCorePlus, WinClipPlus).

Example:
    >>> from anomalib_protorefine.models.common import RefinedFewShotMixin
    >>> from anomalib_protorefine import PatchCorePlus
    >>> issubclass(PatchCorePlus, RefinedFewShotMixin)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_protorefine.refinement import PrototypeRefiner


def make_refiner(
    refiner: bool | str | PrototypeRefiner | dict[str, Any],
    presets: Mapping[str, dict[str, Any]],
    default: str,
) -> PrototypeRefiner | None:
    """Turn the ``refiner`` argument of a model into a refiner (or ``None`` for the baseline).

    Args:
        refiner: ``True`` (the model's ``default`` preset), ``False`` or ``"off"`` (no refinement),
            a preset name (e.g. ``"paper"``), a refiner, or a dict of :class:`PrototypeRefiner`
            arguments that override the default preset (checkpoints store the full dict).
        presets: The model's named settings (preset name -> refiner arguments).
        default: The preset used for ``True`` and as the base of a dict.

    Returns:
        The refiner or ``None``.

    Example:
        >>> make_refiner("paper", {"paper": {"lambda_": 0.3}}, default="paper").options.lambda_
        0.3
    """
    if isinstance(refiner, PrototypeRefiner):
        return refiner
    if isinstance(refiner, bool):
        return PrototypeRefiner(**presets[default]) if refiner else None
    if isinstance(refiner, str):
        if refiner == "off":
            return None
        if refiner not in presets:
            names = ", ".join(repr(name) for name in (*presets, "off"))
            msg = f"refiner={refiner!r} is not a preset: use one of {names}, True, False or a dict of options."
            raise ValueError(msg)
        return PrototypeRefiner(**presets[refiner])
    if isinstance(refiner, dict):
        return PrototypeRefiner(**{**presets[default], **refiner})
    msg = (
        "refiner must be True, False, a preset name, a PrototypeRefiner or a dict of its arguments, "
        f"got {type(refiner).__name__}."
    )
    raise TypeError(msg)


class RefinedFewShotMixin:
    """Hooks shared by models whose torch model has a ``refiner`` and that build support data on demand.

    Subclasses list it before ``AnomalibModule`` in their bases and implement :meth:`_ensure_ready`
    (build the memory bank / reference embeddings from ``k_shot`` seeded support images if needed).
    """

    model: Any
    support_paths: tuple[str, ...]

    def _ensure_ready(self) -> None:
        """Prepare the support data before evaluation (implemented by the model)."""
        raise NotImplementedError

    def on_validation_start(self) -> None:
        """Prepare the support data before validation."""
        self._ensure_ready()

    def on_test_start(self) -> None:
        """Prepare the support data before testing (``anomalib test`` without a checkpoint)."""
        self._ensure_ready()

    def on_predict_start(self) -> None:
        """Prepare the support data before prediction."""
        self._ensure_ready()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:  # noqa: ANN002, ANN003
        """Score a batch (refined or plain) and attach ``pred_score`` and ``anomaly_map``."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        """Anomalib's component callbacks plus the refiner, which logs refinement statistics."""
        callbacks = list(super().configure_callbacks())  # type: ignore[misc]
        if self.model.refiner is not None:
            callbacks.append(self.model.refiner)
        return callbacks

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing to optimise: the models are training-free."""
        return

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Default post-processor (score normalisation and adaptive thresholds)."""
        return PostProcessor()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the refiner as plain options (loadable with ``weights_only``) and the support files."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        refiner = self.model.refiner
        checkpoint["hyper_parameters"]["refiner"] = refiner.options.as_dict() if refiner is not None else False
        checkpoint["protorefine_support_paths"] = list(self.support_paths)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the support file list."""
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        self.support_paths = tuple(checkpoint.get("protorefine_support_paths", ()))
