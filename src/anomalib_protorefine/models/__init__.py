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
    "FEW_SHOT_MODELS",
    "AnomalyDINOPlus",
    "AnomalyDINOPlusModel",
    "PatchCorePlus",
    "PatchCorePlusModel",
    "WinClipPlus",
    "WinClipPlusModel",
    "few_shot_model_class",
]

#: This package's few-shot models, by class name.
FEW_SHOT_MODELS = {model.__name__: model for model in (PatchCorePlus, AnomalyDINOPlus, WinClipPlus)}


def few_shot_model_class(class_path: str) -> type | None:
    """The few-shot model a class path names (``"PatchCorePlus"``, ``"anomalib_protorefine.PatchCorePlus"``, the
    full module path), or ``None`` for any other model.

    Example:
        >>> few_shot_model_class("anomalib_protorefine.AnomalyDINOPlus").__name__, few_shot_model_class("Patchcore")
        ('AnomalyDINOPlus', None)
    """  # noqa: D205
    module, _, name = class_path.rpartition(".")
    model = FEW_SHOT_MODELS.get(name)
    return model if not module or module.split(".")[0] == "anomalib_protorefine" else None


#: Old public names, still served with a ``FutureWarning``.
__getattr__ = renamed_names(__name__, RENAMED, globals())
