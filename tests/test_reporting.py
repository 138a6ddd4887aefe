"""The per-image report of ``Engine.predict``: ``predictions.csv`` / ``.json`` and the console line.

References: the batches ``Engine.predict`` returns (scores, decisions, masks, maps), the model's own
forward pass for the raw scores, numpy for the peaks (``unravel_index``, scaled to the file's size by
hand) and PIL for the files' sizes.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from anomalib.post_processing import PostProcessor
from PIL import Image

from anomalib_protorefine import PatchCorePlus
from anomalib_protorefine.reporting import COLUMNS, PredictionReport, peak_locations, raw_scores, summary_line
from test_false_alarm import QUIET, tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as file:
        return {row["image_path"]: row for row in csv.DictReader(file)}


def _by_path(predictions: list) -> dict[str, dict[str, object]]:
    """The returned batches, one entry per image."""
    items = {}
    for batch in predictions:
        for index, path in enumerate(batch.image_path):
            items[path] = {
                "score": float(batch.pred_score[index]),
                "label": bool(batch.pred_label[index]),
                "mask": batch.pred_mask[index].float().numpy(),
                "map": batch.anomaly_map[index].squeeze().numpy(),
            }
    return items


def _peak_by_hand(anomaly_map: np.ndarray, path: str) -> tuple[int, int]:
    row, col = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    width, height = Image.open(path).size
    return int((row + 0.5) * height / anomaly_map.shape[0]), int((col + 0.5) * width / anomaly_map.shape[1])


def test_report_rows_are_the_predictions_of_engine_predict(
    mixed_parts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model(few_shot_source=str(mixed_parts / "support"))
    report = PredictionReport()
    engine = Engine(default_root_dir=tmp_path, callbacks=[report], **QUIET)
    with caplog.at_level(logging.INFO, logger="anomalib_protorefine.reporting"):
        predictions = engine.predict(model, data_path=mixed_parts / "mixed", return_predictions=True)
    expected = _by_path(predictions)
    files = sorted(str(path) for path in (mixed_parts / "mixed").iterdir())
    assert sorted(expected) == files

    csv_path, json_path = report.paths
    assert csv_path.parent == Path(engine.trainer.default_root_dir)
    rows = _read_csv(csv_path)
    assert list(next(iter(rows.values()))) == list(COLUMNS)
    assert sorted(rows) == files  # one row per image
    assert [record["image_path"] for record in json.loads(json_path.read_text())] == list(rows)

    model.eval()
    with torch.no_grad():
        raw = {
            path: float(model.model(model.pre_processor.transform(read_image(path, as_tensor=True))[None]).pred_score)
            for path in files
        }
    for path, row in rows.items():
        item = expected[path]
        assert float(row["score"]) == pytest.approx(item["score"], abs=1e-6)
        assert row["decision"] == ("defective" if item["label"] else "OK")
        assert float(row["flagged_share"]) == pytest.approx(item["mask"].mean(), abs=1e-6)
        assert (int(row["peak_row"]), int(row["peak_col"])) == _peak_by_hand(item["map"], path)
        assert row["peak_in"] == "image"
        assert float(row["raw_score"]) == pytest.approx(raw[path], rel=1e-4)
        assert row["threshold_origin"] == "support"
        assert row["false_alarm_rate"] == ""
    wide = [path for path in files if "wide_" in path]
    assert wide
    assert all(int(rows[path]["peak_col"]) < 96 and int(rows[path]["peak_row"]) < 48 for path in wide)

    flagged = sum(item["label"] for item in expected.values())
    assert 0 < flagged < len(files)
    lines = [record.getMessage() for record in caplog.records if "parts flagged" in record.getMessage()]
    assert lines == [f"{flagged} of {len(files)} parts flagged (thresholds from support); report: {csv_path}"]


def test_report_as_a_model_callback_sees_the_same_rows_and_goes_beside_the_pictures(
    mixed_parts: Path, tmp_path: Path
) -> None:
    """After the post-processor in the callback list (how the models add it), with anomalib's pictures on."""
    from anomalib.visualization import ImageVisualizer

    first = PredictionReport(output_dir=tmp_path / "first")
    engine = Engine(default_root_dir=tmp_path / "a", callbacks=[first], **QUIET)
    engine.predict(tiny_model(few_shot_source=str(mixed_parts / "support")), data_path=mixed_parts / "mixed")

    second = PredictionReport()
    model = tiny_model(few_shot_source=str(mixed_parts / "support"), visualizer=ImageVisualizer())
    model.configure_callbacks = lambda: [*PatchCorePlus.configure_callbacks(model), second]
    engine = Engine(default_root_dir=tmp_path / "b", **QUIET)
    engine.predict(model, data_path=mixed_parts / "mixed")
    callbacks = engine.trainer.callbacks
    assert callbacks.index(second) > callbacks.index(model.post_processor)
    assert second.rows == first.rows
    assert first.paths[0] == tmp_path / "first" / "predictions.csv"
    pictures = Path(engine.trainer.default_root_dir) / "images"
    assert any(pictures.rglob("*.png"))
    assert second.paths[0].parent == pictures.parent


def test_calibrated_thresholds_are_named_with_the_rate(
    mixed_parts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model(
        few_shot_source=str(mixed_parts / "support"),
        false_alarm_rate=0.25,
        calibration_source=str(mixed_parts / "line"),
    )
    report = PredictionReport()
    engine = Engine(default_root_dir=tmp_path, callbacks=[report], **QUIET)
    with caplog.at_level(logging.INFO, logger="anomalib_protorefine.reporting"):
        predictions = engine.predict(model, data_path=mixed_parts / "mixed", return_predictions=True)
    flagged = sum(item["label"] for item in _by_path(predictions).values())
    records = json.loads(report.paths[1].read_text())
    assert {(record["threshold_origin"], record["false_alarm_rate"]) for record in records} == {("calibration", 0.25)}
    assert f"{flagged} of {len(records)} parts flagged (thresholds from calibration at a 25% false-alarm rate)" in (
        caplog.text
    )


def test_raw_scores_of_anomalibs_post_processor_where_it_did_not_clamp() -> None:
    post = PostProcessor()
    for name, value in (("_image_threshold", 2.0), ("image_min", 0.0), ("image_max", 4.0)):
        getattr(post, name).fill_(value)
    raw = torch.tensor([-3.0, 1.0, 3.5, 9.0])
    normalised = post._normalize(raw, post.image_min, post.image_max, post.image_threshold)
    recovered = raw_scores(normalised, post).tolist()
    assert recovered[1:3] == pytest.approx([1.0, 3.5])
    assert np.isnan(recovered[0])
    assert np.isnan(recovered[3])


def test_peaks_in_map_pixels_when_no_size_is_known_and_nan_ignored() -> None:
    maps = torch.rand(3, 1, 8, 6)
    maps[1, 0, 0, 0] = float("nan")
    peaks = peak_locations(maps)
    for index, (row, col, frame) in enumerate(peaks):
        values = np.nan_to_num(maps[index, 0].numpy(), nan=-1.0)
        assert (row, col) == np.unravel_index(int(np.argmax(values)), values.shape)
        assert frame == "map"


def test_nan_scores_are_null_in_json_and_names_are_checked(tmp_path: Path) -> None:
    from anomalib_protorefine.reporting import ReportRow

    report = PredictionReport()
    report.rows = [ReportRow("a.png", float("nan"), float("nan"), "defective", 1.0, 0, 0, "map", "support", None)]
    _, json_path = report.write(tmp_path)
    assert json.loads(json_path.read_text())[0]["score"] is None
    with pytest.raises(ValueError, match="name must be a file name without folder"):
        PredictionReport(name="a/b")
    assert summary_line(0, 3, "none") == "0 of 3 parts flagged (thresholds from none)"
