"""anomalib-protorefine: test-time prototype refinement for few-shot anomaly detection in anomalib.

The heavy imports (torch, anomalib) happen on first attribute access, so that the autoload hook
installed with the wheel costs nothing for Python processes that never touch anomalib.

Example:
    >>> from anomalib_protorefine import PatchCorePlus, PrototypeRefiner
    >>> PrototypeRefiner().options.lambda_
    0.3
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AnomalyDINOPlus": "anomalib_protorefine.models",
    "AnomalyDINOPlusModel": "anomalib_protorefine.models",
    "PatchCorePlus": "anomalib_protorefine.models",
    "PatchCorePlusModel": "anomalib_protorefine.models",
    "WinClipPlus": "anomalib_protorefine.models",
    "WinClipPlusModel": "anomalib_protorefine.models",
    "PrototypeRefiner": "anomalib_protorefine.refinement",
    "RefinerOptions": "anomalib_protorefine.refinement",
    "FewShotPostProcessor": "anomalib_protorefine.post_processing",
    "SupportThresholds": "anomalib_protorefine.thresholds",
}

__all__ = [*_EXPORTS, "__version__", "config_path"]

if TYPE_CHECKING:
    from .models import (  # noqa: F401
        AnomalyDINOPlus,
        AnomalyDINOPlusModel,
        PatchCorePlus,
        PatchCorePlusModel,
        WinClipPlus,
        WinClipPlusModel,
    )
    from .post_processing import FewShotPostProcessor  # noqa: F401
    from .refinement import PrototypeRefiner, RefinerOptions  # noqa: F401
    from .thresholds import SupportThresholds  # noqa: F401


def config_path(name: str | None = None) -> Path:
    """Where the anomalib CLI configs live: inside the installed package, or ``configs/`` of a source checkout.

    Args:
        name: A config file name (e.g. ``"patchcore_plus_offline.yaml"``), or ``None`` for the folder.

    Returns:
        The path of the config (or of the folder).

    Raises:
        FileNotFoundError: No such config; the message lists the available ones.

    Example:
        >>> config_path("patchcore_plus_offline.yaml").name
        'patchcore_plus_offline.yaml'
    """
    package = Path(__file__).resolve().parent
    folder = next(
        (path for path in (package / "configs", package.parents[1] / "configs") if path.is_dir()), package / "configs"
    )
    if name is None:
        return folder
    path = folder / name
    if not path.is_file():
        available = sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []
        msg = f"config {name!r} not found in {folder}; available: {available}."
        raise FileNotFoundError(msg)
    return path


#: Old public names (old -> new), still served with a ``FutureWarning``: a copy of
#: ``models.patchcore_plus.torch_model.RENAMED``, kept here so that this package imports nothing heavy.
_RENAMED = {"PatchcorePlusModel": "PatchCorePlusModel"}


def __getattr__(name: str) -> Any:
    """Import public names lazily (PEP 562); old names of renamed ones warn."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _RENAMED:
        from ._deprecation import warn_renamed

        warn_renamed(f"anomalib_protorefine.{name}", _RENAMED[name])
        return __getattr__(_RENAMED[name])
    msg = f"module 'anomalib_protorefine' has no attribute {name!r}"
    raise AttributeError(msg)
