"""Shared fixtures: repository paths, the real data sets under ``../shared/data`` and small synthetic data.

The real data sets are read-only and live outside the repository (``<repo>/../shared/data/<name>``).
Tests that need them either skip with a clear reason when they are absent, or copy a handful of
files into a pytest temporary folder (never into the repository) with :func:`make_folder_subset`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

#: Sizes of the quick synthetic data set (seconds to generate, about a second per model run).
QUICK_SYNTHETIC = {"num_train": 6, "num_test_good": 3, "num_test_defect": 4, "image_size": 128}

#: Folder layout of the real data sets (anomalib ``Folder`` arguments, relative to the root).
FOLDER_LAYOUT = {
    "normal_dir": "train/good",
    "abnormal_dir": "test/defect",
    "normal_test_dir": "test/good",
    "mask_dir": "ground_truth/defect",
}

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def shared_dataset_path(name: str) -> Path:
    """Return ``<repo>/../shared/data/<name>``, skipping the test with a clear reason if it is absent."""
    path = SHARED_DATA / name
    if not (path / "train" / "good").is_dir():
        if os.environ.get("CI") == "true":  # CI has the shared data: its absence is a failure, not a skip
            pytest.fail(f"CI: real data set {name!r} not found at {path} (expected ../shared/data/{name})")
        pytest.skip(
            f"real data set {name!r} not found at {path} (expected ../shared/data/{name} relative to the "
            "repository root, in anomalib Folder layout)"
        )
    return path


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _spread(files: list[Path], count: int) -> list[Path]:
    """``count`` files spread evenly over the sorted list (deterministic, not just the first few)."""
    if count >= len(files):
        return files
    step = len(files) / count
    return [files[int(i * step)] for i in range(count)]


def make_folder_subset(source: Path, target: Path, num_train: int, num_good: int, num_defect: int) -> Path:
    """Copy a small, deterministic subset of a Folder-layout data set (with masks) into ``target``.

    Args:
        source: Root of the full data set (``train/good``, ``test/good``, ``test/defect``,
            ``ground_truth/defect``).
        target: Where to write the subset (a temporary folder, never the repository).
        num_train: Normal training images to copy.
        num_good: Normal test images to copy.
        num_defect: Defective test images to copy, each with its mask (same stem).

    Returns:
        ``target``.
    """
    for sub, count in (("train/good", num_train), ("test/good", num_good), ("test/defect", num_defect)):
        (target / sub).mkdir(parents=True, exist_ok=True)
        for file in _spread(_images(source / sub), count):
            shutil.copy2(file, target / sub / file.name)
    masks = {p.stem: p for p in _images(source / "ground_truth" / "defect")}
    (target / "ground_truth" / "defect").mkdir(parents=True, exist_ok=True)
    for image in _images(target / "test" / "defect"):
        mask = masks.get(image.stem) or masks.get(f"{image.stem}_mask")
        if mask is None:
            msg = f"no mask for {image.name} in {source / 'ground_truth' / 'defect'}"
            raise FileNotFoundError(msg)
        shutil.copy2(mask, target / "ground_truth" / "defect" / mask.name)
    return target


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Run a module with one intra-op thread (restored afterwards): its small tensors gain nothing from
    threads, and on a busy two-core machine OpenMP's hand-offs make every small operation slow.
    Use with ``pytestmark = pytest.mark.usefixtures("single_torch_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where ``pyproject.toml`` and ``configs/`` are)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (may not exist: use :func:`shared_dataset_path` to skip cleanly)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def folder_layout() -> dict[str, str]:
    """anomalib ``Folder`` arguments of the real data sets' layout (relative to their root)."""
    return dict(FOLDER_LAYOUT)


@pytest.fixture(scope="session")
def quick_synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Parent folder of a quick synthetic ``brushed_metal`` data set (generated once per session).

    Pass it as ``root`` to :func:`anomalib_protorefine.data.synthetic_datamodule` together with
    ``**QUICK_SYNTHETIC``; the data set itself is ``<root>/brushed_metal``.
    """
    from anomalib_protorefine.data import generate_dataset

    root = tmp_path_factory.mktemp("quick_synthetic")
    generate_dataset(root, category="brushed_metal", seed=0, **QUICK_SYNTHETIC)
    return root


@pytest.fixture
def quick_datamodule(quick_synthetic_root: Path) -> Callable[..., object]:
    """Factory of fresh anomalib ``Folder`` datamodules on the quick synthetic data set.

    Validation uses the whole test split (``same_as_test``) so that the tiny test set is not halved.
    """
    from anomalib_protorefine.data import synthetic_datamodule

    def make(**datamodule_kwargs: object) -> object:
        kwargs = {"val_split_mode": "same_as_test", **datamodule_kwargs}
        return synthetic_datamodule(
            quick_synthetic_root, category="brushed_metal", seed=0, datamodule_kwargs=kwargs, **QUICK_SYNTHETIC
        )

    return make


@pytest.fixture(scope="session")
def deeppcb_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train/good, 6 test/good and 6 test/defect DeepPCB images (+ masks) copied into a temporary folder."""
    source = shared_dataset_path("deeppcb")
    return make_folder_subset(source, tmp_path_factory.mktemp("deeppcb_subset"), num_train=8, num_good=6, num_defect=6)


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of the tiny open_clip config (``models/winclip_plus/tiny_clip.py``), also registered in this process."""
    from anomalib_protorefine.models.winclip_plus import tiny_clip

    folder = tmp_path_factory.mktemp("tiny_clip")
    tiny_clip.register(folder)
    return str(tiny_clip.write_config(folder))


@pytest.fixture(scope="session")
def mixed_parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px synthetic part: 4 support images, a line of 24 good parts, and a folder of mixed parts.

    ``mixed/`` holds 3 good and 4 defective test images and two defective ones resized to 96 x 48
    (``wide_*.png``, non-square and of another size than the model's input).
    """
    from PIL import Image

    from anomalib_protorefine.data import generate_dataset

    root = tmp_path_factory.mktemp("mixed_parts")
    generate_dataset(root, seed=5, num_train=30, num_test_good=3, num_test_defect=4, image_size=64)
    data = root / "brushed_metal"
    for name in ("support", "line", "mixed"):
        (data / name).mkdir()
    good = sorted((data / "train" / "good").glob("*.png"))
    for file in good[:4]:
        shutil.copy(file, data / "support" / file.name)
    for file in good[4:28]:
        shutil.copy(file, data / "line" / file.name)
    for file in sorted((data / "test").rglob("*.png")):
        shutil.copy(file, data / "mixed" / f"{file.parent.name}_{file.name}")
    for file in sorted((data / "test" / "defect").glob("*.png"))[:2]:
        Image.open(file).resize((96, 48)).save(data / "mixed" / f"wide_{file.name}")
    return data
