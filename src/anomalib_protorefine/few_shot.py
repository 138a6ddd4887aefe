"""Seeded selection and loading of the k normal support images.

The same k images are chosen for the same ``(pool, k_shot, seed)`` on every machine: the pool is
sorted by file path, then ``torch.randperm`` with a seeded generator picks k of them. Every
support image goes through the model's pre-processing transform (resize *and* normalisation),
exactly like the query images.

Example:
    >>> from anomalib_protorefine.few_shot import select_indices
    >>> select_indices(10, k_shot=3, seed=0) == select_indices(10, k_shot=3, seed=0)
    True
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils import read_image
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class SupportSet:
    """Pre-processed support images and where they came from.

    Attributes:
        images: ``(k, 3, H, W)`` float tensor, already transformed.
        paths: The k source files, in selection order.
    """

    images: torch.Tensor
    paths: tuple[str, ...]


def validate_k_shot(k_shot: int | None, *, allow_none: bool = True) -> None:
    """Raise a clear error unless ``k_shot`` is a positive int (or ``None`` when allowed)."""
    if k_shot is None and allow_none:
        return
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 1:
        hint = " or None to use the whole training set" if allow_none else ""
        msg = f"k_shot must be a positive integer{hint}, got {k_shot!r}. Use e.g. k_shot=4."
        raise ValueError(msg)


#: Largest ``few_shot_seed``: the seed also seeds numpy (coreset projection), which takes 32-bit seeds.
MAX_SEED = 2**32 - 1


def validate_support_options(k_shot: int | None, few_shot_seed: int, coreset_sampling_ratio: float, paper: str) -> None:
    """Validate the support options shared by the models (``paper``: the paper's alpha, for the message).

    Example:
        >>> validate_support_options(4, -5, 0.1, paper="0.05")
        Traceback (most recent call last):
        ...
        ValueError: few_shot_seed must be in [0, 4294967295] (it also seeds numpy), got -5. Use e.g. few_shot_seed=0.
    """
    validate_k_shot(k_shot)
    if isinstance(few_shot_seed, bool) or not isinstance(few_shot_seed, numbers.Integral):
        msg = f"few_shot_seed must be an integer, got {few_shot_seed!r}. Use e.g. few_shot_seed=0."
        raise TypeError(msg)
    if not 0 <= few_shot_seed <= MAX_SEED:
        msg = (
            f"few_shot_seed must be in [0, {MAX_SEED}] (it also seeds numpy), got {few_shot_seed}. "
            "Use e.g. few_shot_seed=0."
        )
        raise ValueError(msg)
    if isinstance(coreset_sampling_ratio, bool) or not isinstance(coreset_sampling_ratio, numbers.Real):
        msg = (
            f"coreset_sampling_ratio must be a number in (0, 1], got {type(coreset_sampling_ratio).__name__} "
            f"{coreset_sampling_ratio!r}. Pass a number, e.g. coreset_sampling_ratio=0.1 (CLI: "
            f"--model.coreset_sampling_ratio 0.1). Paper: {paper}."
        )
        raise TypeError(msg)
    if not 0 < coreset_sampling_ratio <= 1:
        msg = f"coreset_sampling_ratio must be in (0, 1], got {coreset_sampling_ratio!r}. Paper: {paper}."
        raise ValueError(msg)


#: Largest magnitude a pre-processed (normalised) image plausibly holds; 0-255 pixel values are far above it.
MAX_PREPROCESSED_MAGNITUDE = 20.0


def check_support_images(images: torch.Tensor, *, preprocessed: bool) -> None:
    """Raise a clear error unless ``images`` is a float batch ``(k, 3, H, W)`` in the expected range.

    Args:
        images: The support images.
        preprocessed: ``True``: after the model's pre-processing (normalised, values of a few units);
            ``False``: raw images in ``[0, 1]``.

    Example:
        >>> check_support_images(torch.full((1, 3, 8, 8), 200.0), preprocessed=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: images hold values up to 200: they look like 0-255 pixel values, ...
    """
    if images.ndim != 4 or images.shape[0] == 0:
        msg = f"images must be a non-empty batch (k, 3, H, W), got shape {tuple(images.shape)}."
        raise ValueError(msg)
    expected = (
        "pre-processed images (model.pre_processor.transform of float images in [0, 1])"
        if preprocessed
        else "float images in [0, 1] at the model's input size"
    )
    if not images.is_floating_point():
        msg = f"images must be {expected}, got dtype {images.dtype}: convert with images.float() / 255 first."
        raise TypeError(msg)
    high, low = float(images.max()), float(images.min())
    if preprocessed and max(abs(high), abs(low)) > MAX_PREPROCESSED_MAGNITUDE:
        msg = (
            f"images hold values up to {max(abs(high), abs(low)):.4g}: they look like 0-255 pixel values, but "
            f"fit_support expects {expected}: divide by 255 and apply model.pre_processor.transform."
        )
        raise ValueError(msg)
    if not preprocessed and (low < -1e-3 or high > 1 + 1e-3):
        msg = f"images hold values in [{low:.4g}, {high:.4g}]: expected {expected} (divide 0-255 values by 255)."
        raise ValueError(msg)


def select_indices(pool_size: int, k_shot: int, seed: int) -> list[int]:
    """Pick ``k_shot`` distinct indices out of ``pool_size``, deterministically for ``seed``.

    Raises:
        ValueError: If the pool is smaller than ``k_shot``.
    """
    validate_k_shot(k_shot, allow_none=False)
    if pool_size < k_shot:
        msg = (
            f"k_shot={k_shot} but only {pool_size} normal support image(s) are available: lower k_shot or add "
            "normal images to the training folder."
        )
        raise ValueError(msg)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(pool_size, generator=generator)[:k_shot].tolist()


#: Pillow modes of 16-bit (and 32-bit integer) grayscale images, which anomalib's ``read_image`` flattens.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_image_file(path: str | Path) -> torch.Tensor:
    """Read an image as a float tensor ``(3, H, W)`` in ``[0, 1]``, 16-bit grayscale scaled by its range.

    anomalib's ``read_image`` converts with Pillow's ``convert("RGB")``, which clips 16-bit values to
    255 and so reads a 16-bit image as (nearly) one flat value; here such an image is scaled by
    65535 and repeated over three channels. Other images are read as anomalib reads them.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from PIL import Image
        >>> path = Path(tempfile.mkdtemp()) / "wide.png"
        >>> Image.fromarray((np.arange(16, dtype=np.uint16).reshape(4, 4) * 4096)).save(path)
        >>> image = read_image_file(path)
        >>> image.shape, round(float(image.max()), 4), round(float(image[0, 0, 1]), 4)
        (torch.Size([3, 4, 4]), 0.9375, 0.0625)
    """
    with Image.open(path) as image:
        if image.mode not in WIDE_MODES:
            return read_image(str(path), as_tensor=True)
        array = np.asarray(image).astype(np.float64)
    if array.max() > 65535 or array.min() < 0:
        msg = f"{str(path)!r} holds integer values outside [0, 65535]: save it as an 8- or 16-bit image."
        raise ValueError(msg)
    gray = torch.from_numpy(array / 65535.0).float()
    return gray[None].expand(3, -1, -1).contiguous()


def load_images(paths: Sequence[str | Path], transform: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Read images as float tensors in [0, 1], transform each, and stack them ``(k, 3, H, W)``."""
    images = []
    for path in paths:
        try:
            image = read_image_file(path)
        except (OSError, ValueError, SyntaxError) as error:  # PIL: truncated, corrupt or unreadable files
            msg = (
                f"Could not read support image {str(path)!r} ({type(error).__name__}: {error}): replace or remove "
                "this file, or pick other support images (few_shot_seed)."
            )
            raise OSError(msg) from error
        images.append(transform(image) if transform is not None else image)
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        msg = f"support images have different sizes {sorted(shapes)}: give the model a pre-processor that resizes."
        raise ValueError(msg)
    return torch.stack(images)


def normal_paths(dataset: object) -> list[str]:
    """Sorted paths of the normal images of an anomalib dataset."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        msg = f"the training set {type(dataset).__name__} has no `samples` table: use an anomalib datamodule."
        raise TypeError(msg)
    if "label_index" in samples:
        samples = samples[samples.label_index == 0]
    return sorted(str(path) for path in samples.image_path)


def drawn_support_paths(dataset: object, k_shot: int, seed: int) -> tuple[str, ...]:
    """The files of the k normal images that ``seed`` draws from an anomalib dataset (sorted pool, seeded pick)."""
    pool = normal_paths(dataset)
    return tuple(pool[i] for i in select_indices(len(pool), k_shot, seed))


def support_from_dataset(
    dataset: object,
    k_shot: int,
    seed: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
) -> SupportSet:
    """Choose and load k normal images of an anomalib dataset (e.g. ``datamodule.train_data``)."""
    paths = drawn_support_paths(dataset, k_shot, seed)
    logger.info("Few-shot support (k=%d, seed=%d): %s", k_shot, seed, ", ".join(paths))
    return SupportSet(images=load_images(paths, transform), paths=paths)


def support_from_folder(
    folder: str | Path,
    k_shot: int,
    seed: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
) -> SupportSet:
    """Choose and load k images from a folder of normal images (``few_shot_source``)."""
    root = Path(folder)
    if not root.is_dir():
        msg = f"few_shot_source={str(folder)!r} is not a folder: point it to a folder of normal images."
        raise FileNotFoundError(msg)
    pool = folder_images(root)
    if len(pool) < k_shot:
        subfolders = sorted(p.name for p in root.iterdir() if p.is_dir())
        hint = (
            f" It has subfolders {subfolders}: point it at the folder of good images itself (e.g. "
            f"{root / 'train' / 'good'}); subfolders are not searched, so defect images and masks of a data set "
            "root are never taken as normal."
            if subfolders
            else ""
        )
        msg = (
            f"few_shot_source={str(root)!r} holds {len(pool)} image file(s) ({', '.join(IMAGE_EXTENSIONS)}) but "
            f"k_shot={k_shot}.{hint} Add good images there, convert others to one of these formats, or lower k_shot."
        )
        raise ValueError(msg)
    paths = tuple(pool[i] for i in select_indices(len(pool), k_shot, seed))
    logger.info(
        "Few-shot support from %s: %d of its %d images (k=%d, seed=%d): %s",
        root,
        k_shot,
        len(pool),
        k_shot,
        seed,
        ", ".join(paths),
    )
    return SupportSet(images=load_images(paths, transform), paths=paths)


def folder_images(folder: Path) -> list[str]:
    """Sorted image files directly in ``folder`` (subfolders are not searched).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("b.png", "a.JPG", "notes.txt", "sub/c.png"):
        ...     (root / name).parent.mkdir(exist_ok=True)
        ...     (root / name).touch()
        >>> [Path(p).name for p in folder_images(root)]
        ['a.JPG', 'b.png']
    """
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def validate_few_shot_source(few_shot_source: str | Path | None, k_shot: int | None) -> Path | None:
    """Return ``few_shot_source`` as a ``Path`` after checking it is a folder (and that ``k_shot`` is set).

    Raises:
        ValueError: ``few_shot_source`` without ``k_shot``.
        FileNotFoundError: Not an existing folder.
    """
    if few_shot_source is None or str(few_shot_source) == "":
        return None
    if not k_shot:
        msg = f"few_shot_source={str(few_shot_source)!r} needs k_shot (the number of images to draw), e.g. k_shot=4."
        raise ValueError(msg)
    path = Path(few_shot_source).expanduser()
    if not path.is_dir():
        msg = f"few_shot_source={str(few_shot_source)!r} is not a folder: point it to a folder of normal images."
        raise FileNotFoundError(msg)
    return path


def train_dataset_of(trainer: object | None, model_name: str, datamodule: object | None = None) -> object:
    """Return the training set of ``datamodule`` (default: ``trainer.datamodule``), set up if needed.

    Raises:
        RuntimeError: No datamodule is given or attached; the message says how to fix it.
    """
    if datamodule is None and trainer is not None:
        datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        msg = (
            f"{model_name} needs k normal support images but no datamodule is attached: give the model a folder "
            "of normal images (`few_shot_source=...`; CLI: `--model.few_shot_source /path/to/good`), pass "
            "`datamodule=` to Engine/Trainer, call `model.fit_support(images)` yourself, or load a checkpoint "
            "(`ckpt_path=...`)."
        )
        raise RuntimeError(msg)
    if getattr(datamodule, "train_data", None) is None:
        datamodule.setup("fit")
    return datamodule.train_data
