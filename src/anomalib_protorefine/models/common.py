"""Lightning glue shared by the refined few-shot models (PatchCorePlus, WinClipPlus).

Example:
    >>> from anomalib_protorefine.models.common import RefinedFewShotMixin
    >>> from anomalib_protorefine import PatchCorePlus
    >>> issubclass(PatchCorePlus, RefinedFewShotMixin)
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, ClassVar

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from jsonargparse.typing import register_type
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from PIL import Image
from torchvision.transforms.v2 import CenterCrop, Compose, Resize

from anomalib_protorefine.calibration import split_transform
from anomalib_protorefine.false_alarm import LineCalibration, images_needed, validate_false_alarm_rate
from anomalib_protorefine.few_shot import (
    IMAGE_EXTENSIONS,
    SupportSet,
    check_support_images,
    drawn_support_paths,
    folder_images,
    load_images,
    read_named_image,
    support_from_dataset,
    support_from_folder,
    train_dataset_of,
    validate_few_shot_source,
    validate_k_shot,
    validate_seed,
)
from anomalib_protorefine.post_processing import (
    FewShotPostProcessor,
    clear_thresholds,
    write_support_thresholds,
    write_thresholds,
)
from anomalib_protorefine.refinement import PrototypeRefiner, RefinerOptions
from anomalib_protorefine.reporting import PredictionReport
from anomalib_protorefine.support_augmentation import resolve_support_augmentation, support_views, view_names
from anomalib_protorefine.thresholds import (
    SupportScores,
    SupportThresholds,
    choose_thresholds,
    collect_support_scores,
    describe,
    validate_threshold,
)
from anomalib_protorefine.visualization import DecisionVisualizer

logger = logging.getLogger(__name__)

#: The false-alarm rate of a calibration when none is given (``calibrate_false_alarm`` without ``false_alarm_rate``).
DEFAULT_FALSE_ALARM_RATE = 0.05
#: What an unreadable calibration image's error tells the user to do.
CALIBRATION_READ_FIX = "replace it or remove it from calibration_source."
#: Calibration images scored per forward pass.
CALIBRATION_BATCH = 16


def refiner_option_names() -> tuple[str, ...]:
    """Names of the :class:`PrototypeRefiner` options (derived from :class:`RefinerOptions`, never hard-coded).

    Example:
        >>> "lambda_" in refiner_option_names()
        True
    """
    return tuple(field.name for field in dataclasses.fields(RefinerOptions))


class RefinerPreset(dict):
    """A preset name given on the command line (``--model.refiner paper``), held as ``{"preset": "paper"}``.

    jsonargparse replaces a string value by a new dict when nested options follow
    (``--model.refiner paper --model.refiner.lambda_ 1.0`` would give ``{"lambda_": 1.0}``: the
    default form with lambda 1). It merges nested options into a previous dict value, so the models
    list this type, registered with jsonargparse, before ``str`` in their ``refiner`` type: a preset
    name is parsed into this dict and the options after it are added to it
    (``{"preset": "paper", "lambda_": 1.0}``, the paper form with lambda 1). Saved configurations
    hold the plain name again. In Python, pass the name itself.

    Example:
        >>> RefinerPreset.parse("paper")
        {'preset': 'paper'}
        >>> RefinerPreset.dump(RefinerPreset.parse("paper"))
        'paper'
    """

    __slots__ = ()  # no instance __dict__: jsonargparse copies dicts through it when a dict has one

    @classmethod
    def parse(cls, value: Any) -> RefinerPreset:
        """A preset name as this dict; any other value is left to the other types of ``refiner``."""
        if not isinstance(value, str) or not value.strip() or value.strip()[0] in "{[":
            msg = f"not a refiner preset name: {value!r}"
            raise TypeError(msg)
        return cls(preset=value.strip())

    @staticmethod
    def dump(value: Any) -> Any:
        """The preset name of this dict (as the user wrote it); other values unchanged."""
        return value["preset"] if isinstance(value, RefinerPreset) else value


register_type(RefinerPreset, serializer=RefinerPreset.dump, deserializer=RefinerPreset.parse)


def plain_refiner(refiner: Any) -> Any:
    """A ``{"preset": name}`` dict without options as the plain name (other values unchanged).

    Example:
        >>> plain_refiner(RefinerPreset.parse("auto")), plain_refiner({"preset": "paper", "lambda_": 1.0})
        ('auto', {'preset': 'paper', 'lambda_': 1.0})
    """
    if isinstance(refiner, dict) and set(refiner) == {"preset"}:
        return refiner["preset"]
    return refiner


def _refiner_arguments(refiner: dict[str, Any]) -> dict[str, Any]:
    """The refiner options of a dict: plain options, or a jsonargparse ``class_path``/``init_args`` spec."""
    if "class_path" in refiner:
        class_name = str(refiner["class_path"]).rsplit(".", 1)[-1]
        if class_name != PrototypeRefiner.__name__:
            msg = f"refiner class_path must name PrototypeRefiner, got {refiner['class_path']!r}."
            raise ValueError(msg)
        refiner = dict(refiner.get("init_args") or {})
    refiner = {key: value for key, value in refiner.items() if key != "preset"}
    unknown = sorted(set(refiner) - set(refiner_option_names()))
    if unknown:
        msg = (
            f"refiner has unknown option(s) {unknown}: valid PrototypeRefiner options are "
            f"{list(refiner_option_names())} (e.g. --model.refiner.lambda_ 0.2)."
        )
        raise ValueError(msg)
    return dict(refiner)


def make_refiner(
    refiner: bool | str | dict[str, Any] | PrototypeRefiner,
    presets: Mapping[str, dict[str, Any]],
    default: str,
    other_names: Sequence[str] = (),
) -> PrototypeRefiner | None:
    """Turn the ``refiner`` argument of a model into a refiner (or ``None`` for the baseline).

    A dict is a *partial override* of a preset: its ``"preset"`` key (default: the model's default
    preset) with only the options it names changed. ``--model.refiner paper --model.refiner.lambda_ 1.0``
    gives ``{"preset": "paper", "lambda_": 1.0}`` (see :class:`RefinerPreset`), and
    ``--model.refiner.lambda_ 0.2`` on the command line gives (the models list ``dict``
    before ``PrototypeRefiner`` in their ``refiner`` type, so jsonargparse collects nested options
    into a dict instead of building a ``PrototypeRefiner`` whose unnamed options would take the
    class defaults rather than the model's). A ``PrototypeRefiner`` is used as given: all its
    options are explicit.

    Args:
        refiner: ``True`` (the model's ``default`` preset), ``False`` or ``"off"`` (no refinement),
            a preset name (e.g. ``"paper"``), a dict of :class:`PrototypeRefiner` options over the
            default preset (as stored in checkpoints, or a jsonargparse ``class_path``/``init_args``
            spec), or a refiner.
        presets: The model's named settings (preset name -> refiner options).
        default: The preset of ``True`` and the base of a dict.
        other_names: Other string values the model accepts (e.g. ``"auto"``), listed in the error.

    Returns:
        The refiner or ``None``.

    Example:
        >>> presets = {"paper": {"lambda_": 0.1, "distance": "cosine"}}
        >>> make_refiner({"lambda_": 0.2}, presets, default="paper").options.distance
        'cosine'
        >>> make_refiner("paper", presets, default="paper").options.lambda_
        0.1
    """
    refiner = plain_refiner(refiner)
    if isinstance(refiner, PrototypeRefiner):
        return refiner
    if isinstance(refiner, bool):
        return PrototypeRefiner(**presets[default]) if refiner else None
    if isinstance(refiner, str):
        if refiner == "off":
            return None
        if refiner not in presets:
            names = ", ".join(repr(name) for name in (*presets, *other_names, "off"))
            msg = f"refiner={refiner!r} is not a preset: use one of {names}, True, False or a dict of options."
            raise ValueError(msg)
        return PrototypeRefiner(**presets[refiner])
    if isinstance(refiner, dict):
        preset = refiner.get("preset", default)
        if preset not in presets:
            names = ", ".join(repr(name) for name in presets)
            takes = "takes no options" if preset in (*other_names, "off") else "is not a preset"
            msg = f"refiner preset {preset!r} {takes}: give options over one of {names} (e.g. --model.refiner paper)."
            raise ValueError(msg)
        return PrototypeRefiner(**{**presets[preset], **_refiner_arguments(refiner)})
    msg = (
        "refiner must be True, False, a preset name, a dict of PrototypeRefiner options or a PrototypeRefiner, "
        f"got {type(refiner).__name__}."
    )
    raise TypeError(msg)


def _plain(value: Any) -> Any:
    """Compare options as stored in checkpoints: tuples and lists alike, paths as strings."""
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


#: The first bytes of a ``torch.save`` file: a zip archive (torch >= 1.6) or a pickle (protocol 2+).
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def check_checkpoint_file(path: str | Path) -> None:
    """Raise a one-line error unless ``path`` is an existing ``torch.save`` file (local paths only).

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkstemp(suffix=".ckpt")[1]
        >>> torch.save({"state_dict": {}}, path)
        >>> check_checkpoint_file(path)
    """
    text = str(path)
    if "://" in text:  # a URL or a registry name: Lightning resolves it
        return
    file = Path(text).expanduser()
    if not file.is_file():
        msg = f"checkpoint {text!r} does not exist: pass the .ckpt file that Engine.fit or anomalib fit wrote."
        raise FileNotFoundError(msg)
    with file.open("rb") as handle:
        head = handle.read(4)
    if not head.startswith(_CHECKPOINT_MAGIC):
        msg = (
            f"{text!r} is not a checkpoint (not a torch.save file; it starts with {head!r}): pass the .ckpt file "
            "that Engine.fit or anomalib fit wrote (weights/lightning/model.ckpt)."
        )
        raise ValueError(msg)


class CheckedCheckpointIO(CheckpointIO):
    """The trainer's checkpoint IO, with :func:`check_checkpoint_file` before every load.

    ``anomalib test --ckpt_path notes.txt`` (or ``Engine.test(ckpt_path=...)``) then fails with one
    line naming the file and what to pass instead of a pickle traceback from ``torch.load``. Saving,
    removing and the load itself are the wrapped IO's.

    Example:
        >>> from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
        >>> io = CheckedCheckpointIO(TorchCheckpointIO())
        >>> io.load_checkpoint("no/such/model.ckpt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: checkpoint 'no/such/model.ckpt' does not exist: pass the .ckpt file that Engine.fit or \
anomalib fit wrote.
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Save with the wrapped IO."""
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Check that ``path`` is a checkpoint file, then load it with the wrapped IO."""
        check_checkpoint_file(path)
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: str | Path) -> None:
        """Remove with the wrapped IO."""
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        """Tear the wrapped IO down."""
        self.inner.teardown()


def fail_safe(output: Any, invalid: torch.Tensor) -> Any:
    """An ``InferenceBatch`` whose images marked ``invalid`` get NaN scores and maps, the label defective, a full mask.

    Example:
        >>> from anomalib.data import InferenceBatch
        >>> maps = torch.zeros(2, 1, 2, 2)
        >>> out = InferenceBatch(pred_score=torch.tensor([0.2, 0.3]), pred_label=torch.tensor([False, False]),
        ...                      anomaly_map=maps, pred_mask=maps.bool())
        >>> safe = fail_safe(out, torch.tensor([False, True]))
        >>> safe.pred_label.tolist(), bool(safe.pred_score[1].isnan()), bool(safe.pred_mask[1].all())
        ([False, True], True, True)
    """

    def per_image(tensor: torch.Tensor) -> torch.Tensor:
        return invalid.reshape(-1, *([1] * (tensor.ndim - 1)))

    fields: dict[str, torch.Tensor] = {}
    nan = torch.tensor(float("nan"))
    for name in ("pred_score", "anomaly_map"):
        value = getattr(output, name, None)
        if value is not None:
            fields[name] = torch.where(per_image(value), nan.to(value.dtype), value)
    for name in ("pred_label", "pred_mask"):
        value = getattr(output, name, None)
        if value is not None:
            fields[name] = value.bool() | per_image(value)
    return output._replace(**fields)


#: Loggers of torch's ONNX exporter that report every graph pass at INFO.
EXPORT_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx")


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str], level: int = logging.WARNING) -> Iterator[None]:
    """Hold the named loggers at ``level`` or above while the block runs (restored afterwards).

    Example:
        >>> with quiet_loggers(["onnxscript"]):
        ...     logging.getLogger("onnxscript").level
        30
    """
    loggers = [logging.getLogger(name) for name in names]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(max(level, item.level))
    try:
        yield
    finally:
        for item, previous in zip(loggers, levels, strict=True):
            item.setLevel(previous)


def release_inference_tensors(module: torch.nn.Module) -> int:
    """Replace buffers and parameters made under ``torch.inference_mode`` by ordinary copies; return how many.

    A bank built while predicting or testing (Lightning runs both under inference mode) holds inference
    tensors, which ``torch.export`` (the ONNX and OpenVINO exports) refuses to trace.

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> with torch.inference_mode():
        ...     layer.register_buffer("bank", torch.ones(3))
        >>> release_inference_tensors(layer), layer.bank.is_inference()
        (1, False)
    """
    count = 0
    for sub in module.modules():
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer.is_inference():
                setattr(sub, name, buffer.clone())
                count += 1
        for name, parameter in list(sub.named_parameters(recurse=False)):
            if parameter.is_inference():
                setattr(sub, name, torch.nn.Parameter(parameter.clone(), parameter.requires_grad))
                count += 1
    return count


def _stored_folder_is_gone(checkpoint_path: str | Path, name: str) -> bool:
    """Whether a checkpoint's hyper-parameter ``name`` names a folder that does not exist here (read lazily)."""
    if "://" in str(checkpoint_path):
        return False
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, OSError, pickle.UnpicklingError):  # Lightning's own load says what is wrong
        return False
    folder = (checkpoint.get("hyper_parameters") or {}).get(name)
    return bool(folder) and not Path(str(folder)).expanduser().is_dir()


class QuietCheckpointNotice(logging.Filter):
    """Drop anomalib's "ckpt_path is not provided" warning of ``Engine.predict`` for our few-shot models only.

    For them no weights are missing: the support data is built from ``few_shot_source`` (or the
    datamodule) when prediction starts. The filter sits on anomalib's engine logger and passes every
    other record, and this one for every other model (e.g. anomalib's Patchcore, which does need a
    checkpoint); it finds the model in the calling ``Engine.predict`` frame.
    """

    MESSAGE = "ckpt_path is not provided"

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to keep ``record``."""
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        frame = sys._getframe(1)
        while frame is not None and not (frame.f_code.co_name == "predict" and "ckpt_path" in frame.f_locals):
            frame = frame.f_back
        if frame is None:
            return True
        model = frame.f_locals.get("model")
        return not (isinstance(model, RefinedFewShotMixin) and (model.k_shot or model._support_ready()))


def _install_checkpoint_notice_filter() -> None:
    """Put :class:`QuietCheckpointNotice` on anomalib's engine logger once."""
    engine_logger = logging.getLogger("anomalib.engine.engine")
    if not any(isinstance(item, QuietCheckpointNotice) for item in engine_logger.filters):
        engine_logger.addFilter(QuietCheckpointNotice())


class RefinedFewShotMixin:
    """Hooks shared by models whose torch model has a ``refiner`` and that build support data on demand.

    Subclasses list it before ``AnomalibModule`` in their bases and implement :meth:`_ensure_ready`
    (build the memory bank / reference embeddings from ``k_shot`` seeded support images if needed).
    """

    model: Any
    support_paths: tuple[str, ...]
    hparams: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A pre-processor module passed by the user (not ``True``, the model's default) is the input size
        # they asked for; a checkpoint that replaces it with another size is then worth a warning.
        self.__dict__["_pre_processor_given"] = not isinstance(kwargs.get("pre_processor", True), bool)

    def _ensure_ready(self, datamodule: object | None = None) -> None:
        """Prepare the support data before evaluation (implemented by the model)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Check a ``ckpt_path`` file before Lightning loads it; skip validation when the data has none.

        Lightning runs this hook before the restore and after the datamodule's ``setup``. anomalib's
        ``Engine`` validates few-shot models before testing and predicting, and ``fit`` validates after
        the epoch; a datamodule built with ``val_split_mode="none"`` (good images only) has no
        validation set, where anomalib would fail with ``AttributeError: ... 'val_data'``. Validation
        is then skipped for this run: the thresholds come from the support images or ``calibration_source``.
        """
        super().setup(stage)  # type: ignore[misc]
        trainer = self.trainer  # type: ignore[attr-defined]
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, CheckedCheckpointIO):
            strategy.checkpoint_io = CheckedCheckpointIO(strategy.checkpoint_io)
        datamodule = getattr(trainer, "datamodule", None)
        if stage == "validate" and datamodule is None:
            self._skip_validation_without_data(trainer)
            return
        if stage not in {"fit", "validate"} or datamodule is None:
            return
        if not self._set_validation_skipped(trainer, skip=not len(getattr(datamodule, "val_data", None) or ())):
            return
        logger.info(
            "%s: the datamodule has no validation images (e.g. val_split_mode='none'): no validation pass; the "
            "thresholds come from %s.",
            type(self).__name__,
            "calibration_source" if self.calibration_source is not None else "the support images",
        )
        if stage == "validate" and self.k_shot:
            # anomalib's Engine.fit of a few-shot model is this validation pass: build what it would have
            # built, and write the checkpoint its checkpoint callback writes at the end of validation.
            self._ensure_ready()
            self._ensure_calibrated()
            self.__dict__["_checkpoint_at_teardown"] = True

    def _skip_validation_without_data(self, trainer: Any) -> None:
        """Skip a validation pass that has neither a datamodule nor dataloaders (only :meth:`val_dataloader`'s none).

        anomalib's ``Engine.predict(model, data_path=...)`` / ``anomalib predict --data <folder>`` (and
        ``Engine.test`` with dataloaders) validate few-shot models first; Lightning would then ask the
        model for its empty list and warn "Total length of `list` across ranks is zero". The pass is
        skipped instead; the support data and thresholds are built when the run starts.
        """
        source = getattr(getattr(trainer, "validate_loop", None), "_data_source", None)
        self._set_validation_skipped(trainer, skip=getattr(source, "instance", None) is self)

    def _set_validation_skipped(self, trainer: Any, *, skip: bool) -> bool:
        """Skip this run's validation (``limit_val_batches=0``) or restore the limit a skipped run replaced."""
        saved = self.__dict__.get("_limit_val_batches")
        if not skip:
            if saved is not None:  # a run without validation data before: this one has some again
                trainer.limit_val_batches = saved
                self.__dict__["_limit_val_batches"] = None
            return False
        if saved is None:
            self.__dict__["_limit_val_batches"] = trainer.limit_val_batches
        trainer.limit_val_batches = 0
        return True

    def teardown(self, stage: str) -> None:
        """Write the checkpoint of a validation pass that was skipped for want of validation images (see ``setup``)."""
        super().teardown(stage)  # type: ignore[misc]
        if self.__dict__.pop("_checkpoint_at_teardown", False):
            self._write_checkpoint("no validation images")

    def on_fit_end(self) -> None:
        """Write the checkpoint that anomalib's checkpoint callback writes after validation, when none was written."""
        super().on_fit_end()  # type: ignore[misc]
        self._write_checkpoint("no validation pass")

    def _write_checkpoint(self, reason: str) -> None:
        """Save to the trainer's checkpoint callback file (``weights/lightning/model.ckpt``) unless it saved already.

        anomalib saves few-shot models at the end of a validation pass; a fit on good images only
        (``val_split_mode="none"``) has none, and the bank, thresholds and options would never be saved.
        """
        trainer = self.trainer  # type: ignore[attr-defined]
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None or callback.best_model_path or callback.last_model_path:
            return
        path = Path(callback.dirpath) / f"{callback.filename or 'model'}{callback.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        callback.best_model_path = str(path)
        logger.info("%s: checkpoint written to %s (%s to trigger it).", type(self).__name__, path, reason)

    def forward(self, batch: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run anomalib's pipeline (pre-processing, model, post-processing), failing safe on images it cannot score.

        An image holding NaN or infinite values is scored with those values set to zero (so nothing
        downstream sees them) and then reported with a NaN score and map, judged defective and fully flagged:
        a part that cannot be scored never passes. The same ops run in the exported graphs, so torch,
        ONNX Runtime and OpenVINO all decide this way.
        """
        finite = torch.isfinite(batch)
        invalid = ~finite.flatten(1).all(1)
        clean = torch.where(finite, batch, torch.zeros_like(batch))
        output = super().forward(clean, *args, **kwargs)  # type: ignore[misc]
        return fail_safe(output, invalid)

    def _support_ready(self) -> bool:
        """Whether the support data (bank, references) is built (implemented by the model)."""
        raise NotImplementedError

    def prepare_export(self) -> None:
        """Make the model whole before an export: support data and line calibration, or a refusal that names the fix.

        Without a checkpoint the support data is built from ``few_shot_source`` (and calibrated on
        ``calibration_source``) first; a model with neither would export an empty bank that fails
        only on the deployment machine, so it is refused before anything is written.

        Raises:
            ValueError: No support data and no ``few_shot_source`` to build it from.
        """
        if not self._support_ready():
            if not (self.k_shot and self.few_shot_source is not None):
                msg = (
                    f"{type(self).__name__} has no support data to export (no checkpoint was loaded and no "
                    "few_shot_source is set): pass the checkpoint that anomalib fit wrote (--ckpt_path "
                    ".../weights/lightning/model.ckpt), or the folder of good images (--model.few_shot_source DIR "
                    "with --model.k_shot)."
                )
                raise ValueError(msg)
            self._ensure_ready()
        self._ensure_calibrated()
        release_inference_tensors(self)  # type: ignore[arg-type]

    def to_torch(self, *args: Any, **kwargs: Any) -> Path:
        """Export to torch as anomalib does, after :meth:`prepare_export` (never an empty model)."""
        self.prepare_export()
        return super().to_torch(*args, **kwargs)  # type: ignore[misc]

    def to_onnx(self, *args: Any, **kwargs: Any) -> Path:
        """Export to ONNX as anomalib does (also the first step of OpenVINO), after :meth:`prepare_export`.

        torch's ONNX exporter logs every graph pass at INFO (thousands of lines of ``onnxscript`` and
        ``onnx_ir``); those loggers are held at WARNING while it runs.
        """
        self.prepare_export()
        with quiet_loggers(EXPORT_LOGGERS):
            return super().to_onnx(*args, **kwargs)  # type: ignore[misc]

    def _store_plain_hparams(self) -> None:
        """Keep the refiner in ``hparams`` as plain options (or ``False``), never as a ``PrototypeRefiner`` object.

        ``hparams.yaml`` (written by Lightning's loggers from ``hparams_initial``) then loads with
        ``yaml.safe_load``, and the stored options are the ones actually used.
        """
        refiner = self.model.refiner
        plain = refiner.options.as_dict() if refiner is not None else False
        for name in ("_hparams", "_hparams_initial"):
            hparams = getattr(self, name, None)
            if hparams is not None and "refiner" in hparams:
                hparams["refiner"] = dict(plain) if plain else False

    def draw_support(self, datamodule: object | None = None) -> SupportSet:
        """The ``k_shot`` support images drawn with ``few_shot_seed``, through the pre-processor's transform.

        They come from ``few_shot_source`` when set, else from the normal images of the training set of
        ``datamodule`` (default: the attached trainer's), so ``anomalib test``, ``Engine`` and the
        few-shot benchmark draw the same files.

        Args:
            datamodule: Datamodule to draw from; default: the attached trainer's.

        Returns:
            The pre-processed images and their paths.
        """
        pre_processor = getattr(self, "pre_processor", None)
        transform = pre_processor.transform if isinstance(pre_processor, PreProcessor) else None
        if self.few_shot_source is not None:
            self.__dict__["_support_from_datamodule"] = False
            return support_from_folder(self.few_shot_source, self.k_shot, self.few_shot_seed, transform)
        dataset = train_dataset_of(getattr(self, "_trainer", None), type(self).__name__, datamodule)
        self.__dict__["_support_from_datamodule"] = True
        return support_from_dataset(dataset, self.k_shot, self.few_shot_seed, transform)

    def _forget_support_of_another_datamodule(self) -> None:
        """Forget support data drawn from another datamodule's training images than the attached one's.

        One model tested on a second product (``engine.test(m, datamodule=b)`` after ``datamodule=a``)
        would otherwise score it against the first product's bank. Only support drawn from a datamodule
        in this process is checked: a checkpoint's bank and a ``few_shot_source`` bank are not tied to
        the datamodule. The draw is compared file by file (the same images give the same draw).
        """
        if not self.__dict__.get("_support_from_datamodule") or not self.k_shot or not self.support_paths:
            return
        trainer = getattr(self, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or self.few_shot_source is not None:
            return
        dataset = train_dataset_of(trainer, type(self).__name__, datamodule)
        wanted = drawn_support_paths(dataset, self.k_shot, self.few_shot_seed)
        if tuple(wanted) == tuple(self.support_paths):
            return
        logger.info(
            "%s: the datamodule's training images differ from those of the support (%s, ...): the support data is "
            "drawn again from this datamodule.",
            type(self).__name__,
            self.support_paths[0],
        )
        self.__dict__["_support_from_datamodule"] = False
        self._reset_support()
        self._forget_support_thresholds()

    def _reset_support(self) -> None:
        """Forget the support data (memory bank / reference embeddings) so it is rebuilt (implemented by the model)."""
        raise NotImplementedError

    @staticmethod
    def _normalize_k_shot(k_shot: int | None) -> int | None:
        """The stored form of a ``k_shot`` value (WinClipPlus maps 0 to ``None``, zero-shot)."""
        return k_shot

    @property
    def k_shot(self) -> int | None:
        """Number of normal support images (``None``: full-shot or zero-shot).

        Setting it after construction validates the value, forgets the support data built for the
        previous value (it is rebuilt from ``k_shot`` images when next needed) and keeps
        ``hparams`` (and so checkpoints and ``hparams.yaml``) in sync.
        """
        return self.__dict__["_k_shot"]

    @k_shot.setter
    def k_shot(self, value: int | None) -> None:
        value = validate_k_shot(self._normalize_k_shot(value))
        if not value:
            # the options that only make sense with support images are refused as the constructor refuses them
            source, augmentation = self.__dict__.get("_few_shot_source"), self.__dict__.get("_support_augmentation")
            if source is not None:
                msg = (
                    f"k_shot={value!r} but few_shot_source={str(source)!r} draws k_shot images: set "
                    "few_shot_source=None first, or keep k_shot a positive integer."
                )
                raise ValueError(msg)
            if augmentation:
                msg = (
                    f"k_shot={value!r} but support_augmentation={list(augmentation)!r} transforms the k_shot support "
                    "images: set support_augmentation=None first, or keep k_shot a positive integer."
                )
                raise ValueError(msg)
            if self.__dict__.get("_threshold") == "support":
                validate_threshold("support", value)
        self._set_support_option("k_shot", value, value)

    @property
    def few_shot_seed(self) -> int:
        """Seed of the support draw (and of the coreset). Setting it rebuilds the support data when next needed."""
        return self.__dict__["_few_shot_seed"]

    @few_shot_seed.setter
    def few_shot_seed(self, value: int) -> None:
        value = validate_seed(value)
        self._set_support_option("few_shot_seed", value, value)

    @property
    def few_shot_source(self) -> Path | None:
        """Folder the support images are drawn from (``None``: the datamodule's training set).

        Setting it checks the folder and rebuilds the support data when next needed.
        """
        return self.__dict__["_few_shot_source"]

    @few_shot_source.setter
    def few_shot_source(self, value: str | Path | None) -> None:
        path = validate_few_shot_source(value, self.__dict__.get("_k_shot"))
        self._set_support_option("few_shot_source", path, str(path) if path is not None else None)

    @property
    def support_augmentation(self) -> tuple[str, ...]:
        """Transforms whose copies of the support images join the bank (``support_augmentation`` module).

        Setting it checks the names and rebuilds the support data when next needed.
        """
        return self.__dict__["_support_augmentation"]

    @support_augmentation.setter
    def support_augmentation(self, value: str | Sequence[str] | None) -> None:
        names = resolve_support_augmentation(value)
        if names and not self.__dict__.get("_k_shot"):
            msg = (
                f"support_augmentation={value!r} transforms the k_shot support images, but k_shot is "
                f"{self.__dict__.get('_k_shot')!r}: set k_shot (e.g. k_shot=4), or support_augmentation=None."
            )
            raise ValueError(msg)
        self._set_support_option("support_augmentation", names, list(names))

    @property
    def support_views(self) -> tuple[str, ...]:
        """One name per support view in the bank: each support file, then ``file [transform]`` per transform."""
        return view_names(self.support_paths, self.support_augmentation)

    def augmented_support(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The views of pre-processed support images that the bank is built from (the images first)."""
        return support_views(images, self.support_augmentation)

    def _set_support_option(self, name: str, value: Any, stored: Any) -> None:
        """Set a support-defining option: keep ``hparams`` in sync and forget support data built for the old value.

        The first assignment (in ``__init__``) only stores. A change empties the bank / references, the
        support list and the support thresholds; they are rebuilt from the new value when next needed
        (as at the first test or predict), so no stale support is ever scored.
        """
        key = f"_{name}"
        changed = key in self.__dict__ and self.__dict__[key] != value
        self.__dict__[key] = value
        hparams = getattr(self, "_hparams", None)
        if hparams is not None and name in hparams:
            hparams[name] = stored
        if changed:
            self._on_support_option_changed(name, value)
            self._reset_support()
            self._forget_support_thresholds()

    def _on_support_option_changed(self, name: str, value: Any) -> None:
        """Hook for models whose torch model holds a copy of a support option (e.g. a coreset seed)."""

    # ------------------------------------------------------------------ thresholds
    @property
    def threshold(self) -> str:
        """Where the thresholds come from: ``"auto"``, ``"support"`` or ``"validation"``.

        Setting it checks the value as the constructor does and hands it to the post-processor.
        """
        try:
            return self.__dict__["_threshold"]
        except KeyError:
            raise AttributeError("threshold") from None

    @threshold.setter
    def threshold(self, value: str) -> None:
        value = validate_threshold(value, self.__dict__.get("_k_shot"), self.__dict__.get("_few_shot_source"))
        if value == "validation" and self.__dict__.get("_calibration_source") is not None:
            msg = (
                "threshold='validation' asks for anomalib's thresholds from a labelled validation pass, but "
                "calibration_source sets them from images of the line: set calibration_source=None first, or keep "
                "threshold='auto'."
            )
            raise ValueError(msg)
        self.__dict__["_threshold"] = value
        hparams = getattr(self, "_hparams", None)
        if hparams is not None and "threshold" in hparams:
            hparams["threshold"] = value
        post_processor = getattr(self, "post_processor", None)
        if isinstance(post_processor, FewShotPostProcessor):
            post_processor.threshold = value

    support_thresholds: SupportThresholds | None
    support_scores: SupportScores | None

    def _init_thresholds(
        self,
        threshold: str,
        false_alarm_rate: float | None = None,
        calibration_source: str | Path | None = None,
    ) -> None:
        """No thresholds yet; validate the threshold options and hand ``threshold`` to the post-processor.

        Runs after ``k_shot`` is set. ``calibration_source`` is checked for its type here and for its
        images when it is used (a checkpoint made with it loads without the folder).
        """
        self.support_thresholds = None
        self.support_scores = None
        self.line_calibration = None
        self._set_threshold_source(threshold)
        self.__dict__["_false_alarm_rate"] = validate_false_alarm_rate(false_alarm_rate)
        self.calibration_source = calibration_source

    # ------------------------------------------------------------------ false-alarm rate
    line_calibration: LineCalibration | None

    @property
    def false_alarm_rate(self) -> float | None:
        """The share of good parts the user accepts to see flagged (``None``: the support rule decides).

        The image threshold is set so that this share of good parts is expected above it, from the
        scores of ``calibration_source`` (:mod:`anomalib_protorefine.false_alarm`). Setting it after a
        calibration re-estimates the thresholds from the stored calibration scores (no rescoring).
        """
        return self.__dict__.get("_false_alarm_rate")

    @false_alarm_rate.setter
    def false_alarm_rate(self, value: float | None) -> None:
        rate = validate_false_alarm_rate(value)
        self._store_false_alarm_rate(rate)
        if self.line_calibration is not None and rate is not None and rate != self.line_calibration.false_alarm_rate:
            self._put_calibration_in_force(self.line_calibration.at_rate(rate))

    def _store_false_alarm_rate(self, rate: float | None) -> None:
        """Keep ``false_alarm_rate`` and its ``hparams`` entry (checkpoints, ``hparams.yaml``) in step."""
        self.__dict__["_false_alarm_rate"] = rate
        hparams = getattr(self, "_hparams", None)
        if hparams is not None and "false_alarm_rate" in hparams:
            hparams["false_alarm_rate"] = rate

    @property
    def calibration_source(self) -> Path | None:
        """Folder of unlabelled images from the line (mostly good) that the thresholds are calibrated on."""
        return self.__dict__.get("_calibration_source")

    @calibration_source.setter
    def calibration_source(self, value: str | Path | None) -> None:
        if value is not None and not isinstance(value, str | PurePath):
            msg = (
                f"calibration_source must be a folder path (str or Path) or None, got {type(value).__name__} "
                f"{value!r}: e.g. calibration_source='/line/first_parts' (CLI --model.calibration_source ...)."
            )
            raise TypeError(msg)
        if value is not None and getattr(self, "threshold", None) == "validation":
            msg = (
                "calibration_source sets the thresholds from images of the line, but threshold='validation' asks for "
                "anomalib's thresholds from a labelled validation pass: drop one of them (threshold='auto' with "
                "calibration_source, or no calibration_source)."
            )
            raise ValueError(msg)
        path = Path(value).expanduser() if value is not None and str(value) != "" else None
        changed = path != self.__dict__.get("_calibration_source")
        self.__dict__["_calibration_source"] = path
        hparams = getattr(self, "_hparams", None)
        if hparams is not None and "calibration_source" in hparams:
            hparams["calibration_source"] = str(path) if path is not None else None
        if changed and self.line_calibration is not None:
            self._forget_line_calibration()

    def calibration_paths(self) -> list[str]:
        """The image files of ``calibration_source``, checked: a folder with enough images for the rate.

        Raises:
            FileNotFoundError: ``calibration_source`` is not a folder.
            ValueError: Fewer image files than the requested rate needs.
        """
        folder = self.calibration_source
        if folder is None or not folder.is_dir():
            msg = (
                f"calibration_source={str(folder)!r} is not a folder: point it to a folder of unlabelled images of "
                "parts from the line (mostly good)."
            )
            raise FileNotFoundError(msg)
        paths = folder_images(folder)
        rate = self.false_alarm_rate or DEFAULT_FALSE_ALARM_RATE
        needed = images_needed(rate)
        if len(paths) < needed:
            msg = (
                f"calibration_source={str(folder)!r} holds {len(paths)} image file(s) ({', '.join(IMAGE_EXTENSIONS)}; "
                f"subfolders are not searched), but false_alarm_rate={rate:g} "
                f"needs at least {needed}: add images of parts from the line, or raise false_alarm_rate."
            )
            raise ValueError(msg)
        return paths

    def calibrate_false_alarm(
        self, source: str | Path | Sequence[str | Path] | torch.Tensor | None = None, rate: float | None = None
    ) -> LineCalibration:
        """Set the thresholds so that ``rate`` of good parts are expected above them, from unlabelled line images.

        The images are scored with the model's own scoring against its support data (built first
        when needed), and the good-score distribution is estimated robustly from them
        (:func:`~anomalib_protorefine.false_alarm.estimate_good_threshold`): a few defective parts
        among them do not drag the threshold up. The thresholds go into the post-processor (so
        checkpoints, ``anomalib predict`` and the exports decide with them) and :attr:`line_calibration`,
        and one line goes to the log.

        Args:
            source: A folder of images, a list of image files, or images ``(N, 3, H, W)`` in ``[0, 1]``
                (any size: the pre-processor resizes them). Default: ``calibration_source``.
            rate: The false-alarm rate. Default: ``false_alarm_rate``, else 0.05.

        Returns:
            The calibration (also in :attr:`line_calibration`).

        Raises:
            ValueError: Too few images for the rate, images not in ``[0, 1]``, or a rate outside (0, 0.5].
            FileNotFoundError: The folder does not exist.
        """
        rate = validate_false_alarm_rate(rate) or self.false_alarm_rate or DEFAULT_FALSE_ALARM_RATE
        self._store_false_alarm_rate(rate)
        batches, label = self._calibration_batches(source, rate)
        self._ensure_ready()
        scores, maxima, minimum = self._score_calibration_images(batches)
        calibration = LineCalibration.from_scores(scores, maxima, minimum, rate, label)
        self._put_calibration_in_force(calibration)
        return calibration

    def _calibration_batches(
        self, source: str | Path | Sequence[str | Path] | torch.Tensor | None, rate: float
    ) -> tuple[Iterator[torch.Tensor], str]:
        """Pre-processed calibration images in batches, and where they came from (checked before any scoring)."""
        pre_processor = getattr(self, "pre_processor", None)
        transform = pre_processor.transform if isinstance(pre_processor, PreProcessor) else None
        needed = images_needed(rate)
        if isinstance(source, torch.Tensor):
            if source.ndim != 4 or source.shape[1] != 3:
                msg = f"calibration images must be a batch (N, 3, H, W) in [0, 1], got shape {tuple(source.shape)}."
                raise ValueError(msg)
            check_support_images(source, preprocessed=False)
            if len(source) < needed:
                msg = (
                    f"{len(source)} calibration image(s) given, but false_alarm_rate={rate:g} needs at least {needed}: "
                    "add images of parts from the line, or raise false_alarm_rate."
                )
                raise ValueError(msg)

            def tensor_batches() -> Iterator[torch.Tensor]:
                for chunk in source.split(CALIBRATION_BATCH):
                    yield torch.stack([transform(image) for image in chunk]) if transform is not None else chunk

            return tensor_batches(), "images"
        if source is None or isinstance(source, str | PurePath):
            if source is not None:
                self.calibration_source = source
            if self.calibration_source is None:
                msg = (
                    "no calibration images: pass a folder, a list of files or images, or set calibration_source "
                    "(CLI --model.calibration_source /line/first_parts)."
                )
                raise ValueError(msg)
            paths = self.calibration_paths()
            label = str(self.calibration_source)
        else:
            paths = [str(path) for path in source]
            if len(paths) < needed:
                msg = (
                    f"{len(paths)} calibration image file(s) given, but false_alarm_rate={rate:g} needs at least "
                    f"{needed}: add images of parts from the line, or raise false_alarm_rate."
                )
                raise ValueError(msg)
            label = f"{len(paths)} files"

        def file_batches() -> Iterator[torch.Tensor]:
            for start in range(0, len(paths), CALIBRATION_BATCH):
                chunk = paths[start : start + CALIBRATION_BATCH]
                images = [read_named_image(path, "calibration image", CALIBRATION_READ_FIX) for path in chunk]
                yield torch.stack([transform(image) if transform is not None else image for image in images])

        return file_batches(), label

    def _score_calibration_images(self, batches: Iterator[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Image scores, anomaly-map maxima and the lowest map value of pre-processed batches (the model's scoring)."""
        scores, maxima, minimum = [], [], float("inf")
        with self.calibration_scoring():
            for chunk in batches:
                output = self.model(chunk.to(self.device))
                maps = output.anomaly_map.detach().float().cpu().reshape(len(chunk), -1)
                scores.append(output.pred_score.detach().float().cpu().reshape(-1))
                maxima.append(maps.amax(1))
                minimum = min(minimum, float(maps.min()))
        return torch.cat(scores), torch.cat(maxima), minimum

    def _put_calibration_in_force(self, calibration: LineCalibration) -> None:
        """Store a line calibration, write it into the post-processor and log it in one line."""
        self.line_calibration = calibration
        post_processor = getattr(self, "post_processor", None)
        if isinstance(post_processor, PostProcessor):
            write_thresholds(post_processor, calibration, "calibration")
        logger.info("%s: calibrated thresholds %s.", type(self).__name__, calibration.describe())

    def _ensure_calibrated(self) -> None:
        """Calibrate on ``calibration_source`` once the support data is ready (nothing when done or not asked)."""
        if self.calibration_source is not None and self.line_calibration is None:
            self.calibrate_false_alarm()
        elif self.calibration_source is None and self.false_alarm_rate is not None and self.line_calibration is None:
            self._warn_rate_without_calibration()

    def _warn_rate_without_calibration(self) -> None:
        """Say once that the support images alone cannot honour ``false_alarm_rate``."""
        if self.__dict__.get("_warned_rate"):
            return
        self.__dict__["_warned_rate"] = True
        k = self.k_shot
        spread = (
            "one support image shows no spread between good parts at all"
            if k == 1
            else f"{k} support images show too little spread between good parts to estimate it"
            if k
            else "the training images are in the bank, so their scores say nothing of new good parts"
        )
        msg = (
            f"{type(self).__name__}: false_alarm_rate={self.false_alarm_rate:g} cannot be honoured from the support "
            f"images alone ({spread}); the support rule decides instead, and the share of good parts it flags is "
            "unknown (measured from a few % to most good parts: docs/benchmarks.md, 'A false-alarm rate on the "
            "line'). Set calibration_source to a folder of unlabelled parts from the line (at least "
            f"{images_needed(self.false_alarm_rate)}; CLI --model.calibration_source /line/first_parts), or call "
            "model.calibrate_false_alarm(folder)."
        )
        warnings.warn(msg, UserWarning, stacklevel=3)

    def _forget_line_calibration(self) -> None:
        """The support changed: a line calibration against the old support data no longer applies."""
        self.line_calibration = None
        post_processor = getattr(self, "post_processor", None)
        if isinstance(post_processor, FewShotPostProcessor) and post_processor.threshold_origin == "calibration":
            clear_thresholds(post_processor)

    def _set_threshold_source(self, threshold: str) -> None:
        """Set ``threshold`` (constructor, checkpoint): the model's attribute and its post-processor's."""
        self.threshold = threshold

    def _wants_support_thresholds(self) -> bool:
        """Support thresholds are computed with ``threshold`` ``"support"`` or ``"auto"`` (never for "validation").

        Not with ``calibration_source``: the line calibration sets the thresholds.
        """
        return getattr(self, "threshold", "validation") != "validation" and self.calibration_source is None

    @contextlib.contextmanager
    def calibration_scoring(self) -> Iterator[None]:
        """Scoring of pseudo images: eval mode, no gradients (models with scoring state extend it)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def calibrate_thresholds(self, paths: Sequence[str]) -> SupportThresholds | None:
        """Image and pixel thresholds and the normalisation range from the support image files alone.

        The files are read and resized by the pre-processor's geometric steps, then
        :meth:`calibrate_thresholds_from_images` does the rest.

        Args:
            paths: The support image files.

        Returns:
            The thresholds, or ``None`` when ``threshold="auto"`` and the pre-processor has no
            ``Normalize`` step to paste defects before (a warning says so).

        Raises:
            ValueError: ``threshold="support"`` and the pre-processor cannot be split.
        """
        split = self._split_pre_processing()
        if split is None:
            return None
        geometric, _ = split
        return self.calibrate_thresholds_from_images(load_images(paths, geometric))

    def _split_pre_processing(self) -> tuple[Any, Any] | None:
        """The pre-processor's geometric and photometric steps (``None``: cannot split, warned under "auto")."""
        pre_processor = getattr(self, "pre_processor", None)
        transform = pre_processor.transform if pre_processor is not None else None
        what = "support thresholds (threshold='support' or 'auto')"
        try:
            return split_transform(transform, what=what, alternative="threshold='validation'")
        except ValueError as error:
            if self.threshold == "support":
                raise
            msg = f"{type(self).__name__}: no support thresholds: {error}"
            warnings.warn(msg, UserWarning, stacklevel=3)
            return None

    def calibrate_thresholds_from_images(self, images: torch.Tensor) -> SupportThresholds | None:
        """Thresholds from support images ``(k, 3, H, W)`` in ``[0, 1]`` at the model's input size (not normalised).

        Augmented copies of the support images are scored against the bank of all of them, clean and
        with synthetic defects pasted in, with the model's own refiner, scoring and anomaly map
        (:mod:`anomalib_protorefine.thresholds`); the result goes into the post-processor and
        :attr:`support_thresholds`. The support data is left built from all support images.

        Example:
            >>> import torch
            >>> from anomalib_protorefine import PatchCorePlus
            >>> model = PatchCorePlus(backbone="resnet18", layers=("layer2",), pre_trained=False, refiner=False)
            >>> support = torch.rand(2, 3, 64, 64)
            >>> thresholds = model.calibrate_thresholds_from_images(support)
            >>> model.fit_support(model.pre_processor.transform.transforms[1](support))
            >>> float(model.post_processor.image_threshold) == thresholds.image_threshold
            True
        """
        check_support_images(images, preprocessed=False)
        split = self._split_pre_processing()
        if split is None:
            return None
        _, photometric = split
        scores = self.support_pseudo_scores(images, photometric)
        thresholds = choose_thresholds(scores)
        self.support_scores = scores
        self.support_thresholds = thresholds
        post_processor = getattr(self, "post_processor", None)
        if isinstance(post_processor, PostProcessor):
            write_support_thresholds(post_processor, thresholds)
        logger.info("%s: support thresholds %s.", type(self).__name__, describe(thresholds))
        return thresholds

    def support_pseudo_scores(self, images: torch.Tensor, photometric: Any, held_out: str = "copies") -> SupportScores:
        """Pseudo-normal and pseudo-defect scores of support images, with the model's own scoring and maps.

        Args:
            images: Support images ``(k, 3, H, W)`` in ``[0, 1]`` at the model's input size.
            photometric: The pre-processor's photometric steps (applied before scoring).
            held_out: The construction of the pseudo-normal images (:data:`~anomalib_protorefine.thresholds.HELD_OUT`).

        Returns:
            The scores. With ``"copies"`` the support data is left built from all images; with
            ``"leave_one_out"`` from a subset (the caller rebuilds it).
        """

        def score(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            output = self.model(batch.to(self.device))
            return output.pred_score, output.anomaly_map

        with self.calibration_scoring():
            return collect_support_scores(
                images, photometric, self.fit_support, score, seed=self.few_shot_seed, held_out=held_out
            )

    def _forget_support_thresholds(self) -> None:
        """The support changed: support (and calibrated) thresholds no longer apply (recomputed with the support)."""
        self.support_thresholds = None
        self.support_scores = None
        if getattr(self, "line_calibration", None) is not None:
            self._forget_line_calibration()
        post_processor = getattr(self, "post_processor", None)
        if isinstance(post_processor, FewShotPostProcessor) and post_processor.threshold_origin == "support":
            clear_thresholds(post_processor)

    def on_validation_start(self) -> None:
        """Prepare the support data (and the line calibration) before validation."""
        self._forget_support_of_another_datamodule()
        self._ensure_ready()
        self._ensure_calibrated()

    def on_test_start(self) -> None:
        """Prepare the support data (and the line calibration) before testing."""
        self._forget_support_of_another_datamodule()
        self._ensure_ready()
        self._ensure_calibrated()
        self._warn_if_uncalibrated("test")

    def on_predict_start(self) -> None:
        """Prepare the support data (and the line calibration) before prediction."""
        self._forget_support_of_another_datamodule()
        self._ensure_ready()
        self._ensure_calibrated()
        self._warn_if_uncalibrated("predict")

    def _warn_if_uncalibrated(self, stage: str) -> None:
        """Warn loudly when the post-processor has no thresholds (no validation pass ran, no checkpoint)."""
        post_processor = getattr(self, "post_processor", None)
        if not isinstance(post_processor, PostProcessor):
            return
        thresholds = (post_processor.image_threshold, post_processor.pixel_threshold)
        if not any(bool(torch.isnan(threshold).all()) for threshold in thresholds):
            origin = getattr(post_processor, "threshold_origin", "none")
            sources = {
                "support": "the support images",
                "validation": "a validation pass",
                "calibration": "calibration images of the line",
            }
            logger.info(
                "%s decides with thresholds from %s: image %.4g, pixel %.4g (raw scores; pred_label = score above it).",
                type(self).__name__,
                sources.get(origin, "a checkpoint or a validation pass"),
                float(post_processor.image_threshold),
                float(post_processor.pixel_threshold),
            )
            return
        name = type(self).__name__
        msg = (
            f"{name} has no adaptive thresholds or normalisation statistics: no validation pass ran before "
            f"{stage}, no checkpoint provided them and no support thresholds were computed "
            f"(threshold={getattr(self, 'threshold', None)!r}). pred_score and anomaly_map are raw, unnormalised "
            "scores, pred_label / pred_mask are not thresholded (meaningless), and threshold-dependent metrics "
            "(F1Score) are invalid. Fix: set k_shot with threshold='auto' or 'support' (thresholds from the support "
            "images), or validate on labelled data (normal and defective images) first: "
            f"`trainer.validate(model, datamodule=...)` before `trainer.{stage}(...)`, or anomalib's `Engine` with "
            "a datamodule (it validates few-shot models first), or load a checkpoint made that way "
            "(`ckpt_path=...`, CLI `--ckpt_path`)."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)

    def val_dataloader(self) -> list:
        """No validation data of the model's own: used only when neither a datamodule nor dataloaders are given.

        ``Engine.predict(model, data_path=...)`` (and ``anomalib predict --data <folder>``) validate
        few-shot models first without any validation data; Lightning then asks the model. Returning
        no batches skips that validation: the support images come from ``few_shot_source`` and the
        missing thresholds are reported by a warning when prediction starts.
        """
        return []

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:  # noqa: ANN002, ANN003
        """Score a batch (refined or plain) and attach ``pred_score`` and ``anomaly_map``."""
        del args, kwargs
        warn_about_flat_images(batch)
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def test_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:  # noqa: ANN002, ANN003
        """Anomalib's test step, after a check for images read as one flat value."""
        warn_about_flat_images(batch)
        return super().test_step(batch, batch_idx, *args, **kwargs)  # type: ignore[misc]

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:
        """Anomalib's predict step, after a check for images read as one flat value."""
        warn_about_flat_images(batch)
        return super().predict_step(batch, batch_idx, dataloader_idx)  # type: ignore[misc]

    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        """Anomalib's component callbacks, the refinement statistics and the per-image report of predictions.

        :class:`~anomalib_protorefine.reporting.PredictionReport` writes ``predictions.csv`` / ``.json``
        beside the pictures and one console line "N of M parts flagged" (predict only). A report the
        user gave the trainer is kept (Lightning would replace it by the model's).
        :class:`UnreadableImageNote` names the file behind an image decoding error of the dataloader.
        """
        callbacks = [*super().configure_callbacks(), RefinementStatsCallback(), UnreadableImageNote()]  # type: ignore[misc]
        try:
            given = self.trainer.callbacks  # type: ignore[attr-defined]
        except RuntimeError:  # not attached to a trainer
            given = []
        if not any(isinstance(callback, PredictionReport) for callback in given):
            callbacks.append(PredictionReport())
        return callbacks

    @classmethod
    def configure_visualizer(cls) -> DecisionVisualizer:
        """Pictures that show the decision: score, OK / defective, colour bar, flagged outline, the peak."""
        return DecisionVisualizer()

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing to optimise: the models are training-free."""
        return

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """The post-processor: :class:`FewShotPostProcessor` (thresholds may come from the support images)."""
        return FewShotPostProcessor()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, after a check that the file is a checkpoint at all.

        A missing file or one that is not a ``torch.save`` file (a text file, a truncated download) gets
        one line naming the file and the fix instead of an unpickling traceback.

        Raises:
            FileNotFoundError: No such file.
            ValueError: The file is not a torch checkpoint.
        """
        check_checkpoint_file(checkpoint_path)
        if "few_shot_source" not in kwargs and _stored_folder_is_gone(checkpoint_path, "few_shot_source"):
            kwargs["few_shot_source"] = None  # the bank is in the checkpoint; the folder was only where it came from
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the refiner as plain options (loadable with ``weights_only``) and the support files."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        refiner = self.model.refiner
        checkpoint["hyper_parameters"]["refiner"] = refiner.options.as_dict() if refiner is not None else False
        checkpoint["protorefine_support_paths"] = list(self.support_paths)
        checkpoint["protorefine_support_views"] = list(self.support_views)
        thresholds = getattr(self, "support_thresholds", None)
        checkpoint["protorefine_support_thresholds"] = thresholds.as_dict() if thresholds is not None else None
        line = getattr(self, "line_calibration", None)
        checkpoint["protorefine_line_calibration"] = line.as_dict() if line is not None else None

    # ------------------------------------------------------------------ checkpoints
    #: The model's named refiner settings, and the one that ``refiner=True`` and a partial dict start from.
    refiner_presets: ClassVar[dict[str, dict[str, Any]]] = {}
    refiner_default_preset: ClassVar[str] = ""

    def _score_options(self) -> dict[str, Any]:
        """Current values of the options (besides the refiner) that change scores, by hparams name."""
        return {}

    def _apply_score_option(self, name: str, value: Any) -> None:
        """Set one of :meth:`_score_options` (implemented by the model)."""
        raise NotImplementedError

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore everything that determines the scores from the checkpoint, and the support file list.

        ``anomalib predict/export --ckpt_path`` and ``Engine.predict(model, ckpt_path=...)`` build the
        model from its arguments first and load the checkpoint afterwards. The checkpoint wins: the
        refiner is rebuilt from ``hyper_parameters["refiner"]`` and the other score-relevant options
        (:meth:`_score_options`) take their stored values; each option that differs from the
        constructor's is named in a warning.
        """
        asked = input_size(getattr(self, "pre_processor", None))
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        self._warn_if_input_size_replaced(asked)
        stored = checkpoint.get("hyper_parameters") or {}
        changed: list[str] = []
        if "refiner" in stored:
            changed += self._restore_refiner(stored["refiner"])
        for name, current in self._score_options().items():
            if name == "few_shot_source" and stored.get(name) and not Path(str(stored[name])).is_dir():
                continue  # the checkpoint holds the support data it was drawn into: no folder is read on load
            if name in stored and _plain(stored[name]) != _plain(current):
                changed.append(f"{name}={stored[name]!r} (constructor: {current!r})")
                self._apply_score_option(name, stored[name])
                if name in self.hparams:
                    self.hparams[name] = stored[name]
        if "hyper_parameters" in checkpoint:
            # The bank in the checkpoint was built with its augmentation (none before the option existed).
            augmentation = resolve_support_augmentation(stored.get("support_augmentation"))
            if augmentation != self.support_augmentation:
                changed.append(
                    f"support_augmentation={list(augmentation)!r} (constructor: {list(self.support_augmentation)!r})"
                )
                self.__dict__["_support_augmentation"] = augmentation
            if "support_augmentation" in self.hparams:
                self.hparams["support_augmentation"] = list(augmentation)
        if changed:
            msg = (
                f"{type(self).__name__}: the checkpoint's settings differ from the constructor's and are used: "
                f"{'; '.join(changed)}. Build the model with these values to silence this warning."
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
        self.support_paths = tuple(checkpoint.get("protorefine_support_paths", ()))
        self.__dict__["_support_from_datamodule"] = False  # the checkpoint's bank: not tied to a datamodule
        stored_thresholds = checkpoint.get("protorefine_support_thresholds")
        self.support_thresholds = SupportThresholds(**stored_thresholds) if stored_thresholds else None
        stored_line = checkpoint.get("protorefine_line_calibration")
        self.line_calibration = LineCalibration.from_dict(stored_line) if stored_line else None
        if self.line_calibration is not None:
            self._restore_line_calibration(checkpoint)

    def _warn_if_input_size_replaced(self, asked: tuple[int, ...] | None) -> None:
        """Warn when the checkpoint's pre-processor replaced the input size of the one given to the constructor.

        anomalib restores the checkpoint's transform over the constructor's pre-processor, so the model
        runs at the size its bank and thresholds were made at; a user who passed another size would
        otherwise never learn that it was not used.
        """
        used = input_size(getattr(self, "pre_processor", None))
        if not self.__dict__.get("_pre_processor_given") or asked is None or used is None or asked == used:
            return
        msg = (
            f"{type(self).__name__}: the checkpoint was made at image size {list(used)} and runs at that size; the "
            f"constructor's pre_processor image size {list(asked)} is not used (the bank and thresholds are "
            f"{list(used)} px features). Fix: build the pre_processor with image_size={tuple(used)}, or fit a new "
            f"checkpoint at {tuple(asked)}."
        )
        warnings.warn(msg, UserWarning, stacklevel=3)

    def _restore_line_calibration(self, checkpoint: dict[str, Any]) -> None:
        """Keep a checkpoint's line calibration in force, re-estimated at the constructor's rate where that differs.

        Lightning loads the state dict (the post-processor's threshold buffers) after this hook, so a
        re-estimate is written into the checkpoint's state dict.
        """
        line = self.line_calibration
        wanted = self.false_alarm_rate
        if wanted is not None and wanted != line.false_alarm_rate:
            line = line.at_rate(wanted)
            self.line_calibration = line
            state = checkpoint.get("state_dict") or {}
            for name in ("image_threshold", "pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max"):
                key = f"post_processor.{'_' if name.endswith('threshold') else ''}{name}"
                if key in state:
                    state[key] = torch.tensor(getattr(line, name), dtype=state[key].dtype)
            logger.info(
                "%s: the checkpoint was calibrated at false_alarm_rate=%g; re-estimated at %g from its %d stored "
                "calibration scores: %s.",
                type(self).__name__,
                checkpoint["protorefine_line_calibration"]["false_alarm_rate"],
                wanted,
                line.num_images,
                line.describe(),
            )
        self._store_false_alarm_rate(line.false_alarm_rate)
        post_processor = getattr(self, "post_processor", None)
        if isinstance(post_processor, FewShotPostProcessor):
            # the buffers come from the state dict after this hook; the origin says where they came from
            post_processor.threshold_origin = "calibration"

    def _restore_refiner(self, stored: Any) -> list[str]:
        """Rebuild the refiner from the checkpoint's options; return the differences from the current one."""
        refiner = make_refiner(stored, self.refiner_presets, self.refiner_default_preset)
        current = self.model.refiner
        old = current.options.as_dict() if current is not None else None
        new = refiner.options.as_dict() if refiner is not None else None
        if old == new:
            return []
        if old is None or new is None:
            differences = [f"refiner={new or False!r} (constructor: {old or False!r})"]
        else:
            differences = [
                f"refiner.{key}={new[key]!r} (constructor: {old.get(key)!r})" for key in new if new[key] != old.get(key)
            ]
        self._replace_refiner(refiner)
        self._store_plain_hparams()
        return differences

    def _replace_refiner(self, refiner: PrototypeRefiner | None) -> None:
        """Install another refiner in the torch model (models with derived state override this)."""
        self.model.refiner = refiner


def input_size(pre_processor: Any) -> tuple[int, ...] | None:
    """The image size a pre-processor's transform produces: the last ``Resize`` or ``CenterCrop`` size.

    Args:
        pre_processor: A pre-processor with a ``transform`` (a torchvision transform or ``Compose``), or ``None``.

    Returns:
        The size as a tuple (one value for a ``Resize`` of the shorter side), ``None`` without a resize or crop.

    Example:
        >>> from torchvision.transforms.v2 import CenterCrop, Compose, Resize
        >>> input_size(PreProcessor(transform=Compose([Resize((72, 72)), CenterCrop((64, 64))])))
        (64, 64)
    """
    stack = [getattr(pre_processor, "transform", None)]
    size = None
    while stack:
        transform = stack.pop(0)
        if isinstance(transform, Compose):
            stack = list(transform.transforms) + stack
        elif isinstance(transform, Resize | CenterCrop) and transform.size is not None:
            sides = transform.size
            size = (int(sides),) if isinstance(sides, int) else tuple(int(side) for side in sides)
    return size


#: Share of an image's values at its maximum (or minimum) from which it counts as one flat value.
FLAT_SHARE = 0.95


def warn_about_flat_images(batch: Batch) -> list[str]:
    """Warn loudly, naming the files, about images of a batch that (nearly) hold one flat value; return their paths.

    An image counts as flat when, in every channel, :data:`FLAT_SHARE` of its values sit at the maximum or the minimum.

    anomalib's ``read_image`` converts with Pillow's ``convert("RGB")``, which clips 16-bit images to
    255: a 16-bit image arrives as (nearly) one flat value and its scores mean nothing.

    Example:
        >>> from types import SimpleNamespace
        >>> import warnings
        >>> images = torch.stack([torch.ones(3, 4, 4), torch.rand(3, 4, 4)])
        >>> batch = SimpleNamespace(image=images, image_path=["a", "b"])
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     warn_about_flat_images(batch)
        ['a']
    """
    images = getattr(batch, "image", None)
    if images is None or images.ndim != 4:
        return []
    values = images.detach().flatten(2).float()  # (B, C, H*W): channels are normalised apart
    top, bottom = values.amax(2, keepdim=True), values.amin(2, keepdim=True)
    tolerance = 1e-4 * (top - bottom).abs().clamp_min(1e-6)
    at_top = (values >= top - tolerance).float().mean(2)
    at_bottom = (values <= bottom + tolerance).float().mean(2)
    flat = (torch.maximum(at_top, at_bottom) >= FLAT_SHARE).all(1)
    if not bool(flat.any()):
        return []
    paths = list(getattr(batch, "image_path", None) or [f"batch image {i}" for i in range(len(images))])
    named = [str(paths[i]) for i in flat.nonzero().flatten().tolist()]
    msg = (
        f"{len(named)} image(s) hold one flat value (at least {FLAT_SHARE:.0%} of their pixels), so their scores and "
        f"decisions mean nothing: {named[:5]}. "
        "anomalib's read_image reads 16-bit images this way (Pillow's convert('RGB') clips them to 255): convert "
        "them to 8-bit (e.g. with OpenCV, dividing by 257), or check the files."
    )
    warnings.warn(msg, UserWarning, stacklevel=2)
    return named


class RefinementStatsCallback(Callback):
    """Log the refinement statistics of the model's last validation/test batch.

    The statistics are the torch model's ``refinement_stats`` (the refiner's ``last_stats``: EM and
    Sinkhorn iterations, objective, OT cost, time); the refiner itself knows nothing of Lightning.
    ``seconds`` (the batch's refinement time) is logged per image as ``refinement/seconds_per_image``;
    all values are epoch means weighted by batch size, reduced over ranks under DDP. The model's refiner
    can be replaced after the callbacks are attached (a checkpoint loaded with ``ckpt_path`` rebuilds it),
    so the statistics are looked up on every batch.
    """

    @staticmethod
    def log_stats(pl_module: Any, batch_size: int) -> None:
        """Log the statistics of the last refined batch of ``pl_module`` (nothing before the first one)."""
        stats = getattr(getattr(pl_module, "model", None), "refinement_stats", None) or {}
        for name, value in stats.items():
            key, logged = ("seconds_per_image", value / max(batch_size, 1)) if name == "seconds" else (name, value)
            pl_module.log(
                f"refinement/{key}", logged, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True
            )

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Log the statistics of the validation batch."""
        del trainer, outputs, batch_idx, dataloader_idx
        self.log_stats(pl_module, len(batch))

    def on_test_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Log the statistics of the test batch."""
        del trainer, outputs, batch_idx, dataloader_idx
        self.log_stats(pl_module, len(batch))


_install_checkpoint_notice_filter()


def _dataset_image_paths(dataset: Any) -> list[str]:
    """The image files of an anomalib dataset: ``image_filenames`` (``PredictDataset``) or ``samples.image_path``."""
    names = getattr(dataset, "image_filenames", None)
    if names is None:
        samples = getattr(dataset, "samples", None)
        names = list(samples["image_path"]) if samples is not None and "image_path" in samples else []
    return [str(name) for name in names]


def first_unreadable_image(paths: Sequence[str]) -> tuple[str, str] | None:
    """The first file of ``paths`` that Pillow cannot decode, with Pillow's message (``None``: all decode).

    Args:
        paths: Image files.

    Returns:
        ``(path, error)`` of the first file whose full decode fails, or ``None``.
    """
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError) as error:  # what Pillow raises for broken files
            return path, str(error)
    return None


class UnreadableImageNote(Callback):
    """Name the image file behind a decoding error in the dataloader, and the fix.

    anomalib's datasets read images in the dataloader with Pillow, whose errors ("image file is
    truncated", "cannot identify image file") do not name the file, and no model hook sees them. When
    a run ends in an ``OSError``, the files of the running stage's datasets are decoded until one fails
    (only then: nothing is read on a run that works), and a note naming that file is added to the error.
    """

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Add a note naming the first unreadable image of the running stage to an ``OSError``."""
        del pl_module
        if not isinstance(exception, OSError):
            return
        stages = (("predict", "predicting", "predict_dataloaders"), ("test", "testing", "test_dataloaders"))
        stages += (("validate", "validating", "val_dataloaders"),)
        running = [(stage, loaders) for stage, flag, loaders in stages if getattr(trainer, flag, False)]
        if not running:
            return
        stage, loaders = running[0]
        found = getattr(trainer, loaders, None)
        dataloaders = found if isinstance(found, Sequence) else [found] if found is not None else []
        paths = [path for loader in dataloaders for path in _dataset_image_paths(getattr(loader, "dataset", None))]
        unreadable = first_unreadable_image(paths)
        if unreadable is None:
            return
        path, error = unreadable
        exception.add_note(
            f"{stage}: image file {path} cannot be read ({error}): re-copy it from the camera or remove it from "
            "the folder."
        )
