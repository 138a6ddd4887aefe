"""PatchCore+: few-shot PatchCore with test-time prototype refinement (see README.md beside this file)."""

from .lightning_model import PatchCorePlus
from .torch_model import PatchcorePlusModel

__all__ = ["PatchCorePlus", "PatchcorePlusModel"]
