"""A per-image report of predictions: ``predictions.csv`` and ``predictions.json`` beside the pictures.

:class:`PredictionReport` is a Lightning prediction writer (``BasePredictionWriter``): added to the
callbacks of ``anomalib predict`` / ``Engine.predict`` / ``Trainer.predict`` it writes one row per
image (:data:`COLUMNS`) and logs one line, ``"N of M parts flagged (thresholds from <origin>)"``.

* ``raw_score``: the model's score before normalisation. The post-processor replaces ``pred_score``
  by the normalised score in place; the raw score is computed back from it and the post-processor's
  thresholds and range (:func:`raw_scores`; the normalisation is strictly increasing, so this is
  exact up to float32 rounding, about 1e-6 relative for scores within ten ranges of the threshold).
* ``score``: the normalised score (0.5 = the image threshold); ``decision``: ``"defective"`` or
  ``"OK"`` (``"undecided"`` without thresholds).
* ``flagged_share``: the share of the image's pixels in ``pred_mask``.
* ``peak_row``, ``peak_col``: where the anomaly map is highest; ``peak_in`` says in which pixels:
  ``"image"`` (the original file's, when the pre-processing only resizes) or ``"map"`` (the anomaly
  map's, e.g. after a crop).
* ``threshold_origin``: where the thresholds came from (``"support"``, ``"calibration"``,
  ``"validation"``, ``"none"``); ``false_alarm_rate``: the requested rate when calibrated.

Example:
    >>> import torch
    >>> from anomalib_protorefine.post_processing import FewShotPostProcessor, normalize_scores, write_thresholds
    >>> from anomalib_protorefine.thresholds import SupportThresholds
    >>> post = FewShotPostProcessor()
    >>> write_thresholds(post, SupportThresholds(2.0, 3.0, 0.0, 4.0, 0.0, 6.0, 1.5, 2, 6, True), "support")
    >>> raw = torch.tensor([1.0, 2.0, 9.0])
    >>> normalised = normalize_scores(raw, post.image_min, post.image_max, post.image_threshold)
    >>> [round(value, 4) for value in raw_scores(normalised, post).tolist()]
    [1.0, 2.0, 9.0]
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from anomalib_protorefine.post_processing import FewShotPostProcessor

__all__ = [
    "COLUMNS",
    "PredictionReport",
    "ReportRow",
    "batch_rows",
    "peak_locations",
    "raw_scores",
    "report_folder",
    "summary_line",
    "threshold_origin",
]

logger = logging.getLogger(__name__)

#: Transforms that only rescale the whole image (or change its values): peaks map back to the file's pixels.
_RESCALING = {"Resize", "SeparableResize", "Normalize", "ToDtype", "ToImage", "ToPureTensor", "ConvertImageDtype"}


@dataclass(frozen=True)
class ReportRow:
    """One image of the report (see the module docstring for the columns)."""

    image_path: str
    raw_score: float
    score: float
    decision: str
    flagged_share: float
    peak_row: int
    peak_col: int
    peak_in: str
    threshold_origin: str
    false_alarm_rate: float | None


#: The report's columns, in order.
COLUMNS: tuple[str, ...] = tuple(ReportRow.__dataclass_fields__)


def raw_scores(scores: torch.Tensor, post_processor: Any) -> torch.Tensor:
    """The raw image scores behind the normalised ``scores`` of a post-processor (float64).

    Inverts :func:`~anomalib_protorefine.post_processing.normalize_scores` for a
    :class:`~anomalib_protorefine.post_processing.FewShotPostProcessor`, and anomalib's min-max
    normalisation for its ``PostProcessor`` (NaN where that one clamped to 0 or 1: the raw score is
    lost). Without normalisation (disabled, or no range yet) the scores are raw already. A normalised
    score of exactly 1 (beyond float32's resolution) gives ``inf``.

    Args:
        scores: Normalised image scores.
        post_processor: The model's post-processor.

    Returns:
        The raw scores, in float64.

    Example:
        >>> from anomalib.post_processing import PostProcessor
        >>> post = PostProcessor()
        >>> raw_scores(torch.tensor([0.3]), post).tolist()  # no range: nothing was normalised
        [0.30000001192092896]
    """
    values = scores.detach().double().flatten().cpu()
    if post_processor is None or not getattr(post_processor, "enable_normalization", False):
        return values
    low, high = post_processor.image_min.double().cpu(), post_processor.image_max.double().cpu()
    if torch.isnan(low) or torch.isnan(high):
        return values
    threshold = post_processor.image_threshold.double().cpu()
    threshold = torch.where(torch.isnan(threshold), (high + low) / 2, threshold)
    value_range = high - low
    safe_range = torch.where(value_range > 0, value_range, torch.ones_like(value_range))
    if isinstance(post_processor, FewShotPostProcessor):
        centred = 2.0 * values - 1.0  # = z / (1 + |z|)
        return threshold + centred / (1.0 - centred.abs()) * safe_range
    if value_range <= 0:
        return torch.full_like(values, float("nan"))
    inside = (values > 0) & (values < 1)
    return torch.where(inside, threshold + (values - 0.5) * safe_range, torch.full_like(values, float("nan")))


def peak_locations(
    anomaly_maps: torch.Tensor, image_sizes: Sequence[tuple[int, int] | None] | None = None
) -> list[tuple[int, int, str]]:
    """``(row, col, frame)`` of each map's maximum, in the original image's pixels where its size is given.

    A map pixel is taken back to the image by its centre, ``floor((row + 0.5) * H / h)`` (a resize of the
    whole image); ``frame`` is ``"image"`` then, else ``"map"``. NaN map values are ignored.

    Args:
        anomaly_maps: ``(B, H, W)`` or ``(B, 1, H, W)`` anomaly maps.
        image_sizes: The original ``(height, width)`` of each image, or ``None`` (map pixels).

    Returns:
        One ``(row, col, frame)`` per map.

    Example:
        >>> maps = torch.zeros(2, 4, 4)
        >>> maps[0, 1, 3] = maps[1, 2, 0] = 1.0
        >>> peak_locations(maps, [(40, 80), None])
        [(15, 70, 'image'), (2, 0, 'map')]
    """
    flat = anomaly_maps.detach().float().reshape(anomaly_maps.shape[0], -1, *anomaly_maps.shape[-2:])[:, 0]
    height, width = flat.shape[-2:]
    indices = torch.nan_to_num(flat, nan=-math.inf).flatten(1).argmax(1).tolist()
    sizes = list(image_sizes) if image_sizes is not None else [None] * len(indices)
    peaks = []
    for index, size in zip(indices, sizes, strict=True):
        row, col = divmod(int(index), int(width))
        if size is None:
            peaks.append((row, col, "map"))
        else:
            image_height, image_width = size
            peaks.append(
                (
                    min(int((row + 0.5) * image_height / height), image_height - 1),
                    min(int((col + 0.5) * image_width / width), image_width - 1),
                    "image",
                )
            )
    return peaks


def summary_line(flagged: int, total: int, origin: str, false_alarm_rate: float | None = None) -> str:
    """The console line of a prediction run.

    Example:
        >>> summary_line(2, 20, "support")
        '2 of 20 parts flagged (thresholds from support)'
        >>> summary_line(1, 30, "calibration", 0.05)
        '1 of 30 parts flagged (thresholds from calibration at a 5% false-alarm rate)'
    """
    source = origin if false_alarm_rate is None else f"{origin} at a {100 * false_alarm_rate:.3g}% false-alarm rate"
    return f"{flagged} of {total} parts flagged (thresholds from {source})"


def report_folder(trainer: Trainer, pl_module: LightningModule | None = None) -> Path:
    """Where the report goes: beside anomalib's pictures (the parent of the visualizer's folder).

    anomalib's ``ImageVisualizer`` saves into its ``output_dir``, by default
    ``<trainer.default_root_dir>/images``; the report goes into that folder's parent.
    """
    visualizer = getattr(pl_module, "visualizer", None)
    pictures = getattr(visualizer, "output_dir", None)
    if pictures is not None:
        return Path(pictures).parent
    return Path(trainer.default_root_dir)


def _image_size(path: str | None) -> tuple[int, int] | None:
    """``(height, width)`` of an image file from its header, ``None`` if it cannot be read."""
    if not path:
        return None
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError):
        return None


def _only_rescales(pl_module: LightningModule) -> bool:
    """The model's pre-processing maps the whole image onto the map (a resize, no crop)."""
    transform = getattr(getattr(pl_module, "pre_processor", None), "transform", None)
    if transform is None:
        return True
    parts = getattr(transform, "transforms", [transform])
    return all(type(part).__name__ in _RESCALING for part in parts)


def _finite(value: float | None) -> float | None:
    """``value`` for JSON: NaN and infinities become ``null``."""
    return value if value is not None and math.isfinite(value) else None


class PredictionReport(BasePredictionWriter):
    """Write ``predictions.csv`` and ``predictions.json`` (one row per image) and log how many parts were flagged.

    Works as a trainer callback (``Engine(callbacks=[PredictionReport()])``) or as a model callback
    (``configure_callbacks``): rows are read once the post-processor has thresholded the batch.

    Args:
        output_dir: Folder of the report; ``None``: beside anomalib's pictures (:func:`report_folder`).
        name: File name of the report, without suffix.

    Raises:
        ValueError: If ``name`` is empty or holds a path separator.

    Example:
        >>> report = PredictionReport(name="line_3")
        >>> report.interval.on_batch
        True
    """

    def __init__(self, output_dir: str | Path | None = None, name: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        if not name or "/" in name or "\\" in name:
            msg = (
                f"PredictionReport name must be a file name without folder, got name={name!r}: pass e.g. 'predictions'."
            )
            raise ValueError(msg)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.name = name
        self.rows: list[ReportRow] = []
        self.paths: tuple[Path, Path] | None = None
        self._pending: list[Any] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start a new report."""
        del trainer, pl_module
        self.rows = []
        self.paths = None
        self._pending = []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the batch: the post-processor may run after this callback (it normalises the batch in place)."""
        del trainer, batch_indices, batch, batch_idx, dataloader_idx
        self._flush(pl_module)
        self._pending.append(prediction)

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        """Read the previous batch, post-processed by now."""
        del trainer, args, kwargs
        self._flush(pl_module)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Read the last batch, write the report and log the summary line."""
        super().on_predict_epoch_end(trainer, pl_module)
        self._flush(pl_module)
        if not trainer.is_global_zero:
            return
        folder = self.output_dir or report_folder(trainer, pl_module)
        self.paths = self.write(folder)
        origin = self.rows[0].threshold_origin if self.rows else threshold_origin(pl_module)
        rate = self.rows[0].false_alarm_rate if self.rows else None
        flagged = sum(row.decision == "defective" for row in self.rows)
        logger.info("%s; report: %s", summary_line(flagged, len(self.rows), origin, rate), self.paths[0])

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """Write the rows to ``<folder>/<name>.csv`` and ``<folder>/<name>.json``; return both paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = folder / f"{self.name}.csv", folder / f"{self.name}.json"
        with csv_path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(asdict(row) for row in self.rows)
        records = [
            {key: _finite(value) if isinstance(value, float) else value for key, value in asdict(row).items()}
            for row in self.rows
        ]
        json_path.write_text(json.dumps(records, indent=2, allow_nan=False) + "\n")
        return csv_path, json_path

    def _flush(self, pl_module: LightningModule) -> None:
        """Turn the kept batches into rows."""
        for prediction in self._pending:
            self.rows.extend(batch_rows(prediction, pl_module))
        self._pending = []


def threshold_origin(pl_module: LightningModule) -> str:
    """Where the post-processor's thresholds came from (anomalib's own post-processor: validation, if set)."""
    post_processor = getattr(pl_module, "post_processor", None)
    origin = getattr(post_processor, "threshold_origin", None)
    if origin is not None:
        return str(origin)
    threshold = getattr(post_processor, "image_threshold", None)
    return "validation" if threshold is not None and not torch.isnan(threshold).item() else "none"


def batch_rows(prediction: Any, pl_module: LightningModule) -> list[ReportRow]:
    """The report rows of a post-processed prediction batch."""
    post_processor = getattr(pl_module, "post_processor", None)
    origin = threshold_origin(pl_module)
    line = getattr(pl_module, "line_calibration", None)
    rate = float(line.false_alarm_rate) if origin == "calibration" and line is not None else None
    scores = prediction.pred_score.detach().float().flatten().cpu()
    count = scores.numel()
    paths = list(getattr(prediction, "image_path", None) or [""] * count)
    raw = raw_scores(scores, post_processor).tolist()
    decided = origin != "none" and prediction.pred_label is not None
    labels = prediction.pred_label.detach().flatten().bool().tolist() if decided else [None] * count
    masks = prediction.pred_mask
    shares = masks.detach().float().flatten(1).mean(1).tolist() if masks is not None else [math.nan] * count
    sizes = [_image_size(path) for path in paths] if _only_rescales(pl_module) else None
    if prediction.anomaly_map is not None:
        peaks = peak_locations(prediction.anomaly_map, sizes)
    else:
        peaks = [(-1, -1, "none")] * count
    return [
        ReportRow(
            image_path=str(path),
            raw_score=float(raw_score),
            score=float(score),
            decision="undecided" if label is None else ("defective" if label else "OK"),
            flagged_share=float(share),
            peak_row=peak[0],
            peak_col=peak[1],
            peak_in=peak[2],
            threshold_origin=origin,
            false_alarm_rate=rate,
        )
        for path, raw_score, score, label, share, peak in zip(
            paths, raw, scores.tolist(), labels, shares, peaks, strict=True
        )
    ]
