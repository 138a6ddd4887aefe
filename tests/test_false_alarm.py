"""A false-alarm rate the user sets, and gets: the estimate, the models' calibration, normalisation, decisions.

References: hand-sorted order statistics for the estimate; a Monte Carlo line with a known good-score
distribution (numpy, float64) for the rate it delivers; scikit-learn's ROC AUC on the raw scores of
the model's own forward pass for the metrics anomalib reports; the model's forward pass scored by
hand for the calibrated thresholds; onnxruntime for the exported graph.
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Trainer
from sklearn.metrics import roc_auc_score

from anomalib_protorefine import PatchCorePlus
from anomalib_protorefine.benchmark.line import oracle_recall
from anomalib_protorefine.false_alarm import (
    LineCalibration,
    conformal_rank,
    estimate_good_threshold,
    images_needed,
    validate_false_alarm_rate,
)
from anomalib_protorefine.post_processing import FewShotPostProcessor, consistent_masks, normalize_scores

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZE = 64
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


def tiny_model(**kwargs: object) -> PatchCorePlus:
    """A random-weight resnet18 PatchCorePlus at ``SIZE`` px (fast; the decisions, not the accuracy, are tested)."""
    options = {
        "backbone": "resnet18",
        "layers": ("layer2",),
        "pre_trained": False,
        "k_shot": 2,
        "refiner": False,
        "visualizer": False,
        "pre_processor": PatchCorePlus.configure_pre_processor(image_size=(SIZE, SIZE), backbone="resnet18"),
        **kwargs,
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return PatchCorePlus(**options)


@pytest.fixture(scope="module")
def line_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic set (64 px) with 40 good training images; 30 of them (not the support pool's draw) form the line."""
    from anomalib_protorefine.data import generate_dataset

    root = tmp_path_factory.mktemp("line")
    generate_dataset(
        root, category="brushed_metal", seed=3, num_train=40, num_test_good=8, num_test_defect=8, image_size=SIZE
    )
    data = root / "brushed_metal"
    support, line = data / "support", data / "line"
    support.mkdir()
    line.mkdir()
    files = sorted((data / "train" / "good").glob("*.png"))
    for file in files[:6]:
        shutil.copy(file, support / file.name)
    for file in files[6:36]:
        shutil.copy(file, line / file.name)
    for file in sorted((data / "test" / "defect").glob("*.png"))[:2]:  # a few defective parts on the line
        shutil.copy(file, line / f"defect_{file.name}")
    return data


def labelled_folder(root: Path) -> object:
    """anomalib's Folder of the line data set with its labelled test images (validation = the test set)."""
    from anomalib.data import Folder

    return Folder(
        name="line",
        root=root,
        normal_dir="train/good",
        abnormal_dir="test/defect",
        normal_test_dir="test/good",
        mask_dir="ground_truth/defect",
        val_split_mode="same_as_test",
        num_workers=0,
        eval_batch_size=8,
    )


# ------------------------------------------------------------------------------------ the estimate
def fence_by_hand(values: np.ndarray, whisker: float = 3.0) -> float:
    """The skew-adjusted boxplot's upper fence, with the medcouple as a plain double loop over the pairs."""
    median = float(np.median(values))
    kernels = [
        ((high - median) - (median - low)) / (high - low)
        for low in values[values <= median]
        for high in values[values >= median]
        if high > low
    ]
    skew = float(np.median(kernels))
    q1, q3 = np.quantile(values, [0.25, 0.75])
    return float(q3 + whisker * math.exp((3 if skew >= 0 else 4) * skew) * (q3 - q1))


def test_conformal_threshold_is_the_hand_sorted_order_statistic() -> None:
    """Fence by hand; the threshold is the conformal order statistic of the scores below it."""
    rng = np.random.default_rng(0)
    scores = np.concatenate((rng.gumbel(size=57), [40.0, 45.0, 50.0]))
    fence = fence_by_hand(scores)
    inliers = sorted(scores[scores <= fence])
    estimate = estimate_good_threshold(torch.from_numpy(scores), rate=0.05)
    rank = math.ceil((len(inliers) + 1) * 0.95)
    assert conformal_rank(len(inliers), 0.05) == rank
    assert estimate.fence == pytest.approx(fence, rel=1e-9)
    assert estimate.num_outliers == 60 - len(inliers) == 3
    assert estimate.threshold == inliers[rank - 1]
    assert estimate.expected_rate == pytest.approx(1 - rank / (len(inliers) + 1))
    clean = estimate_good_threshold(torch.arange(1.0, 41.0), rate=0.1)  # no outlier: the 37th of 1..40
    assert (clean.threshold, clean.num_outliers) == (37.0, 0)


def test_the_fence_follows_the_skew_of_good_scores() -> None:
    """A long right tail of good scores (lognormal) is hardly cut, far less than by the plain boxplot's fence."""
    rng = np.random.default_rng(4)
    adjusted, plain = [], []
    for _ in range(50):
        good = rng.lognormal(0, 0.8, 200)
        q1, q3 = np.quantile(good, [0.25, 0.75])
        adjusted.append(estimate_good_threshold(torch.from_numpy(good), 0.05).num_outliers)
        plain.append(int((good > q3 + 3 * (q3 - q1)).sum()))
    assert np.mean(adjusted) < 0.5  # of 200 good scores
    assert np.mean(plain) > 4 * max(np.mean(adjusted), 0.05)


def test_defects_above_the_fence_are_left_out() -> None:
    """Ten far-out defects: the threshold is the order statistic of the 90 good scores alone."""
    rng = np.random.default_rng(1)
    good = rng.normal(10.0, 1.0, size=90)
    scores = np.concatenate((good, rng.normal(40.0, 1.0, size=10)))
    estimate = estimate_good_threshold(torch.from_numpy(scores), rate=0.05)
    assert estimate.num_outliers == 10
    assert estimate.threshold == sorted(good)[math.ceil(91 * 0.95) - 1]
    # what a plain quantile of all scores would give: inside the defects
    assert np.quantile(scores, 0.95) > 30


@pytest.mark.parametrize("share", [0.0, 0.1, 0.2])
def test_the_requested_rate_is_not_exceeded_on_a_simulated_line(share: float) -> None:
    """Gumbel good scores, defects anywhere from inside the good tail to far out: mean realised rate over 300 lines.

    Clean lines get the requested rate (conformal: between rate - 1 / (n + 1) and rate); defects inside the
    fence can only raise the threshold.
    """
    rng = np.random.default_rng(2)
    realised = []
    for _ in range(300):
        num_defect = round(share * 100)
        good = rng.gumbel(size=100 - num_defect)
        defects = rng.gumbel(loc=rng.uniform(2.0, 12.0, size=num_defect))
        estimate = estimate_good_threshold(torch.from_numpy(np.concatenate((good, defects))), rate=0.05)
        realised.append(float((rng.gumbel(size=20000) > estimate.threshold).mean()))
    mean = float(np.mean(realised))
    assert mean <= 0.055
    if share == 0.0:
        assert mean >= 0.035


def test_too_many_outliers_warn_with_the_share() -> None:
    scores = torch.cat((torch.linspace(1, 2, 30), torch.full((15,), 100.0)))
    with pytest.warns(UserWarning, match=r"15 of 45 calibration images \(33%\) score far above"):
        estimate_good_threshold(scores, rate=0.05, what="calibration_source='x'")


def test_a_rate_the_images_cannot_resolve_warns() -> None:
    with pytest.warns(UserWarning, match="cannot resolve a false-alarm rate of 0.01"):
        estimate = estimate_good_threshold(torch.cat((torch.linspace(0, 1, 95), torch.full((10,), 50.0))), rate=0.01)
    assert not estimate.resolved
    assert (estimate.num_outliers, estimate.threshold) == (10, 1.0)  # the highest inlier


@pytest.mark.parametrize("rate", [0.0, 0.6, -0.1, float("nan"), float("inf")])
def test_rates_outside_the_range_are_refused(rate: float) -> None:
    with pytest.raises(ValueError, match=r"false_alarm_rate must be a number in \(0, 0.5\]"):
        validate_false_alarm_rate(rate)


@pytest.mark.parametrize("rate", ["0.05", True, [0.05]])
def test_rates_that_are_not_numbers_are_refused(rate: object) -> None:
    with pytest.raises(TypeError, match="false_alarm_rate must be a number"):
        validate_false_alarm_rate(rate)


def test_too_few_images_name_the_number_needed() -> None:
    assert images_needed(0.01) == 99
    with pytest.raises(ValueError, match="needs at least 99"):
        estimate_good_threshold(torch.rand(50), rate=0.01)


def test_oracle_recall_hand_computed() -> None:
    good = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    defect = torch.tensor([3.5, 4.5, 6.0])
    assert oracle_recall(good, defect, 0.2) == pytest.approx(2 / 3)  # one false alarm allowed: t = 4
    assert oracle_recall(good, defect, 0.1) == pytest.approx(1 / 3)  # none allowed: t = 5


# ----------------------------------------------------------------------------- normalisation
def test_normalisation_is_strictly_increasing_and_keeps_the_threshold_at_one_half() -> None:
    raw = torch.tensor([-1e3, -5.0, 0.0, 0.999, 1.0, 1.001, 3.0, 50.0, 1e3])
    out = normalize_scores(raw, torch.tensor(0.0), torch.tensor(0.1), torch.tensor(1.0))
    assert bool((out[1:] > out[:-1]).all())
    assert float(out[4]) == 0.5
    assert bool(((out > 0) & (out < 1)).all())
    anomalib = torch.clamp((raw - 1.0) / 0.1 + 0.5, 0, 1)  # anomalib's clamped map: ties at 0 and 1
    assert len(anomalib.unique()) < len(raw)


def test_nan_scores_are_flagged_defective() -> None:
    post = FewShotPostProcessor(threshold="support")
    label = post._apply_threshold(torch.tensor([0.2, float("nan"), 0.9]), torch.tensor(0.5))
    assert label.tolist() == [False, True, True]


def test_masks_agree_with_the_image_decisions() -> None:
    maps = torch.tensor([[[0.6, 0.2]], [[0.3, 0.4]], [[0.7, 0.9]]])
    masks = consistent_masks(torch.tensor([False, True, True]), maps > 0.5, maps)
    assert masks.tolist() == [[[False, False]], [[False, True]], [[True, True]]]


# --------------------------------------------------------------------------- the models
def _hand_threshold(model: PatchCorePlus, folder: Path, rate: float) -> tuple[float, float, int]:
    """Score the folder with the model's forward (no post-processing) and take the order statistic by hand."""
    from anomalib.data.utils import read_image

    files = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    images = torch.stack([model.pre_processor.transform(read_image(str(f), as_tensor=True)) for f in files])
    model.model.eval()
    with torch.no_grad():
        output = model.model(images)
    scores = sorted(output.pred_score.double().flatten().tolist())
    fence = fence_by_hand(np.array(scores))
    inliers = [s for s in scores if s <= fence]
    rank = math.ceil((len(inliers) + 1) * (1 - rate))
    maxima = output.anomaly_map.flatten(1).amax(1).double()
    kept = sorted(
        float(m) for m, s in zip(maxima, output.pred_score.double().flatten(), strict=True) if float(s) <= fence
    )
    return inliers[rank - 1], kept[math.ceil((len(kept) + 1) * (1 - rate)) - 1], len(scores) - len(inliers)


def test_calibrate_false_alarm_sets_the_hand_computed_thresholds(line_data: Path) -> None:
    model = tiny_model(few_shot_source=str(line_data / "support"), false_alarm_rate=0.1)
    calibration = model.calibrate_false_alarm(line_data / "line")
    image, pixel, outliers = _hand_threshold(model, line_data / "line", 0.1)
    assert calibration.image_threshold == pytest.approx(image, rel=1e-6)
    assert calibration.pixel_threshold == pytest.approx(pixel, rel=1e-6)
    assert calibration.num_outliers == outliers
    assert calibration.num_images == 32
    assert float(model.post_processor.image_threshold) == pytest.approx(image, rel=1e-6)
    assert model.post_processor.threshold_origin == "calibration"
    assert model.line_calibration is calibration
    # another rate: re-estimated from the stored scores, no rescoring
    model.false_alarm_rate = 0.25
    image, _, _ = _hand_threshold(model, line_data / "line", 0.25)
    assert float(model.post_processor.image_threshold) == pytest.approx(image, rel=1e-6)


def test_calibration_on_tensors_equals_the_folder(line_data: Path) -> None:
    from anomalib.data.utils import read_image

    files = sorted((line_data / "line").glob("*.png"))
    images = torch.stack([read_image(str(f), as_tensor=True) for f in files])
    model = tiny_model(few_shot_source=str(line_data / "support"))
    from_images = model.calibrate_false_alarm(images, rate=0.1)
    from_folder = model.calibrate_false_alarm(line_data / "line", rate=0.1)
    assert from_images.image_threshold == from_folder.image_threshold
    assert from_images.source == "images"


def test_bad_calibration_sources_name_the_fix(line_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="false_alarm_rate must be a number"):
        tiny_model(false_alarm_rate=0.7)
    with pytest.raises(TypeError, match="calibration_source must be a folder path"):
        tiny_model(calibration_source=3)
    with pytest.raises(ValueError, match="threshold='validation'"):
        tiny_model(calibration_source=str(tmp_path), threshold="validation")
    few = tmp_path / "few"
    few.mkdir()
    for file in sorted((line_data / "line").glob("*.png"))[:5]:
        shutil.copy(file, few / file.name)
    model = tiny_model(few_shot_source=str(line_data / "support"), calibration_source=str(few))
    with pytest.raises(ValueError, match=r"calibration_source=.* holds 5 image file\(s\).*needs at least 20"):
        model.calibrate_false_alarm()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"holds 0 image file\(s\)"):
        model.calibrate_false_alarm(empty)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        model.calibrate_false_alarm(tmp_path / "missing")


def test_a_rate_without_calibration_images_warns_once(line_data: Path, tmp_path: Path) -> None:
    model = tiny_model(k_shot=1, few_shot_source=str(line_data / "support"), false_alarm_rate=0.02)
    engine = Engine(default_root_dir=tmp_path, **QUIET)
    with pytest.warns(UserWarning, match="cannot be honoured from the support images alone.*calibration_source"):
        engine.predict(model, data_path=line_data / "test" / "good")
    assert model.post_processor.threshold_origin == "support"


def test_engine_test_keeps_calibrated_thresholds_and_they_survive_a_checkpoint(line_data: Path, tmp_path: Path) -> None:
    """Engine.test validates on labelled defects first: the calibrated thresholds stay; a checkpoint keeps them."""

    model = tiny_model(false_alarm_rate=0.1, calibration_source=str(line_data / "line"))
    datamodule = labelled_folder(line_data)
    engine = Engine(default_root_dir=tmp_path, **QUIET)
    engine.test(model, datamodule=datamodule)
    assert model.post_processor.threshold_origin == "calibration"
    calibrated = model.line_calibration.image_threshold
    assert float(model.post_processor.image_threshold) == calibrated
    path = tmp_path / "calibrated.ckpt"
    engine.trainer.save_checkpoint(path)
    shutil.copytree(line_data / "line", tmp_path / "line_copy")
    loaded = PatchCorePlus.load_from_checkpoint(path)
    assert loaded.line_calibration == model.line_calibration
    assert loaded.post_processor.threshold_origin == "calibration"
    assert float(loaded.post_processor.image_threshold) == calibrated
    assert loaded.false_alarm_rate == 0.1
    # a checkpoint loaded with another rate is re-estimated from its stored calibration scores
    other = PatchCorePlus.load_from_checkpoint(path, false_alarm_rate=0.25)
    expected = LineCalibration.from_dict(model.line_calibration.as_dict()).at_rate(0.25).image_threshold
    assert float(other.post_processor.image_threshold) == pytest.approx(expected)
    assert expected < calibrated


def _raw_auroc(model: PatchCorePlus, loader: object) -> tuple[float, float]:
    """Image and pixel AUROC of the model's raw forward pass (no post-processing), by scikit-learn in float64."""
    model.model.eval()
    scores, labels, maps, masks = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            output = model.model(batch.image)
            scores.append(output.pred_score.double().flatten())
            labels.append(batch.gt_label.flatten())
            maps.append(output.anomaly_map.double().reshape(len(batch.image), -1))
            masks.append(batch.gt_mask.reshape(len(batch.image), -1))
    image = roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())
    pixel = roc_auc_score(torch.cat(masks).flatten().int().numpy(), torch.cat(maps).flatten().numpy())
    return float(image), float(pixel)


@pytest.mark.parametrize("threshold", ["support", "auto"])
def test_reported_auroc_equals_the_raw_score_auroc(line_data: Path, tmp_path: Path, threshold: str) -> None:
    """Support thresholds (a narrow range): Trainer.test metrics equal the raw-score metrics to 1e-6."""

    model = tiny_model(few_shot_source=str(line_data / "support"), threshold=threshold)
    datamodule = labelled_folder(line_data)
    trainer = Trainer(**model.trainer_arguments, **QUIET, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metrics = trainer.test(model, datamodule=datamodule)[0]
    assert model.post_processor.threshold_origin == "support"
    datamodule.setup("test")
    transform = model.pre_processor.transform
    loader = [
        batch.update(image=torch.stack([transform(image) for image in batch.image]))
        for batch in datamodule.test_dataloader()
    ]
    image, pixel = _raw_auroc(model, loader)
    assert metrics["image_AUROC"] == pytest.approx(image, abs=1e-6)
    assert metrics["pixel_AUROC"] == pytest.approx(pixel, abs=1e-6)


def test_exported_onnx_decides_with_the_calibrated_thresholds(line_data: Path, tmp_path: Path) -> None:
    """The ONNX graph carries the calibrated thresholds and the fail-safe NaN decision."""
    ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra")
    pytest.importorskip("onnxscript", reason="ONNX export needs the export extra")
    from anomalib.data.utils import read_image

    model = tiny_model(few_shot_source=str(line_data / "support"))
    model.calibrate_false_alarm(line_data / "line", rate=0.25)
    model.eval()
    path = model.to_onnx(tmp_path, input_size=(SIZE, SIZE))
    files = (
        sorted((line_data / "test" / "defect").glob("*.png"))[:4]
        + sorted((line_data / "test" / "good").glob("*.png"))[:4]
    )
    images = torch.stack([read_image(str(file), as_tensor=True) for file in files])
    with torch.no_grad():
        expected = model(images)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
    assert got["pred_label"].tolist() == expected.pred_label.tolist()
    raw = model.model(model.pre_processor.transform(images)).pred_score
    assert expected.pred_label.tolist() == (raw > model.line_calibration.image_threshold).tolist()
    mask = torch.from_numpy(got["pred_mask"]).reshape(expected.pred_mask.shape)
    assert not bool(mask[~expected.pred_label].any())  # an OK part shows no flagged pixel
    assert bool(mask[expected.pred_label].flatten(1).any(1).all())  # a defective one shows where


# --------------------------------------------------------------------------- the other two models
def _conformal_by_hand(scores: torch.Tensor, rate: float) -> float:
    values = np.sort(scores.double().flatten().numpy())
    inliers = values[values <= fence_by_hand(values)]
    return float(inliers[math.ceil((len(inliers) + 1) * (1 - rate)) - 1])


def test_anomaly_dino_plus_calibrates_on_line_images(line_data: Path) -> None:
    from anomalib_protorefine import AnomalyDINOPlus

    torch.manual_seed(0)
    model = AnomalyDINOPlus(
        pre_trained=False,
        k_shot=2,
        few_shot_source=str(line_data / "support"),
        pre_processor=AnomalyDINOPlus.configure_pre_processor(56),
        visualizer=False,
    )
    images = torch.rand(24, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    calibration = model.calibrate_false_alarm(images, rate=0.1)
    model.eval()
    with torch.no_grad():
        raw = model.model(model.pre_processor.transform(images)).pred_score
    assert calibration.image_threshold == pytest.approx(_conformal_by_hand(raw, 0.1), rel=1e-6)
    assert model.post_processor.threshold_origin == "calibration"


def test_winclip_plus_calibrates_on_line_images(line_data: Path, tiny_json: str) -> None:
    from anomalib_protorefine import WinClipPlus

    torch.manual_seed(0)
    model = WinClipPlus(
        backbone=tiny_json,
        pretrained=None,
        k_shot=1,
        class_name="widget",
        few_shot_source=str(line_data / "support"),
        false_alarm_rate=0.1,
        visualizer=False,
    )
    images = torch.rand(20, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    calibration = model.calibrate_false_alarm(images)
    model.eval()
    with torch.no_grad():
        raw = model.model(model.pre_processor.transform(images)).pred_score
    assert calibration.image_threshold == pytest.approx(_conformal_by_hand(raw, 0.1), rel=1e-6)
    assert calibration.false_alarm_rate == 0.1


@pytest.mark.slow
def test_anomalib_cli_calibrates_at_the_requested_rate(line_data: Path, tmp_path: Path) -> None:
    """``anomalib test --model.false_alarm_rate --model.calibration_source``: one log line with the calibration."""
    from cli_helpers import run_anomalib_test

    output = run_anomalib_test(
        [
            "--model",
            "PatchCorePlus",
            "--model.backbone",
            "resnet18",
            "--model.layers",
            "[layer2]",
            "--model.pre_trained",
            "false",
            "--model.k_shot",
            "2",
            "--model.false_alarm_rate",
            "0.1",
            "--model.calibration_source",
            str(line_data / "line"),
        ],
        {"name": "line", "normal_dir": "train/good", "abnormal_dir": "test/defect", "normal_test_dir": "test/good"},
        line_data,
        tmp_path / "results",
    )
    assert "calibrated thresholds image" in output
    assert "from 32 calibration images" in output
    assert "requested false-alarm rate 10.00%" in output
    assert "calibrated thresholds stay in force" in output
    assert "image_AUROC" in output


def test_engine_predict_calibrates_and_torch_and_openvino_exports_decide_alike(
    line_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine.predict calibrates on calibration_source; the torch and OpenVINO exports carry the thresholds."""
    pytest.importorskip("openvino", reason="OpenVINO is part of the export extra: pip install '.[export]'")
    from anomalib.deploy import ExportType, OpenVINOInferencer, TorchInferencer

    model = tiny_model(
        few_shot_source=str(line_data / "support"), false_alarm_rate=0.25, calibration_source=str(line_data / "line")
    )
    engine = Engine(default_root_dir=tmp_path / "run", **QUIET)
    predictions = engine.predict(model, data_path=line_data / "test" / "defect")
    assert model.post_processor.threshold_origin == "calibration"
    threshold = model.line_calibration.image_threshold
    labels = {
        path: bool(label)
        for batch in predictions
        for path, label in zip(batch.image_path, batch.pred_label, strict=True)
    }
    scores = {
        path: float(s) for batch in predictions for path, s in zip(batch.image_path, batch.pred_score, strict=True)
    }
    assert all(labels[path] == (scores[path] > 0.5) for path in labels)  # 0.5 = the calibrated threshold
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # the exported torch file is a pickled model
    torch_file = engine.export(model, ExportType.TORCH, export_root=tmp_path / "torch")
    openvino_file = engine.export(model, ExportType.OPENVINO, export_root=tmp_path / "openvino")
    torch_inferencer = TorchInferencer(torch_file, device="cpu")
    openvino_inferencer = OpenVINOInferencer(openvino_file, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    for path, label in labels.items():
        assert bool(torch_inferencer.predict(path).pred_label.reshape(())) == label
        assert bool(np.asarray(openvino_inferencer.predict(path).pred_label).reshape(())) == label
    model.eval()
    with torch.no_grad():
        raw = model.model(model.pre_processor.transform(_read(sorted(labels)))).pred_score.flatten()
    assert [bool(v > threshold) for v in raw] == [labels[p] for p in sorted(labels)]


def _read(paths: list[str]) -> torch.Tensor:
    from anomalib.data.utils import read_image

    return torch.stack([read_image(path, as_tensor=True) for path in paths])
