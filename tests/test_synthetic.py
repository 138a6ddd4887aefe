"""Tests for the procedurally generated demo dataset (offline, a few seconds)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomalib_protorefine.data import (
    CATEGORIES,
    DATASET_VERSION,
    DEFECT_TYPES,
    default_cache_dir,
    folder_kwargs,
    generate_dataset,
    synthetic_datamodule,
)

SMALL = {"num_train": 3, "num_test_good": 2, "num_test_defect": 6, "image_size": 64}


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))
    }


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), category="brushed_metal", seed=0, **SMALL)


def test_determinism(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", seed=3, **SMALL)
    b = generate_dataset(tmp_path / "b", seed=3, **SMALL)
    c = generate_dataset(tmp_path / "c", seed=4, **SMALL)
    assert _digest(a) == _digest(b)
    assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()
    # File names of defect images may differ (random second defect); shared names must differ in content.
    da, dc = _digest(a), _digest(c)
    shared = da.keys() & dc.keys()
    assert shared
    assert all(da[k] != dc[k] for k in shared)


def test_images_independent_of_counts(tmp_path: Path) -> None:
    """Each image has its own child seed: adding images does not change existing ones."""
    a = generate_dataset(tmp_path / "a", **SMALL)
    b = generate_dataset(tmp_path / "b", **{**SMALL, "num_train": 5})
    assert (a / "train/good/002.png").read_bytes() == (b / "train/good/002.png").read_bytes()
    assert (a / "test/good/001.png").read_bytes() == (b / "test/good/001.png").read_bytes()


@pytest.mark.parametrize("category", CATEGORIES)
def test_layout_and_counts(tmp_path: Path, category: str) -> None:
    path = generate_dataset(tmp_path, category=category, **SMALL)
    assert path == tmp_path / category
    assert len(_pngs(path / "train/good")) == SMALL["num_train"]
    assert len(_pngs(path / "test/good")) == SMALL["num_test_good"]
    defects = _pngs(path / "test/defect")
    masks = _pngs(path / "ground_truth/defect")
    assert len(defects) == len(masks) == SMALL["num_test_defect"]
    assert [m.name for m in masks] == [f"{d.stem}_mask.png" for d in defects]
    kinds = {kind for d in defects for kind in d.stem.split("_", 1)[1].split("-")}
    assert kinds == set(DEFECT_TYPES)
    for png in _pngs(path / "train/good") + defects:
        image = Image.open(png)
        assert image.mode == "RGB"
        assert image.size == (SMALL["image_size"], SMALL["image_size"])
    normal = np.asarray(Image.open(path / "train/good/000.png"), dtype=np.float32)
    assert normal.std() > 3.0  # a texture, not a flat colour
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == DATASET_VERSION
    assert manifest["params"] == {"category": category, "seed": 0, **SMALL}


def test_masks_binary_nonempty_aligned(small_dataset: Path) -> None:
    size = SMALL["image_size"]
    for image_path in _pngs(small_dataset / "test/defect"):
        mask_image = Image.open(small_dataset / "ground_truth/defect" / f"{image_path.stem}_mask.png")
        assert mask_image.mode == "L"
        assert mask_image.size == Image.open(image_path).size == (size, size)
        mask = np.asarray(mask_image)
        assert set(np.unique(mask)) == {0, 255}
        assert 0 < (mask > 0).mean() < 0.5
    # Only defect images have masks.
    assert sorted(p.name for p in (small_dataset / "ground_truth").iterdir()) == ["defect"]


def test_defects_change_masked_pixels(tmp_path: Path) -> None:
    """The defect is visible where the mask says, relative to the same image without it."""
    path = generate_dataset(tmp_path, category="cast_stone", num_test_defect=3, num_train=1, num_test_good=1)
    for image_path in _pngs(path / "test/defect"):
        image = np.asarray(Image.open(image_path), dtype=np.float32)
        mask = np.asarray(Image.open(path / "ground_truth/defect" / f"{image_path.stem}_mask.png")) > 0
        inside = image[mask].mean(axis=0)
        ring = np.zeros_like(mask)
        ys, xs = np.nonzero(mask)
        ring[max(ys.min() - 12, 0) : ys.max() + 13, max(xs.min() - 12, 0) : xs.max() + 13] = True
        ring &= ~mask
        outside = image[ring].mean(axis=0)
        assert np.abs(inside - outside).max() > 2.0


def test_cache_is_reused(tmp_path: Path) -> None:
    path = generate_dataset(tmp_path, **SMALL)
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}
    again = generate_dataset(tmp_path, **SMALL)
    assert again == path
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()} == before


def test_cache_regenerates_on_change(tmp_path: Path) -> None:
    path = generate_dataset(tmp_path, **SMALL)
    regenerated = generate_dataset(tmp_path, **{**SMALL, "num_train": 4})
    assert regenerated == path
    assert len(_pngs(path / "train/good")) == 4
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["params"]["num_train"] == 4
    # A missing file makes the dataset incomplete -> regenerated.
    (path / "train/good/000.png").unlink()
    generate_dataset(tmp_path, **{**SMALL, "num_train": 4})
    assert (path / "train/good/000.png").is_file()
    # overwrite=True always rewrites.
    mtime = (path / "manifest.json").stat().st_mtime_ns
    generate_dataset(tmp_path, overwrite=True, **{**SMALL, "num_train": 4})
    assert (path / "manifest.json").stat().st_mtime_ns >= mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_refuses_to_clobber_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "brushed_metal").mkdir()
    (tmp_path / "brushed_metal" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_dataset(tmp_path, **SMALL)
    assert (tmp_path / "brushed_metal" / "precious.txt").is_file()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_train": 0}, "num_train"),
        ({"num_test_good": 0}, "num_test_good"),
        ({"num_test_defect": -1}, "num_test_defect"),
        ({"image_size": 32}, "image_size"),
        ({"image_size": 100_000}, "image_size"),
        ({"image_size": 128.0}, "image_size"),
        ({"num_train": True}, "num_train"),
        ({"seed": -1}, "seed"),
        ({"category": "wood"}, "brushed_metal, woven_fabric, cast_stone"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # validated before any work


def test_bad_datamodule_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train_batch_size"):
        synthetic_datamodule(tmp_path, train_batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        synthetic_datamodule(tmp_path, num_workers=-1)
    with pytest.raises(TypeError, match="num_trian"):
        synthetic_datamodule(tmp_path, num_trian=3)
    assert not any(tmp_path.iterdir())


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANOMALIB_PROTOREFINE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "datasets"
    path = generate_dataset(**SMALL)
    assert path == tmp_path / "datasets" / "brushed_metal"
    monkeypatch.delenv("ANOMALIB_PROTOREFINE_CACHE")
    assert default_cache_dir().name == "datasets"
    assert "anomalib_protorefine" in str(default_cache_dir())


def test_folder_datamodule_loads(tmp_path: Path) -> None:
    dm = synthetic_datamodule(tmp_path, category="woven_fabric", eval_batch_size=4, **SMALL)
    dm.setup()
    train = dm.train_data.samples
    assert len(train) == SMALL["num_train"]
    assert (train.label_index == 0).all()
    evaluation = pd.concat([dm.test_data.samples, dm.val_data.samples])
    assert len(evaluation) == SMALL["num_test_good"] + SMALL["num_test_defect"]
    assert set(evaluation.label_index) == {0, 1}
    abnormal = evaluation[evaluation.label_index == 1]
    assert all(Path(row.mask_path).stem == f"{Path(row.image_path).stem}_mask" for row in abnormal.itertuples())

    batch = next(iter(dm.test_dataloader()))
    size = SMALL["image_size"]
    assert batch.image.shape[1:] == (3, size, size)
    assert batch.gt_mask.shape == (batch.image.shape[0], size, size)
    assert batch.gt_label is not None
    for label, mask in zip(batch.gt_label.tolist(), batch.gt_mask, strict=True):
        assert bool(mask.any()) == bool(label)


def test_folder_kwargs_match_layout(small_dataset: Path) -> None:
    kwargs = folder_kwargs("brushed_metal")
    for key in ("normal_dir", "abnormal_dir", "normal_test_dir", "mask_dir"):
        assert (small_dataset / kwargs[key]).is_dir()
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    assert manifest["folder_kwargs"]["abnormal_dir"] == kwargs["abnormal_dir"]
