"""PyTorch model of PatchCore+: anomalib's ``PatchcoreModel`` with test-time prototype refinement.

Pure torch (plus POT inside the refiner), no Lightning logic. Compared with the upstream model:

* patch scores are distances to the prototypes refined for each query (paper Eq. 6/7) when a
  :class:`~anomalib_protorefine.refinement.PrototypeRefiner` is given, and nearest-neighbour
  distances to the bank (plain PatchCore) when ``refiner=None``: one code path for both;
* image score = max patch score (paper Sec. 4.3) for both;
* the map is upsampled **bilinearly** (the paper; upstream uses nearest) and blurred with sigma 4;
* optional "online" mode (paper Table 6): refined prototypes of each query join a bounded extra bank.

Example:
    >>> import torch
    >>> from anomalib_protorefine.models.patchcore_plus.torch_model import PatchCorePlusModel
    >>> model = PatchCorePlusModel(backbone="resnet18", layers=("layer2",), pre_trained=False).eval()
    >>> model.memory_bank = torch.randn(20, 128)
    >>> out = model(torch.rand(1, 3, 64, 64))
    >>> out.anomaly_map.shape
    torch.Size([1, 1, 64, 64])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from torch.nn import functional as F  # noqa: N812

from anomalib_protorefine._deprecation import renamed_names, warn_renamed
from anomalib_protorefine.backbones import build_feature_extractor
from anomalib_protorefine.coreset import seeded_coreset
from anomalib_protorefine.models.torch_common import RefinementStats
from anomalib_protorefine.refinement import PrototypeRefiner
from anomalib_protorefine.refinement.precision import autocast_disabled


class BilinearAnomalyMapGenerator(AnomalyMapGenerator):
    """Upsample patch scores bilinearly (paper Sec. 4.3), then blur with a Gaussian of width ``sigma``.

    Example:
        >>> import torch
        >>> BilinearAnomalyMapGenerator()(torch.rand(2, 1, 8, 8), (32, 32)).shape
        torch.Size([2, 1, 32, 32])
    """

    def compute_anomaly_map(
        self,
        patch_scores: torch.Tensor,
        image_size: tuple[int, int] | torch.Size | None = None,
    ) -> torch.Tensor:
        """Upsample ``(B, 1, h, w)`` scores to ``image_size`` bilinearly and blur them."""
        if image_size is not None:
            patch_scores = F.interpolate(patch_scores, size=tuple(image_size), mode="bilinear", align_corners=False)
        return self.blur(patch_scores)


class PatchCorePlusModel(RefinementStats, PatchcoreModel):
    """PatchCore with per-query prototype refinement.

    Args:
        layers: Backbone layers whose features are concatenated.
        backbone: timm backbone name.
        pre_trained: Load pretrained weights (resolved offline first, see
            :func:`anomalib_protorefine.backbones.build_feature_extractor`).
        weights: Optional local state-dict file for the backbone.
        refiner: The refiner, or ``None`` for plain PatchCore scoring.
        online: Let refined prototypes of each query join an extra bank used for later queries.
        online_capacity: Maximum size of the extra bank (oldest prototypes leave first); ``None``
            means the size of the support bank.
        online_sampling_ratio: Coreset ratio of each query's refined prototypes added online.
    """

    def __init__(
        self,
        layers: Sequence[str] = ("layer2", "layer3"),
        backbone: str = "wide_resnet50_2",
        pre_trained: bool = True,
        weights: str | Path | None = None,
        refiner: PrototypeRefiner | None = None,
        online: bool = False,
        online_capacity: int | None = None,
        online_sampling_ratio: float = 0.05,
    ) -> None:
        # The upstream constructor builds a randomly initialised extractor that is replaced below,
        # so that weights are resolved offline first.
        super().__init__(layers=layers, backbone=backbone, pre_trained=False, num_neighbors=1)
        self.feature_extractor = build_feature_extractor(
            backbone=backbone, layers=layers, pre_trained=pre_trained, weights=weights
        ).eval()
        self.anomaly_map_generator = BilinearAnomalyMapGenerator(sigma=4)
        self.refiner = refiner
        self.online = online
        self.online_capacity = online_capacity
        self.online_sampling_ratio = online_sampling_ratio
        self.online_bank: torch.Tensor
        self.register_buffer("online_bank", torch.empty(0))

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embeddings ``(B, h*w, c)`` of a batch of pre-processed images, and ``(h, w)``.

        With anomalib's tiler set (``model.tiler``, e.g. by its tiler callback) the images are cut into
        tiles, each tile is embedded, and the embeddings are put back together as one map per image, as
        anomalib's ``PatchcoreModel`` does: scoring, refinement and the anomaly map then see the whole image.
        """
        images = images.type(next(self.feature_extractor.parameters()).dtype)  # e.g. a half-precision model
        if self.tiler:
            images = self.tiler.tile(images)
        with torch.no_grad():
            features = self.feature_extractor(images)
        features = {layer: self.feature_pooler(feature) for layer, feature in features.items()}
        embedding = self.generate_embedding(features)
        if self.tiler:
            embedding = self.tiler.untile(embedding)
        batch_size, channels, height, width = embedding.shape
        return embedding.permute(0, 2, 3, 1).reshape(batch_size, height * width, channels), (height, width)

    def reference_bank(self) -> torch.Tensor:
        """The bank queries are refined against and scored on: support coreset plus the online bank."""
        if self.online and self.online_bank.numel():
            return torch.cat((self.memory_bank, self.online_bank.to(self.memory_bank.dtype)))
        return self.memory_bank

    def scoring_bank(self) -> torch.Tensor:
        """Deprecated name of :meth:`reference_bank` (``scoring_bank`` is also a refiner option)."""
        warn_renamed("PatchCorePlusModel.scoring_bank()", "PatchCorePlusModel.reference_bank()")
        return self.reference_bank()

    @contextlib.contextmanager
    def exporting(self, sinkhorn_iterations: int | None = None) -> Iterator[None]:
        """Trace-friendly scoring inside the block (ONNX/OpenVINO export): see :meth:`PrototypeRefiner.exporting`.

        Plain PatchCore (``refiner=None``) is already a static graph; a refiner is switched to a fixed
        number of Sinkhorn iterations per E-step for the current memory bank.

        Args:
            sinkhorn_iterations: Sinkhorn iterations per E-step (``None``: the refiner's default for export).

        Raises:
            ValueError: The memory bank is empty, or ``online=True`` (an exported graph cannot grow a bank).
        """
        if self.memory_bank.numel() == 0:
            msg = (
                "Memory bank is empty: give PatchCorePlus support images before exporting (model.fit_support(images), "
                "a checkpoint with --ckpt_path, or few_shot_source)."
            )
            raise ValueError(msg)
        if self.refiner is None:
            yield
            return
        if self.online:
            msg = (
                "online=True grows the bank with every query, which an exported (static) graph cannot do: export "
                "a model with online=False, or use --export_type torch."
            )
            raise ValueError(msg)
        with self.refiner.exporting(self.reference_bank(), sinkhorn_iterations):
            yield

    def patch_scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, m)`` of query embeddings ``(B, m, c)``: refined, or plain nearest neighbour.

        Autocast (``precision="bf16-mixed"``/``"16-mixed"``) is disabled here: the distances are
        computed in the memory bank's precision (float32 unless the whole model was cast), and an
        embedding that autocast produced in lower precision is upcast to it first.
        """
        dtype = torch.promote_types(embedding.dtype, self.memory_bank.dtype)
        with autocast_disabled(embedding):
            if self.refiner is None:  # plain PatchCore (the online bank only grows with refinement)
                batch_size, num_patches, channels = embedding.shape
                flat = embedding.reshape(-1, channels).to(self.memory_bank.dtype)
                if torch.compiler.is_exporting() or torch.compiler.is_compiling():
                    # anomalib's search chunks on the number of patches (a Python branch): traced, it would pin
                    # the exported graph's batch size; one distance matrix gives the same minima.
                    scores = self.euclidean_dist(flat, self.memory_bank).min(1).values
                else:
                    scores, _ = self.nearest_neighbors(flat, n_neighbors=1)
                return scores.reshape(batch_size, num_patches).to(dtype)
            bank = self.reference_bank()
            result = self.refiner.refine(embedding, bank)
            if self.online:
                self._grow_online_bank(result.prototypes.to(bank.dtype))
            return self.refiner.score_result(result).to(dtype)

    def _grow_online_bank(self, prototypes: torch.Tensor) -> None:
        """Add a coreset of each query's refined prototypes to the bounded online bank."""
        capacity = self.online_capacity if self.online_capacity is not None else self.memory_bank.shape[0]
        if capacity <= 0:
            return
        added = [seeded_coreset(p, self.online_sampling_ratio, seed=0) for p in prototypes]
        bank = torch.cat([self.online_bank.to(prototypes.dtype).reshape(-1, prototypes.shape[-1]), *added])
        self.online_bank = bank[-capacity:].detach().clone()

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training: store embeddings. Inference: scores and bilinear, blurred anomaly maps.

        Args:
            input_tensor: Pre-processed images ``(B, 3, H, W)``.

        Returns:
            Embeddings in training mode, else ``InferenceBatch(pred_score, anomaly_map)``.
        """
        output_size = input_tensor.shape[-2:]
        embedding, (height, width) = self.embed(input_tensor)
        if self.training:
            flat = embedding.reshape(-1, embedding.shape[-1])
            self.embedding_store.append(flat)
            return flat
        return self.score_embedding(embedding, (height, width), output_size)

    def score_embedding(
        self, embedding: torch.Tensor, grid: tuple[int, int], output_size: tuple[int, int] | torch.Size
    ) -> InferenceBatch:
        """Image scores and anomaly maps of patch embeddings ``(B, h*w, c)`` (the inference half of ``forward``).

        ``forward`` is ``embed`` followed by this, so a caller that caches embeddings (the few-shot
        benchmark) gets exactly the model's outputs.

        Args:
            embedding: Patch embeddings of pre-processed images, as returned by :meth:`embed`.
            grid: The patch grid ``(h, w)``.
            output_size: The size ``(H, W)`` of the pre-processed images (the map's size).

        Returns:
            ``InferenceBatch(pred_score, anomaly_map)``.
        """
        if self.memory_bank.size(0) == 0:
            msg = (
                "Memory bank is empty: give PatchCorePlus support images first (k_shot with a datamodule, "
                "model.fit_support(images), Engine.fit, or a checkpoint)."
            )
            raise ValueError(msg)
        return self.outputs_from_patch_scores(self.patch_scores(embedding), grid, output_size)

    def outputs_from_patch_scores(
        self, patch_scores: torch.Tensor, grid: tuple[int, int], output_size: tuple[int, int] | torch.Size
    ) -> InferenceBatch:
        """Image scores (max patch score) and anomaly maps (bilinear, blurred) of patch scores ``(B, h*w)``.

        Example:
            >>> model = PatchCorePlusModel(backbone="resnet18", layers=("layer2",), pre_trained=False)
            >>> model.outputs_from_patch_scores(torch.rand(2, 16), (4, 4), (32, 32)).anomaly_map.shape
            torch.Size([2, 1, 32, 32])
        """
        height, width = grid
        with autocast_disabled(patch_scores):  # keep the map (interpolation, blur) in the scores' precision
            pred_score = patch_scores.amax(1)
            anomaly_map = self.anomaly_map_generator(patch_scores.reshape(-1, 1, height, width), output_size)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def subsample_embedding(self, sampling_ratio: float, seed: int = 0) -> None:  # type: ignore[override]
        """Full-shot mode: build the bank from the embeddings collected in training (seeded coreset)."""
        if not self.embedding_store:
            msg = "Embedding store is empty: run a training epoch (Engine.fit) before building the bank."
            raise ValueError(msg)
        embeddings = torch.vstack(self.embedding_store)
        self.embedding_store.clear()
        self.build_bank(embeddings, sampling_ratio, seed)

    def build_bank(
        self, embeddings: torch.Tensor, sampling_ratio: float, seed: int = 0, size: int | None = None
    ) -> None:
        """Set the memory bank to a coreset of ``embeddings`` ``(N, c)`` (resets the online bank).

        The greedy coreset is seeded with ``seed`` (see :func:`anomalib_protorefine.coreset.seeded_coreset`);
        ``size`` keeps that many rows instead of the ratio's.
        """
        self.memory_bank = seeded_coreset(embeddings, sampling_ratio, seed, size=size)
        self.online_bank = torch.empty(0, device=self.memory_bank.device)


#: Old public names of this module's classes (old -> new), still served with a ``FutureWarning`` here and
#: wherever the classes are re-exported.
RENAMED = {"PatchcorePlusModel": "PatchCorePlusModel"}

__getattr__ = renamed_names(__name__, RENAMED, globals())
