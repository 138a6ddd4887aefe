"""Pictures that show the decision: the decision panel and the visualizer that saves it for each image.

References: the predictions ``Engine.predict`` returns (score, label, mask, map), numpy for the
map's peak, PIL for the saved files and the original images' sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageItem
from anomalib.engine import Engine
from matplotlib.contour import ContourSet
from PIL import Image

from anomalib_protorefine import PatchCorePlus
from anomalib_protorefine.heatmaps import COLORBAR_LABEL, DecisionPanel, decision_figure
from anomalib_protorefine.visualization import DecisionVisualizer
from test_false_alarm import QUIET, tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _model(visualizer: DecisionVisualizer, support: Path) -> PatchCorePlus:
    return tiny_model(visualizer=visualizer, few_shot_source=str(support))


def _outlines(axis: object) -> list[ContourSet]:
    return [artist for artist in axis.get_children() if isinstance(artist, ContourSet)]


def test_predict_saves_one_decision_picture_per_image(mixed_parts: Path, tmp_path: Path) -> None:
    visualizer = DecisionVisualizer()
    engine = Engine(default_root_dir=tmp_path, **QUIET)
    predictions = engine.predict(_model(visualizer, mixed_parts / "support"), data_path=mixed_parts / "mixed")
    items = [item for batch in predictions for item in batch]
    saved = sorted((Path(engine.trainer.default_root_dir) / "images").rglob("*.png"))
    assert sorted(path.name for path in saved) == sorted(Path(item.image_path).name for item in items)
    labels = {bool(item.pred_label) for item in items}
    assert labels == {False, True}, "the folder should hold parts judged OK and parts judged defective"

    for item in items:
        figure = visualizer.figure(item)
        axis, colorbar = figure.axes
        title = axis.get_title()
        score = float(item.pred_score)
        decision = "defective" if bool(item.pred_label) else "OK"
        assert title == f"{Path(item.image_path).name}\n{decision} · score {score:.2f}"
        assert colorbar.get_ylabel() == COLORBAR_LABEL
        width, height = Image.open(item.image_path).size
        assert axis.images[0].get_array().shape[:2] == (height, width)  # the original picture, not the 64 px input
        flagged = bool(item.pred_mask.any())
        assert flagged == (decision == "defective")  # support thresholds: the peak at least
        assert bool(_outlines(axis)) == (flagged and item.pred_mask.float().mean() > 0)
        # a one-pixel flagged area is invisible: such defective parts get the ring at the peak
        ring = [line for line in axis.lines if line.get_gid() == "peak"]
        assert bool(ring) == (decision == "defective" and float(item.pred_mask.float().mean()) < 0.002)
    saved_wide = next(path for path in saved if path.name.startswith("wide_"))
    assert Image.open(saved_wide).width > 1.5 * Image.open(saved_wide).height  # the aspect ratio is kept


def test_a_defective_part_with_no_flagged_pixel_gets_a_ring_at_its_peak() -> None:
    """Validation thresholds can judge a part defective with an empty mask: the ring shows where to look."""
    anomaly_map = torch.zeros(1, 16, 16)
    anomaly_map[0, 3, 12] = 0.45
    image = torch.rand(3, 40, 80)
    empty = torch.zeros(1, 16, 16, dtype=torch.bool)
    item = ImageItem(image=image, anomaly_map=anomaly_map, pred_score=torch.tensor(0.61), pred_label=torch.tensor(True))
    item.pred_mask = empty
    axis = DecisionVisualizer().figure(item).axes[0]
    (ring,) = [line for line in axis.lines if line.get_gid() == "peak"]
    # the map pixel's centre in the 40 x 80 picture: ((3 + 0.5) * 40 / 16 - 0.5, (12 + 0.5) * 80 / 16 - 0.5)
    assert (float(ring.get_xdata()[0]), float(ring.get_ydata()[0])) == pytest.approx((62.0, 8.25))
    assert not _outlines(axis)
    assert axis.get_title() == "defective · score 0.61"

    ok = decision_figure(DecisionPanel(np.zeros((40, 80, 3)), anomaly_map[0].numpy(), empty[0].numpy(), 0.2, "OK"))
    ok = ok.axes[0]
    assert not [line for line in ok.lines if line.get_gid() == "peak"]
    assert ok.get_title() == "OK · score 0.20"
    assert ok.title.get_color() != axis.title.get_color()


def test_the_outline_is_drawn_around_the_flagged_pixels_on_the_original_picture() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 4:8] = True
    values = np.random.default_rng(0).random((8, 8))
    axis = decision_figure(DecisionPanel(np.zeros((80, 40, 3)), values, mask, 0.9, "defective")).axes[0]
    (outline,) = _outlines(axis)
    vertices = np.concatenate([path.vertices for path in outline.get_paths()])
    # map pixel centres in the 80 x 40 picture: row r at 10 r + 4.5, column c at 5 c + 2; the outline runs
    # midway between flagged and unflagged centres (rows 1|2 and 3|4, columns 3|4) and ends at column 7's
    assert (vertices[:, 1].min(), vertices[:, 1].max()) == pytest.approx((19.5, 39.5))
    assert (vertices[:, 0].min(), vertices[:, 0].max()) == pytest.approx((19.5, 37.0))
    assert not [line for line in axis.lines if line.get_gid() == "peak"]


def test_wrong_decisions_and_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="decision must be one of"):
        decision_figure(DecisionPanel(np.zeros((8, 8, 3)), np.zeros((4, 4)), None, 0.5, "bad"))
    with pytest.raises(ValueError, match="pred_mask has shape"):
        decision_figure(DecisionPanel(np.zeros((8, 8, 3)), np.zeros((4, 4)), np.zeros((2, 2)), 0.5, "OK"))
    with pytest.raises(ValueError, match="positive height and dpi"):
        DecisionVisualizer(dpi=0)
