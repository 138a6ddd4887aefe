"""Procedurally generated industrial-inspection dataset for offline demos and tests.

The package's demo must run few-shot anomaly detection without downloading
anything, so this module synthesises a small dataset of textured industrial
surfaces with realistic nuisance variation and three kinds of defects (painted by
:mod:`anomalib_protorefine.data.defects`):

* **scratch**: a thin, curved, bright or dark line of varying length and contrast;
* **pit**: a small dark blob with soft, slightly irregular edges;
* **stain**: a low-contrast, irregular colour blotch (some are quite subtle).

Three surface textures are available (:data:`CATEGORIES`, painted by
:mod:`anomalib_protorefine.data.textures`): ``"brushed_metal"``, ``"woven_fabric"``
and ``"cast_stone"``. Normal images vary in illumination, texture phase, orientation
and colour so that "normal" is never pixel-identical.

Generation is fully vectorised numpy, seeded through :class:`numpy.random.Generator`
(each image gets its own child seed, so images do not depend on how many others
are generated) and the result is written once to a cache folder in the layout
expected by :class:`anomalib.data.Folder`::

    <root>/<category>/
    ├── manifest.json                     parameters + version + file list
    ├── train/good/000.png ...            normal images (k-shot support pool)
    ├── test/good/000.png ...             normal test images
    ├── test/defect/000_scratch.png ...   defective test images (type in the name)
    └── ground_truth/defect/000_scratch_mask.png ...  binary 0/255 masks

Example:
    >>> from anomalib_protorefine.data import generate_dataset, synthetic_datamodule
    >>> path = generate_dataset("/tmp/protorefine_data", category="woven_fabric")  # doctest: +SKIP
    >>> datamodule = synthetic_datamodule("/tmp/protorefine_data", category="woven_fabric")  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP

"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from anomalib_protorefine.data.defects import DEFECT_TYPES, add_defect
from anomalib_protorefine.data.noise import Array
from anomalib_protorefine.data.textures import TEXTURES, finish

if TYPE_CHECKING:
    from anomalib.data import Folder

__all__ = [
    "CATEGORIES",
    "DATASET_VERSION",
    "default_cache_dir",
    "folder_kwargs",
    "generate_dataset",
    "synthetic_datamodule",
]

#: Texture categories that :func:`generate_dataset` can synthesise.
CATEGORIES: tuple[str, ...] = ("brushed_metal", "woven_fabric", "cast_stone")

#: Bump whenever the generated pixels change, so that stale caches are regenerated.
DATASET_VERSION: int = 1

_MANIFEST = "manifest.json"
_GENERATOR_ID = "anomalib_protorefine.data.synthetic"
_NORMAL_TRAIN_DIR = "train/good"
_NORMAL_TEST_DIR = "test/good"
_ABNORMAL_DIR = "test/defect"
_MASK_DIR = "ground_truth/defect"
_MASK_SUFFIX = "_mask"
_MIN_IMAGE_SIZE = 64
_MAX_IMAGE_SIZE = 2048
_SPLIT_CODES = {"train_good": 0, "test_good": 1, "test_defect": 2}


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Return the folder where generated datasets are cached by default.

    ``$ANOMALIB_PROTOREFINE_CACHE/datasets`` when that environment variable is set,
    otherwise ``<user cache dir>/anomalib_protorefine/datasets`` (via ``platformdirs``,
    falling back to ``~/.cache/anomalib_protorefine/datasets``).

    Returns:
        Path: The dataset cache folder (not created by this function).

    Example:
        >>> import os
        >>> os.environ["ANOMALIB_PROTOREFINE_CACHE"] = "/tmp/protorefine_cache"
        >>> str(default_cache_dir())
        '/tmp/protorefine_cache/datasets'
        >>> del os.environ["ANOMALIB_PROTOREFINE_CACHE"]

    """
    env = os.environ.get("ANOMALIB_PROTOREFINE_CACHE", "").strip()
    if env:
        return Path(env).expanduser() / "datasets"
    try:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("anomalib_protorefine", appauthor=False))
    except ImportError:  # pragma: no cover - platformdirs ships with anomalib
        base = Path.home() / ".cache" / "anomalib_protorefine"
    return base / "datasets"


def folder_kwargs(category: str = "brushed_metal") -> dict[str, Any]:
    """Return the :class:`anomalib.data.Folder` arguments matching the generated layout.

    ``root`` must be set to the path returned by :func:`generate_dataset`.

    Args:
        category: Dataset category, used as the datamodule ``name``.

    Returns:
        dict[str, Any]: ``name``, ``normal_dir``, ``abnormal_dir``, ``normal_test_dir``,
        ``mask_dir`` and ``extensions``.

    Example:
        >>> folder_kwargs("cast_stone")["abnormal_dir"]
        'test/defect'

    """
    _check_category(category)
    return {
        "name": category,
        "normal_dir": _NORMAL_TRAIN_DIR,
        "abnormal_dir": _ABNORMAL_DIR,
        "normal_test_dir": _NORMAL_TEST_DIR,
        "mask_dir": _MASK_DIR,
        "extensions": (".png",),
    }


def generate_dataset(
    root: str | Path | None = None,
    category: str = "brushed_metal",
    num_train: int = 20,
    num_test_good: int = 10,
    num_test_defect: int = 15,
    image_size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Generate (or reuse) a synthetic anomaly-detection dataset on disk.

    The dataset is written to ``<root>/<category>`` together with a ``manifest.json``
    holding the generation parameters and :data:`DATASET_VERSION`. When a complete
    dataset with the same parameters is already there, nothing is written. When the
    parameters (or the version) differ, the folder is regenerated. Generation happens
    in a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a half-written dataset behind.

    Defect types cycle through :data:`DEFECT_TYPES` (about one image in five gets a
    second defect); each defective image ``test/defect/<stem>.png`` has a binary
    0/255 mask ``ground_truth/defect/<stem>_mask.png`` of the same size.

    Args:
        root: Parent folder of the dataset. Defaults to :func:`default_cache_dir`.
        category: Surface texture, one of :data:`CATEGORIES`.
        num_train: Number of normal training images (the k-shot support pool), >= 1.
        num_test_good: Number of normal test images, >= 1.
        num_test_defect: Number of defective test images, >= 1.
        image_size: Side length in pixels of the square RGB images, 64..2048.
        seed: Non-negative random seed; the same seed gives byte-identical files.
        overwrite: Regenerate even if a matching dataset exists. Also required to
            replace a non-empty folder that was not created by this generator.

    Returns:
        Path: The dataset folder ``<root>/<category>``.

    Raises:
        ValueError: If an argument is out of range (the message names the parameter).
        FileExistsError: If ``<root>/<category>`` holds foreign files and
            ``overwrite`` is ``False``.

    Example:
        >>> import tempfile
        >>> path = generate_dataset(tempfile.mkdtemp(), category="cast_stone", num_train=4,
        ...                         num_test_good=2, num_test_defect=3, image_size=64)
        >>> path.name, len(list((path / "test" / "defect").glob("*.png")))
        ('cast_stone', 3)

    """
    params = _validate_params(
        category=category,
        num_train=num_train,
        num_test_good=num_test_good,
        num_test_defect=num_test_defect,
        image_size=image_size,
        seed=seed,
    )
    if not isinstance(overwrite, bool):
        msg = f"overwrite must be True or False, got {overwrite!r}."
        raise ValueError(msg)
    root = default_cache_dir() if root is None else Path(root).expanduser()
    target = root / category

    if not overwrite and _is_complete(target, params):
        return target
    if target.exists() and not overwrite and _read_manifest(target) is None and any(target.iterdir()):
        msg = (
            f"{target} exists, is not empty and was not created by {_GENERATOR_ID}. "
            "Pass overwrite=True to replace it, or choose another root."
        )
        raise FileExistsError(msg)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.tmp-", dir=root))
    try:
        manifest = _write_dataset(tmp, params)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def synthetic_datamodule(
    root: str | Path | None = None,
    category: str = "brushed_metal",
    seed: int = 0,
    train_batch_size: int = 8,
    eval_batch_size: int = 8,
    num_workers: int = 0,
    *,
    datamodule_kwargs: Mapping[str, Any] | None = None,
    **generate_kwargs: Any,
) -> Folder:
    """Generate the dataset if needed and return an :class:`anomalib.data.Folder` for it.

    The test split comes from the directories (``test/good`` + ``test/defect``, with
    masks); the validation split follows anomalib's default (half of the test set,
    split with ``seed``), override it through ``datamodule_kwargs``.

    Args:
        root: Parent folder of the dataset. Defaults to :func:`default_cache_dir`.
        category: Surface texture, one of :data:`CATEGORIES`.
        seed: Seed for generation and for anomalib's validation split.
        train_batch_size: Training batch size, >= 1.
        eval_batch_size: Validation/test batch size, >= 1.
        num_workers: Data-loader workers, >= 0.
        datamodule_kwargs: Extra keyword arguments for :class:`anomalib.data.Folder`
            (e.g. ``{"val_split_mode": "same_as_test"}`` or augmentations); they
            override the defaults chosen here.
        **generate_kwargs: Forwarded to :func:`generate_dataset` (``num_train``,
            ``num_test_good``, ``num_test_defect``, ``image_size``, ``overwrite``).

    Returns:
        Folder: A datamodule; call ``setup()`` (or let the engine do it) before use.

    Raises:
        ValueError: If an argument is out of range (the message names the parameter).
        TypeError: If ``generate_kwargs`` has an unknown key.

    Example:
        >>> import tempfile
        >>> dm = synthetic_datamodule(tempfile.mkdtemp(), category="cast_stone", num_train=4,
        ...                           num_test_good=2, num_test_defect=3, image_size=64)
        >>> dm.setup()
        >>> len(dm.train_data), len(dm.test_data) + len(dm.val_data)
        (4, 5)

    """
    allowed = {"num_train", "num_test_good", "num_test_defect", "image_size", "overwrite"}
    unknown = sorted(set(generate_kwargs) - allowed)
    if unknown:
        msg = f"synthetic_datamodule() got unexpected keyword argument(s) {unknown}; valid ones: {sorted(allowed)}."
        raise TypeError(msg)
    for name, value, minimum in (
        ("train_batch_size", train_batch_size, 1),
        ("eval_batch_size", eval_batch_size, 1),
        ("num_workers", num_workers, 0),
    ):
        _check_int(name, value, minimum)
    _check_category(category)
    _check_int("seed", seed, 0)

    path = generate_dataset(root=root, category=category, seed=seed, **generate_kwargs)

    from anomalib.data import Folder

    kwargs: dict[str, Any] = {
        **folder_kwargs(category),
        "root": path,
        "train_batch_size": train_batch_size,
        "eval_batch_size": eval_batch_size,
        "num_workers": num_workers,
        "test_split_mode": "from_dir",
        "seed": seed,
    }
    kwargs.update(datamodule_kwargs or {})
    return Folder(**kwargs)


# --------------------------------------------------------------------------------------
# Validation and caching
# --------------------------------------------------------------------------------------
def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        msg = f"{name} must be an integer, got {value!r} ({type(value).__name__}); pass e.g. {name}={minimum}."
        raise ValueError(msg)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        msg = f"{name} must be {bound}, got {value}; pass e.g. {name}={minimum if value < minimum else maximum}."
        raise ValueError(msg)
    return int(value)


def _check_category(category: object) -> str:
    if category not in CATEGORIES:
        msg = f"Unknown category {category!r}; valid categories are: {', '.join(CATEGORIES)}."
        raise ValueError(msg)
    return str(category)


def _validate_params(**params: Any) -> dict[str, Any]:
    return {
        "category": _check_category(params["category"]),
        "num_train": _check_int("num_train", params["num_train"], 1),
        "num_test_good": _check_int("num_test_good", params["num_test_good"], 1),
        "num_test_defect": _check_int("num_test_defect", params["num_test_defect"], 1),
        "image_size": _check_int("image_size", params["image_size"], _MIN_IMAGE_SIZE, _MAX_IMAGE_SIZE),
        "seed": _check_int("seed", params["seed"], 0),
    }


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != _GENERATOR_ID:
        return None
    return manifest


def _is_complete(folder: Path, params: Mapping[str, Any]) -> bool:
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("version") != DATASET_VERSION or manifest.get("params") != dict(params):
        return False
    files = manifest.get("files", {})
    return all((folder / rel).is_file() for group in files.values() for rel in group)


# --------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------
def _image_rng(params: Mapping[str, Any], split: str, index: int) -> np.random.Generator:
    """Independent generator per image (stable under changes of the image counts)."""
    category_key = zlib.crc32(params["category"].encode())
    return np.random.default_rng([params["seed"], category_key, _SPLIT_CODES[split], index])


def _save_png(array: Array, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=3)


def _write_dataset(folder: Path, params: Mapping[str, Any]) -> dict[str, Any]:
    size, category = params["image_size"], params["category"]
    texture = TEXTURES[category]
    width = max(3, len(str(max(params["num_train"], params["num_test_good"], params["num_test_defect"]) - 1)))
    files: dict[str, list[str]] = {"train_good": [], "test_good": [], "test_defect": [], "masks": []}
    defects: dict[str, list[str]] = {}

    for split, sub, count in (
        ("train_good", _NORMAL_TRAIN_DIR, params["num_train"]),
        ("test_good", _NORMAL_TEST_DIR, params["num_test_good"]),
    ):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = _image_rng(params, split, index)
            rel = f"{sub}/{index:0{width}d}.png"
            _save_png(finish(texture(rng, size), rng), folder / rel)
            files[split].append(rel)

    (folder / _ABNORMAL_DIR).mkdir(parents=True, exist_ok=True)
    (folder / _MASK_DIR).mkdir(parents=True, exist_ok=True)
    for index in range(params["num_test_defect"]):
        rng = _image_rng(params, "test_defect", index)
        image = texture(rng, size)
        kinds = [DEFECT_TYPES[index % len(DEFECT_TYPES)]]
        if rng.random() < 0.2:
            kinds.append(DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))])
        mask = np.zeros((size, size), dtype=bool)
        for kind in kinds:
            image, defect_mask = add_defect(kind, image, rng, category)
            mask |= defect_mask
        stem = f"{index:0{width}d}_{'-'.join(kinds)}"
        _save_png(finish(image, rng), folder / _ABNORMAL_DIR / f"{stem}.png")
        _save_png(mask.astype(np.uint8) * 255, folder / _MASK_DIR / f"{stem}{_MASK_SUFFIX}.png")
        files["test_defect"].append(f"{_ABNORMAL_DIR}/{stem}.png")
        files["masks"].append(f"{_MASK_DIR}/{stem}{_MASK_SUFFIX}.png")
        defects[stem] = kinds

    return {
        "generator": _GENERATOR_ID,
        "version": DATASET_VERSION,
        "params": dict(params),
        "folder_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in folder_kwargs(category).items()},
        "files": files,
        "defects": defects,
    }
