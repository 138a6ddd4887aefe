"""Tests of AnomalyDINOPlus against anomalib's own AnomalyDINO, offline with a random-weight DINOv2 ViT-S/14.

anomalib's ``AnomalyDINOModel`` always asks the hub for its encoder; its module's
``TimmFeatureExtractor`` is monkeypatched to build the same architecture with random weights, and
the weights are then copied from ours, so the two models compare score for score.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from anomalib.data import Folder
from anomalib.models import get_model
from anomalib.models.components import AnomalibModule
from anomalib.models.components.feature_extractors import TimmFeatureExtractor
from anomalib.models.image.anomaly_dino import AnomalyDINO
from anomalib.models.image.anomaly_dino import torch_model as upstream_torch_model
from lightning.pytorch import Trainer

from anomalib_protorefine import AnomalyDINOPlus, AnomalyDINOPlusModel
from anomalib_protorefine.data import folder_kwargs, generate_dataset
from anomalib_protorefine.refinement import PrototypeRefiner
from cli_helpers import run_anomalib_test

REPO = Path(__file__).resolve().parents[1]
ENCODER = "vit_small_patch14_dinov2"
SIZE = 112  # 8 x 8 patches of 14 px: small and fast, the same code path as anomalib's 252 px


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def upstream_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """anomalib's AnomalyDINOModel builds its encoder with random weights instead of downloading them."""

    def random_weights(*args: object, **kwargs: object) -> TimmFeatureExtractor:
        return TimmFeatureExtractor(*args, **{**kwargs, "pre_trained": False})

    monkeypatch.setattr(upstream_torch_model, "TimmFeatureExtractor", random_weights)


def images(count: int, seed: int, size: int | tuple[int, int] = SIZE, square: bool = False) -> torch.Tensor:
    """Random images; ``square`` adds a brighter square, which PCA masking keeps about half of."""
    height, width = (size, size) if isinstance(size, int) else size
    batch = torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(seed))
    if square:
        batch[:, :, 30:80, 30:80] += 1.0
    return batch


def upstream_and_ours(masking: bool = False, **ours: object) -> tuple[AnomalyDINO, AnomalyDINOPlus]:
    """anomalib's AnomalyDINO and AnomalyDINOPlus with the same random encoder weights."""
    torch.manual_seed(0)  # the same random encoder whatever ran before (PCA masking keeps part of its patches)
    upstream = AnomalyDINO(masking=masking, post_processor=False, evaluator=False, visualizer=False)
    plus = AnomalyDINOPlus(
        pre_trained=False, masking=masking, post_processor=False, evaluator=False, visualizer=False, **ours
    )
    plus.model.feature_encoder.load_state_dict(upstream.model.feature_encoder.state_dict())
    return upstream, plus


def fit_upstream(model: AnomalyDINO, support: torch.Tensor) -> None:
    """anomalib's training path: one batch through the training forward, then ``fit``."""
    model.model.train()
    model.model(support)
    model.fit()
    model.model.eval()


# ---------------------------------------------------------------------- parity with anomalib
@pytest.mark.parametrize(
    ("masking", "size"),
    [(False, SIZE), (False, (118, 125)), (True, SIZE)],
    ids=["plain", "crop-to-patch-size", "pca-masking"],
)
def test_refiner_off_reproduces_anomalib_anomaly_dino(
    upstream_offline: None, masking: bool, size: int | tuple[int, int]
) -> None:
    upstream, plus = upstream_and_ours(masking=masking, refiner=False)
    support = images(2, 0, size, square=masking)
    fit_upstream(upstream, support)
    plus.fit_support(support)
    torch.testing.assert_close(plus.model.memory_bank, upstream.model.memory_bank, atol=1e-6, rtol=0)
    if masking:  # some patches masked out, some kept
        assert 0 < len(plus.model.memory_bank) < 2 * 64
    queries = images(3, 1, size, square=masking)
    plus.model.eval()
    theirs, ours = upstream.model(queries), plus.model(queries)
    assert ours.anomaly_map.shape == theirs.anomaly_map.shape == (3, 1, *queries.shape[-2:])
    torch.testing.assert_close(ours.pred_score, theirs.pred_score, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.anomaly_map, theirs.anomaly_map, atol=1e-5, rtol=0)
    # The same scores through the Lightning validation step.
    batch = type("Batch", (), {"image": queries, "update": lambda self, **kw: kw})()
    torch.testing.assert_close(plus.validation_step(batch)["pred_score"], theirs.pred_score, atol=1e-5, rtol=0)


def test_masking_that_keeps_no_support_patch_is_an_error() -> None:
    torch.manual_seed(0)
    plus = AnomalyDINOPlus(pre_trained=False, masking=True)
    with pytest.raises(ValueError, match="masking=True kept no patch"):
        plus.fit_support(images(2, 0))  # pure noise: PCA masking drops every patch of this random encoder


def test_num_neighbours_matches_anomalib(upstream_offline: None) -> None:
    upstream = AnomalyDINO(num_neighbours=3, post_processor=False, evaluator=False, visualizer=False)
    plus = AnomalyDINOPlus(num_neighbours=3, pre_trained=False, refiner=False, post_processor=False)
    plus.model.feature_encoder.load_state_dict(upstream.model.feature_encoder.state_dict())
    fit_upstream(upstream, images(2, 0))
    plus.fit_support(images(2, 0))
    plus.model.eval()
    torch.testing.assert_close(plus.model(images(2, 1)).pred_score, upstream.model(images(2, 1)).pred_score)


# ---------------------------------------------------------------------- refinement
def reference_tokens(plus: AnomalyDINOPlus, batch: torch.Tensor) -> torch.Tensor:
    """Last-block patch tokens straight from timm (final norm, class token dropped), L2-normalised."""
    encoder = timm.create_model(ENCODER, pretrained=False, dynamic_img_size=True)
    encoder.load_state_dict(plus.model.feature_encoder.feature_extractor.state_dict())
    with torch.no_grad():
        tokens = encoder.forward_features(batch)[:, encoder.num_prefix_tokens :]
    return torch.nn.functional.normalize(tokens, dim=-1)


@pytest.mark.parametrize("preset", ["fused", "paper"])
def test_refined_scores_are_the_refiners_cosine_distances(preset: str) -> None:
    """Image score = mean of the top 1 % of ``2 x`` the refiner's ``(1 - cos) / 2`` on timm's own tokens."""
    torch.manual_seed(0)
    plus = AnomalyDINOPlus(pre_trained=False, refiner=preset, post_processor=False)
    support, queries = images(2, 0), images(2, 1)
    plus.fit_support(support)
    plus.model.eval()
    out = plus.model(queries)
    bank = reference_tokens(plus, support).reshape(-1, 384)
    torch.testing.assert_close(plus.model.memory_bank, bank, atol=1e-5, rtol=0)
    refiner = PrototypeRefiner(
        **{"fused": plus.refiner_presets["fused"], "paper": plus.refiner_presets["paper"]}[preset]
    )
    distances = 2 * refiner.patch_scores(reference_tokens(plus, queries), bank)  # (2, 64)
    top = distances.topk(max(int(64 * 0.01), 1), dim=1).values.mean(1, keepdim=True)
    torch.testing.assert_close(out.pred_score, top, atol=1e-5, rtol=0)
    plain = AnomalyDINOPlus(pre_trained=False, refiner=False, post_processor=False)
    plain.model.load_state_dict(plus.model.state_dict())
    plain.model.eval()
    nearest = (1 - reference_tokens(plus, queries) @ bank.T).amin(-1)
    torch.testing.assert_close(
        plain.model(queries).anomaly_map,
        plain.model.anomaly_map_generator(nearest.reshape(2, 1, 8, 8), (SIZE, SIZE)),
        atol=1e-5,
        rtol=0,
    )
    assert not torch.allclose(out.pred_score, plain.model(queries).pred_score, atol=1e-3)


def test_bf16_autocast_scores_match_float32() -> None:
    """Under ``torch.autocast`` (``precision="bf16-mixed"``) the distances and the refinement run in float32."""
    torch.manual_seed(0)
    plus = AnomalyDINOPlus(pre_trained=False, refiner="fused", post_processor=False)
    plus.fit_support(images(2, 0))
    plus.model.eval()
    tokens, grid = plus.model.embed(images(2, 1))
    reference = plus.model.score_embedding(tokens, grid, (SIZE, SIZE))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = plus.model.score_embedding(tokens.bfloat16(), grid, (SIZE, SIZE))
    assert mixed.pred_score.dtype == torch.float32
    torch.testing.assert_close(mixed.pred_score, reference.pred_score, atol=2e-2, rtol=2e-2)
    assert torch.corrcoef(torch.stack([mixed.anomaly_map.flatten(), reference.anomaly_map.flatten()]))[0, 1] > 0.99


# ---------------------------------------------------------------------- arguments and weights
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encoder_name": "vit_small_patch16_224"}, "encoder_name must be a timm DINO ViT"),
        ({"num_neighbours": 0}, "num_neighbours must be an integer >= 1"),
        ({"num_neighbours": 3, "refiner": "fused"}, "use num_neighbours=1 with a refiner"),
        ({"refiner": PrototypeRefiner(distance="euclidean")}, "needs distance='cosine'"),
        ({"refiner": "nonsense"}, "refiner='nonsense' is not a preset"),
        ({"precision": "bf16"}, "precision must be 'float32' or 'float16'"),
        ({"sampling_ratio": 0.0}, r"^sampling_ratio must be in \(0, 1\]"),
        ({"sampling_ratio": "0.1"}, r"^sampling_ratio must be a number.*--model.sampling_ratio 0.1"),
        ({"encoder_name": "dinov9_huge"}, r"^`encoder_name`='dinov9_huge' is not a timm model name"),
        ({"k_shot": 0}, "k_shot"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        AnomalyDINOPlus(pre_trained=False, **kwargs)


def test_num_neighbours_above_the_bank_size_warns_once_naming_both() -> None:
    """k-NN scoring averages at most the whole bank: a larger num_neighbours is said, and scores as the whole bank."""
    plus = AnomalyDINOPlus(pre_trained=False, num_neighbours=100_000, visualizer=False)
    support = images(2, seed=0, size=56)
    with pytest.warns(UserWarning, match=r"num_neighbours=100000 exceeds the memory bank's 32 patches") as caught:
        plus.fit_support(support)
    assert len([w for w in caught if "num_neighbours" in str(w.message)]) == 1
    torch.manual_seed(0)
    whole_bank = AnomalyDINOPlus(pre_trained=False, num_neighbours=32, visualizer=False)
    whole_bank.model.feature_encoder.load_state_dict(plus.model.feature_encoder.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # num_neighbours equal to the bank size: nothing to say
        whole_bank.fit_support(support)
    query = images(1, seed=1, size=56)
    plus.model.eval()
    whole_bank.model.eval()
    torch.testing.assert_close(plus.model(query).pred_score, whole_bank.model(query).pred_score)


def test_weights_file_loads_strictly_and_wrong_files_are_named(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = timm.create_model(ENCODER, pretrained=False, num_classes=0)
    path = tmp_path / "dinov2.pth"
    torch.save(reference.state_dict(), path)
    plus = AnomalyDINOPlus(weights=str(path))
    for name, value in reference.state_dict().items():
        assert torch.equal(plus.model.feature_encoder.feature_extractor.state_dict()[name], value), name
    wrong = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"do not fit encoder 'vit_small_patch14_dinov2'"):
        AnomalyDINOPlus(weights=str(wrong))
    with pytest.raises(ValueError, match="pre_trained=False"):
        AnomalyDINOPlus(weights=str(path), pre_trained=False)
    with pytest.raises(FileNotFoundError, match="is not an existing file"):
        AnomalyDINOPlus(weights=str(tmp_path / "missing.pth"))


def test_offline_hub_error_names_the_fixes(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("offline")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    with pytest.raises(RuntimeError, match=r"weights=/path/to/file.pth.*pre_trained=False"):
        AnomalyDINOPlus()


# ---------------------------------------------------------------------- Lightning, checkpoints, registry, CLI
@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("data"), num_train=4, num_test_good=3, num_test_defect=3, image_size=SIZE
    )


def make_datamodule(root: Path, val_split_mode: str = "none") -> Folder:
    kwargs = {**folder_kwargs(), "root": root, "test_split_mode": "from_dir", "val_split_mode": val_split_mode}
    return Folder(**kwargs, train_batch_size=4, eval_batch_size=4, num_workers=0, seed=0)


def trainer() -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)


def small_model(**kwargs: object) -> AnomalyDINOPlus:
    torch.manual_seed(0)
    defaults = {"pre_trained": False, "k_shot": 2, "pre_processor": AnomalyDINOPlus.configure_pre_processor(SIZE)}
    return AnomalyDINOPlus(**{**defaults, **kwargs})


def test_registry_and_direct_subclass() -> None:
    assert AnomalyDINOPlus in AnomalibModule.__subclasses__()
    assert issubclass(AnomalyDINOPlus, AnomalyDINO)
    assert isinstance(AnomalyDINOPlus(pre_trained=False).model, AnomalyDINOPlusModel)
    model = get_model("AnomalyDINOPlus", pre_trained=False, k_shot=1, refiner="paper")
    assert isinstance(model, AnomalyDINOPlus)
    assert model.model.refiner.options.score_fusion == "none"
    configured = AnomalyDINOPlus.from_config(
        REPO / "configs" / "anomaly_dino_plus.yaml", **{"model.pre_trained": False}
    )
    assert (configured.k_shot, configured.model.refiner, configured.threshold) == (2, None, "auto")


def test_checkpoint_round_trip_keeps_bank_refiner_and_thresholds(dataset_root: Path, tmp_path: Path) -> None:
    model = small_model(refiner={"lambda_": 0.2}, few_shot_seed=1)
    run = trainer()
    run.test(model, datamodule=make_datamodule(dataset_root), verbose=False)
    assert len(model.support_paths) == 2
    assert model.post_processor.threshold_origin == "support"
    path = tmp_path / "anomaly_dino_plus.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["hyper_parameters"]["pre_trained"] is False  # the encoder is in the state dict
    assert checkpoint["hyper_parameters"]["refiner"]["lambda_"] == 0.2

    torch.manual_seed(123)  # another random encoder: everything must come from the checkpoint
    reloaded = AnomalyDINOPlus.load_from_checkpoint(path)
    assert reloaded.support_paths == model.support_paths
    assert reloaded.model.refiner.options.lambda_ == 0.2
    assert float(reloaded.post_processor.image_threshold) == float(model.post_processor.image_threshold)
    queries = images(2, 5)
    model.model.eval()
    reloaded.model.eval()
    assert torch.equal(model.model(queries).pred_score, reloaded.model(queries).pred_score)

    # Built from other arguments, then loaded with ckpt_path (anomalib predict/export --ckpt_path): the checkpoint wins.
    fresh = small_model(refiner=False, few_shot_seed=0)
    with pytest.warns(UserWarning, match=r"refiner=.*constructor: False.*few_shot_seed=1 \(constructor: 0\)"):
        trainer().test(fresh, datamodule=make_datamodule(dataset_root), ckpt_path=path, verbose=False)
    assert fresh.model.refiner.options.lambda_ == 0.2
    assert fresh.support_paths == model.support_paths
    fresh.model.eval()
    assert torch.equal(fresh.model(queries).pred_score, model.model(queries).pred_score)

    other = dict(checkpoint, hyper_parameters={"backbone": "resnet18"})
    with pytest.raises(ValueError, match="not an AnomalyDINOPlus checkpoint"):
        small_model().on_load_checkpoint(other)
    wrong_encoder = dict(
        checkpoint, hyper_parameters={**checkpoint["hyper_parameters"], "encoder_name": "vit_base_patch14_dinov2"}
    )
    with pytest.raises(ValueError, match="encoder_name='vit_base_patch14_dinov2'"):
        small_model().on_load_checkpoint(wrong_encoder)


def test_full_shot_builds_the_bank_from_every_training_image(dataset_root: Path, upstream_offline: None) -> None:
    """``k_shot=None`` is anomalib's behaviour: Engine.fit collects every training image, as anomalib's model does."""
    from anomalib.engine import Engine

    quiet = {"logger": False, "enable_progress_bar": False, "accelerator": "cpu"}
    model = small_model(k_shot=None, threshold="validation")
    Engine(**quiet).fit(model, datamodule=make_datamodule(dataset_root, "same_as_test"))
    upstream = AnomalyDINO(pre_processor=AnomalyDINOPlus.configure_pre_processor(SIZE))
    upstream.model.feature_encoder.load_state_dict(model.model.feature_encoder.state_dict())
    Engine(**quiet).fit(upstream, datamodule=make_datamodule(dataset_root, "same_as_test"))
    assert model.model.memory_bank.shape == (4 * 64, 384)  # 4 training images x 8 x 8 patches
    torch.testing.assert_close(
        model.model.memory_bank.sort(0).values, upstream.model.memory_bank.sort(0).values, atol=1e-6, rtol=0
    )


def test_changing_the_seed_rebuilds_the_support(dataset_root: Path) -> None:
    model = small_model(threshold="validation")
    trainer().test(model, datamodule=make_datamodule(dataset_root), verbose=False)
    first = model.support_paths
    model.few_shot_seed = 3
    assert model.model.memory_bank.numel() == 0
    assert model.support_paths == ()
    trainer().test(model, datamodule=make_datamodule(dataset_root), verbose=False)
    assert model.support_paths != first
    assert model.hparams["few_shot_seed"] == 3


def test_onnx_export_reproduces_scores_and_maps(tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    for refiner in (False, "fused"):
        model = small_model(refiner=refiner, k_shot=None, threshold="validation", post_processor=False)
        model.fit_support(images(2, 0))
        model.eval()
        path = model.to_onnx(tmp_path / str(refiner), input_size=(SIZE, SIZE))
        raw = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
        expected = model(raw)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = dict(
            zip([o.name for o in session.get_outputs()], session.run(None, {"input": raw.numpy()}), strict=True)
        )
        torch.testing.assert_close(torch.from_numpy(outputs["pred_score"]), expected.pred_score, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(outputs["anomaly_map"]), expected.anomaly_map, atol=1e-4, rtol=1e-4)
        ov = pytest.importorskip("openvino")
        compiled = ov.Core().compile_model(ov.convert_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        run = {out.get_any_name(): value for out, value in compiled(raw.numpy()).items()}
        torch.testing.assert_close(torch.from_numpy(run["pred_score"]), expected.pred_score, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(run["anomaly_map"]), expected.anomaly_map, atol=1e-4, rtol=1e-4)
    masked = small_model(masking=True, k_shot=None, threshold="validation", post_processor=False)
    masked.fit_support(images(2, 0, square=True))
    with pytest.raises(ValueError, match="masking=True"):
        masked.to_onnx(tmp_path / "masked", input_size=(SIZE, SIZE))


def test_torch_export_and_inferencer_give_engine_predict_scores(
    dataset_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``anomalib export --export_type torch`` + ``TorchInferencer`` give ``Engine.predict``'s scores and maps."""
    from anomalib.deploy import ExportType, TorchInferencer
    from anomalib.engine import Engine

    model = small_model(refiner="fused", few_shot_source=str(dataset_root / "train" / "good"))
    quiet = {"logger": False, "enable_progress_bar": False, "accelerator": "cpu"}
    engine = Engine(default_root_dir=tmp_path / "run", **quiet)
    folder = dataset_root / "test" / "defect"
    predictions = engine.predict(model, data_path=folder)  # support and thresholds from few_shot_source
    exported = engine.export(model, ExportType.TORCH, export_root=tmp_path / "export")
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # the exported file is a pickled model
    inferencer = TorchInferencer(exported, device="cpu")
    compared = 0
    for batch in predictions:
        for path, score, label, anomaly_map in zip(
            batch.image_path, batch.pred_score, batch.pred_label, batch.anomaly_map, strict=True
        ):
            result = inferencer.predict(path)
            torch.testing.assert_close(result.pred_score.reshape(()), score.reshape(()), rtol=0, atol=1e-4)
            torch.testing.assert_close(result.anomaly_map.reshape(anomaly_map.shape), anomaly_map, rtol=0, atol=1e-4)
            assert bool(result.pred_label.reshape(())) == bool(label.reshape(()))
            compared += 1
    assert compared == len(list(folder.glob("*.png")))


@pytest.mark.slow
def test_anomalib_cli_short_name(dataset_root: Path, tmp_path: Path) -> None:
    output = run_anomalib_test(
        [
            "--model",
            "AnomalyDINOPlus",
            "--model.pre_trained",
            "false",
            "--model.k_shot",
            "2",
            "--model.refiner",
            "fused",
        ],
        folder_kwargs(),
        dataset_root,
        tmp_path / "results",
    )
    assert "image_AUROC" in output
    assert "AnomalyDINOPlus decides with thresholds from" in output
    assert "refinement/em_iterations" in output
