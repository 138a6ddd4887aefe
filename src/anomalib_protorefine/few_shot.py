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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from anomalib_protorefine.image_checks import (
    FLAT_SPREAD as FLAT_SPREAD,
)
from anomalib_protorefine.image_checks import (
    FLOAT_MODES as FLOAT_MODES,
)
from anomalib_protorefine.image_checks import (
    INTERPOLATION_OVERSHOOT as INTERPOLATION_OVERSHOOT,
)
from anomalib_protorefine.image_checks import (
    MAX_PREPROCESSED_MAGNITUDE as MAX_PREPROCESSED_MAGNITUDE,
)
from anomalib_protorefine.image_checks import (
    MIN_SUPPORT_SIDE as MIN_SUPPORT_SIDE,
)
from anomalib_protorefine.image_checks import (
    WIDE_MODES as WIDE_MODES,
)
from anomalib_protorefine.image_checks import (
    check_support_images as check_support_images,
)
from anomalib_protorefine.image_checks import (
    degenerate_image_reason as degenerate_image_reason,
)
from anomalib_protorefine.image_checks import (
    read_image_file as read_image_file,
)
from anomalib_protorefine.image_checks import (
    read_named_image as read_named_image,
)

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


def plain_int(value: object) -> object:
    """``value`` as a Python ``int`` when it is an integral number (a numpy integer included), else unchanged.

    Integral numpy scalars (``np.int64(3)``) pass the checks as integers but must not be stored: torch's
    ``Generator.manual_seed`` refuses them and YAML writes them as Python objects.

    Example:
        >>> import numpy as np
        >>> type(plain_int(np.int64(3))).__name__, plain_int(True), plain_int(2.5)
        ('int', True, 2.5)
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def validate_k_shot(k_shot: int | None, *, allow_none: bool = True) -> int | None:
    """Return ``k_shot`` as a plain ``int`` (or ``None`` when allowed); raise a clear error unless it is positive.

    Integral numpy scalars are accepted.

    Example:
        >>> import numpy as np
        >>> type(validate_k_shot(np.int64(2))).__name__
        'int'
    """
    if k_shot is None and allow_none:
        return None
    if isinstance(k_shot, bool) or not isinstance(k_shot, numbers.Integral) or k_shot < 1:
        hint = " or None to use the whole training set" if allow_none else ""
        msg = f"k_shot must be a positive integer{hint}, got {k_shot!r}. Use e.g. k_shot=4."
        raise ValueError(msg)
    return int(k_shot)


#: Largest ``few_shot_seed``: the seed also seeds numpy (coreset projection), which takes 32-bit seeds.
MAX_SEED = 2**32 - 1


def validate_seed(few_shot_seed: int) -> int:
    """Return ``few_shot_seed`` as a plain ``int`` after checking it is an integer in ``[0, MAX_SEED]``.

    Example:
        >>> import numpy as np
        >>> type(validate_seed(np.uint32(3))).__name__
        'int'
    """
    if isinstance(few_shot_seed, bool) or not isinstance(few_shot_seed, numbers.Integral):
        msg = f"few_shot_seed must be an integer, got {few_shot_seed!r}. Use e.g. few_shot_seed=0."
        raise TypeError(msg)
    if not 0 <= few_shot_seed <= MAX_SEED:
        msg = (
            f"few_shot_seed must be in [0, {MAX_SEED}] (it also seeds numpy), got {few_shot_seed}. "
            "Use e.g. few_shot_seed=0."
        )
        raise ValueError(msg)
    return int(few_shot_seed)


def validate_support_options(
    k_shot: int | None,
    few_shot_seed: int,
    coreset_sampling_ratio: float,
    paper: str,
    ratio_name: str = "coreset_sampling_ratio",
) -> tuple[int | None, int]:
    """Validate the support options shared by the models; return ``(k_shot, few_shot_seed)`` as plain ints.

    Args:
        k_shot: Number of support images, or ``None``.
        few_shot_seed: Seed of the support draw.
        coreset_sampling_ratio: The coreset ratio, in ``(0, 1]``.
        paper: The paper's value of the ratio, for the message.
        ratio_name: The model's name of the ratio argument (AnomalyDINOPlus: ``sampling_ratio``).

    Returns:
        ``k_shot`` (``None`` stays ``None``) and ``few_shot_seed`` as Python ints (numpy integers converted).

    Example:
        >>> validate_support_options(4, -5, 0.1, paper="0.05")
        Traceback (most recent call last):
        ...
        ValueError: few_shot_seed must be in [0, 4294967295] (it also seeds numpy), got -5. Use e.g. few_shot_seed=0.
    """
    k_shot = validate_k_shot(k_shot)
    few_shot_seed = validate_seed(few_shot_seed)
    if isinstance(coreset_sampling_ratio, bool) or not isinstance(coreset_sampling_ratio, numbers.Real):
        msg = (
            f"{ratio_name} must be a number in (0, 1], got {type(coreset_sampling_ratio).__name__} "
            f"{coreset_sampling_ratio!r}. Pass a number, e.g. {ratio_name}=0.1 (CLI: "
            f"--model.{ratio_name} 0.1). Paper: {paper}."
        )
        raise TypeError(msg)
    if not 0 < coreset_sampling_ratio <= 1:
        msg = f"{ratio_name} must be in (0, 1], got {coreset_sampling_ratio!r}. Paper: {paper}."
        raise ValueError(msg)
    return k_shot, few_shot_seed


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


#: What an unreadable support image's error tells the user to do.
SUPPORT_READ_FIX = "replace or remove this file, or pick other support images (few_shot_seed)."


def load_images(
    paths: Sequence[str | Path],
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    what: str = "support image",
) -> torch.Tensor:
    """Read images as float tensors in [0, 1], transform each, and stack them ``(k, 3, H, W)``.

    Files that cannot be read fail with their name. Images that hold nothing to compare with (one flat
    value, e.g. all black, or a side below :data:`MIN_SUPPORT_SIDE` pixels) are used, with one warning
    that names them.

    Args:
        paths: The image files.
        transform: Applied to each image read (``None``: none).
        what: What the images are, for the messages (e.g. ``"calibration image"``).

    Returns:
        The stacked images.

    Raises:
        OSError: A file cannot be read (truncated, corrupt, unsupported values); the message names it.
        ValueError: The transformed images differ in size.
    """
    images, degenerate = [], []
    for path in paths:
        image = read_named_image(
            path, what, "replace or remove this file, or pick other support images (few_shot_seed)."
        )
        reason = degenerate_image_reason(image)
        if reason is not None:
            degenerate.append(f"{str(path)!r}: {reason}")
        images.append(transform(image) if transform is not None else image)
    if degenerate:
        msg = (
            f"{len(degenerate)} {what}(s) hold nothing to compare with and are used anyway: {'; '.join(degenerate)}. "
            "Replace them with real images of good parts, or pick other support images (few_shot_seed)."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        msg = f"{what}s have different sizes {sorted(shapes)}: give the model a pre-processor that resizes."
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
