"""PatchCore+: few-shot PatchCore with test-time prototype refinement (see README.md beside this file)."""

from anomalib_protorefine._deprecation import renamed_names

from .lightning_model import PatchCorePlus
from .torch_model import RENAMED, PatchCorePlusModel

__all__ = ["PatchCorePlus", "PatchCorePlusModel"]


#: Old public names, still served with a ``FutureWarning``.
__getattr__ = renamed_names(__name__, RENAMED, globals())
