"""Anomalib models with test-time prototype refinement.

Importing this module registers the models with anomalib: they are direct subclasses of
``AnomalibModule``, so ``anomalib.models.get_model("PatchCorePlus")`` (or ``"WinClipPlus"``,
``"AnomalyDINOPlus"``) and the ``anomalib`` CLI find them.
"""

from anomalib_protorefine._deprecation import renamed_names
from anomalib_protorefine.upstream import quiet_upstream_imports

with quiet_upstream_imports():  # first import here: anomalib's notices about its own imports stay quiet
    import anomalib.models  # noqa: F401

from .anomaly_dino_plus import AnomalyDINOPlus, AnomalyDINOPlusModel
from .patchcore_plus import PatchCorePlus, PatchCorePlusModel
from .patchcore_plus.torch_model import RENAMED
from .winclip_plus import WinClipPlus, WinClipPlusModel

__all__ = [
    "AnomalyDINOPlus",
    "AnomalyDINOPlusModel",
    "PatchCorePlus",
    "PatchCorePlusModel",
    "WinClipPlus",
    "WinClipPlusModel",
]


#: Old public names, still served with a ``FutureWarning``.
__getattr__ = renamed_names(__name__, RENAMED, globals())
