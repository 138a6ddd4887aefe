"""PyTorch model of AnomalyDINO+: anomalib's ``AnomalyDINOModel`` with test-time prototype refinement.

Pure torch (plus POT inside the refiner), no Lightning logic. Compared with the upstream model:

* the encoder's weights are resolved like the package's other backbones
  (:func:`~anomalib_protorefine.backbones.build_vit_extractor`: ``weights=`` file, then the hub,
  or random with ``pre_trained=False``) instead of always asking the hub;
* with a cosine :class:`~anomalib_protorefine.refinement.PrototypeRefiner`, a patch's distance is
  measured to the prototypes refined for its image (``1 - cos``, AnomalyDINO's unit); with
  ``refiner=None`` the very same code computes anomalib's k-NN cosine distances;
* ``forward`` is :meth:`embed` followed by :meth:`score_embedding`, so cached embeddings (the
  few-shot benchmark) score exactly like images;
* the bank of a few-shot support set is built with a seeded coreset (:meth:`build_bank`).

Scoring (mean of the top 1 % patch distances), PCA masking, the centre crop to a multiple of the
patch size and the anomaly map (anomalib's ``AnomalyMapGenerator``: nearest upsampling and a
Gaussian blur, sigma 4) are anomalib's.

Example:
    >>> import torch
    >>> model = AnomalyDINOPlusModel(pre_trained=False).eval()
    >>> model.memory_bank = torch.nn.functional.normalize(torch.randn(20, 384), dim=1)
    >>> out = model(torch.rand(1, 3, 56, 56))
    >>> out.pred_score.shape, out.anomaly_map.shape
    (torch.Size([1, 1]), torch.Size([1, 1, 56, 56]))
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from anomalib.models.image.anomaly_dino.torch_model import AnomalyDINOModel
from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator
from torch.nn import functional as F  # noqa: N812

from anomalib_protorefine import upstream
from anomalib_protorefine.backbones import build_vit_extractor
from anomalib_protorefine.coreset import seeded_coreset
from anomalib_protorefine.models.tiling import NoTiler
from anomalib_protorefine.models.torch_common import RefinementStats, require_cosine
from anomalib_protorefine.refinement import PrototypeRefiner
from anomalib_protorefine.refinement.precision import autocast_disabled

#: anomalib's default encoder (DINOv2 ViT-S/14).
DEFAULT_ENCODER = "vit_small_patch14_dinov2"


def validate_dino_options(encoder_name: str, num_neighbours: int, refiner: PrototypeRefiner | None) -> None:
    """Raise an error naming the option unless the encoder, ``num_neighbours`` and the refiner fit together.

    Example:
        >>> validate_dino_options("vit_small_patch14_dinov2", 0, None)
        Traceback (most recent call last):
        ...
        ValueError: num_neighbours must be an integer >= 1, got 0. Use e.g. num_neighbours=1 (AnomalyDINO's default).
    """
    if not isinstance(encoder_name, str) or "dino" not in encoder_name:
        msg = (
            f"encoder_name must be a timm DINO ViT name (containing 'dino'), got {encoder_name!r}. "
            f"Use e.g. encoder_name={DEFAULT_ENCODER!r}."
        )
        raise ValueError(msg)
    if isinstance(num_neighbours, bool) or not isinstance(num_neighbours, numbers.Integral) or num_neighbours < 1:
        msg = (
            f"num_neighbours must be an integer >= 1, got {num_neighbours!r}. "
            "Use e.g. num_neighbours=1 (AnomalyDINO's default)."
        )
        raise ValueError(msg)
    if refiner is None:
        return
    require_cosine(refiner, "AnomalyDINOPlus")
    if num_neighbours != 1:
        msg = (
            f"num_neighbours={num_neighbours} averages the k nearest bank patches, which the refined scoring (nearest "
            "refined prototype) does not do: use num_neighbours=1 with a refiner, or refiner=False for k-NN scoring."
        )
        raise ValueError(msg)


class AnomalyDINOPlusModel(RefinementStats, NoTiler, AnomalyDINOModel):
    """AnomalyDINO with per-query prototype refinement of its DINOv2 patch bank.

    Args:
        num_neighbours: Nearest bank patches averaged per patch (plain scoring only; anomalib: 1).
        encoder_name: timm DINO ViT name (anomalib: ``"vit_small_patch14_dinov2"``).
        masking: Score foreground patches only (anomalib's PCA masking).
        coreset_subsampling: Reduce the bank with a seeded greedy coreset.
        sampling_ratio: Coreset ratio when ``coreset_subsampling``.
        pre_trained: Load pretrained encoder weights (``weights=`` file first, then the hub).
        weights: Local state-dict file of the full timm encoder.
        refiner: A cosine refiner, or ``None`` for anomalib's k-NN scoring.
    """

    def __init__(
        self,
        num_neighbours: int = 1,
        encoder_name: str = DEFAULT_ENCODER,
        masking: bool = False,
        coreset_subsampling: bool = False,
        sampling_ratio: float = 0.1,
        pre_trained: bool = True,
        weights: str | Path | None = None,
        refiner: PrototypeRefiner | None = None,
    ) -> None:
        validate_dino_options(encoder_name, num_neighbours, refiner)
        # anomalib's constructor always downloads the encoder from the hub; the same attributes are set
        # here with the encoder built offline-first, so nn.Module's constructor runs instead of it.
        upstream.init_skipping(AnomalyDINOModel, self)
        self.num_neighbours = int(num_neighbours)  # a numpy integer stored as a plain int
        self.encoder_name = encoder_name
        self.masking = masking
        self.coreset_subsampling = coreset_subsampling
        self.sampling_ratio = sampling_ratio
        self.last_layer = f"blocks.{self._last_block_index(encoder_name)}"
        self.feature_encoder = build_vit_extractor(encoder_name, self.last_layer, pre_trained, weights)
        self.patch_size = self.feature_encoder.patch_size
        self.register_buffer("memory_bank", torch.empty(0))
        self.embedding_store: list[torch.Tensor] = []
        self.anomaly_map_generator = AnomalyMapGenerator()
        self.refiner = refiner

    # ------------------------------------------------------------------ features
    def _crop(self, size: tuple[int, int] | torch.Size) -> tuple[int, int, int, int]:
        """Rows and columns ``(top, bottom, left, right)`` that anomalib's centre crop removes from ``size``."""
        height, width = int(size[0]), int(size[1])
        crop_h, crop_w = height % self.patch_size, width % self.patch_size
        return crop_h // 2, crop_h - crop_h // 2, crop_w // 2, crop_w - crop_w // 2

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Last-block patch tokens ``(B, h*w, c)`` of pre-processed images and their grid ``(h, w)``.

        The images are centre-cropped to a multiple of the patch size first, as anomalib does.

        Example:
            >>> model = AnomalyDINOPlusModel(pre_trained=False)
            >>> tokens, grid = model.embed(torch.rand(2, 3, 60, 60))
            >>> tokens.shape, grid
            (torch.Size([2, 16, 384]), (4, 4))
        """
        images = images.type(self.memory_bank.dtype)  # anomalib: the input in the model's precision
        top, bottom, left, right = self._crop(images.shape[-2:])
        height, width = images.shape[-2:]
        images = images[:, :, top : height - bottom, left : width - right]
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        with torch.no_grad():
            return self.extract_features(images), grid

    def foreground(self, embedding: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patches that count, ``(B, h*w)`` bool: anomalib's PCA masks with ``masking``, else all."""
        if not self.masking:
            return torch.ones(embedding.shape[:2], dtype=torch.bool, device=embedding.device)
        masks = self.compute_background_masks(embedding.detach().float().cpu().numpy(), grid)
        return torch.from_numpy(masks).to(embedding.device)

    def support_features(self, embedding: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The bank rows of support embeddings ``(k, h*w, c)``: foreground patches, L2-normalised, ``(n, c)``."""
        return F.normalize(embedding[self.foreground(embedding, grid)], p=2, dim=1)

    def build_bank(self, features: torch.Tensor, seed: int = 0) -> None:
        """Set the memory bank to ``features`` ``(n, c)`` (a seeded coreset of them with ``coreset_subsampling``)."""
        if features.shape[0] == 0:
            msg = (
                "masking=True kept no patch of the support images (PCA masking found no foreground), so the bank "
                "would be empty: use masking=False for this product, or support images whose object stands out."
            )
            raise ValueError(msg)
        if self.coreset_subsampling:
            features = seeded_coreset(features, self.sampling_ratio, seed)
        self.memory_bank = features.detach().clone()
        if self.refiner is None and self.num_neighbours > features.shape[0]:
            # k-NN scoring averages min(num_neighbours, bank size) patches: say so rather than cap in silence.
            msg = (
                f"num_neighbours={self.num_neighbours} exceeds the memory bank's {features.shape[0]} patches: each "
                f"patch is scored by the mean distance to all {features.shape[0]} of them. Lower num_neighbours "
                "(AnomalyDINO's default: 1), or give more support images (k_shot) or a larger coreset (sampling_ratio)."
            )
            warnings.warn(msg, UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ scoring
    def _distances(self, queries: torch.Tensor) -> torch.Tensor:
        """Distances ``1 - cos`` in ``[0, 2]`` of normalised queries ``(B, m, c)`` to the bank (refined or k-NN)."""
        bank = self.memory_bank
        if self.refiner is not None:
            return 2.0 * self.refiner.patch_scores(queries, bank)  # the refiner's (1 - cos) / 2
        similarity = torch.matmul(queries.to(bank.dtype), bank.T)
        distances = (1.0 - similarity).clamp(min=0.0, max=2.0)
        k = min(self.num_neighbours, bank.shape[0])
        nearest, _ = torch.topk(distances, k=k, dim=-1, largest=False)
        return nearest.mean(-1) if k > 1 else nearest.squeeze(-1)

    def patch_scores(self, embedding: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Distances ``(B, h*w)`` of the patch tokens ``(B, h*w, c)``; background patches (``masking``) score 0.

        Autocast is disabled here, so the distances and the refinement run in the bank's precision.
        """
        # Under autocast (bf16-mixed) the tokens may come in lower precision: distances in the bank's precision.
        dtype = torch.promote_types(embedding.dtype, self.memory_bank.dtype)
        with autocast_disabled(embedding):
            queries = F.normalize(embedding.to(dtype), p=2, dim=-1)
            if not self.masking:
                return self._distances(queries)
            masks = self.foreground(embedding, grid)
            scores = torch.zeros(masks.shape, dtype=self.memory_bank.dtype, device=embedding.device)
            for index in range(len(queries)):  # each image refines its own foreground patches
                if masks[index].any():
                    scores[index, masks[index]] = self._distances(queries[index, masks[index]][None])[0].to(
                        scores.dtype
                    )
            return scores

    def score_embedding(
        self, embedding: torch.Tensor, grid: tuple[int, int], output_size: tuple[int, int] | torch.Size
    ) -> InferenceBatch:
        """Image scores ``(B, 1)`` (mean of the top 1 % patch scores) and maps of patch tokens from :meth:`embed`.

        Args:
            embedding: Patch tokens ``(B, h*w, c)``.
            grid: The patch grid ``(h, w)``.
            output_size: The size ``(H, W)`` of the pre-processed images (the map's size, crop included).

        Returns:
            ``InferenceBatch(pred_score, anomaly_map)``.
        """
        if self.memory_bank.numel() == 0:
            msg = (
                "Memory bank is empty: give AnomalyDINOPlus support images first (k_shot with a datamodule, "
                "model.fit_support(images), Engine.fit, or a checkpoint)."
            )
            raise RuntimeError(msg)
        distances = self.patch_scores(embedding, grid)
        top, bottom, left, right = self._crop(output_size)
        cropped = (int(output_size[0]) - top - bottom, int(output_size[1]) - left - right)
        with autocast_disabled(distances):
            image_score = self.mean_top1p(distances)
            anomaly_map = self.anomaly_map_generator(distances.reshape(-1, 1, *grid), cropped)
            if top or bottom or left or right:
                anomaly_map = F.pad(anomaly_map, (left, right, top, bottom), mode="replicate")
        return InferenceBatch(pred_score=image_score, anomaly_map=anomaly_map)

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training: collect the normalised foreground tokens. Inference: scores and anomaly maps.

        Args:
            input_tensor: Pre-processed images ``(B, 3, H, W)``.

        Returns:
            A dummy loss in training mode (as anomalib), else ``InferenceBatch(pred_score, anomaly_map)``.
        """
        embedding, grid = self.embed(input_tensor)
        if self.training:
            self.embedding_store.append(self.support_features(embedding, grid))
            return torch.tensor(0.0, device=input_tensor.device, requires_grad=True)
        return self.score_embedding(embedding, grid, input_tensor.shape[-2:])

    # ------------------------------------------------------------------ export
    @contextlib.contextmanager
    def exporting(self, sinkhorn_iterations: int | None = None) -> Iterator[None]:
        """Trace-friendly scoring inside the block (ONNX/OpenVINO export).

        Raises:
            ValueError: The memory bank is empty, or ``masking=True`` (its PCA runs in scikit-learn,
                outside any graph).
        """
        if self.memory_bank.numel() == 0:
            msg = (
                "Memory bank is empty: give AnomalyDINOPlus support images before exporting "
                "(model.fit_support(images), "
                "a checkpoint with --ckpt_path, or few_shot_source)."
            )
            raise ValueError(msg)
        if self.masking:
            msg = (
                "masking=True computes its foreground masks with scikit-learn's PCA, which no exported graph holds: "
                "export a model with masking=False, or use --export_type torch."
            )
            raise ValueError(msg)
        if self.refiner is None:
            yield
            return
        with self.refiner.exporting(self.memory_bank, sinkhorn_iterations):
            yield
