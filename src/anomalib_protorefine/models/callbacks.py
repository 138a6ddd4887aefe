"""Lightning callbacks and batch checks the few-shot models add to every run.

* :class:`RefinementStatsCallback` logs the refiner's per-batch statistics;
* :class:`UnreadableImageNote` names the file behind a dataloader's image decoding error;
* :func:`warn_about_flat_images` warns about images read as one flat value;
* :class:`QuietCheckpointNotice` drops anomalib's "ckpt_path is not provided" warning where no
  weights are missing (our few-shot models build their support data themselves).

Example:
    >>> FLAT_SHARE
    0.95
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch
from lightning.pytorch import Callback
from PIL import Image

from anomalib_protorefine import upstream

__all__ = [
    "FLAT_SHARE",
    "QuietCheckpointNotice",
    "RefinementStatsCallback",
    "UnreadableImageNote",
    "first_unreadable_image",
    "install_checkpoint_notice_filter",
    "warn_about_flat_images",
]


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


class QuietCheckpointNotice(logging.Filter):
    """Drop anomalib's "ckpt_path is not provided" warning of ``Engine.predict`` for our few-shot models only.

    For them no weights are missing: the support data is built from ``few_shot_source`` (or the
    datamodule) when prediction starts. The filter sits on anomalib's engine logger and passes every
    other record, and this one for every other model (e.g. anomalib's Patchcore, which does need a
    checkpoint); it finds the model in the calling ``Engine.predict`` frame.
    """

    MESSAGE = upstream.MISSING_CHECKPOINT_NOTICE

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to keep ``record``."""
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        model = upstream.model_being_predicted()
        from .base import FewShotModel  # the base imports this module

        return not (isinstance(model, FewShotModel) and (model.k_shot or model._support_ready()))


def install_checkpoint_notice_filter() -> None:
    """Put :class:`QuietCheckpointNotice` on anomalib's engine logger once."""
    upstream.filter_engine_log(QuietCheckpointNotice())
