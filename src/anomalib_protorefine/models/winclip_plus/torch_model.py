"""PyTorch model of WinCLIP+: anomalib's ``WinClipModel`` with test-time prototype refinement.

Pure torch (plus POT inside the refiner), no Lightning logic. Compared with the upstream model:

* ``backbone`` and ``pretrained`` are constructor arguments (upstream reads module globals). A
  path to a local checkpoint file is accepted as ``pretrained``, a path to an open_clip model
  configuration (``.json``) as ``backbone``, and a missing download says which file to fetch
  (:mod:`anomalib_protorefine.clip_weights`);
* the few-shot visual memory (patch embeddings and the window embeddings of every scale of the
  k reference images) is refined for each query with the cosine form of the objective (paper
  Eq. 8) when a :class:`~anomalib_protorefine.refinement.PrototypeRefiner` is given, each
  reference set reduced to a k-center coreset of ratio ``coreset_sampling_ratio`` first. With
  ``refiner=None`` the very same code computes upstream WinCLIP's visual association scores on
  the full reference sets, so the baseline is exactly upstream WinCLIP;
* the image score is fused explicitly as ``s* = (s0 + max_j s_j) / 2`` (paper Eq. 9);
* the text embeddings are computed once per class name; the class name is stored beside them
  in the state dict, so a reloaded model needs no text-encoder pass for the same class.

Example:
    >>> import torch
    >>> from anomalib_protorefine.models.winclip_plus.torch_model import fuse_image_scores
    >>> fuse_image_scores(torch.tensor([0.2]), torch.tensor([[[0.1, 0.6], [0.3, 0.0]]]))
    tensor([0.4000])

"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import InferenceBatch
from anomalib.models.image.winclip.torch_model import TEMPERATURE, WinClipModel
from anomalib.models.image.winclip.utils import class_scores, harmonic_aggregation, visual_association_score
from torch import nn

from anomalib_protorefine import upstream
from anomalib_protorefine._deprecation import moved_names
from anomalib_protorefine.clip_weights import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, create_clip
from anomalib_protorefine.coreset import seeded_coreset
from anomalib_protorefine.models.tiling import NoTiler
from anomalib_protorefine.models.torch_common import require_cosine
from anomalib_protorefine.refinement import PrototypeRefiner
from anomalib_protorefine.refinement.precision import autocast_disabled, float32_compute

logger = logging.getLogger(__name__)


def fuse_image_scores(zero_shot: torch.Tensor, few_shot_map: torch.Tensor) -> torch.Tensor:
    """Image score of WinCLIP+ (paper Eq. 9): ``s* = (s0 + max_j s_j) / 2``.

    Args:
        zero_shot: Zero-shot CLIP image scores ``s0``, ``(B,)``.
        few_shot_map: Few-shot score maps ``s``, ``(B, h, w)``.

    Returns:
        ``(B,)`` fused scores.

    Example:
        >>> fuse_image_scores(torch.tensor([0.0, 1.0]), torch.tensor([[[0.5]], [[0.0]]]))
        tensor([0.2500, 0.5000])

    """
    return (zero_shot + few_shot_map.amax(dim=(-2, -1))) / 2


def validate_scales(scales: Any) -> tuple[int, ...]:
    """Return ``scales`` as a tuple of window sizes, or raise an error that names ``scales`` and the fix.

    Example:
        >>> validate_scales([2, 3])
        (2, 3)
        >>> validate_scales([0])
        Traceback (most recent call last):
        ...
        ValueError: scales must be a non-empty list of window sizes >= 1 (in patches), got [0]. WinCLIP: scales=[2, 3].
    """
    valid = (
        isinstance(scales, Sequence)
        and not isinstance(scales, str)
        and len(scales) > 0
        and all(isinstance(scale, numbers.Integral) and not isinstance(scale, bool) and scale >= 1 for scale in scales)
    )
    if not valid:
        msg = (
            f"scales must be a non-empty list of window sizes >= 1 (in patches), got {scales!r}. "
            "WinCLIP: scales=[2, 3]."
        )
        raise ValueError(msg)
    return tuple(int(scale) for scale in scales)


def _encode_name(name: str | None) -> torch.Tensor:
    """UTF-8 bytes of a class name as a uint8 tensor (so it lives in the state dict)."""
    return torch.tensor(list((name or "").encode()), dtype=torch.uint8)


class WinClipPlusModel(NoTiler, WinClipModel):
    """WinCLIP with per-query refinement of its visual reference sets (paper Sec. 5.2).

    Args:
        class_name: Object name of the prompt ensemble (text embeddings are computed once per name).
        reference_images: Pre-processed normal reference images ``(k, 3, H, W)``.
        scales: Window sizes in patches (WinCLIP: ``(2, 3)``).
        apply_transform: Apply open_clip's own transform to inputs (upstream flag; the Lightning
            model pre-processes instead).
        backbone: open_clip model name or model-config JSON path.
        pretrained: open_clip tag, local checkpoint path, or ``None`` (random weights).
        refiner: Cosine :class:`PrototypeRefiner`, or ``None`` for plain WinCLIP.
        coreset_sampling_ratio: Coreset ratio alpha of each reference set before refinement
            (paper: 0.5 MVTec, 0.3 VisA, 0.2 MPDD). Plain WinCLIP keeps the full sets.
        coreset_seed: Seed of the coreset's random start.
        cache_dir: open_clip download cache.

    Example:
        >>> model = WinClipPlusModel(backbone="ViT-B-16-plus-240", pretrained=None)  # doctest: +SKIP
        >>> model.setup("bottle", torch.rand(2, 3, 240, 240))  # doctest: +SKIP
        >>> model(torch.rand(1, 3, 240, 240)).anomaly_map.shape  # doctest: +SKIP
        torch.Size([1, 240, 240])

    """

    def __init__(
        self,
        class_name: str | None = None,
        reference_images: torch.Tensor | None = None,
        scales: Sequence[int] = (2, 3),
        apply_transform: bool = False,
        backbone: str | Path = DEFAULT_BACKBONE,
        pretrained: str | Path | None = DEFAULT_PRETRAINED,
        refiner: PrototypeRefiner | None = None,
        coreset_sampling_ratio: float = 0.5,
        coreset_seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        # Upstream's constructor builds CLIP from module globals (and downloads); skip it and
        # build the same attributes and buffers with the CLIP given by the arguments.
        upstream.init_skipping(WinClipModel, self)
        require_cosine(refiner, "WinClipPlus")  # its scores are cosine distances (paper Eq. 8)
        if not 0 < coreset_sampling_ratio <= 1:
            msg = f"coreset_sampling_ratio must be in (0, 1], got {coreset_sampling_ratio!r}. Paper: 0.5 on MVTec."
            raise ValueError(msg)
        scales = validate_scales(scales)
        self.clip, self._transform, self.backbone = create_clip(backbone, pretrained, cache_dir)
        grid = tuple(self.clip.visual.grid_size)
        if max(scales) > min(grid):
            msg = (
                f"scales {list(scales)} has a window larger than the {grid[0]} x {grid[1]} patch grid of "
                f"{self.backbone}: use smaller windows, e.g. scales=[2, 3]."
            )
            raise ValueError(msg)
        self.pretrained = pretrained
        self.temperature = TEMPERATURE
        self.class_name = class_name
        self.reference_images = reference_images
        self.scales = tuple(scales)
        self.apply_transform = apply_transform
        self.k_shot = 0
        self.refiner = refiner
        self._refinement_stats: dict[str, float] = {}
        self.coreset_sampling_ratio = coreset_sampling_ratio
        self.coreset_seed = coreset_seed

        self.clip.visual.output_tokens = True
        self.grid_size = self.clip.visual.grid_size

        self.register_buffer_list("masks", self._generate_masks(), persistent=False)
        self.register_buffer("_text_embeddings", torch.empty(0))
        self.register_buffer("_text_class_name", torch.empty(0, dtype=torch.uint8))
        self.register_buffer_list("_visual_embeddings", [torch.empty(0) for _ in self.scales])
        self.register_buffer("_patch_embeddings", torch.empty(0))
        self.register_buffer("_patch_bank", torch.empty(0))
        self.register_buffer_list("_window_banks", [torch.empty(0) for _ in self.scales])
        self.setup(class_name, reference_images)

    # ------------------------------------------------------------------ memory
    @property
    def text_class_name(self) -> str | None:
        """The class name the stored text embeddings belong to (``None`` before any)."""
        if self._text_class_name.numel() == 0:
            return None
        return bytes(self._text_class_name.cpu().tolist()).decode()

    @property
    def has_references(self) -> bool:
        """Whether few-shot reference embeddings are stored (also true after loading a state dict)."""
        return self._patch_embeddings.numel() > 0

    @torch.no_grad()
    def _collect_text_embeddings(self, class_name: str) -> None:
        """Encode the prompt ensemble of ``class_name``, unless it is already stored for that name."""
        if self._text_embeddings.numel() and self.text_class_name == class_name:
            return
        super()._collect_text_embeddings(class_name)
        self._text_class_name = _encode_name(class_name).to(self._text_embeddings.device)

    @torch.no_grad()
    def _collect_visual_embeddings(self, images: torch.Tensor) -> None:
        """Embed the reference images, then build the refinement banks (when refining)."""
        super()._collect_visual_embeddings(images)
        self.build_banks()

    def set_scales(self, scales: Sequence[int]) -> None:
        """Change the window sizes (e.g. to a checkpoint's) while keeping the number of scales.

        Raises:
            ValueError: Invalid scales, or another number of scales (the state dict holds one
                reference set per scale: build the model with these scales instead).
        """
        scales = validate_scales(scales)
        if len(scales) != len(self.scales):
            msg = (
                f"scales {list(scales)} has {len(scales)} window sizes but this model was built with "
                f"{len(self.scales)} ({list(self.scales)}): build it with scales={list(scales)}."
            )
            raise ValueError(msg)
        if scales != self.scales:
            device = self.masks[0].device
            self.scales = scales
            self.masks = [mask.to(device) for mask in self._generate_masks()]

    def clear_references(self) -> None:
        """Forget the few-shot reference images, their embeddings and banks (back to zero-shot)."""
        device = self._patch_embeddings.device
        self.reference_images = None
        self.k_shot = 0
        self._patch_embeddings = torch.empty(0, device=device)
        self._visual_embeddings = [torch.empty(0, device=device) for _ in self.scales]
        self.build_banks()

    def build_banks(self) -> None:
        """Set the refinement banks: a coreset of each reference set (patches, then each window scale).

        Without a refiner the banks are cleared: plain WinCLIP scores against the full sets.
        """
        if self.refiner is None or not self.has_references:
            self._patch_bank = torch.empty(0, device=self._patch_embeddings.device)
            self._window_banks = [torch.empty(0, device=self._patch_embeddings.device) for _ in self.scales]
            return
        ratio, seed = self.coreset_sampling_ratio, self.coreset_seed
        self._patch_bank = seeded_coreset(
            self.patch_embeddings.reshape(-1, self.patch_embeddings.shape[-1]), ratio, seed, normalize=True
        )
        self._window_banks = [
            seeded_coreset(reference.reshape(-1, reference.shape[-1]), ratio, seed, normalize=True)
            for reference in self.visual_embeddings
        ]

    # ------------------------------------------------------------------ scoring
    @float32_compute
    def _reference_scores(
        self,
        embeddings: torch.Tensor,
        references: torch.Tensor,
        bank: torch.Tensor,
    ) -> torch.Tensor:
        """Few-shot scores ``(B, m)`` of query embeddings ``(B, m, c)`` against one reference set.

        Refined: ``min_p (1 - cos(f_j, p)) / 2`` over the prototypes refined for this query (paper
        Eq. 8). Plain: upstream's visual association score ``min_r (1 - cos(f_j, r)) / 2`` over
        the full reference set.
        """
        if self.refiner is None:
            return visual_association_score(embeddings, references)
        return self.refiner.patch_scores(embeddings, bank)

    @float32_compute
    def _compute_few_shot_scores(
        self,
        patch_embeddings: torch.Tensor,
        window_embeddings: list[torch.Tensor],
    ) -> torch.Tensor:
        """Multi-scale few-shot score maps ``(B, h, w)``, as upstream, on refined or plain references.

        Patch scores form the finest map, window scores are harmonically aggregated onto the
        patch grid per scale, and the maps of all scales are averaged.
        """
        if self.refiner is not None and self._patch_bank.numel() == 0:
            self.build_banks()
        stats: list[dict[str, float]] = []
        scores = self._reference_scores(patch_embeddings, self.patch_embeddings, self._patch_bank)
        stats.append(self._last_refiner_stats())
        multi_scale_scores = [scores.reshape((-1, *self.grid_size))]
        for window_embedding, references, bank, mask in zip(
            window_embeddings,
            self.visual_embeddings,
            self._window_banks,
            self.masks,
            strict=True,
        ):
            scores = self._reference_scores(window_embedding, references, bank)
            stats.append(self._last_refiner_stats())
            multi_scale_scores.append(harmonic_aggregation(scores, self.grid_size, mask))
        if self.refiner is not None:
            # One log entry per batch for all reference sets: total time, mean of the rest.
            self._refinement_stats = {
                key: sum(s[key] for s in stats) if key == "seconds" else sum(s[key] for s in stats) / len(stats)
                for key in stats[0]
            }
        return torch.stack(multi_scale_scores).mean(dim=0)

    def _last_refiner_stats(self) -> dict[str, float]:
        """Statistics of the refiner's last call (empty without a refiner)."""
        return dict(self.refiner.last_stats) if self.refiner is not None else {}

    @property
    def refinement_stats(self) -> dict[str, float]:
        """Statistics of the last refined batch, over all its reference sets: total time, mean of the rest.

        Empty without a refiner or before the first refined batch.
        """
        return {} if self.refiner is None else dict(self._refinement_stats)

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> InferenceBatch:
        """Image scores and anomaly maps of pre-processed images ``(B, 3, H, W)``.

        Zero-shot: CLIP text scores of the image (``s0``) and of every window. Few-shot (with
        references): the few-shot map joins the zero-shot map (mean), and the image score is
        ``(s0 + max few-shot map) / 2`` (Eq. 9).

        Returns:
            ``InferenceBatch(pred_score (B,), anomaly_map (B, H, W))``.

        """
        image_embeddings, window_embeddings, patch_embeddings = self.encode_image(batch)
        # Under autocast (bf16/fp16 mixed precision) the CLIP encoders return low-precision embeddings:
        # score in the precision of the stored embeddings (float32 unless the whole model was cast).
        dtype = torch.promote_types(image_embeddings.dtype, self._text_embeddings.dtype)
        image_embeddings, patch_embeddings = image_embeddings.to(dtype), patch_embeddings.to(dtype)
        window_embeddings = [window.to(dtype) for window in window_embeddings]
        with autocast_disabled(image_embeddings):
            zero_shot = class_scores(image_embeddings, self.text_embeddings, self.temperature, target_class=1)
            multi_scale_scores = self._compute_zero_shot_scores(zero_shot, window_embeddings)
            image_scores = zero_shot
            if self.has_references:
                few_shot_map = self._compute_few_shot_scores(patch_embeddings, window_embeddings)
                multi_scale_scores = (multi_scale_scores + few_shot_map) / 2
                image_scores = fuse_image_scores(zero_shot, few_shot_map)
            pixel_scores = nn.functional.interpolate(
                multi_scale_scores.unsqueeze(1), size=batch.shape[-2:], mode="bilinear"
            )
        return InferenceBatch(pred_score=image_scores, anomaly_map=pixel_scores.squeeze(1))


#: The open_clip weight resolution moved to :mod:`anomalib_protorefine.clip_weights` (old imports warn).
__getattr__ = moved_names(
    __name__,
    dict.fromkeys(
        ("CHECKPOINT_SUFFIXES", "pretrained_source", "resolve_backbone", "resolve_pretrained"),
        "anomalib_protorefine.clip_weights",
    ),
)
