"""PatchCorePlus: few-shot PatchCore with test-time prototype refinement (Lightning glue).

A direct subclass of anomalib's ``AnomalibModule``, so ``anomalib test --model PatchCorePlus``,
``anomalib.models.get_model("PatchCorePlus")``, ``Engine`` and a plain ``lightning.Trainer`` all
work. With ``k_shot`` set the model is few-shot: it picks ``k_shot`` normal images of the
datamodule's training set with ``few_shot_seed`` and builds its memory bank from them the first
time it is needed, so no checkpoint and no training pass are required.

Example:
    >>> from anomalib_protorefine import PatchCorePlus
    >>> model = PatchCorePlus(backbone="resnet18", layers=("layer2",), pre_trained=False, k_shot=2)
    >>> model.learning_type.value
    'few_shot'
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_protorefine import upstream
from anomalib_protorefine.backbones import normalization_for
from anomalib_protorefine.calibration import CalibrationResult, calibrate, split_transform
from anomalib_protorefine.few_shot import (
    check_support_images,
    load_images,
    plain_int,
    validate_few_shot_source,
    validate_support_options,
)
from anomalib_protorefine.models.base import FewShotModel
from anomalib_protorefine.models.checkpoints import FEW_SHOT_SEED, FEW_SHOT_SOURCE, K_SHOT, THRESHOLD, ScoreOption
from anomalib_protorefine.models.memory_bank import FewShotMemoryBankMixin
from anomalib_protorefine.models.refiner_config import RefinerPreset, make_refiner, plain_refiner
from anomalib_protorefine.pre_processing import AntialiasPreProcessor
from anomalib_protorefine.refinement import PrototypeRefiner

from .options import (
    check_architecture,
    validate_augmented_bank,
    validate_image_size,
    validate_layers,
    validate_online_options,
)
from .torch_model import PatchCorePlusModel

logger = logging.getLogger(__name__)

#: Paper defaults of the PatchCore+ refiner (Euclidean distance, lambda = 0.3, N = 10).
PATCHCORE_PAPER_REFINER: dict[str, Any] = {"lambda_": 0.3, "num_iterations": 10, "distance": "euclidean"}
#: The default form (docs/method.md, "Score fusion"; how it was chosen: docs/benchmarks.md): the
#: paper's EM, each patch scored with the geometric mean of its refined and its nearest-neighbour distance.
PATCHCORE_FUSED_REFINER: dict[str, Any] = {**PATCHCORE_PAPER_REFINER, "score_fusion": "geometric"}
#: The local form whose cost grows like PatchCore's with the number of patches (docs/method.md, "Locality"):
#: each patch's prototype rebuilt from its 16 nearest bank prototypes, no transport term, the patch scored
#: against its own refined prototype, fused with its nearest-neighbour distance.
PATCHCORE_LOCAL_REFINER: dict[str, Any] = {
    **PATCHCORE_FUSED_REFINER,
    "neighbors": 16,
    "transport": False,
    "scoring_bank": "matched",
}
#: Named refiner settings of PatchCorePlus (``refiner="paper"`` etc.).
PATCHCORE_REFINER_PRESETS: dict[str, dict[str, Any]] = {
    "fused": PATCHCORE_FUSED_REFINER,
    "paper": PATCHCORE_PAPER_REFINER,
    "local": PATCHCORE_LOCAL_REFINER,
}
#: The preset of ``refiner=True``.
PATCHCORE_DEFAULT_PRESET = "fused"
#: What ``refiner="auto"`` chooses between, by self-calibration on the support images.
PATCHCORE_AUTO_CANDIDATES: tuple[str, ...] = ("off", PATCHCORE_DEFAULT_PRESET)


def _set_coreset_ratio(model: PatchCorePlus, value: float) -> None:
    """The coreset ratio of the bank is also the online bank's."""
    model.coreset_sampling_ratio = value
    model.model.online_sampling_ratio = value


class PatchCorePlus(FewShotMemoryBankMixin, FewShotModel, MemoryBankMixin, AnomalibModule):
    """PatchCore+ (paper Sec. 5.1): few-shot PatchCore whose prototypes are refined per query.

    Args:
        backbone: timm backbone. Paper: ``"wide_resnet50_2"``; offline: ``"tf_efficientnet_lite0"``
            with the ``offline`` extra.
        layers: Backbone layers. Paper: ``("layer2", "layer3")``.
        pre_trained: Use pretrained backbone weights (explicit file, then installed package, then hub).
            Spelled as anomalib's ``Patchcore(pre_trained=...)``, which it wraps.
        weights: Local backbone state-dict file (for air-gapped machines).
        coreset_sampling_ratio: Coreset ratio alpha of the support features (paper: 0.05).
        k_shot: Number of normal support images, or ``None`` for classic full-shot PatchCore
            trained with ``Engine.fit``.
        few_shot_seed: Seed of the support image draw.
        few_shot_source: Folder of normal images to draw the support images from instead of the
            datamodule's training set (needed to predict on a folder without a checkpoint).
        support_augmentation: Rotated / flipped copies of the support images added to the bank:
            ``None`` (default), a preset (``"flips"``, ``"rotations"``, ``"rotations_flips"``,
            ``"dihedral"``: all seven) or a list of ``"rot90"``, ``"rot180"``, ``"rot270"``, ``"hflip"``,
            ``"vflip"``, ``"transpose"``, ``"antitranspose"``
            (:mod:`anomalib_protorefine.support_augmentation`). The bank grows by one copy per transform
            before the coreset (see ``augmented_bank``). Only with ``k_shot``.
        refiner: ``True`` or ``"fused"`` (the default form: the paper's EM, lambda 0.3, N 10, with
            each patch scored by the geometric mean of its refined and nearest-neighbour distances;
            see docs/method.md), ``"paper"`` (the paper's exact form: refined distance alone),
            ``"local"`` (each patch rebuilt from its 16 nearest prototypes, no transport, fused: a cost
            that grows like PatchCore's with the image size, for large inputs), ``"auto"``
            (self-calibration: refinement on or off, chosen per task from the support images alone),
            ``False`` or ``"off"`` (plain PatchCore scored with the same code: the baseline), a dict of
            the options to change (the others keep the default form's; CLI:
            ``--model.refiner.lambda_ 0.2``), or a :class:`PrototypeRefiner` (used as given).
        online: "Online PatchCore+" (paper Table 6): refined prototypes join a bounded extra bank.
        online_capacity: Size bound of the online bank (default: the support bank's size).
        threshold: Where the image and pixel thresholds (and the normalisation range) come from:
            ``"auto"`` (the support images, replaced by anomalib's F1-adaptive thresholds when a
            validation pass with defective images runs), ``"support"`` (the support images only: augmented
            copies of them scored clean and with synthetic defects; see
            :mod:`anomalib_protorefine.thresholds`) or ``"validation"`` (anomalib's behaviour).
        false_alarm_rate: The share of good parts you accept to see flagged, in (0, 0.5] (e.g. 0.02).
            With ``calibration_source`` the image threshold is set so that this share of good parts is
            expected above it (:mod:`anomalib_protorefine.false_alarm`); without, the support rule
            decides and a warning says the rate cannot be honoured from the support images alone.
        calibration_source: Folder of unlabelled images of parts from the line (mostly good, a few
            defective ones tolerated) to calibrate the thresholds on at ``false_alarm_rate`` (default
            0.05); also ``model.calibrate_false_alarm(folder_or_images)``.
        augmented_bank: Size of the bank built from augmented support: ``"grow"`` (default: the
            coreset ratio of all views, so the bank, and the refinement's cost, grow with the views) or
            ``"constant"`` (the coreset picks as many prototypes from all views as it would from the
            support images alone: scoring and refinement cost as without augmentation).
        image_size: Input size of the default pre-processor: an integer (square) or ``[height, width]``
            (default: 256 x 256, the paper's). Small defects in large images need more (docs/benchmarks.md,
            "Resolution": 512 px on DeepPCB's 640 px boards), at a cost that grows with the pixels; there
            ``refiner="local"`` refines at about PatchCore's cost. Not with a ``pre_processor`` module.
        pre_processor: Pre-processor, ``True`` for the default (``image_size``, backbone normalisation).
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> model = PatchCorePlus(backbone="resnet18", layers=("layer2",), pre_trained=False, refiner=False)
        >>> model.model.refiner is None
        True
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        weights: str | None = None,
        coreset_sampling_ratio: float = 0.05,
        k_shot: int | None = 4,
        few_shot_seed: int = 0,
        few_shot_source: str | Path | None = None,
        support_augmentation: str | Sequence[str] | None = None,
        refiner: bool | RefinerPreset | str | dict[str, Any] | PrototypeRefiner = True,
        online: bool = False,
        online_capacity: int | None = None,
        threshold: str = "auto",
        false_alarm_rate: float | None = None,
        calibration_source: str | Path | None = None,
        augmented_bank: str = "grow",
        image_size: int | Sequence[int] | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        k_shot, few_shot_seed = validate_support_options(k_shot, few_shot_seed, coreset_sampling_ratio, paper="0.05")
        online_capacity = plain_int(online_capacity)
        validate_online_options(online, online_capacity)
        source = validate_few_shot_source(few_shot_source, k_shot)
        layers = validate_layers(layers)
        augmented_bank = validate_augmented_bank(augmented_bank)
        size = validate_image_size(image_size, pre_processor)
        refiner = plain_refiner(refiner)
        self.auto_refiner = refiner == "auto"
        if self.auto_refiner and not k_shot:
            msg = "refiner='auto' calibrates on the k support images: set k_shot (e.g. k_shot=4) or choose a preset."
            raise ValueError(msg)
        refiner_module = make_refiner(
            True if self.auto_refiner else refiner,
            PATCHCORE_REFINER_PRESETS,
            PATCHCORE_DEFAULT_PRESET,
            other_names=("auto",),
        )
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        if pre_processor is True:
            self.pre_processor = self.configure_pre_processor(size, backbone=backbone)
        if size is not None:  # an input size the user asked for: a checkpoint that replaces it is worth a warning
            self.__dict__["_pre_processor_given"] = True
            for initial in (False, True):  # plain values in hparams.yaml, whatever sequence was given
                upstream.set_stored_hparam(self, "image_size", list(size), initial=initial)
        self.model: PatchCorePlusModel = PatchCorePlusModel(
            layers=layers,
            backbone=backbone,
            pre_trained=pre_trained,
            weights=weights,
            refiner=refiner_module,
            online=online,
            online_capacity=online_capacity,
            online_sampling_ratio=coreset_sampling_ratio,
        )
        self._store_plain_hparams()
        self.coreset_sampling_ratio = coreset_sampling_ratio
        self.augmented_bank = augmented_bank
        self.k_shot = k_shot
        self.few_shot_seed = few_shot_seed
        self.few_shot_source = source
        self.support_augmentation = support_augmentation
        self.support_paths: tuple[str, ...] = ()
        self.calibration: CalibrationResult | None = None
        self._init_thresholds(threshold, false_alarm_rate, calibration_source)

    # ------------------------------------------------------------------ components
    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        backbone: str = "wide_resnet50_2",
    ) -> PreProcessor:
        """Resize to ``image_size`` (paper: 256 x 256) and normalise as the backbone's weights expect.

        The export transform keeps the resize antialiasing (see
        :class:`~anomalib_protorefine.pre_processing.AntialiasPreProcessor`), so an exported torch
        model scores exactly like ``Engine.predict``.

        Example:
            >>> transform = PatchCorePlus.configure_pre_processor(backbone="tf_efficientnet_lite0").transform
            >>> transform.transforms[0].size, transform.transforms[0].antialias, transform.transforms[1].mean
            ([256, 256], True, [0.5, 0.5, 0.5])
        """
        mean, std = normalization_for(backbone)
        return AntialiasPreProcessor(
            transform=Compose([Resize(image_size or (256, 256), antialias=True), Normalize(mean=mean, std=std)])
        )

    @classmethod
    def pre_processor_for(cls, image_size: tuple[int, int] | None, arguments: dict[str, Any]) -> PreProcessor:
        """The pre-processor at ``image_size`` for the backbone of ``arguments`` (its normalisation)."""
        return cls.configure_pre_processor(image_size, arguments.get("backbone", "wide_resnet50_2"))

    # ------------------------------------------------------------------ memory bank
    def fit_support(self, images: torch.Tensor) -> None:
        """Build the memory bank from pre-processed support images ``(k, 3, H, W)``.

        Example:
            >>> import torch
            >>> model = PatchCorePlus(backbone="resnet18", layers=("layer2",), pre_trained=False)
            >>> model.fit_support(torch.rand(2, 3, 64, 64))
            >>> model.model.memory_bank.shape[1]
            128
        """
        check_support_images(images, preprocessed=True)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            # One embedding per view (support_augmentation): a quarter turn of non-square images changes their shape.
            patches = [self.model.embed(view.to(self.device))[0] for view in self.augmented_support(images)]
        features = [patch.reshape(-1, patch.shape[-1]) for patch in patches]
        size = None
        if self.augmented_bank == "constant" and len(features) > 1:
            size = max(int(features[0].shape[0] * self.coreset_sampling_ratio), 1)  # the unaugmented bank's
        self.model.build_bank(torch.cat(features), self.coreset_sampling_ratio, seed=self.few_shot_seed, size=size)
        self.model.train(was_training)
        upstream.mark_fitted(self, True)

    def _before_support_bank(self, paths: tuple[str, ...]) -> None:
        """With ``refiner="auto"``: choose the refiner on the support images first."""
        if self.auto_refiner:
            self.calibrate_refiner(paths)

    def _bank_from_collected_embeddings(self) -> None:
        """Core-set subsampling of the embeddings collected by ``Engine.fit`` (full-shot)."""
        logger.info("Applying core-set subsampling to the collected embeddings.")
        self.model.subsample_embedding(self.coreset_sampling_ratio, seed=self.few_shot_seed)
        upstream.mark_fitted(self, True)

    def on_test_start(self) -> None:
        """Prepare the support data; warn that Online PatchCore+'s metrics depend on the test order."""
        super().on_test_start()
        if self.model.online:
            msg = (
                "PatchCorePlus(online=True): each test image's refined prototypes join the bank used for the "
                "next images, so scores and metrics depend on the order of the test images. anomalib's Folder "
                "and the public data sets list the defective test images first, an order that inflates image "
                "metrics (measured in docs/benchmarks.md, few-shot benchmark, Online PatchCore+). "
                "Compare methods in a random order (the few-shot benchmark shuffles) and treat `anomalib test` "
                "numbers of the online mode with care."
            )
            warnings.warn(msg, UserWarning, stacklevel=2)

    def calibrate_refiner(self, paths: Sequence[str]) -> CalibrationResult:
        """Choose the refiner among :data:`PATCHCORE_AUTO_CANDIDATES` from the support images alone.

        Synthetic defects are pasted into held-out support images (leave-one-out, or augmented
        copies for one image) and the candidate that localises them best is kept (see
        :mod:`anomalib_protorefine.calibration`). The bank is rebuilt by the caller afterwards.

        Args:
            paths: The support image files.

        Returns:
            The calibration result (also stored in :attr:`calibration` and logged).
        """
        geometric, photometric = split_transform(self.pre_processor.transform if self.pre_processor else None)
        raw = load_images(paths, geometric)
        candidates = {
            name: make_refiner(name, PATCHCORE_REFINER_PRESETS, PATCHCORE_DEFAULT_PRESET)
            for name in PATCHCORE_AUTO_CANDIDATES
        }

        def fit_bank(images: torch.Tensor) -> tuple[int, int]:
            self.fit_support(images)
            return self._grid_of(images)

        def scorer(refiner: PrototypeRefiner | None) -> Callable[[torch.Tensor], torch.Tensor]:
            def score(images: torch.Tensor) -> torch.Tensor:
                self.model.refiner = refiner
                embedding, _ = self.model.embed(images.to(self.device))
                return self.model.patch_scores(embedding).cpu()

            return score

        with torch.no_grad():
            result = calibrate(
                raw, photometric, fit_bank, {name: scorer(r) for name, r in candidates.items()}, seed=self.few_shot_seed
            )
        self.model.refiner = candidates[result.choice]
        self._store_plain_hparams()  # hparams (and checkpoints) hold the refiner actually used
        self.calibration = result
        scores = ", ".join(f"{name} {value:.3f}" for name, value in result.scores.items())
        logger.info("Self-calibration chose refiner=%r (calibration scores: %s).", result.choice, scores)
        return result

    @contextlib.contextmanager
    def calibration_scoring(self) -> Iterator[None]:
        """Score pseudo images without growing the online bank (the bank is rebuilt afterwards anyway)."""
        online = self.model.online
        self.model.online = False
        try:
            with super().calibration_scoring():
                yield
        finally:
            self.model.online = online

    def _grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of pre-processed images."""
        with torch.no_grad():
            _, grid = self.model.embed(images[:1].to(self.device))
        return grid

    def _reset_support(self) -> None:
        """Empty the memory bank, the online bank and the support list: a support-defining option changed."""
        super()._reset_support()
        self.model.online_bank = torch.empty(0, device=self.model.memory_bank.device)

    def fit(self) -> None:
        """Build the memory bank (called by anomalib at the end of the training epoch), then the line calibration."""
        self._ensure_ready()
        self._ensure_calibrated()

    # ------------------------------------------------------------------ checkpoints
    refiner_presets = PATCHCORE_REFINER_PRESETS
    refiner_default_preset = PATCHCORE_DEFAULT_PRESET
    feature_arguments = ("backbone", "layers", "pre_trained", "weights")
    tiles = True
    score_options = (
        K_SHOT,
        FEW_SHOT_SEED,
        ScoreOption("coreset_sampling_ratio", lambda model: model.coreset_sampling_ratio, _set_coreset_ratio),
        ScoreOption.model_attribute("online"),
        ScoreOption.model_attribute("online_capacity"),
        ScoreOption.attribute("augmented_bank"),
        FEW_SHOT_SOURCE,
        THRESHOLD,
    )

    def _check_feature_extractor(self, checkpoint: dict[str, Any]) -> None:
        """Compare the checkpoint's feature-extractor tensors with this model's (names and shapes)."""
        prefix = "model.feature_extractor."
        stored = {k: tuple(v.shape) for k, v in (checkpoint.get("state_dict") or {}).items() if k.startswith(prefix)}
        current = {k: tuple(v.shape) for k, v in self.state_dict().items() if k.startswith(prefix)}
        if stored and stored != current:
            made = checkpoint.get("hyper_parameters") or {}
            msg = (
                f"the checkpoint's backbone weights do not fit this model's backbone={self.hparams.get('backbone')!r}, "
                f"layers={list(self.hparams.get('layers') or [])} ({len(set(stored) ^ set(current))} tensors differ "
                "in name, others in shape): it was made with another backbone or layers (its hyper_parameters say "
                f"backbone={made.get('backbone')!r}, layers={made.get('layers')!r}). Build the model with the "
                "checkpoint's backbone and layers, or use a checkpoint made with this backbone."
            )
            raise ValueError(msg)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the score-relevant options and the support file list; a loaded bank counts as fitted.

        Raises:
            ValueError: The checkpoint is not a PatchCorePlus one, or was made with another backbone or
                layers (the feature extractor and the bank would not match); the message names the fix.
        """
        check_architecture(checkpoint, {"backbone": self.hparams.get("backbone"), "layers": self.hparams.get("layers")})
        self._check_feature_extractor(checkpoint)
        super().on_load_checkpoint(checkpoint)
        upstream.mark_fitted(self, True, device="cpu")
