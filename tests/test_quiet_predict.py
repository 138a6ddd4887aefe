"""A correct few-shot predict prints no misleading warning."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from anomalib.models import Patchcore

from anomalib_protorefine import PatchCorePlus

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_predict_with_few_shot_source_has_no_checkpoint_or_empty_list_warning(
    mixed_parts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No "ckpt_path is not provided" (the bank comes from few_shot_source) and no empty validation list."""
    torch.manual_seed(0)
    model = PatchCorePlus(
        backbone="resnet18", layers=("layer2",), pre_trained=False, k_shot=2, few_shot_source=mixed_parts / "support"
    )
    model.pre_processor = PatchCorePlus.configure_pre_processor(image_size=(64, 64), backbone="resnet18")
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        predictions = engine.predict(model, data_path=mixed_parts / "mixed")
    assert sum(len(batch.pred_score) for batch in predictions) == len(list((mixed_parts / "mixed").glob("*.png")))
    messages = [record.getMessage() for record in caplog.records] + [str(item.message) for item in caught]
    assert not [text for text in messages if "ckpt_path is not provided" in text], messages
    assert not [text for text in messages if "across ranks is zero" in text], messages


def test_anomalib_models_still_hear_about_the_missing_checkpoint(caplog: pytest.LogCaptureFixture) -> None:
    """The notice is kept for every other model (anomalib's Patchcore does need a checkpoint)."""
    import anomalib.engine.engine as engine_module

    def predict(model: object, ckpt_path: object = None) -> None:
        del model, ckpt_path
        engine_module.logger.warning("ckpt_path is not provided. Model weights will not be loaded.")

    with caplog.at_level(logging.WARNING, logger="anomalib.engine.engine"):
        predict(Patchcore(backbone="resnet18", layers=["layer2"], pre_trained=False))
    assert any("ckpt_path is not provided" in record.getMessage() for record in caplog.records)
