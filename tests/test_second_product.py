"""One model instance tested on a second product draws its support from that product, never the first one's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine

from anomalib_protorefine import PatchCorePlus
from anomalib_protorefine.data import synthetic_datamodule

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZES = {"num_train": 4, "num_test_good": 2, "num_test_defect": 2, "image_size": 64}


def small_model() -> PatchCorePlus:
    """A 64 px resnet18 PatchCorePlus, k = 2, without pictures (random backbone weights, seeded: all alike)."""
    torch.manual_seed(0)
    model = PatchCorePlus(backbone="resnet18", layers=("layer2",), pre_trained=False, k_shot=2, visualizer=False)
    model.pre_processor = PatchCorePlus.configure_pre_processor(image_size=(64, 64), backbone="resnet18")
    return model


def product(root: Path, seed: int) -> object:
    """A Folder datamodule of one synthetic product (its own training images)."""
    return synthetic_datamodule(
        root, seed=seed, datamodule_kwargs={"val_split_mode": "same_as_test"}, num_workers=0, **SIZES
    )


def test_a_second_datamodule_rebuilds_the_support_from_its_images(tmp_path: Path) -> None:
    """``engine.test(m, datamodule=a); engine.test(m, datamodule=b)``: b is scored against a bank of b's images."""
    first, second = product(tmp_path / "a", seed=0), product(tmp_path / "b", seed=1)
    model = small_model()
    engine = Engine(default_root_dir=tmp_path / "results", accelerator="cpu", logger=False, enable_progress_bar=False)
    engine.test(model, datamodule=first)
    assert all(str(tmp_path / "a") in path for path in model.support_paths)
    engine.test(model, datamodule=second)
    assert model.support_paths
    assert all(str(tmp_path / "b") in path for path in model.support_paths)
    fresh = small_model()
    fresh.prepare_support(second)
    assert model.support_paths == fresh.support_paths
    torch.testing.assert_close(model.model.memory_bank, fresh.model.memory_bank)


def test_a_checkpoint_bank_is_kept_on_another_datamodule(tmp_path: Path) -> None:
    """A checkpoint's bank (support list stored) is not tied to a datamodule: testing elsewhere keeps it."""
    first, second = product(tmp_path / "a", seed=0), product(tmp_path / "b", seed=1)
    model = small_model()
    engine = Engine(default_root_dir=tmp_path / "results", accelerator="cpu", logger=False, enable_progress_bar=False)
    engine.test(model, datamodule=first)
    checkpoint = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    loaded = PatchCorePlus.load_from_checkpoint(checkpoint, pre_processor=model.pre_processor)
    bank = loaded.model.memory_bank.clone()
    engine.test(loaded, datamodule=second)
    assert loaded.support_paths == model.support_paths
    torch.testing.assert_close(loaded.model.memory_bank, bank)
