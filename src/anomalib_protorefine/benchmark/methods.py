"""How the benchmark runs one method on one (dataset, k, seed) cell, and the metrics it reports.

Two paths, one metric set (:mod:`~anomalib_protorefine.benchmark.metrics`: anomalib's metrics on raw
scores, scaled by the whole test set's range, no thresholds):

* **cached features** (PatchCorePlus in any setting, the FastRecon-style baseline, and
  AnomalyDINOPlus, whose ``refiner: off`` is anomalib's AnomalyDINO): the model draws its support
  images from the datamodule's training set exactly as in ``anomalib test``
  (``prepare_support``), then scores the cached test embeddings with the model's own inference code
  (``model.model.score_embedding``), batch by batch in test order;
* **Engine** (any other anomalib model, e.g. AnomalyDINO, WinClip, WinClipPlus): the datamodule's
  training set is cut down to the same k support images and anomalib's ``Engine`` fits and tests
  the model (its own features, not cached).

Example:
    >>> fastrecon_patch_scores(torch.zeros(1, 2, 4), torch.ones(3, 4)).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from anomalib.callbacks import TilerConfigurationCallback
from anomalib.data import AnomalibDataModule
from anomalib.data.utils.tiler import Tiler
from anomalib.engine import Engine
from anomalib.metrics import Evaluator
from anomalib.models import get_model

from anomalib_protorefine import upstream
from anomalib_protorefine.few_shot import drawn_support_paths, load_images
from anomalib_protorefine.models.base import FewShotModel
from anomalib_protorefine.thresholds import SupportThresholds

from .config import BenchmarkPlan, MethodSpec
from .decision import best_balanced_accuracy, decision_values
from .features import CachedTestSet, scored_indices
from .line import LineSimulation, line_values
from .metrics import benchmark_metrics
from .resources import peak_memory
from .rules import DecisionRules, rule_values

#: FastRecon-style options (everything else is a PatchCorePlus argument).
FASTRECON_OPTIONS = ("lambda_", "ridge")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- models
@contextlib.contextmanager
def same_initialisation() -> Iterator[None]:
    """Construct models from a fixed torch seed (global RNG restored after).

    Pretrained backbones do not care; randomly initialised ones (``pre_trained=False``, tests) are
    then identical in every method and process, so cached test features and each method's support
    features come from the same network.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


#: Method arguments that are the benchmark's, not the model constructor's.
BENCHMARK_ARGUMENTS = ("image_size", "tiling", *FASTRECON_OPTIONS)


def model_arguments(model: type, init_args: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of a method's few-shot model: ``image_size`` becomes the model's pre-processor.

    ``tiling`` is the benchmark's, not the constructor's: :func:`build_feature_model` sets anomalib's tiler from it.
    """
    args = {key: value for key, value in init_args.items() if key not in BENCHMARK_ARGUMENTS}
    image_size = init_args.get("image_size")
    size = tuple(image_size) if isinstance(image_size, list | tuple) else image_size and (image_size, image_size)
    args["pre_processor"] = model.pre_processor_for(size, args)
    return args


def build_feature_model(method: MethodSpec, k: int, seed: int, device: torch.device) -> Any:
    """The model of a cached-feature method for a (k, seed) cell (FastRecon: its bank), no Lightning parts."""
    model_class = method.model_class
    args = model_arguments(model_class, method.init_args)
    if method.is_fastrecon:
        args["refiner"] = False
    with same_initialisation():
        model = model_class(
            **args, k_shot=k, few_shot_seed=seed, post_processor=False, evaluator=False, visualizer=False
        )
    if method.init_args.get("tiling"):
        model.model.tiler = Tiler(**method.init_args["tiling"])  # what anomalib's tiler callback sets
    return model.to(device).eval()


def fastrecon_patch_scores(
    embedding: torch.Tensor, bank: torch.Tensor, lambda_: float = 1.0, ridge: float = 1e-3
) -> torch.Tensor:
    """FastRecon-style scores (Fang et al., ICCV 2023): distance of each patch to its regularised reconstruction.

    Each query patch ``f`` is reconstructed from the bank ``M`` by ridge regression pulled toward the
    support mean ``mu``: ``W = argmin ||f - W M||^2 + lambda ||W M - mu||^2 + delta ||W||^2`` (closed
    form, ``delta = ridge * trace(M M^T) / n``); the score is ``||f - W M||``.

    Args:
        embedding: Query patches ``(B, m, c)``.
        bank: Support bank ``(n, c)``.
        lambda_: Weight of the pull toward the support mean.
        ridge: Ridge weight relative to the mean squared bank norm.

    Returns:
        Patch scores ``(B, m)``.

    Example:
        >>> bank = torch.randn(30, 8)
        >>> fastrecon_patch_scores(bank[None, :5], bank, lambda_=0.0, ridge=1e-9).abs().max() < 1e-3
        tensor(True)
    """
    bank = bank.float()
    queries = embedding.float()
    gram = bank @ bank.T
    delta = ridge * gram.diagonal().mean()
    system = (1 + lambda_) * gram + delta * torch.eye(len(bank), dtype=bank.dtype, device=bank.device)
    target = queries + lambda_ * bank.mean(0)
    weights = torch.linalg.solve(system, (target @ bank.T).transpose(1, 2)).transpose(1, 2)
    return (queries - weights @ bank).norm(dim=-1)


def _score_batch(model: FewShotModel, method: MethodSpec, chunk: torch.Tensor, test: CachedTestSet) -> Any:
    """``pred_score`` and ``anomaly_map`` of a batch of cached embeddings, as the model's forward computes them."""
    if not method.is_fastrecon:
        return model.model.score_embedding(chunk, test.grid, test.image_size)
    options = {key: method.init_args[key] for key in FASTRECON_OPTIONS if key in method.init_args}
    patch = fastrecon_patch_scores(chunk, model.model.memory_bank, **options)
    return model.model.outputs_from_patch_scores(patch, test.grid, test.image_size)


@dataclass
class ScoredTestSet:
    """A method's outputs on the cached test set, in test order.

    Attributes:
        scores: Image scores ``(N,)``.
        maps: Anomaly maps ``(N, H, W)``.
        seconds: Scoring time (all batches).
        memory: Peak memory of the first batch (``peak_mb``), when measured.
    """

    scores: torch.Tensor
    maps: torch.Tensor
    seconds: float
    memory: dict[str, float]


def score_test_set(
    model: FewShotModel,
    method: MethodSpec,
    test: CachedTestSet,
    device: torch.device,
    batch_size: int,
) -> ScoredTestSet:
    """Score the cached test embeddings batch by batch, as the model's forward does, timing the scoring."""
    memory: dict[str, float] = {}
    seconds = 0.0
    scores, maps = [], []
    with torch.inference_mode():
        for index, chunk in enumerate(test.embeddings.split(batch_size)):
            chunk = chunk.to(device)
            start = time.perf_counter()
            with peak_memory(device, memory) if index == 0 else contextlib.nullcontext():
                output = _score_batch(model, method, chunk, test)
                _sync(device)
            seconds += time.perf_counter() - start
            scores.append(output.pred_score.reshape(-1).cpu())
            maps.append(output.anomaly_map.squeeze(1).cpu())
    return ScoredTestSet(torch.cat(scores), torch.cat(maps), seconds, memory)


def run_cached(
    method: MethodSpec,
    datamodule: AnomalibDataModule,
    test: CachedTestSet,
    k: int,
    seed: int,
    device: torch.device,
    batch_size: int,
    rules: DecisionRules | None = None,
    line: LineSimulation | None = None,
) -> dict[str, float]:
    """Metrics, decisions, time and memory of a feature-based method on one cell, from the cached test features.

    With ``rules``, the decisions of other support-threshold rules too (:mod:`.rules`); with ``line``,
    the line simulation (:mod:`.line`).
    """
    model = build_feature_model(method, k, seed, device)
    start = time.perf_counter()
    model.prepare_support(datamodule)
    support_seconds = time.perf_counter() - start
    scored = score_test_set(model, method, test, device, batch_size)
    has_masks = bool(test.masks.any())
    metrics = [metric for metric in benchmark_metrics() if has_masks or not metric.name.startswith("pixel_")]
    batch = SimpleNamespace(pred_score=scored.scores, anomaly_map=scored.maps, gt_label=test.labels, gt_mask=test.masks)
    for metric in metrics:
        metric.update(batch)
    values = {metric.name: float(metric.compute()) for metric in metrics}
    if not method.is_fastrecon:  # the support thresholds are in the model's own score units
        values |= decisions(model, scored, test)
        if rules is not None:
            values |= rule_values(model, scored, test, rules)
    if line is not None:
        thresholds = getattr(model, "support_thresholds", None)
        support = thresholds.image_threshold if thresholds is not None else None
        values |= line_values(scored, test, line, seed, support)
    calibration = getattr(model, "calibration", None)
    if calibration is not None:  # refiner="auto": which candidate the support images chose
        values["auto_refined"] = float(calibration.choice != "off")
    head_ms = 1000 * scored.seconds / len(test.paths)
    values |= {
        "head_ms": head_ms,
        "backbone_ms": test.backbone_ms,
        "time_ms": test.backbone_ms + head_ms,
        "support_s": support_seconds,
        "peak_mb": scored.memory.get("peak_mb", float("nan")),
        "bank_size": float(model.model.memory_bank.shape[0]),
    }
    return values


def decisions(
    model: FewShotModel,
    scored: ScoredTestSet,
    test: CachedTestSet,
    thresholds: SupportThresholds | None = None,
) -> dict[str, float]:
    """Decision metrics of a cell: at the support thresholds, the oracle, and anomalib's normal-only fallback.

    The fallback is what anomalib's F1-adaptive threshold gives on a validation set without defects:
    the highest normal score, here that of the support images themselves against the full bank.

    Args:
        model: The cell's model, support data built.
        scored: Its outputs on the test set.
        test: The test set.
        thresholds: Support thresholds to judge (default: the model's own).
    """
    scores, maps = scored.scores, scored.maps
    values = {"oracle_image_BAcc": best_balanced_accuracy(scores, test.labels)}
    masks = test.masks if bool(test.masks.any()) else None
    thresholds = thresholds if thresholds is not None else model.support_thresholds
    if thresholds is not None:
        values |= decision_values(
            scores, test.labels, maps, masks, thresholds.image_threshold, thresholds.pixel_threshold, "support_"
        )
    transform = model.pre_processor.transform if model.pre_processor is not None else None
    support = load_images(model.support_paths, transform)
    with model.calibration_scoring():
        own = model.model(support.to(model.device))
    values |= decision_values(
        scores, test.labels, maps, masks, float(own.pred_score.max()), float(own.anomaly_map.max()), "fallback_"
    )
    return values


def support_paths(datamodule: AnomalibDataModule, k: int, seed: int) -> list[str]:
    """The k support images of a cell: the draw :class:`PatchCorePlus` makes from the same training set."""
    return list(drawn_support_paths(datamodule.train_data, k, seed))


def build_engine_model(method: MethodSpec) -> Any:
    """An anomalib model of ``method`` with the benchmark's evaluator and no post-processing or visualiser."""
    name = method.class_path.rsplit(".", 1)[-1]
    evaluator = Evaluator(test_metrics=benchmark_metrics(), compute_on_cpu=True)
    with same_initialisation():
        return get_model(name, **method.init_args, post_processor=False, evaluator=evaluator, visualizer=False)


def run_engine(
    method: MethodSpec,
    datamodule: AnomalibDataModule,
    plan: BenchmarkPlan,
    k: int,
    seed: int,
) -> dict[str, float]:
    """Metrics, time and memory of any anomalib model on one cell: fit on the k support images, test with Engine.

    The training set is cut down to the draw of :func:`support_paths` (this package's few-shot
    models get ``k_shot`` and ``few_shot_seed`` and draw the same images themselves); the test set
    to the run's scored subset.
    """
    test = datamodule.test_data
    indices = scored_indices(len(test), plan.max_test_images)
    upstream.replace_samples(test, test.samples.iloc[indices].reset_index(drop=True))
    if upstream.validation_data_of(datamodule) is None:
        # anomalib's Engine validates few-shot models before testing: give it the test set (no effect on the
        # threshold-free metrics; without a post-processor nothing is normalised).
        upstream.set_validation_data(datamodule, test)
    init_args = dict(method.init_args)
    model_class = method.model_class
    if model_class is not None and model_class.cached_features:
        init_args = model_arguments(model_class, init_args)
    if model_class is not None:
        init_args |= {"k_shot": k, "few_shot_seed": seed}  # they draw the support images themselves
    else:
        train = datamodule.train_data
        chosen = set(support_paths(datamodule, k, seed))
        upstream.replace_samples(
            train, train.samples[train.samples.image_path.astype(str).isin(chosen)].reset_index(drop=True)
        )
    model = build_engine_model(MethodSpec(method.name, method.class_path, init_args, method.base))
    memory: dict[str, float] = {}
    tiling = method.init_args.get("tiling")
    callbacks = [TilerConfigurationCallback(enable=True, **tiling)] if tiling else None
    with tempfile.TemporaryDirectory() as root:
        engine = Engine(
            accelerator="gpu" if plan.accelerator == "cuda" else "cpu",
            devices=1,
            default_root_dir=root,
            logger=False,
            enable_progress_bar=False,
            callbacks=callbacks,
        )
        if not isinstance(model, FewShotModel):  # those build their support data at test start
            engine.fit(model, train_dataloaders=datamodule.train_dataloader())  # training only: no thresholds
        start = time.perf_counter()
        with peak_memory(torch.device("cuda" if plan.accelerator == "cuda" else "cpu"), memory):
            results = engine.test(model, datamodule=datamodule, verbose=False)[0]
        seconds = time.perf_counter() - start
    values = {key: float(value) for key, value in results.items()}
    time_ms = 1000 * seconds / len(indices)
    return values | {"head_ms": float("nan"), "backbone_ms": float("nan"), "time_ms": time_ms, **memory}
