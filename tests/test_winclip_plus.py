"""Tests of WinClipPlus (WinCLIP+, paper Sec. 5.2), offline with a tiny random-weight CLIP.

The tiny open_clip architecture of ``models/winclip_plus/tiny_clip.py`` keeps WinCLIP's 240 px / 16 px grid, so
upstream ``WinClipModel`` runs on it too (its module globals are monkeypatched to it) and the two
can be compared score for score with the same weights and references.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import open_clip
import pytest
import torch
from anomalib.data import Folder
from anomalib.data.utils import read_image
from anomalib.models import get_model
from anomalib.models.components import AnomalibModule
from anomalib.models.image.winclip import WinClip, WinClipModel
from anomalib.models.image.winclip import torch_model as upstream_torch_model
from anomalib.models.image.winclip.utils import class_scores
from lightning.pytorch import Trainer

from anomalib_protorefine import WinClipPlus, WinClipPlusModel
from anomalib_protorefine.clip_weights import resolve_pretrained
from anomalib_protorefine.data import folder_kwargs, generate_dataset
from anomalib_protorefine.models.winclip_plus import tiny_clip
from anomalib_protorefine.models.winclip_plus.torch_model import fuse_image_scores
from anomalib_protorefine.refinement import PrototypeRefiner
from cli_helpers import run_anomalib_test

REPO = Path(__file__).resolve().parents[1]
K_SHOT = 2


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: the tiny tensors here gain nothing from more, and shared CI cores lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic Folder dataset at WinCLIP's 240 px (4 train, 2 good + 2 defect test images)."""
    return generate_dataset(
        tmp_path_factory.mktemp("data"), num_train=4, num_test_good=2, num_test_defect=2, image_size=240
    )


def make_datamodule(root: Path) -> Folder:
    kwargs = {**folder_kwargs(), "root": root, "test_split_mode": "from_dir", "val_split_mode": "same_as_test"}
    return Folder(**kwargs, train_batch_size=4, eval_batch_size=4, num_workers=0, seed=0)


@pytest.fixture
def datamodule(dataset_root: Path) -> Folder:
    return make_datamodule(dataset_root)


@pytest.fixture
def upstream_on_tiny(tiny_json: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make upstream WinClip build the tiny CLIP with random weights (it reads module globals)."""
    del tiny_json
    monkeypatch.setattr(upstream_torch_model, "BACKBONE", tiny_clip.TINY_NAME)
    monkeypatch.setattr(upstream_torch_model, "PRETRAINED", None)


def tiny_model(tiny_json: str, **kwargs: object) -> WinClipPlus:
    torch.manual_seed(0)  # the same random CLIP weights for every model built here
    defaults = {"backbone": tiny_json, "pretrained": None, "k_shot": K_SHOT, "class_name": "widget"}
    return WinClipPlus(**{**defaults, **kwargs})


def trainer() -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)


def normalised_images(paths: list[Path] | tuple[str, ...]) -> torch.Tensor:
    transform = WinClipPlus.configure_pre_processor().transform
    return torch.stack([transform(read_image(str(path), as_tensor=True)) for path in paths])


def assert_each_shot_is_a_normalised_image(shots: torch.Tensor, pool: torch.Tensor) -> None:
    """Every reference image must equal one CLIP-pre-processed (resized + normalised) pool image."""
    assert shots.shape[1:] == pool.shape[1:], f"shots {tuple(shots.shape)} not pre-processed to {tuple(pool.shape)}"
    for shot in shots:
        distances = (pool - shot.cpu()).flatten(1).abs().amax(1)
        assert distances.min() < 1e-5, (
            f"a reference image is not CLIP-normalised (pixel range [{shot.min():.2f}, {shot.max():.2f}])"
        )


# ---------------------------------------------------------------------- scores
@pytest.fixture(scope="module")
def references() -> torch.Tensor:
    return torch.randn(K_SHOT, 3, 240, 240, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def queries() -> torch.Tensor:
    return torch.randn(3, 3, 240, 240, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def plain_and_refined(tiny_json: str, references: torch.Tensor) -> tuple[WinClipPlusModel, WinClipPlusModel]:
    """Two torch models with identical weights and references, without and with refinement."""
    torch.manual_seed(0)
    plain = WinClipPlusModel(backbone=tiny_json, pretrained=None).eval()
    refined = WinClipPlusModel(
        backbone=tiny_json, pretrained=None, refiner=PrototypeRefiner(lambda_=0.1, distance="cosine")
    ).eval()
    refined.clip.load_state_dict(plain.clip.state_dict())
    for model in (plain, refined):
        model.setup("widget", references)
    return plain, refined


def test_refiner_false_reproduces_upstream_winclip_exactly(
    upstream_on_tiny: None, plain_and_refined: tuple, references: torch.Tensor, queries: torch.Tensor
) -> None:
    plain, _ = plain_and_refined
    upstream = WinClipModel().eval()
    upstream.clip.load_state_dict(plain.clip.state_dict())
    upstream.setup("widget", references)
    ours, theirs = plain(queries), upstream(queries)
    assert torch.equal(ours.pred_score, theirs.pred_score)
    assert torch.equal(ours.anomaly_map, theirs.anomaly_map)
    # Zero-shot too (no references).
    plain_zero = WinClipPlusModel(backbone=tiny_clip.TINY_NAME, pretrained=None).eval()
    plain_zero.clip.load_state_dict(plain.clip.state_dict())
    plain_zero.setup("widget")
    upstream_zero = WinClipModel(class_name="widget").eval()
    upstream_zero.clip.load_state_dict(plain.clip.state_dict())
    upstream_zero.setup("widget")
    assert torch.equal(plain_zero(queries).pred_score, upstream_zero(queries).pred_score)


def test_refinement_changes_few_shot_scores(plain_and_refined: tuple, queries: torch.Tensor) -> None:
    plain, refined = plain_and_refined
    _, windows, patches = refined.encode_image(queries)
    # Each of the 1 + len(scales) reference sets is refined against its own coreset bank.
    seen: list[dict[str, float]] = []
    original = refined.refiner.patch_scores

    def recording(*args: torch.Tensor) -> torch.Tensor:
        scores = original(*args)
        seen.append(dict(refined.refiner.last_stats))
        return scores

    with mock.patch.object(refined.refiner, "patch_scores", side_effect=recording) as spy:
        refined_map = refined._compute_few_shot_scores(patches, windows)
    # The batch's statistics: total refinement time of the reference sets, mean of the rest.
    stats = refined.refinement_stats
    assert stats["seconds"] == pytest.approx(sum(s["seconds"] for s in seen))
    assert stats["em_iterations"] == pytest.approx(sum(s["em_iterations"] for s in seen) / 3)
    assert 0 < stats["em_iterations"] <= 10
    banks = [refined._patch_bank, *refined._window_banks]
    assert spy.call_count == len(banks) == 3
    for call, query_set, bank in zip(spy.call_args_list, [patches, *windows], banks, strict=True):
        assert torch.equal(call.args[0], query_set)
        assert call.args[1] is bank
    # alpha = 0.5 of the k * (patches or windows) reference embeddings.
    assert [b.shape[0] for b in banks] == [K_SHOT * 225 // 2, K_SHOT * 196 // 2, K_SHOT * 169 // 2]
    plain_map = plain._compute_few_shot_scores(patches, windows)
    assert refined_map.shape == plain_map.shape == (3, 15, 15)
    assert torch.isfinite(refined_map).all()
    assert (refined_map - plain_map).abs().max() > 1e-3
    # The zero-shot part is untouched; the final scores change.
    assert not torch.equal(refined(queries).pred_score, plain(queries).pred_score)


def test_image_score_fusion_eq9(plain_and_refined: tuple, queries: torch.Tensor) -> None:
    assert torch.allclose(
        fuse_image_scores(torch.tensor([0.2, 0.8]), torch.tensor([[[0.1, 0.6]], [[0.0, 0.2]]])),
        torch.tensor([0.4, 0.5]),
    )
    for model in plain_and_refined:
        image, windows, patches = model.encode_image(queries)
        s0 = class_scores(image, model.text_embeddings, model.temperature, target_class=1)
        few_shot = model._compute_few_shot_scores(patches, windows)
        zero_shot_map = model._compute_zero_shot_scores(s0, windows)
        output = model(queries)
        assert torch.allclose(output.pred_score, (s0 + few_shot.flatten(1).max(1).values) / 2, atol=1e-6)
        expected_map = torch.nn.functional.interpolate(
            ((zero_shot_map + few_shot) / 2).unsqueeze(1), size=(240, 240), mode="bilinear"
        ).squeeze(1)
        assert torch.allclose(output.anomaly_map, expected_map, atol=1e-6)


def test_bf16_autocast_scores_match_float32(plain_and_refined: tuple, queries: torch.Tensor) -> None:
    """Under ``torch.autocast`` (``precision="bf16-mixed"``) few-shot scoring still runs in float32."""
    for model in plain_and_refined:
        _, windows, patches = model.encode_image(queries)
        expected_map = model._compute_few_shot_scores(patches, windows)
        expected = model(queries)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            few_shot_map = model._compute_few_shot_scores(patches, windows)
            output = model(queries)
        torch.testing.assert_close(few_shot_map, expected_map, rtol=1e-5, atol=1e-5)
        assert output.pred_score.dtype == torch.float32
        # The CLIP encoders themselves run in bfloat16 under autocast: scores move by its rounding only.
        torch.testing.assert_close(output.pred_score, expected.pred_score, rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(output.anomaly_map, expected.anomaly_map, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("scales", [[], [0], "23", [2, 99]])
def test_bad_scales_name_the_option(tiny_json: str, scales: object) -> None:
    with pytest.raises(ValueError, match=r"scales.*scales=\[2, 3\]"):
        WinClipPlus(backbone=tiny_json, pretrained=None, scales=scales)


def test_setting_k_shot_after_construction(tiny_json: str, dataset_root: Path) -> None:
    """``model.k_shot = 1`` after a run: the references are re-drawn with the new k, hparams follow."""
    model = tiny_model(tiny_json, refiner=False)
    trainer().validate(model, datamodule=make_datamodule(dataset_root), verbose=False)
    assert model.model.k_shot == K_SHOT
    model.k_shot = 1
    assert model.hparams["k_shot"] == 1
    assert not model.model.has_references
    assert model.support_paths == ()
    trainer().validate(model, datamodule=make_datamodule(dataset_root), verbose=False)
    assert model.model.k_shot == 1
    assert len(model.support_paths) == 1
    model.k_shot = 0  # zero-shot
    assert model.k_shot is None
    assert model.learning_type.value == "zero_shot"
    with pytest.raises(ValueError, match="k_shot must be a positive integer"):
        model.k_shot = -1


def test_partial_refiner_override_from_the_command_line_keeps_model_defaults(tiny_json: str) -> None:
    """``--model.refiner.lambda_ 0.2`` (jsonargparse, as ``anomalib test`` parses it) keeps the cosine defaults."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AnomalibModule, "model")
    args = ["--model", "anomalib_protorefine.WinClipPlus", "--model.backbone", tiny_json]
    args += ["--model.pretrained", "null", "--model.refiner.lambda_", "0.2"]
    model = parser.instantiate_classes(parser.parse_args(args)).model
    options = model.model.refiner.options
    assert (options.lambda_, options.distance, options.num_iterations) == (0.2, "cosine", 10)
    assert model.hparams["refiner"]["lambda_"] == 0.2
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lamda'\].*lambda_"):
        WinClipPlus(backbone=tiny_json, pretrained=None, refiner={"lamda": 0.2})


def test_refiner_must_be_cosine(tiny_json: str) -> None:
    with pytest.raises(ValueError, match="distance='cosine'"):
        WinClipPlus(backbone=tiny_json, pretrained=None, refiner={"distance": "euclidean"})
    with pytest.raises(ValueError, match="coreset_sampling_ratio"):
        WinClipPlus(backbone=tiny_json, pretrained=None, coreset_sampling_ratio=0.0)


# ---------------------------------------------------------------------- shots
def test_seeded_shots_are_reproducible_and_normalised(tiny_json: str, dataset_root: Path) -> None:
    def support(seed: int) -> tuple[tuple[str, ...], torch.Tensor]:
        support = tiny_model(tiny_json, few_shot_seed=seed).select_support(make_datamodule(dataset_root))
        return support.paths, support.images

    paths_a, shots_a = support(0)
    paths_b, shots_b = support(0)
    paths_c, _ = support(1)
    assert len(paths_a) == K_SHOT
    assert paths_a == paths_b
    assert torch.equal(shots_a, shots_b)
    assert paths_c != paths_a
    assert torch.allclose(shots_a, normalised_images(paths_a), atol=1e-6)
    assert shots_a.min() < 0  # normalised, not raw [0, 1] pixels
    # The Lightning path draws the same seeded shots.
    model = tiny_model(tiny_json, few_shot_seed=0, refiner=False)
    trainer().validate(model, datamodule=make_datamodule(dataset_root), verbose=False)
    assert model.support_paths == paths_a
    assert torch.equal(model.model.reference_images, shots_a)


@pytest.mark.parametrize(
    "model_class",
    [
        WinClipPlus,
        pytest.param(
            WinClip,
            marks=pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason="anomalib 2.7.0 WinClip takes raw train-loader images as shots (no CLIP normalisation)",
            ),
        ),
    ],
)
def test_train_loader_shots_are_clip_normalised(
    model_class: type, upstream_on_tiny: None, tiny_json: str, datamodule: Folder, dataset_root: Path
) -> None:
    if model_class is WinClipPlus:
        model = tiny_model(tiny_json, refiner=False)  # the shots do not depend on the refiner
    else:
        model = WinClip(class_name="widget", k_shot=K_SHOT)
    trainer().validate(model, datamodule=datamodule, verbose=False)
    pool = normalised_images(sorted((dataset_root / "train" / "good").glob("*.png")))
    assert_each_shot_is_a_normalised_image(model.model.reference_images, pool)


@pytest.mark.parametrize(
    "model_class",
    [
        WinClipPlus,
        pytest.param(
            WinClip,
            marks=pytest.mark.xfail(
                strict=True,
                raises=AttributeError,
                reason="anomalib 2.7.0 WinClip: 'PreProcessor' object has no attribute 'test_transform'",
            ),
        ),
    ],
)
def test_few_shot_source(
    model_class: type, upstream_on_tiny: None, tiny_json: str, datamodule: Folder, dataset_root: Path
) -> None:
    source = dataset_root / "test" / "good"  # a folder outside the training set
    if model_class is WinClipPlus:
        model = tiny_model(tiny_json, few_shot_source=str(source), refiner=False)
    else:
        model = WinClip(class_name="widget", k_shot=K_SHOT, few_shot_source=source)
    trainer().validate(model, datamodule=datamodule, verbose=False)
    pool = normalised_images(sorted(source.glob("*.png")))
    assert_each_shot_is_a_normalised_image(model.model.reference_images, pool)
    assert all(Path(path).parent == source for path in model.support_paths)


# ---------------------------------------------------------------------- weights and text
def test_backbone_and_pretrained_are_arguments(tiny_json: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = WinClipPlusModel(backbone=tiny_json, pretrained=None)
    checkpoint = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(source.clip.state_dict(), checkpoint)
    torch.manual_seed(1)
    loaded = WinClipPlusModel(backbone=tiny_json, pretrained=str(checkpoint))
    assert loaded.backbone == tiny_clip.TINY_NAME
    for key, value in source.clip.state_dict().items():
        assert torch.equal(value, loaded.clip.state_dict()[key]), key
    with pytest.raises(FileNotFoundError, match="pretrained="):
        WinClipPlusModel(backbone=tiny_json, pretrained=str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="backbone="):
        WinClipPlusModel(backbone="no-such-clip", pretrained=None)
    with pytest.raises(ValueError, match="open_clip tag"):
        resolve_pretrained("ViT-B-16-plus-240", "no_such_tag")


def test_offline_error_names_the_file_and_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> str:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(RuntimeError) as error:
        WinClipPlus(backbone="ViT-B-16-plus-240", pretrained="laion400m_e31")
    message = str(error.value)
    url = open_clip.pretrained.get_pretrained_cfg("ViT-B-16-plus-240", "laion400m_e31").get("url") or "huggingface.co"
    assert url in message
    assert 'pretrained="/path/to/' in message
    assert "--model.pretrained" in message


def test_text_embeddings_once_per_class_name(tiny_json: str) -> None:
    model = WinClipPlusModel(backbone=tiny_json, pretrained=None)
    with mock.patch.object(model.clip, "encode_text", wraps=model.clip.encode_text) as spy:
        model.setup("widget")
        model.setup("widget")
        assert spy.call_count == 2  # normal + anomalous prompts, once
        model.setup("gadget")
        assert spy.call_count == 4
    assert model.text_class_name == "gadget"
    state = model.state_dict()
    assert "_text_embeddings" in state
    assert "_text_class_name" in state


# ---------------------------------------------------------------------- Lightning, registry, CLI
def test_trainer_checkpoint_round_trip(tiny_json: str, datamodule: Folder, tmp_path: Path) -> None:
    model = tiny_model(tiny_json)
    assert isinstance(model, AnomalibModule)
    assert WinClipPlus in AnomalibModule.__subclasses__()
    assert model.learning_type.value == "few_shot"
    assert tiny_model(tiny_json, k_shot=0).learning_type.value == "zero_shot"
    run = trainer()
    run.test(model, datamodule=datamodule, verbose=False)
    assert model.model.refiner is not None
    assert len(model.support_paths) == K_SHOT
    path = tmp_path / "winclip_plus.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["hyper_parameters"]["pretrained"] is None  # the weights are in the state dict
    assert checkpoint["hyper_parameters"]["refiner"]["distance"] == "cosine"

    torch.manual_seed(123)  # different random init: everything must come from the checkpoint
    reloaded = WinClipPlus.load_from_checkpoint(path)
    assert reloaded.support_paths == model.support_paths
    assert reloaded.model.text_class_name == "widget"
    images = normalised_images(sorted((datamodule.root / "test" / "defect").glob("*.png")))
    model.model.eval()
    reloaded.model.eval()
    before, after = model.model(images), reloaded.model(images)
    assert torch.equal(before.pred_score, after.pred_score)
    assert torch.equal(before.anomaly_map, after.anomaly_map)
    # Testing the reloaded model encodes neither text nor references again.
    with (
        mock.patch.object(reloaded.model.clip, "encode_text", wraps=reloaded.model.clip.encode_text) as text,
        mock.patch.object(reloaded, "select_support", wraps=reloaded.select_support) as shots,
    ):
        trainer().test(reloaded, datamodule=make_datamodule(datamodule.root), verbose=False)
    assert text.call_count == 0
    assert shots.call_count == 0


def test_checkpoint_settings_win_over_constructor(tiny_json: str, datamodule: Folder, tmp_path: Path) -> None:
    """Build from arguments, then load with ``ckpt_path`` (``anomalib predict --ckpt_path``): the checkpoint wins."""
    model = tiny_model(tiny_json, refiner={"lambda_": 0.2, "num_iterations": 3}, coreset_sampling_ratio=0.3)
    run = trainer()
    run.test(model, datamodule=datamodule, verbose=False)
    path = tmp_path / "winclip_plus.ckpt"
    run.save_checkpoint(path)

    fresh = tiny_model(tiny_json, class_name="gadget")  # constructor: lambda 0.1, N 10, alpha 0.5
    with pytest.warns(UserWarning, match=r"refiner\.lambda_=0\.2 \(constructor: 0\.1\).*class_name='widget'"):
        trainer().test(fresh, datamodule=make_datamodule(datamodule.root), ckpt_path=path, verbose=False)
    options = fresh.model.refiner.options
    assert (options.lambda_, options.num_iterations, options.distance) == (0.2, 3, "cosine")
    assert (fresh.class_name, fresh.model.coreset_sampling_ratio) == ("widget", 0.3)
    assert fresh.model.text_class_name == "widget"
    images = normalised_images(sorted((datamodule.root / "test" / "defect").glob("*.png")))
    model.model.eval()
    fresh.model.eval()
    torch.testing.assert_close(fresh.model(images).pred_score, model.model(images).pred_score)


def test_registry_and_yaml_config(tiny_json: str) -> None:
    model = get_model("WinClipPlus", backbone=tiny_json, pretrained=None, k_shot=1, refiner=False)
    assert isinstance(model, WinClipPlus)
    assert model.model.refiner is None
    configured = WinClipPlus.from_config(
        REPO / "configs" / "winclip_plus.yaml", **{"model.backbone": tiny_json, "model.pretrained": "null"}
    )
    assert isinstance(configured, WinClipPlus)
    assert configured.k_shot == 2
    assert configured.model.refiner.options.lambda_ == 0.1
    assert configured.model.refiner.options.distance == "cosine"
    assert configured.model.coreset_sampling_ratio == 0.5


@pytest.mark.slow
def test_anomalib_cli_without_checkpoint(tiny_json: str, dataset_root: Path, tmp_path: Path) -> None:
    output = run_anomalib_test(
        [
            "--model",
            "WinClipPlus",
            "--model.k_shot",
            "2",
            "--model.backbone",
            tiny_json,
            "--model.pretrained",
            "null",
            "--model.class_name",
            "widget",
            "--model.refiner.lambda_",  # a partial override keeps WinClipPlus's cosine defaults
            "0.2",
        ],
        folder_kwargs(),
        dataset_root,
        tmp_path / "results",
    )
    assert "image_AUROC" in output
    assert "refinement/em_iterations" in output  # the refiner ran (and logged through its callback)


@pytest.mark.parametrize("k_shot", [1, 2])
def test_support_thresholds_from_the_reference_images(tiny_json: str, dataset_root: Path, k_shot: int) -> None:
    """Without any validation pass the references give finite thresholds in the post-processor, and predict decides."""
    import warnings

    from anomalib_protorefine.post_processing import FewShotPostProcessor

    source = dataset_root / "train" / "good"
    model = tiny_model(tiny_json, k_shot=k_shot, few_shot_source=str(source), threshold="support")
    assert isinstance(model.post_processor, FewShotPostProcessor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random CLIP weights may not separate the synthetic defects
        model.eval()
        model._ensure_ready()
    thresholds = model.support_thresholds
    assert thresholds.num_normal == 2 * k_shot  # two augmented copies of each reference image
    assert thresholds.num_defect == 3 * thresholds.num_normal
    assert model.post_processor.threshold_origin == "support"
    assert float(model.post_processor.image_threshold) == thresholds.image_threshold
    assert float(model.post_processor.pixel_threshold) == thresholds.pixel_threshold
    assert model.model.k_shot == k_shot  # the references are rebuilt from all k images afterwards
    images = normalised_images(sorted((dataset_root / "test" / "defect").glob("*.png")))
    with torch.no_grad():
        output = model.post_processor(model.model(images))
    assert output.pred_label.dtype == torch.bool
    assert bool(((output.pred_score >= 0) & (output.pred_score <= 1)).all())


def test_zero_shot_cannot_take_support_thresholds(tiny_json: str) -> None:
    with pytest.raises(ValueError, match=r"threshold='support'.*k_shot"):
        tiny_model(tiny_json, k_shot=0, threshold="support")
