"""Test features computed once per (dataset, backbone, layers, image size, weights) and kept on disk.

Every feature-based method and every (k, seed) of a run scores the same test embeddings, so the
backbone runs once per dataset: the cache file's name is a hash of everything that determines
the embeddings (the datamodule config, the test images, the backbone and its weights, the
layers, the pre-processing), so a change of any of them computes new features, never stale ones.

Example:
    >>> key = feature_key({"class_path": "Folder"}, ["a.png"], {"backbone": "resnet18"}, None)
    >>> len(key)
    16
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from anomalib.data import AnomalibDataModule, get_datamodule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Subset

from anomalib_protorefine.models import AnomalyDINOPlus, PatchCorePlus

logger = logging.getLogger(__name__)

#: Bumped when the cached content changes.
CACHE_VERSION = 1


@dataclass
class CachedTestSet:
    """Cached test data of one dataset: what every feature-based method scores.

    Attributes:
        embeddings: Patch embeddings ``(N, h*w, c)``.
        grid: The patch grid ``(h, w)``.
        image_size: The pre-processed image size ``(H, W)`` (the maps' size).
        labels: Image labels ``(N,)`` (1 = anomalous).
        masks: Ground-truth masks ``(N, H, W)`` at the pre-processed size, boolean.
        paths: Image files, in test order.
        backbone_ms: Backbone time per image (pre-processing + features) when the cache was built.
    """

    embeddings: torch.Tensor
    grid: tuple[int, int]
    image_size: tuple[int, int]
    labels: torch.Tensor
    masks: torch.Tensor
    paths: list[str]
    backbone_ms: float


def make_datamodule(config: dict[str, Any]) -> AnomalibDataModule:
    """Build and set up the anomalib datamodule of ``config`` (downloading a public data set if it is missing).

    Data loading runs in the main process unless ``init_args.num_workers`` says otherwise.
    """
    config = json.loads(json.dumps(config))
    config.setdefault("init_args", {}).setdefault("num_workers", 0)
    datamodule = get_datamodule(config)
    datamodule.prepare_data()
    # A Trainer stage marks the datamodule as set up, so that Engine/Lightning do not build the
    # subsets again (that would undo the benchmark's cut to the k support and the scored test images).
    datamodule.setup(TrainerFn.FITTING)
    return datamodule


def scored_indices(size: int, max_images: int | None) -> list[int]:
    """The test images a run scores, in the order it scores them: a seeded (1234) shuffle, cut to ``max_images``.

    The order matters to order-dependent methods only (Online PatchCore+, whose extra bank grows with
    every query): anomalib's ``Folder`` lists all defective test images first, an order that would
    favour them, so every method scores the same seeded random order (threshold-free metrics and
    per-query refinement do not depend on it).

    Example:
        >>> sorted(scored_indices(5, None)) == list(range(5)), len(scored_indices(5, 3))
        (True, 3)
    """
    order = torch.randperm(size, generator=torch.Generator().manual_seed(1234)).tolist()
    return order if max_images is None else order[:max_images]


def feature_key(data_config: dict[str, Any], paths: list[str], model_args: dict[str, Any], weights: Any) -> str:
    """Hash of everything that determines the test embeddings."""
    payload = json.dumps([CACHE_VERSION, data_config, paths, model_args, str(weights)], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def feature_model_args(init_args: dict[str, Any], model: type) -> dict[str, Any]:
    """The arguments that change test features: the model, its ``feature_arguments``, the image size and tiling.

    Example:
        >>> from anomalib_protorefine.models import AnomalyDINOPlus
        >>> feature_model_args({"encoder_name": "vit_small_patch14_dinov2", "refiner": "fused"}, AnomalyDINOPlus)
        {'model': 'AnomalyDINOPlus', 'encoder_name': 'vit_small_patch14_dinov2'}
    """
    names = (*model.feature_arguments, "image_size", "tiling")
    return {"model": model.__name__, **{name: init_args[name] for name in names if name in init_args}}


def _read_cache(path: Path) -> CachedTestSet | None:
    """The cached test set in ``path``; ``None`` (file deleted, a warning naming it) when it cannot be read.

    A run killed while writing leaves a truncated file; reading it would fail the same way on every
    re-run, so it is discarded and the features are computed again.
    """
    try:
        return CachedTestSet(**torch.load(path, weights_only=False))
    except Exception as error:  # truncated or foreign file: any unpickling or field error
        logger.warning(
            "discarding unreadable feature cache %s (%s: %s); recomputing", path, type(error).__name__, error
        )
        path.unlink(missing_ok=True)
        return None


def load_test_features(
    model: PatchCorePlus | AnomalyDINOPlus,
    datamodule: AnomalibDataModule,
    data_config: dict[str, Any],
    model_args: dict[str, Any],
    cache_dir: Path,
    max_images: int | None,
) -> CachedTestSet:
    """The test features of ``datamodule`` under ``model``'s backbone: from the cache, or computed and cached.

    Args:
        model: A PatchCorePlus or AnomalyDINOPlus whose encoder and pre-processor define the features.
        datamodule: The set-up datamodule.
        data_config: Its config (part of the cache key).
        model_args: The feature-defining model arguments (part of the cache key).
        cache_dir: Folder of the cache files.
        max_images: Score a seeded subset of this many test images (``None``: all).

    Returns:
        The test features.
    """
    test = datamodule.test_data
    indices = scored_indices(len(test), max_images)
    paths = [str(test.samples.image_path.iloc[i]) for i in indices]
    path = cache_dir / f"features-{feature_key(data_config, paths, model_args, model.hparams.get('weights'))}.pt"
    if path.exists():
        cached = _read_cache(path)
        if cached is not None:
            return cached
    batch_size = getattr(datamodule, "eval_batch_size", 32)
    loader = DataLoader(Subset(test, indices), batch_size=batch_size, collate_fn=test.collate_fn)
    transform = model.pre_processor.transform
    embeddings, labels, masks = [], [], []
    grid = image_size = None
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for batch in loader:
            if batch.gt_mask is None:  # no masks (image labels only): all-normal pixels
                images = transform(batch.image)
                gt_masks = torch.zeros(len(images), *images.shape[-2:])
            else:
                images, gt_masks = transform(batch.image, batch.gt_mask)
            embedding, grid = model.model.embed(images.to(model.device))
            embeddings.append(embedding.cpu())
            labels.append(batch.gt_label.int())
            image_size = tuple(images.shape[-2:])
            masks.append(gt_masks.reshape(len(images), *image_size).bool())
    seconds = time.perf_counter() - start
    features = CachedTestSet(
        embeddings=torch.cat(embeddings),
        grid=tuple(grid),
        image_size=image_size,
        labels=torch.cat(labels),
        masks=torch.cat(masks),
        paths=paths,
        backbone_ms=1000 * seconds / len(paths),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(features.__dict__, partial)
    partial.replace(path)  # atomic: a stopped run never leaves a truncated cache under the final name
    logger.info("cached %d test features in %s (%.0f s)", len(paths), path, seconds)
    return features
