"""WinClipPlus: few-shot WinCLIP+ with cosine prototype refinement (Lightning glue).

A direct subclass of anomalib's ``AnomalibModule``, so ``anomalib test --model WinClipPlus``,
``anomalib.models.get_model("WinClipPlus")``, ``Engine`` and a plain ``lightning.Trainer`` all
work, without a checkpoint. With ``k_shot`` set, ``k_shot`` normal reference images are chosen
with ``few_shot_seed`` from the datamodule's training set (or from the folder ``few_shot_source``),
pre-processed exactly like the query images (resize *and* CLIP normalisation), and embedded the
first time they are needed. Unlike anomalib 2.7.0's ``WinClip``, train-loader shots are
normalised and ``few_shot_source`` works.

Example:
    >>> from anomalib_protorefine import WinClipPlus
    >>> model = WinClipPlus(k_shot=2, pretrained=None)  # doctest: +SKIP
    >>> model.learning_type.value  # doctest: +SKIP
    'few_shot'

"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import AnomalibDataModule
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_protorefine.few_shot import (
    SupportSet,
    check_support_images,
    validate_few_shot_source,
    validate_support_options,
)
from anomalib_protorefine.models.base import FewShotModel
from anomalib_protorefine.models.checkpoints import FEW_SHOT_SEED, FEW_SHOT_SOURCE, K_SHOT, THRESHOLD, ScoreOption
from anomalib_protorefine.models.refiner_config import RefinerPreset, make_refiner
from anomalib_protorefine.pre_processing import AntialiasPreProcessor
from anomalib_protorefine.refinement import PrototypeRefiner

from .torch_model import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, WinClipPlusModel

logger = logging.getLogger(__name__)

#: Paper defaults of the WinCLIP+ refiner (cosine distance, lambda = 0.1, N = 10).
WINCLIP_REFINER_DEFAULTS: dict[str, Any] = {"lambda_": 0.1, "num_iterations": 10, "distance": "cosine"}
#: Named refiner settings of WinClipPlus (``refiner="paper"``); the default is the paper's.
WINCLIP_REFINER_PRESETS: dict[str, dict[str, Any]] = {"paper": WINCLIP_REFINER_DEFAULTS}
#: CLIP's normalisation (OpenAI / open_clip image mean and std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class WinClipPlus(FewShotModel, AnomalibModule):
    """WinCLIP+ (paper Sec. 5.2): few-shot WinCLIP whose visual references are refined per query.

    Args:
        class_name: Object name of the prompt ensemble. Default: the datamodule's ``category``,
            else ``"object"`` (as upstream).
        k_shot: Number of normal reference images; ``0`` or ``None`` is zero-shot WinCLIP.
        few_shot_seed: Seed of the reference draw (and of the coreset start).
        few_shot_source: Folder of normal images to draw the references from instead of the
            datamodule's training set.
        support_augmentation: Rotated / flipped copies of the support images added to the references
            (``None``, a preset or a list of transforms, as :class:`~anomalib_protorefine.PatchCorePlus`).
        scales: Window sizes in patches (WinCLIP: ``(2, 3)``).
        backbone: open_clip model name (WinCLIP: ``"ViT-B-16-plus-240"``) or the path of an
            open_clip model-config JSON.
        pretrained: open_clip tag (``"laion400m_e31"``), the path of a local checkpoint file (for
            offline machines), or ``None`` for random weights. Spelled as open_clip's
            ``create_model(pretrained=...)``, which it is passed to (a tag, not the boolean
            ``pre_trained`` of PatchCorePlus and AnomalyDINOPlus).
        coreset_sampling_ratio: Coreset ratio alpha of each reference set before refinement
            (paper: 0.5 MVTec, 0.3 VisA, 0.2 MPDD).
        refiner: ``True`` or ``"paper"`` (paper defaults: cosine, lambda 0.1, N 10), ``False`` or
            ``"off"`` (plain WinCLIP with the same code: the baseline), a dict of the options to
            change (the others keep these defaults; CLI: ``--model.refiner.lambda_ 0.2``), or a cosine
            :class:`PrototypeRefiner`.
        threshold: Where the thresholds and the normalisation range come from: ``"auto"`` (the
            support images, replaced by anomalib's when a validation pass with defective images runs),
            ``"support"`` (the support images only) or ``"validation"`` (anomalib's behaviour); as
            :class:`~anomalib_protorefine.PatchCorePlus`.
        false_alarm_rate: The share of good parts you accept to see flagged, in (0, 0.5] (e.g. 0.02).
            With ``calibration_source`` the image threshold is set so that this share of good parts is
            expected above it (:mod:`anomalib_protorefine.false_alarm`); without, the support rule
            decides and a warning says the rate cannot be honoured from the support images alone.
        calibration_source: Folder of unlabelled images of parts from the line (mostly good, a few
            defective ones tolerated) to calibrate the thresholds on at ``false_alarm_rate`` (default
            0.05); also ``model.calibrate_false_alarm(folder_or_images)``.
        pre_processor: Pre-processor, ``True`` for the default (240 px bicubic, CLIP normalisation).
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> model = WinClipPlus(k_shot=2, refiner=False, pretrained=None)  # doctest: +SKIP
        >>> model.model.refiner is None  # doctest: +SKIP
        True

    """

    def __init__(
        self,
        class_name: str | None = None,
        k_shot: int | None = 4,
        few_shot_seed: int = 0,
        few_shot_source: str | Path | None = None,
        support_augmentation: str | Sequence[str] | None = None,
        scales: Sequence[int] = (2, 3),
        backbone: str = DEFAULT_BACKBONE,
        pretrained: str | None = DEFAULT_PRETRAINED,
        coreset_sampling_ratio: float = 0.5,
        refiner: bool | RefinerPreset | str | dict[str, Any] | PrototypeRefiner = True,
        threshold: str = "auto",
        false_alarm_rate: float | None = None,
        calibration_source: str | Path | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        k_shot = k_shot or None  # 0 means zero-shot, as in upstream WinClip
        k_shot, few_shot_seed = validate_support_options(
            k_shot, few_shot_seed, coreset_sampling_ratio, paper="0.5 on MVTec"
        )
        source = validate_few_shot_source(few_shot_source, k_shot)
        refiner_module = make_refiner(refiner, WINCLIP_REFINER_PRESETS, default="paper")
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.model: WinClipPlusModel = WinClipPlusModel(
            scales=scales,
            backbone=backbone,
            pretrained=pretrained,
            refiner=refiner_module,
            coreset_sampling_ratio=coreset_sampling_ratio,
            coreset_seed=few_shot_seed,
        )
        image_size = tuple(self.model.clip.visual.image_size)
        if pre_processor is True and image_size != (240, 240):
            self.pre_processor = self.configure_pre_processor(image_size=image_size)
        self._store_plain_hparams()
        self.class_name = class_name
        self.k_shot = k_shot
        self.few_shot_seed = few_shot_seed
        self.few_shot_source = source
        self.support_augmentation = support_augmentation
        self.support_paths: tuple[str, ...] = ()
        self._init_thresholds(threshold, false_alarm_rate, calibration_source)

    # ------------------------------------------------------------------ components
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to the CLIP input size (WinCLIP: 240 x 240, bicubic) and apply CLIP's normalisation.

        Example:
            >>> transform = WinClipPlus.configure_pre_processor().transform
            >>> transform.transforms[0]
            Resize(size=[240, 240], interpolation=InterpolationMode.BICUBIC, antialias=True)
            >>> transform.transforms[1].mean == list(CLIP_MEAN)
            True

        """
        transform = Compose(
            [
                Resize(image_size or (240, 240), antialias=True, interpolation=InterpolationMode.BICUBIC),
                Normalize(mean=CLIP_MEAN, std=CLIP_STD),
            ]
        )
        return AntialiasPreProcessor(transform=transform)

    # ------------------------------------------------------------------ text and references
    def _get_class_name(self) -> str:
        """Class name of the prompts: init argument, else the datamodule's ``category``, else ``"object"``."""
        if self.class_name is not None:
            return self.class_name
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        category = getattr(datamodule, "category", None)
        return str(category) if category else "object"

    def select_support(self, datamodule: AnomalibDataModule | None = None) -> SupportSet:
        """Choose and pre-process the ``k_shot`` reference images, deterministically for ``few_shot_seed``.

        They come from ``few_shot_source`` when set, else from the training set of ``datamodule``
        (default: the trainer's), and go through the pre-processor's transform (resize and CLIP
        normalisation) exactly like the query images.

        Args:
            datamodule: Datamodule to draw from; default: the attached trainer's.

        Returns:
            The pre-processed images and their paths.

        Example:
            >>> support = model.select_support(datamodule)  # doctest: +SKIP
            >>> model.fit_support(support.images)  # doctest: +SKIP

        """
        if not self.k_shot:
            msg = "select_support needs k_shot >= 1 (the model is zero-shot): set e.g. k_shot=2."
            raise RuntimeError(msg)
        return self.draw_support(datamodule)

    def fit_support(self, images: torch.Tensor) -> None:
        """Embed pre-processed reference images ``(k, 3, H, W)`` (and build the refinement banks).

        Example:
            >>> model = WinClipPlus(k_shot=2, pretrained=None)  # doctest: +SKIP
            >>> model.fit_support(torch.randn(2, 3, 240, 240))  # doctest: +SKIP
            >>> model.model.k_shot  # doctest: +SKIP
            2

        """
        check_support_images(images, preprocessed=True)
        views = self.augmented_support(images)
        if len({tuple(view.shape) for view in views}) > 1:
            msg = (
                f"support_augmentation={list(self.support_augmentation)!r}: a quarter turn or diagonal reflection of "
                f"{tuple(images.shape[-2:])} images changes their shape, and WinCLIP's references must share "
                "the CLIP input size. Use square images (the default pre-processor resizes to the CLIP size) "
                "or only 'rot180', 'hflip', 'vflip'."
            )
            raise ValueError(msg)
        self.model.setup(reference_images=torch.cat(views).to(self.device))

    def _ensure_ready(self) -> None:
        """Text embeddings for the class name (cached per name) and, few-shot, the reference embeddings."""
        self.model.setup(self._get_class_name())
        if self.k_shot and not self.model.has_references:
            support = self.select_support()
            self.support_paths = support.paths
            if self._wants_support_thresholds():
                self.calibrate_thresholds(support.paths)
            self.fit_support(support.images)

    def _support_ready(self) -> bool:
        """Zero-shot needs no references; few-shot needs them built."""
        return not self.k_shot or bool(self.model.has_references)

    @staticmethod
    def _normalize_k_shot(k_shot: int | None) -> int | None:
        """``0`` means zero-shot, as in upstream WinClip: stored as ``None``."""
        return k_shot or None

    def _on_support_option_changed(self, name: str, value: Any) -> None:
        """The torch model's coreset seed follows ``few_shot_seed``."""
        if name == "few_shot_seed":
            self.model.coreset_seed = value

    def _reset_support(self) -> None:
        """Forget the reference embeddings and the support list: a support-defining option changed."""
        self.model.clear_references()
        self.support_paths = ()

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No training; one device."""
        return {"devices": 1}

    @property
    def learning_type(self) -> LearningType:
        """``FEW_SHOT`` with ``k_shot``, else ``ZERO_SHOT`` (anomalib validates before testing either way)."""
        return LearningType.FEW_SHOT if self.k_shot else LearningType.ZERO_SHOT

    # ------------------------------------------------------------------ checkpoints
    refiner_presets = WINCLIP_REFINER_PRESETS
    refiner_default_preset = "paper"

    score_options = (
        K_SHOT,
        FEW_SHOT_SEED,
        FEW_SHOT_SOURCE,
        ScoreOption.model_attribute("coreset_sampling_ratio"),
        ScoreOption.attribute("class_name"),
        ScoreOption(
            "scales", lambda model: list(model.model.scales), lambda model, value: model.model.set_scales(value)
        ),
        THRESHOLD,
    )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also save ``pretrained`` as ``None``: the CLIP weights are in the state dict (no download on reload)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["hyper_parameters"]["pretrained"] = None
