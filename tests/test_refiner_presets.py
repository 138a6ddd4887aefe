"""The ``refiner`` argument of the models: presets (default ``"fused"``, ``"paper"``, ``"off"``), dicts over
the default, and self-calibration (``"auto"``) end to end on the quick synthetic data set."""

from __future__ import annotations

import pytest
import torch
from anomalib.engine import Engine

from anomalib_protorefine import PatchCorePlus, PrototypeRefiner
from anomalib_protorefine.models.patchcore_plus.lightning_model import (
    PATCHCORE_AUTO_CANDIDATES,
    PATCHCORE_PAPER_REFINER,
    PATCHCORE_REFINER_PRESETS,
)
from test_patchcore_plus import QUIET, make_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _options(model: PatchCorePlus) -> dict | None:
    return None if model.model.refiner is None else model.model.refiner.options.as_dict()


def test_default_is_the_fused_form_and_paper_is_one_argument_away() -> None:
    default = _options(make_model())
    assert default == PrototypeRefiner(**PATCHCORE_REFINER_PRESETS["fused"]).options.as_dict()
    assert (default["score_fusion"], default["lambda_"], default["num_iterations"]) == ("geometric", 0.3, 10)
    assert (default["neighbors"], default["scoring_bank"]) == (None, "refined")
    paper = _options(make_model(refiner="paper"))
    assert paper == PrototypeRefiner(**PATCHCORE_PAPER_REFINER).options.as_dict()
    assert (paper["score_fusion"], paper["lambda_"], paper["num_iterations"]) == ("none", 0.3, 10)
    assert {k for k in default if default[k] != paper[k]} == {"score_fusion"}
    assert _options(make_model(refiner="off")) is None
    assert _options(make_model(refiner=False)) is None


def test_local_preset_is_the_linear_cost_form() -> None:
    """``refiner="local"``: 16 neighbours, no transport term, own refined prototype, fused with the nearest one."""
    local = _options(make_model(refiner="local"))
    default = _options(make_model())
    expected = {"neighbors": 16, "transport": False, "scoring_bank": "matched", "score_fusion": "geometric"}
    assert {key: local[key] for key in expected} == expected
    assert {k for k in default if default[k] != local[k]} == {"neighbors", "transport", "scoring_bank"}


def test_dict_overrides_the_default_form() -> None:
    options = _options(make_model(refiner={"lambda_": 1.0}))
    assert (options["lambda_"], options["score_fusion"]) == (1.0, "geometric")
    paper_like = _options(make_model(refiner={"score_fusion": "none"}))
    assert paper_like == PrototypeRefiner(**PATCHCORE_PAPER_REFINER).options.as_dict()
    local = _options(make_model(refiner={"neighbors": 16, "affine": True}))
    assert (local["neighbors"], local["affine"], local["score_fusion"]) == (16, True, "geometric")


def test_unknown_preset_names_the_choices() -> None:
    names = "'fused', 'paper', 'local', 'auto', 'off'"
    with pytest.raises(ValueError, match=f"refiner='fast' is not a preset: use one of {names}"):
        make_model(refiner="fast")


def test_auto_needs_support_images() -> None:
    with pytest.raises(ValueError, match="refiner='auto' calibrates on the k support images"):
        make_model(refiner="auto", k_shot=None)


@pytest.mark.slow
def test_auto_calibrates_on_the_support_images(quick_datamodule, tmp_path) -> None:
    """``refiner="auto"`` picks a candidate from the support images alone, deterministically, and the model
    then scores with exactly that candidate's refiner."""
    choices = []
    for _ in range(2):
        model = make_model(refiner="auto")
        Engine(default_root_dir=tmp_path, **QUIET).test(model, datamodule=quick_datamodule())
        assert model.calibration is not None
        assert set(model.calibration.scores) == set(PATCHCORE_AUTO_CANDIDATES)
        assert model.calibration.choice == max(model.calibration.scores, key=model.calibration.scores.get)
        expected = None if model.calibration.choice == "off" else PATCHCORE_REFINER_PRESETS[model.calibration.choice]
        if expected is None:
            assert model.model.refiner is None
            assert model.hparams["refiner"] is False
        else:
            assert model.model.refiner.options == PrototypeRefiner(**expected).options
            assert model.hparams["refiner"] == model.model.refiner.options.as_dict()
        # The bank is the full support bank again after the leave-one-out folds.
        assert model.model.memory_bank.shape[0] == make_bank_size(model)
        choices.append((model.calibration.choice, model.calibration.scores))
    assert choices[0] == choices[1]


def make_bank_size(model: PatchCorePlus) -> int:
    """Size of the coreset of ``k_shot`` support images (patches per image x k x ratio)."""
    grid = model._grid_of(torch.zeros(1, 3, 128, 128))
    return max(int(grid[0] * grid[1] * model.k_shot * model.coreset_sampling_ratio), 1)


def test_sgd_step_size_beyond_the_stable_range_names_lr() -> None:
    """SGD on the M-step's L-smooth quadratic diverges for lr >= 2 (units of 1/L): refused before any work."""
    with pytest.raises(ValueError, match=r"lr=10 with optimizer='sgd'.*diverges for lr >= 2"):
        PrototypeRefiner(m_step="gradient", lr=10)
    refiner = PrototypeRefiner(m_step="gradient", lr=1.9)
    torch.manual_seed(0)
    assert torch.isfinite(refiner.refine(torch.randn(1, 50, 16), torch.randn(20, 16)).prototypes).all()


@pytest.mark.parametrize(
    ("image_size", "pre_processor", "match"),
    [
        (0, True, r"^image_size must be a positive integer or \[height, width\]"),
        (True, True, r"^image_size must be a positive integer"),
        ((256, 256, 3), True, r"^image_size must be a positive integer"),
        ("512", True, r"^image_size must be a positive integer"),
        (512, False, r"^image_size sets the size of the default pre-processor, but pre_processor was given"),
    ],
)
def test_bad_image_size_is_refused_naming_it(image_size: object, pre_processor: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_model(image_size=image_size, pre_processor=pre_processor)


def test_image_size_builds_the_default_pre_processor_at_that_size_and_is_saved_plain() -> None:
    import yaml

    from anomalib_protorefine.models.checkpoints import input_size

    model = make_model(image_size=(96, 160), pre_processor=True)
    assert input_size(model.pre_processor) == (96, 160)
    assert yaml.safe_load(yaml.safe_dump(dict(model.hparams)))["image_size"] == [96, 160]
    assert input_size(make_model(image_size=128, pre_processor=True).pre_processor) == (128, 128)
    assert input_size(make_model(pre_processor=True).pre_processor) == (256, 256)
