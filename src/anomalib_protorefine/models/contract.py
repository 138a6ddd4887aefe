"""The torch side of the few-shot model contract: what a Lightning model may call on ``self.model``.

Two levels, as :class:`typing.Protocol` s checked at run time (attribute presence) by the tests:

* :class:`FewShotTorchModel`, every torch model (PatchCorePlusModel, AnomalyDINOPlusModel,
  WinClipPlusModel): a ``refiner`` (``None``: the upstream scoring), its ``refinement_stats``, a
  ``tiler`` attribute (anomalib's tiler callback sets it; :class:`~.tiling.NoTiler` refuses it) and a
  ``forward`` that returns anomalib's ``InferenceBatch`` in eval mode;
* :class:`MemoryBankTorchModel`, the memory-bank models (PatchCorePlusModel, AnomalyDINOPlusModel)
  that the few-shot benchmark scores on cached features: ``embed`` (images to patch embeddings and
  their grid), ``score_embedding`` (embeddings to scores and maps), ``build_bank``, the
  ``memory_bank`` and ``embedding_store`` of full-shot training, and ``exporting()`` (the block in
  which the graph is traceable).

Example:
    >>> from anomalib_protorefine.models.patchcore_plus.torch_model import PatchCorePlusModel
    >>> model = PatchCorePlusModel(layers=["layer2"], backbone="resnet18", pre_trained=False)
    >>> isinstance(model, MemoryBankTorchModel), isinstance(model, FewShotTorchModel)
    (True, True)
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["FewShotTorchModel", "MemoryBankTorchModel"]


@runtime_checkable
class FewShotTorchModel(Protocol):
    """What every refined torch model offers its Lightning model."""

    refiner: Any
    tiler: Any

    @property
    def refinement_stats(self) -> dict[str, float]:
        """Statistics of the last refined batch (empty without a refiner)."""

    def forward(self, batch: torch.Tensor) -> Any:
        """Scores and maps of pre-processed images (anomalib's ``InferenceBatch`` in eval mode)."""


@runtime_checkable
class MemoryBankTorchModel(FewShotTorchModel, Protocol):
    """A torch model whose support data is a bank of patch features (scored on cached features by the benchmark)."""

    memory_bank: torch.Tensor
    embedding_store: list[torch.Tensor]

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embeddings ``(B, h*w, c)`` of pre-processed images and the grid ``(h, w)``."""

    def score_embedding(self, embedding: torch.Tensor, grid: tuple[int, int], output_size: tuple[int, int]) -> Any:
        """Scores and anomaly maps of embeddings (what ``forward`` computes after ``embed``)."""

    def build_bank(self, *args: Any, **kwargs: Any) -> None:
        """Build the bank from support features (the arguments are the model's)."""

    def exporting(self, sinkhorn_iterations: int | None = None) -> contextlib.AbstractContextManager[None]:
        """Trace-friendly scoring inside the block (ONNX / OpenVINO export)."""
