"""Exports that never write an empty model, and a forward that fails safe on images it cannot score.

Example:
    >>> EXPORT_LOGGERS[:2]
    ('onnxscript', 'onnx_ir')
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["EXPORT_LOGGERS", "FewShotExportMixin", "fail_safe", "quiet_loggers", "release_inference_tensors"]


def fail_safe(output: Any, invalid: torch.Tensor) -> Any:
    """An ``InferenceBatch`` whose images marked ``invalid`` get NaN scores and maps, the label defective, a full mask.

    Example:
        >>> from anomalib.data import InferenceBatch
        >>> maps = torch.zeros(2, 1, 2, 2)
        >>> out = InferenceBatch(pred_score=torch.tensor([0.2, 0.3]), pred_label=torch.tensor([False, False]),
        ...                      anomaly_map=maps, pred_mask=maps.bool())
        >>> safe = fail_safe(out, torch.tensor([False, True]))
        >>> safe.pred_label.tolist(), bool(safe.pred_score[1].isnan()), bool(safe.pred_mask[1].all())
        ([False, True], True, True)
    """

    def per_image(tensor: torch.Tensor) -> torch.Tensor:
        return invalid.reshape(-1, *([1] * (tensor.ndim - 1)))

    fields: dict[str, torch.Tensor] = {}
    nan = torch.tensor(float("nan"))
    for name in ("pred_score", "anomaly_map"):
        value = getattr(output, name, None)
        if value is not None:
            fields[name] = torch.where(per_image(value), nan.to(value.dtype), value)
    for name in ("pred_label", "pred_mask"):
        value = getattr(output, name, None)
        if value is not None:
            fields[name] = value.bool() | per_image(value)
    return output._replace(**fields)


#: Loggers of torch's ONNX exporter that report every graph pass at INFO.
EXPORT_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx")


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str], level: int = logging.WARNING) -> Iterator[None]:
    """Hold the named loggers at ``level`` or above while the block runs (restored afterwards).

    Example:
        >>> with quiet_loggers(["onnxscript"]):
        ...     logging.getLogger("onnxscript").level
        30
    """
    loggers = [logging.getLogger(name) for name in names]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(max(level, item.level))
    try:
        yield
    finally:
        for item, previous in zip(loggers, levels, strict=True):
            item.setLevel(previous)


def release_inference_tensors(module: torch.nn.Module) -> int:
    """Replace buffers and parameters made under ``torch.inference_mode`` by ordinary copies; return how many.

    A bank built while predicting or testing (Lightning runs both under inference mode) holds inference
    tensors, which ``torch.export`` (the ONNX and OpenVINO exports) refuses to trace.

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> with torch.inference_mode():
        ...     layer.register_buffer("bank", torch.ones(3))
        >>> release_inference_tensors(layer), layer.bank.is_inference()
        (1, False)
    """
    count = 0
    for sub in module.modules():
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer.is_inference():
                setattr(sub, name, buffer.clone())
                count += 1
        for name, parameter in list(sub.named_parameters(recurse=False)):
            if parameter.is_inference():
                setattr(sub, name, torch.nn.Parameter(parameter.clone(), parameter.requires_grad))
                count += 1
    return count


class FewShotExportMixin:
    """The forward and exports of a few-shot model (part of :class:`~anomalib_protorefine.models.base.FewShotModel`)."""

    def forward(self, batch: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run anomalib's pipeline (pre-processing, model, post-processing), failing safe on images it cannot score.

        An image holding NaN or infinite values is scored with those values set to zero (so nothing
        downstream sees them) and then reported with a NaN score and map, judged defective and fully flagged:
        a part that cannot be scored never passes. The same ops run in the exported graphs, so torch,
        ONNX Runtime and OpenVINO all decide this way.
        """
        finite = torch.isfinite(batch)
        invalid = ~finite.flatten(1).all(1)
        clean = torch.where(finite, batch, torch.zeros_like(batch))
        output = super().forward(clean, *args, **kwargs)  # type: ignore[misc]
        return fail_safe(output, invalid)

    def prepare_export(self) -> None:
        """Make the model whole before an export: support data and line calibration, or a refusal that names the fix.

        Without a checkpoint the support data is built from ``few_shot_source`` (and calibrated on
        ``calibration_source``) first; a model with neither would export an empty bank that fails
        only on the deployment machine, so it is refused before anything is written.

        Raises:
            ValueError: No support data and no ``few_shot_source`` to build it from.
        """
        if not self._support_ready():
            if not (self.k_shot and self.few_shot_source is not None):
                msg = (
                    f"{type(self).__name__} has no support data to export (no checkpoint was loaded and no "
                    "few_shot_source is set): pass the checkpoint that anomalib fit wrote (--ckpt_path "
                    ".../weights/lightning/model.ckpt), or the folder of good images (--model.few_shot_source DIR "
                    "with --model.k_shot)."
                )
                raise ValueError(msg)
            self._ensure_ready()
        self._ensure_calibrated()
        release_inference_tensors(self)  # type: ignore[arg-type]

    def to_torch(self, *args: Any, **kwargs: Any) -> Path:
        """Export to torch as anomalib does, after :meth:`prepare_export` (never an empty model)."""
        self.prepare_export()
        return super().to_torch(*args, **kwargs)  # type: ignore[misc]

    def to_onnx(self, *args: Any, **kwargs: Any) -> Path:
        """Export to ONNX as anomalib does (also the first step of OpenVINO), after :meth:`prepare_export`.

        torch's ONNX exporter logs every graph pass at INFO (thousands of lines of ``onnxscript`` and
        ``onnx_ir``); those loggers are held at WARNING while it runs.
        """
        self.prepare_export()
        with quiet_loggers(EXPORT_LOGGERS):
            return super().to_onnx(*args, **kwargs)  # type: ignore[misc]
