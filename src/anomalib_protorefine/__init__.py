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
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "PatchCorePlus": "anomalib_protorefine.models",
    "PatchcorePlusModel": "anomalib_protorefine.models",
    "WinClipPlus": "anomalib_protorefine.models",
    "WinClipPlusModel": "anomalib_protorefine.models",
    "PrototypeRefiner": "anomalib_protorefine.refinement",
    "RefinerOptions": "anomalib_protorefine.refinement",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .models import PatchCorePlus, PatchcorePlusModel, WinClipPlus, WinClipPlusModel  # noqa: F401
    from .refinement import PrototypeRefiner, RefinerOptions  # noqa: F401


def __getattr__(name: str) -> Any:
    """Import public names lazily (PEP 562)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    msg = f"module 'anomalib_protorefine' has no attribute {name!r}"
    raise AttributeError(msg)
