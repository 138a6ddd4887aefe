"""Pre-processing whose exported form matches ``Engine.predict`` exactly.

anomalib's :class:`~anomalib.pre_processing.PreProcessor` applies ``transform`` in the Lightning
loops (``Engine.test/predict``) but an *export transform* in ``forward``, which is what an exported
torch model (``anomalib export --export_type torch``, ``TorchInferencer``) runs. anomalib builds
the export transform with ``get_exportable_transform``, which switches ``Resize`` antialiasing off
(for ONNX/OpenVINO): downsampled inputs then differ, and so do the scores (by up to 0.16 on real
data). :class:`AntialiasPreProcessor` keeps the transform as it is (only ``CenterCrop`` becomes
anomalib's exportable crop, which computes the same), so both paths see identical pixels.

Example:
    >>> from torchvision.transforms.v2 import Compose, Resize
    >>> pre = AntialiasPreProcessor(Compose([Resize((64, 64), antialias=True)]))
    >>> pre.export_transform.transforms[0].antialias
    True
"""

from __future__ import annotations

import copy
from typing import Any

from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import convert_center_crop_transform
from torchvision.transforms.v2 import Transform

__all__ = ["AntialiasPreProcessor", "exportable_transform"]


def exportable_transform(transform: Transform | None) -> Transform | None:
    """A copy of ``transform`` for ``forward``/export that computes exactly what ``transform`` computes.

    Unlike anomalib's ``get_exportable_transform`` it keeps ``Resize(antialias=True)``.
    """
    if transform is None:
        return None
    return convert_center_crop_transform(copy.deepcopy(transform))


class AntialiasPreProcessor(PreProcessor):
    """A :class:`~anomalib.pre_processing.PreProcessor` whose export transform keeps resize antialiasing.

    An exported torch model (``anomalib export --export_type torch`` then ``TorchInferencer``, or
    ``model(images)``) then scores exactly like ``Engine.predict``.

    Args:
        transform: The transform applied to the images (and masks).
    """

    def __init__(self, transform: Transform | None = None) -> None:
        super().__init__(transform=transform)
        self.export_transform = exportable_transform(self.transform)

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore the transform from a checkpoint, keeping antialiasing in the export transform too."""
        super().load_checkpoint_config(config)
        self.export_transform = exportable_transform(self.transform)
