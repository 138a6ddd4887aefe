"""Checkpoints that travel alone: checked before loading, restoring every option that changes scores.

Example:
    >>> import tempfile, torch
    >>> path = tempfile.mkstemp(suffix=".ckpt")[1]
    >>> torch.save({"state_dict": {}}, path)
    >>> check_checkpoint_file(path)
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any, ClassVar

import torch
from lightning.fabric.plugins.io import CheckpointIO
from torchvision.transforms.v2 import CenterCrop, Compose, Resize

from anomalib_protorefine import upstream
from anomalib_protorefine.false_alarm import LineCalibration
from anomalib_protorefine.post_processing import FewShotPostProcessor
from anomalib_protorefine.refinement import PrototypeRefiner
from anomalib_protorefine.support_augmentation import resolve_support_augmentation
from anomalib_protorefine.thresholds import SupportThresholds

from .refiner_config import make_refiner

logger = logging.getLogger(__name__)

__all__ = [
    "FEW_SHOT_SEED",
    "FEW_SHOT_SOURCE",
    "K_SHOT",
    "THRESHOLD",
    "CheckedCheckpointIO",
    "CheckpointMixin",
    "ScoreOption",
    "check_checkpoint_file",
    "input_size",
]


@dataclasses.dataclass(frozen=True)
class ScoreOption:
    """An option that changes scores or decisions: how to read it and how a checkpoint sets it.

    Attributes:
        name: Its hyper-parameter name.
        read: Its current value, as checkpoints store it.
        write: Set it (from a checkpoint's value).

    Example:
        >>> from types import SimpleNamespace
        >>> option = ScoreOption.model_attribute("num_neighbours")
        >>> model = SimpleNamespace(model=SimpleNamespace(num_neighbours=1))
        >>> option.write(model, 3)
        >>> option.read(model)
        3
    """

    name: str
    read: Callable[[Any], Any]
    write: Callable[[Any, Any], None]

    @classmethod
    def attribute(cls, name: str) -> ScoreOption:
        """An option held by the Lightning model itself (set as an attribute: through its property where it has one)."""
        return cls(name, lambda model: getattr(model, name), lambda model, value: setattr(model, name, value))

    @classmethod
    def model_attribute(cls, name: str) -> ScoreOption:
        """An option held by the torch model (``model.model``)."""
        return cls(
            name, lambda model: getattr(model.model, name), lambda model, value: setattr(model.model, name, value)
        )


def _set_threshold(model: Any, value: Any) -> None:
    model._set_threshold_source(value)


def _set_few_shot_source(model: Any, value: Any) -> None:
    model.few_shot_source = value or None


#: The score options every few-shot model has, in restore order (``k_shot`` before the source that needs it).
K_SHOT = ScoreOption.attribute("k_shot")
FEW_SHOT_SEED = ScoreOption.attribute("few_shot_seed")
FEW_SHOT_SOURCE = ScoreOption(
    "few_shot_source", lambda model: str(model.few_shot_source) if model.few_shot_source else None, _set_few_shot_source
)
THRESHOLD = ScoreOption("threshold", lambda model: model.threshold, _set_threshold)


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


def input_size(pre_processor: Any) -> tuple[int, ...] | None:
    """The image size a pre-processor's transform produces: the last ``Resize`` or ``CenterCrop`` size.

    Args:
        pre_processor: A pre-processor with a ``transform`` (a torchvision transform or ``Compose``), or ``None``.

    Returns:
        The size as a tuple (one value for a ``Resize`` of the shorter side), ``None`` without a resize or crop.

    Example:
        >>> from anomalib.pre_processing import PreProcessor
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


class CheckpointMixin:
    """Saving and restoring a few-shot model (part of :class:`~anomalib_protorefine.models.base.FewShotModel`)."""

    # ------------------------------------------------------------------ checkpoints
    #: The model's named refiner settings, and the one that ``refiner=True`` and a partial dict start from.
    refiner_presets: ClassVar[dict[str, dict[str, Any]]] = {}

    refiner_default_preset: ClassVar[str] = ""

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

    def _store_plain_hparams(self) -> None:
        """Keep the refiner in ``hparams`` as plain options (or ``False``), never as a ``PrototypeRefiner`` object.

        ``hparams.yaml`` (written by Lightning's loggers from ``hparams_initial``) then loads with
        ``yaml.safe_load``, and the stored options are the ones actually used.
        """
        refiner = self.model.refiner
        plain = refiner.options.as_dict() if refiner is not None else False
        for initial in (False, True):
            upstream.set_stored_hparam(self, "refiner", dict(plain) if plain else False, initial=initial)

    #: The options besides the refiner that change scores or decisions, in the order a checkpoint restores them.
    score_options: ClassVar[tuple[ScoreOption, ...]] = ()

    def _score_options(self) -> dict[str, Any]:
        """Current values of :attr:`score_options`, by hparams name."""
        return {option.name: option.read(self) for option in self.score_options}

    def _apply_score_option(self, name: str, value: Any) -> None:
        """Set one of :attr:`score_options` (from a checkpoint).

        Raises:
            KeyError: ``name`` is not one of them.
        """
        for option in self.score_options:
            if option.name == name:
                option.write(self, value)
                return
        msg = f"{name!r} is not an option of {type(self).__name__} that a checkpoint restores."
        raise KeyError(msg)

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
            # The bank in the checkpoint was built with its augmentation (none when the checkpoint has no entry).
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
            for name in upstream.THRESHOLD_BUFFERS:
                key = upstream.threshold_state_key(name)
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
