"""The support options of a few-shot model: ``k_shot``, ``few_shot_seed``, ``few_shot_source``, augmentation.

Setting one after construction validates it, keeps the saved hyper-parameters in step and forgets the
support data built for the old value (rebuilt when next needed).

Example:
    >>> from anomalib_protorefine import PatchCorePlus
    >>> issubclass(PatchCorePlus, SupportMixin)
    True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.pre_processing import PreProcessor

from anomalib_protorefine import upstream
from anomalib_protorefine.few_shot import (
    SupportSet,
    drawn_support_paths,
    support_from_dataset,
    support_from_folder,
    train_dataset_of,
    validate_few_shot_source,
    validate_k_shot,
    validate_seed,
)
from anomalib_protorefine.support_augmentation import resolve_support_augmentation, support_views, view_names
from anomalib_protorefine.thresholds import validate_threshold

logger = logging.getLogger(__name__)

__all__ = ["SupportMixin"]


class SupportMixin:
    """Support options and the support draw (part of :class:`~anomalib_protorefine.models.base.FewShotModel`)."""

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
        dataset = train_dataset_of(upstream.attached_trainer(self), type(self).__name__, datamodule)
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
        trainer = upstream.attached_trainer(self)
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
        upstream.set_stored_hparam(self, name, stored)
        if changed:
            self._on_support_option_changed(name, value)
            self._reset_support()
            self._forget_support_thresholds()

    def _on_support_option_changed(self, name: str, value: Any) -> None:
        """Hook for models whose torch model holds a copy of a support option (e.g. a coreset seed)."""
