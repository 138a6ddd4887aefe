"""Support-defining options set after construction rebuild the support data; few_shot_source scans one folder."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from anomalib_protorefine import PatchCorePlus
from anomalib_protorefine.few_shot import drawn_support_paths

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def small_model(**kwargs: object) -> PatchCorePlus:
    options = {
        "backbone": "resnet18",
        "layers": ("layer2",),
        "pre_trained": False,
        "k_shot": 2,
        "refiner": False,
        "visualizer": False,
        "pre_processor": PatchCorePlus.configure_pre_processor(image_size=(64, 64), backbone="resnet18"),
        **kwargs,
    }
    return PatchCorePlus(**options)


def test_setting_few_shot_seed_rebuilds_the_support(quick_datamodule) -> None:
    """A new seed draws other images (the draw of that seed), rebuilds the bank and thresholds, and updates hparams."""
    datamodule = quick_datamodule()
    model = small_model()
    model.prepare_support(datamodule)
    first_paths, first_bank = model.support_paths, model.model.memory_bank.clone()
    first_threshold = model.support_thresholds.image_threshold
    model.few_shot_seed = 3
    assert model.model.memory_bank.numel() == 0
    assert model.support_paths == ()
    assert model.support_thresholds is None
    assert model.hparams["few_shot_seed"] == 3
    model.prepare_support(datamodule)
    assert model.support_paths == drawn_support_paths(datamodule.train_data, 2, 3)
    assert model.support_paths != first_paths
    assert not torch.equal(model.model.memory_bank, first_bank)
    assert model.support_thresholds.image_threshold != first_threshold
    with pytest.raises(ValueError, match="few_shot_seed"):
        model.few_shot_seed = -1


def test_setting_few_shot_source_rebuilds_from_that_folder(
    quick_synthetic_root: Path, quick_datamodule, tmp_path: Path
) -> None:
    good = quick_synthetic_root / "brushed_metal" / "train" / "good"
    other = tmp_path / "other"
    other.mkdir()
    for file in sorted(good.glob("*.png"))[:2]:
        shutil.copy(file, other / f"copy_{file.name}")
    model = small_model()
    model.prepare_support(quick_datamodule())
    model.few_shot_source = str(other)
    assert model.support_paths == ()
    assert model.hparams["few_shot_source"] == str(other)
    model.prepare_support()
    assert all(Path(path).parent == other for path in model.support_paths)
    with pytest.raises(FileNotFoundError, match="few_shot_source="):
        model.few_shot_source = str(tmp_path / "missing")


def test_few_shot_source_at_a_data_set_root_is_refused(quick_synthetic_root: Path) -> None:
    """A data set root holds test/defect images and masks in subfolders: never taken as normal support."""
    model = small_model(few_shot_source=str(quick_synthetic_root / "brushed_metal"))
    with pytest.raises(ValueError, match=r"holds 0 image file\(s\).*subfolders \['ground_truth', 'test', 'train'\]"):
        model.prepare_support()


def test_few_shot_source_with_unsupported_files_names_folder_and_formats(tmp_path: Path) -> None:
    for name in ("a.pgm", "b.pgm"):
        (tmp_path / name).write_bytes(b"P5 1 1 255 \x00")
    model = small_model(few_shot_source=str(tmp_path))
    with pytest.raises(ValueError, match=rf"few_shot_source='{tmp_path}' holds 0 image file\(s\) \(\.png, \.jpg"):
        model.prepare_support()


def test_few_shot_source_logs_how_many_files_from_where(
    quick_synthetic_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = quick_synthetic_root / "brushed_metal" / "train" / "good"
    model = small_model(few_shot_source=str(good))
    with caplog.at_level(logging.INFO, logger="anomalib_protorefine.few_shot"):
        model.prepare_support()
    count = len(list(good.glob("*.png")))
    assert f"Few-shot support from {good}: 2 of its {count} images" in caplog.text


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.full((2, 3, 64, 64), 128, dtype=torch.uint8), TypeError, r"dtype torch\.uint8.*images\.float\(\) / 255"),
        (torch.full((2, 3, 64, 64), 128.0), ValueError, "look like 0-255 pixel values"),
        (torch.rand(3, 64, 64), ValueError, r"batch \(k, 3, H, W\)"),
    ],
)
def test_fit_support_rejects_unprocessed_images(images: torch.Tensor, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        small_model().fit_support(images)


def test_support_thresholds_expect_images_in_zero_one() -> None:
    with pytest.raises(ValueError, match=r"expected float images in \[0, 1\]"):
        small_model().calibrate_thresholds_from_images(torch.full((2, 3, 64, 64), 2.0))


def _gray_images(folder: Path, count: int = 3) -> tuple[list[Path], list[Path]]:
    """The same grayscale images as 8-bit and as 16-bit PNG (value * 257, as ``cv2.imwrite`` of uint16 writes)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    narrow, wide = [], []
    for index in range(count):
        gray = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
        Image.fromarray(gray).save(folder / f"n{index}.png")
        Image.fromarray(gray.astype(np.uint16) * 257).save(folder / f"w{index}.png")
        narrow.append(folder / f"n{index}.png")
        wide.append(folder / f"w{index}.png")
    return narrow, wide


def test_16_bit_support_images_are_read_by_their_range(tmp_path: Path) -> None:
    """anomalib's read_image flattens a 16-bit PNG; the support loader scales it by 65535 (= the 8-bit read)."""
    from anomalib.data.utils import read_image

    from anomalib_protorefine.few_shot import load_images

    narrow, wide = _gray_images(tmp_path)
    upstream = read_image(str(wide[0]), as_tensor=True)
    assert float((upstream == 1.0).float().mean()) > 0.99  # upstream: (nearly) one flat value, clipped at 255
    torch.testing.assert_close(load_images(wide, None), load_images(narrow, None), rtol=0, atol=1e-6)


def test_predicting_on_16_bit_images_warns_naming_the_files(tmp_path: Path) -> None:
    """The datamodule path (anomalib's loader) flattens them: a loud warning names the files."""
    from anomalib.engine import Engine

    narrow, wide = _gray_images(tmp_path / "parts")
    support = tmp_path / "good"
    support.mkdir()
    for path in narrow:
        shutil.copy(path, support / path.name)
    queries = tmp_path / "queries"
    queries.mkdir()
    shutil.copy(wide[0], queries / wide[0].name)
    model = small_model(few_shot_source=str(support))
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match=r"hold one flat value.*w0\.png.*16-bit"):
        engine.predict(model, data_path=queries)


def test_a_checkpoint_of_other_layers_or_another_model_is_one_clear_error(tmp_path: Path) -> None:
    """Another backbone's layers, or a WinClipPlus checkpoint: one line naming the cause and the fix."""
    from lightning.pytorch import Trainer

    model = small_model(threshold="validation")
    model.fit_support(model.pre_processor.transform(torch.rand(2, 3, 64, 64)))
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert PatchCorePlus.load_from_checkpoint(path).model.memory_bank.shape == model.model.memory_bank.shape
    with pytest.raises(
        ValueError, match=r"backbone weights do not fit this model's backbone='resnet18', layers=\['layer3'\]"
    ):
        PatchCorePlus.load_from_checkpoint(path, layers=("layer3",))  # Lightning writes the kwargs into the hparams
    checkpoint = torch.load(path, weights_only=False)  # as `anomalib predict --ckpt_path` hands it to the model
    with pytest.raises(
        ValueError, match=r"made with backbone='resnet18', layers=\['layer2'\].*--model.layers '\[layer2\]'"
    ):
        small_model(layers=("layer3",)).on_load_checkpoint(checkpoint)
    winclip_like = {"hyper_parameters": {"k_shot": 2, "scales": [2, 3]}, "state_dict": {"model.clip.positional": 0}}
    with pytest.raises(ValueError, match="not a PatchCorePlus checkpoint \\(a WinClipPlus checkpoint"):
        small_model().on_load_checkpoint(winclip_like)
