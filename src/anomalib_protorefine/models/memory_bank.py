"""What the memory-bank models (PatchCorePlus, AnomalyDINOPlus) share: few-shot training, export, reset.

Both keep a bank of support patch features in ``self.model.memory_bank``: with ``k_shot`` the bank
comes from k support images and the training epoch does nothing; without it (anomalib's full-shot
behaviour) the training batches' embeddings are collected. Export puts the bank and any refinement
in the graph (``self.model.exporting``).

Example:
    >>> from anomalib_protorefine.models import AnomalyDINOPlus, PatchCorePlus
    >>> issubclass(PatchCorePlus, FewShotMemoryBankMixin), issubclass(AnomalyDINOPlus, FewShotMemoryBankMixin)
    (True, True)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_protorefine import upstream

__all__ = ["FewShotMemoryBankMixin"]


class FewShotMemoryBankMixin:
    """Bank building, training, learning type, trainer arguments, ONNX/OpenVINO export and support reset.

    Listed before :class:`~anomalib_protorefine.models.base.FewShotModel` by a model whose torch model
    is a :class:`~anomalib_protorefine.models.contract.MemoryBankTorchModel`. It implements
    ``_ensure_ready`` (support draw, thresholds, bank) with two hooks for the model:
    ``_before_support_bank`` (e.g. choosing the refiner) and ``_bank_from_collected_embeddings``
    (full-shot banks from ``Engine.fit``).
    """

    #: Memory-bank models are scored on cached test features by the few-shot benchmark.
    cached_features = True

    model: Any
    k_shot: int | None
    few_shot_source: Path | None

    def _reset_support(self) -> None:
        """Empty the memory bank and the support list: a support-defining option changed."""
        bank = self.model.memory_bank
        self.model.memory_bank = torch.empty(0, device=bank.device, dtype=bank.dtype)
        self.model.embedding_store.clear()
        self.support_paths = ()
        upstream.mark_fitted(self, False, device=bank.device)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT | None:  # noqa: ANN002, ANN003
        """Full-shot: collect the batch's embeddings (as anomalib). Few-shot: nothing (the bank comes from k images)."""
        del args, kwargs
        if self.k_shot:
            return None
        self.model(batch.image)
        return torch.tensor(0.0, requires_grad=True, device=self.device)  # type: ignore[attr-defined]

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Anomalib's Patchcore and AnomalyDINO arguments (one epoch, no sanity check, one device); few-shot
        runs a single (skipped) training batch.
        """  # noqa: D205
        arguments: dict[str, Any] = {"gradient_clip_val": 0, "max_epochs": 1, "num_sanity_val_steps": 0, "devices": 1}
        if self.k_shot:
            arguments["limit_train_batches"] = 1
        return arguments

    @property
    def learning_type(self) -> LearningType:
        """``FEW_SHOT`` with ``k_shot`` (anomalib then validates before testing), else ``ONE_CLASS``."""
        return LearningType.FEW_SHOT if self.k_shot else LearningType.ONE_CLASS

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        sinkhorn_iterations: int | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to ONNX (also the first step of ``to_openvino``), with the bank and any refinement in the graph.

        The graph holds pre-processing (with the antialiased resize), backbone, refinement, scoring and
        post-processing, for any batch size (and any image size when ``input_size`` is ``None``). Without
        a memory bank (no checkpoint) the bank is built from ``few_shot_source`` first. The
        refiner runs in its static form (:meth:`PrototypeRefiner.exporting`): all EM iterations, a fixed
        number of log-domain Sinkhorn iterations per E-step, closed-form M-step. The default opset is 18
        (the first with an antialiased ``Resize``).

        Args:
            export_root: Folder of the export (the file goes to ``weights/onnx/<model_file_name>.onnx``).
            model_file_name: File name without suffix.
            input_size: Static ``(H, W)`` of the input, or ``None`` for dynamic height and width.
            sinkhorn_iterations: Sinkhorn iterations per E-step in the graph (``None``: the refiner's
                ``sinkhorn_max_iter`` if it uses ``sinkhorn_method="fixed"``, else
                :data:`~anomalib_protorefine.refinement.refiner.EXPORT_SINKHORN_ITERATIONS`). CLI:
                ``--onnx_kwargs '{"sinkhorn_iterations": 200}'``.
            **kwargs: Passed to anomalib's ``ExportMixin.to_onnx`` (and ``torch.onnx.export``).

        Returns:
            The path of the ``.onnx`` file.

        Raises:
            ValueError: A model that cannot be exported (e.g. AnomalyDINOPlus with ``masking=True``:
                scikit-learn's PCA), or an empty bank; the message names the fix.

        Example:
            >>> import torch
            >>> from anomalib_protorefine.models import PatchCorePlus
            >>> model = PatchCorePlus(backbone="resnet18", layers=("layer2",), pre_trained=False, k_shot=1)
            >>> model.fit_support(torch.rand(1, 3, 64, 64))
            >>> path = model.to_onnx("exports", input_size=(64, 64))  # doctest: +SKIP
        """
        kwargs.setdefault("opset_version", 18)
        self.prepare_export()  # type: ignore[attr-defined]  # no checkpoint: the bank from few_shot_source
        with self.model.exporting(sinkhorn_iterations):
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)  # type: ignore[misc]

    def _support_ready(self) -> bool:
        """The memory bank is built."""
        return bool(self.model.memory_bank.numel())

    def _ensure_ready(self, datamodule: object | None = None) -> None:
        """Build the bank if it is empty: from k seeded support images, or from the embeddings of ``Engine.fit``."""
        if self.model.memory_bank.numel():
            return
        if self.k_shot:
            support = self.draw_support(datamodule)  # type: ignore[attr-defined]
            self.support_paths = support.paths
            self._before_support_bank(support.paths)
            if self._wants_support_thresholds():  # type: ignore[attr-defined]
                self.calibrate_thresholds(support.paths)  # type: ignore[attr-defined]
            self.fit_support(support.images)  # type: ignore[attr-defined]
        elif self.model.embedding_store:
            self._bank_from_collected_embeddings()
        else:
            msg = (
                f"{type(self).__name__} has an empty memory bank and k_shot=None: run Engine.fit first, load a "
                "checkpoint, or set k_shot (e.g. --model.k_shot 4) to build the bank from support images."
            )
            raise RuntimeError(msg)

    def prepare_support(self, datamodule: object | None = None) -> None:
        """Build the memory bank now, as a test run would: k seeded support images of ``datamodule``'s training set.

        Does nothing when the bank exists. Used by the few-shot benchmark, which scores cached test
        features without a ``Trainer``; within Lightning the bank is built on demand.

        Args:
            datamodule: The anomalib datamodule whose training set the support images come from
                (not needed with ``few_shot_source``).
        """
        self._ensure_ready(datamodule)

    def _before_support_bank(self, paths: tuple[str, ...]) -> None:
        """Hook run on the drawn support files before the thresholds and the bank (e.g. choosing the refiner)."""

    def _bank_from_collected_embeddings(self) -> None:
        """Build the bank from the embeddings collected by ``Engine.fit`` (full-shot; implemented by the model)."""
        raise NotImplementedError

    def to_openvino(self, export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        """Anomalib's OpenVINO export (through :meth:`to_onnx`), with a warning about OpenVINO's CPU precision.

        OpenVINO's CPU plugin infers in bfloat16 by default on processors that support it, which puts the
        refined scores far off; the IR cannot carry the fix (OpenVINO ignores runtime options stored in the
        model's ``rt_info``), so the export warns once with the option to pass:
        ``OpenVINOInferencer(path, config={"INFERENCE_PRECISION_HINT": "f32"})``.

        Args:
            export_root: Folder of the export.
            *args: anomalib's ``to_openvino`` arguments (``model_file_name``, ``input_size``, ...).
            **kwargs: Its keyword arguments (``onnx_kwargs={"sinkhorn_iterations": 200}`` reaches
                :meth:`to_onnx`).

        Returns:
            The path of the ``.xml`` file.
        """
        path = super().to_openvino(export_root, *args, **kwargs)  # type: ignore[misc]
        msg = (
            f"OpenVINO export {path}: compile it in float32, e.g. OpenVINOInferencer(path, "
            "config={'INFERENCE_PRECISION_HINT': 'f32'}) or core.compile_model(path, 'CPU', "
            "{'INFERENCE_PRECISION_HINT': 'f32'}). OpenVINO's CPU default on bfloat16-capable processors is "
            "bfloat16, which puts the scores and the decisions far off, and the IR cannot carry the option."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
        return path
