"""AnomalyDINOPlus: few-shot AnomalyDINO with cosine prototype refinement (Lightning glue).

A subclass of anomalib's ``AnomalyDINO`` that also names ``AnomalibModule`` among its direct bases,
so ``anomalib.models.get_model("AnomalyDINOPlus")`` and ``anomalib test --model AnomalyDINOPlus``
find it (anomalib looks up direct subclasses only). With ``k_shot`` set, ``k_shot`` normal images
are drawn with ``few_shot_seed`` from the datamodule's training set (or from ``few_shot_source``)
and the bank is built from them the first time it is needed: no checkpoint and no training pass.

Example:
    >>> from anomalib_protorefine import AnomalyDINOPlus
    >>> model = AnomalyDINOPlus(pre_trained=False, k_shot=2)
    >>> model.learning_type.value, model.model.refiner is None
    ('few_shot', True)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import PrecisionType
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.models.image.anomaly_dino.lightning_model import AnomalyDINO
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from anomalib_protorefine import upstream
from anomalib_protorefine.backbones import IMAGENET_MEAN, IMAGENET_STD
from anomalib_protorefine.few_shot import (
    check_support_images,
    plain_int,
    validate_few_shot_source,
    validate_support_options,
)
from anomalib_protorefine.models.base import FewShotModel
from anomalib_protorefine.models.checkpoints import FEW_SHOT_SEED, FEW_SHOT_SOURCE, K_SHOT, THRESHOLD, ScoreOption
from anomalib_protorefine.models.memory_bank import FewShotMemoryBankMixin
from anomalib_protorefine.models.refiner_config import RefinerPreset, make_refiner
from anomalib_protorefine.pre_processing import AntialiasPreProcessor
from anomalib_protorefine.refinement import PrototypeRefiner

from .torch_model import DEFAULT_ENCODER, AnomalyDINOPlusModel, validate_dino_options

logger = logging.getLogger(__name__)

#: The paper's cosine refinement (as WinCLIP+: lambda 0.1, N 10), scored by the refined distance alone.
DINO_PAPER_REFINER: dict[str, Any] = {"lambda_": 0.1, "num_iterations": 10, "distance": "cosine"}
#: The paper's EM with each patch scored by the geometric mean of its refined and nearest-neighbour distances.
DINO_FUSED_REFINER: dict[str, Any] = {**DINO_PAPER_REFINER, "score_fusion": "geometric"}
#: Named refiner settings of AnomalyDINOPlus (``refiner="paper"`` etc.).
DINO_REFINER_PRESETS: dict[str, dict[str, Any]] = {"fused": DINO_FUSED_REFINER, "paper": DINO_PAPER_REFINER}
#: The preset of ``refiner=True`` and the base of a partial dict.
DINO_DEFAULT_PRESET = "fused"
#: The default ``refiner`` argument (chosen by measurement: docs/benchmarks.md, "AnomalyDINOPlus").
DINO_DEFAULT_REFINER: bool | str = "off"


class AnomalyDINOPlus(FewShotMemoryBankMixin, FewShotModel, AnomalyDINO, AnomalibModule):
    """AnomalyDINO (anomalib 2.7) with seeded k-shot support, offline weights and optional prototype refinement.

    Args:
        num_neighbours: Nearest bank patches averaged per patch (anomalib: 1; plain scoring only).
        encoder_name: timm DINO ViT (anomalib: ``"vit_small_patch14_dinov2"``).
        masking: anomalib's PCA background masking.
        coreset_subsampling: Reduce the bank with a seeded greedy coreset.
        sampling_ratio: Coreset ratio when ``coreset_subsampling`` (anomalib: 0.1).
        precision: ``"float32"`` or ``"float16"`` (as anomalib's AnomalyDINO).
        pre_trained: Load pretrained encoder weights: ``weights`` first, then the hub (with an error
            naming the offline fixes); ``False`` keeps a random initialisation (tests). Spelled as
            anomalib's ``Patchcore(pre_trained=...)`` (and PatchCorePlus) for the same meaning.
        weights: Local state-dict file of timm's full ``encoder_name`` model (air-gapped machines).
        k_shot: Number of normal support images, or ``None`` for anomalib's behaviour (the bank
            from every training image, built by ``Engine.fit``).
        few_shot_seed: Seed of the support draw (and of the coreset).
        few_shot_source: Folder of normal images to draw the support images from instead of the
            datamodule's training set.
        support_augmentation: Rotated / flipped copies of the support images added to the bank
            (``None``, a preset or a list of transforms, as :class:`~anomalib_protorefine.PatchCorePlus`).
        refiner: ``"off"`` / ``False`` (anomalib's scoring: the default, see docs/benchmarks.md),
            ``"fused"`` / ``True`` (the paper's cosine EM, lambda 0.1, N 10, each patch scored by the
            geometric mean of its refined and nearest-neighbour distances), ``"paper"`` (the paper's
            form: refined distance alone), a dict of options over ``"fused"`` (CLI:
            ``--model.refiner.lambda_ 0.2``), or a cosine :class:`PrototypeRefiner`.
        threshold: ``"auto"``, ``"support"`` or ``"validation"``, as
            :class:`~anomalib_protorefine.PatchCorePlus`.
        false_alarm_rate: The share of good parts you accept to see flagged, as
            :class:`~anomalib_protorefine.PatchCorePlus`.
        calibration_source: Folder of unlabelled line images to calibrate the thresholds on, as
            :class:`~anomalib_protorefine.PatchCorePlus`.
        pre_processor: Pre-processor, ``True`` for anomalib's (252 px bicubic, ImageNet normalisation).
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> model = AnomalyDINOPlus(pre_trained=False, refiner="fused")
        >>> model.model.refiner.options.lambda_
        0.1
    """

    def __init__(
        self,
        num_neighbours: int = 1,
        encoder_name: str = DEFAULT_ENCODER,
        masking: bool = False,
        coreset_subsampling: bool = False,
        sampling_ratio: float = 0.1,
        precision: str | PrecisionType = PrecisionType.FLOAT32,
        pre_trained: bool = True,
        weights: str | None = None,
        k_shot: int | None = 4,
        few_shot_seed: int = 0,
        few_shot_source: str | Path | None = None,
        support_augmentation: str | Sequence[str] | None = None,
        refiner: bool | RefinerPreset | str | dict[str, Any] | PrototypeRefiner = DINO_DEFAULT_REFINER,
        threshold: str = "auto",
        false_alarm_rate: float | None = None,
        calibration_source: str | Path | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        # Rebound before the hyper-parameters are saved, so that numpy integers are stored as plain ints.
        k_shot, few_shot_seed = validate_support_options(
            k_shot, few_shot_seed, sampling_ratio, paper="AnomalyDINO's default 0.1", ratio_name="sampling_ratio"
        )
        num_neighbours = plain_int(num_neighbours)
        source = validate_few_shot_source(few_shot_source, k_shot)
        precision = _precision(precision)
        refiner_module = make_refiner(refiner, DINO_REFINER_PRESETS, DINO_DEFAULT_PRESET)
        # AnomalyDINO's constructor builds anomalib's model, which always downloads the encoder: its
        # base (MemoryBankMixin, AnomalibModule) is initialised instead and the torch model built here.
        # Called here, not through upstream.init_skipping: Lightning's save_hyperparameters collects the
        # constructor arguments by walking the __init__ frames, which a helper's frame would interrupt.
        # tests/test_upstream_contract.py checks AnomalyDINO's constructor arguments.
        super(AnomalyDINO, self).__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        # FewShotModel.__init__ is skipped with AnomalyDINO's: record what it records (a given input size).
        self.__dict__["_pre_processor_given"] = not isinstance(pre_processor, bool)
        self.model: AnomalyDINOPlusModel = AnomalyDINOPlusModel(
            num_neighbours=num_neighbours,
            encoder_name=encoder_name,
            masking=masking,
            coreset_subsampling=coreset_subsampling,
            sampling_ratio=sampling_ratio,
            pre_trained=pre_trained,
            weights=weights,
            refiner=refiner_module,
        )
        self.model = self.model.half() if precision == PrecisionType.FLOAT16 else self.model.float()
        self._store_plain_hparams()
        for initial in (False, True):  # a plain string: checkpoints load with weights_only
            upstream.set_stored_hparam(self, "precision", precision.value, initial=initial)
        self.k_shot = k_shot
        self.few_shot_seed = few_shot_seed
        self.few_shot_source = source
        self.support_augmentation = support_augmentation
        self.support_paths: tuple[str, ...] = ()
        self._init_thresholds(threshold, false_alarm_rate, calibration_source)

    # ------------------------------------------------------------------ components
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> PreProcessor:
        """Anomalib's AnomalyDINO pre-processing (252 x 252 bicubic, ImageNet normalisation), exported as computed.

        Example:
            >>> AnomalyDINOPlus.configure_pre_processor((448, 448)).transform.transforms[0].size
            [448, 448]
        """
        size = image_size or (252, 252)
        transform = Compose(
            [
                Resize(size, antialias=True, interpolation=InterpolationMode.BICUBIC),
                Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ]
        )
        return AntialiasPreProcessor(transform=transform)

    # ------------------------------------------------------------------ memory bank
    def fit_support(self, images: torch.Tensor) -> None:
        """Build the memory bank from pre-processed support images ``(k, 3, H, W)``.

        Example:
            >>> model = AnomalyDINOPlus(pre_trained=False)
            >>> model.fit_support(torch.rand(2, 3, 56, 56))
            >>> tuple(model.model.memory_bank.shape)
            (32, 384)
        """
        check_support_images(images, preprocessed=True)
        was_training = self.model.training
        self.model.eval()
        # One embedding per view (support_augmentation): a quarter turn of non-square images changes their grid.
        features = [
            self.model.support_features(*self.model.embed(view.to(self.device)))
            for view in self.augmented_support(images)
        ]
        self.model.build_bank(torch.cat(features), seed=self.few_shot_seed)
        self.model.train(was_training)
        upstream.mark_fitted(self, True)

    def _bank_from_collected_embeddings(self) -> None:
        """The bank from the embeddings collected by ``Engine.fit`` (full-shot)."""
        self.fit()

    def fit(self) -> None:
        """Build the bank from the embeddings collected by ``Engine.fit`` (full-shot), or from the support images."""
        if self.k_shot or not self.model.embedding_store:
            self._ensure_ready()
            self._ensure_calibrated()
            return
        embeddings = torch.vstack(self.model.embedding_store)
        self.model.embedding_store.clear()
        self.model.build_bank(embeddings, seed=self.few_shot_seed)
        upstream.mark_fitted(self, True)
        self._ensure_calibrated()

    # ------------------------------------------------------------------ checkpoints
    refiner_presets = DINO_REFINER_PRESETS
    refiner_default_preset = DINO_DEFAULT_PRESET
    feature_arguments = ("encoder_name", "pre_trained", "weights")
    loads_hub_weights = True
    score_options = (
        K_SHOT,
        FEW_SHOT_SEED,
        FEW_SHOT_SOURCE,
        ScoreOption.model_attribute("num_neighbours"),
        ScoreOption.model_attribute("masking"),
        ScoreOption.model_attribute("coreset_subsampling"),
        ScoreOption.model_attribute("sampling_ratio"),
        THRESHOLD,
    )

    def _replace_refiner(self, refiner: PrototypeRefiner | None) -> None:
        """Install another refiner after checking it fits the model's options."""
        validate_dino_options(self.model.encoder_name, self.model.num_neighbours, refiner)
        self.model.refiner = refiner

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store ``pre_trained=False`` and no ``weights``: the encoder is in the state dict (no download on reload)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["hyper_parameters"]["pre_trained"] = False
        checkpoint["hyper_parameters"]["weights"] = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint was made by AnomalyDINOPlus with this encoder, then restore its options.

        Raises:
            ValueError: Another model's checkpoint, or one of another encoder (its bank holds other features).
        """
        stored = checkpoint.get("hyper_parameters") or {}
        if "encoder_name" not in stored:
            msg = (
                "this is not an AnomalyDINOPlus checkpoint (no encoder_name in its hyper_parameters): load it with the "
                "model that wrote it (e.g. --model PatchCorePlus), or pass an AnomalyDINOPlus checkpoint."
            )
            raise ValueError(msg)
        if stored["encoder_name"] != self.model.encoder_name:
            msg = (
                f"the checkpoint was made with encoder_name={stored['encoder_name']!r} but this model has "
                f"encoder_name={self.model.encoder_name!r}: its memory bank holds that encoder's features. Build the "
                f"model with it (CLI: --model.encoder_name {stored['encoder_name']})."
            )
            raise ValueError(msg)
        super().on_load_checkpoint(checkpoint)
        upstream.mark_fitted(self, True, device="cpu")


def _precision(precision: str | PrecisionType) -> PrecisionType:
    """Anomalib's precision argument, validated (float32 or float16) with an error naming it."""
    try:
        value = PrecisionType(precision.lower() if isinstance(precision, str) else precision)
    except ValueError:
        value = None
    if value not in {PrecisionType.FLOAT32, PrecisionType.FLOAT16}:
        msg = f"precision must be 'float32' or 'float16' (as anomalib's AnomalyDINO), got {precision!r}."
        raise ValueError(msg)
    return value
