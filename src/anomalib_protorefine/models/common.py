"""Old home of the few-shot models' shared Lightning glue, now in modules named for what they hold.

Importing a name from here still works, with a ``FutureWarning`` naming its new module (see
docs/architecture.md): ``RefinedFewShotMixin`` is :class:`~anomalib_protorefine.models.base.FewShotModel`.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True):
    ...     warnings.simplefilter("always")
    ...     from anomalib_protorefine.models.common import make_refiner
    >>> make_refiner.__module__
    'anomalib_protorefine.models.refiner_config'
"""

from __future__ import annotations

from typing import Any

from anomalib_protorefine._deprecation import moved_names, warn_renamed

_MOVED = {
    "RefinerPreset": "anomalib_protorefine.models.refiner_config",
    "make_refiner": "anomalib_protorefine.models.refiner_config",
    "plain_refiner": "anomalib_protorefine.models.refiner_config",
    "refiner_option_names": "anomalib_protorefine.models.refiner_config",
    "check_checkpoint_file": "anomalib_protorefine.models.checkpoints",
    "CheckedCheckpointIO": "anomalib_protorefine.models.checkpoints",
    "input_size": "anomalib_protorefine.models.checkpoints",
    "fail_safe": "anomalib_protorefine.models.export",
    "quiet_loggers": "anomalib_protorefine.models.export",
    "release_inference_tensors": "anomalib_protorefine.models.export",
    "EXPORT_LOGGERS": "anomalib_protorefine.models.export",
    "RefinementStatsCallback": "anomalib_protorefine.models.callbacks",
    "UnreadableImageNote": "anomalib_protorefine.models.callbacks",
    "QuietCheckpointNotice": "anomalib_protorefine.models.callbacks",
    "warn_about_flat_images": "anomalib_protorefine.models.callbacks",
    "first_unreadable_image": "anomalib_protorefine.models.callbacks",
    "FLAT_SHARE": "anomalib_protorefine.models.callbacks",
    "DEFAULT_FALSE_ALARM_RATE": "anomalib_protorefine.models.line_calibration",
}
_moved = moved_names(__name__, _MOVED)


def __getattr__(name: str) -> Any:
    """Serve a moved name (``RefinedFewShotMixin``: :class:`FewShotModel`) with a ``FutureWarning``."""
    if name == "RefinedFewShotMixin":
        from anomalib_protorefine.models.base import FewShotModel

        warn_renamed(f"{__name__}.RefinedFewShotMixin", "anomalib_protorefine.models.base.FewShotModel")
        return FewShotModel
    return _moved(name)
