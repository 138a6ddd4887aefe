"""The one place that reaches into anomalib's and Lightning's internals.

Everything here relies on a name or a behaviour that anomalib or Lightning do not promise to keep:
private attributes (``_is_fitted``, ``_hparams``, ``_trainer``, the post-processor's threshold
buffers and metrics, the validate loop's data source), registries and helpers that are not API
(``PIPELINE_REGISTRY``, ``Pipeline._get_args``), dataset ``samples`` frames rewritten in place, and
log or warning messages matched by their text. Each function names one such use;
``tests/test_upstream_contract.py`` checks every one against the installed anomalib and Lightning,
so an upgrade that changes any of them fails there, by name, instead of somewhere in a model.

The module imports nothing heavy at import time (the autoload hook imports it at interpreter start).

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     with quiet_upstream_imports():
    ...         warnings.warn("Importing from timm.models.layers is deprecated, please import via timm.layers",
    ...                       FutureWarning)
    ...         warnings.warn("something else", FutureWarning)
    >>> [str(w.message) for w in caught]
    ['something else']
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

__all__ = [
    "ENGINE_LOGGER",
    "MISSING_CHECKPOINT_NOTICE",
    "THRESHOLD_BUFFERS",
    "UPSTREAM_IMPORT_NOTICES",
    "attached_trainer",
    "decision_buffers",
    "filter_engine_log",
    "init_skipping",
    "kcenter_projection",
    "mark_checkpoint_written",
    "mark_fitted",
    "model_being_predicted",
    "pipeline_config",
    "pixel_threshold_seen",
    "quiet_upstream_imports",
    "register_pipeline",
    "replace_samples",
    "set_stored_hparam",
    "set_validation_batches",
    "set_validation_data",
    "stored_hparams",
    "threshold_metrics",
    "threshold_state_key",
    "validation_batches",
    "validation_data_of",
    "validation_source_is",
    "wrap_checkpoint_loader",
]

# ---------------------------------------------------------------------------------------------- imports
#: Messages (regular expressions matched at the start) of the notices ignored while anomalib.models loads:
#: anomalib's CFM model imports timm's old ``timm.models.layers`` path, and its Dinomaly model imports
#: anomalib's own deprecated ``dinov2`` package; no user can act on either.
UPSTREAM_IMPORT_NOTICES: tuple[str, ...] = (
    r"Importing from timm\.models\.layers is deprecated",
    r"The anomalib\.models\.components\.dinov2 package is deprecated",
)


@contextlib.contextmanager
def quiet_upstream_imports() -> Iterator[None]:
    """Ignore :data:`UPSTREAM_IMPORT_NOTICES` (``FutureWarning`` only) inside the block.

    ``ANOMALIB_PROTOREFINE_NO_AUTOLOAD=1`` restores anomalib's stock output; every other warning, and
    these two raised by any other import, still shows.
    """
    with warnings.catch_warnings():
        for message in UPSTREAM_IMPORT_NOTICES:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield


# ---------------------------------------------------------------------------------------------- modules
def mark_fitted(module: Any, fitted: bool, device: Any = None) -> None:
    """Set anomalib's ``MemoryBankMixin`` fitted flag (the ``_is_fitted`` buffer that decides whether it calls ``fit``).

    Args:
        module: A model with anomalib's ``MemoryBankMixin``.
        fitted: Whether its bank is built.
        device: Device of the flag (default: the module's ``device``, else CPU).
    """
    import torch

    if device is None:
        device = getattr(module, "device", None)
    module._is_fitted = torch.tensor([fitted], device=device)


def stored_hparams(module: Any, *, initial: bool = False) -> MutableMapping[str, Any] | None:
    """Lightning's saved hyper-parameters of ``module`` (``hparams``, or ``hparams_initial``), without creating them.

    Lightning's ``hparams`` property creates an empty mapping on first access and ``hparams_initial``
    returns a copy; checkpoints and ``hparams.yaml`` are written from these two attributes.
    """
    return getattr(module, "_hparams_initial" if initial else "_hparams", None)


def set_stored_hparam(module: Any, name: str, value: Any, *, initial: bool = False) -> None:
    """Keep a saved hyper-parameter in step with the option's value (only when it was saved at all).

    Args:
        module: A ``LightningModule``.
        name: The hyper-parameter.
        value: Its value as checkpoints store it (plain types).
        initial: Write ``hparams_initial`` (what Lightning's loggers write to ``hparams.yaml``) instead.
    """
    mapping = stored_hparams(module, initial=initial)
    if mapping is not None and name in mapping:
        mapping[name] = value


def attached_trainer(module: Any) -> Any:
    """The trainer ``module`` is attached to, or ``None`` (Lightning's ``trainer`` property raises instead)."""
    return getattr(module, "_trainer", None)


def init_skipping(cls: type, instance: Any, *args: Any, **kwargs: Any) -> None:
    """Run the constructor of the class after ``cls`` in ``instance``'s MRO, skipping ``cls.__init__``.

    For upstream torch models whose constructor does work we must not do (download weights, build an
    encoder we replace); the attributes it would set are then set by the caller, and the contract
    tests check upstream's constructor arguments. Not for Lightning modules: ``save_hyperparameters``
    walks the ``__init__`` frames, which this function's frame would interrupt (AnomalyDINOPlus calls
    ``super(AnomalyDINO, self).__init__`` itself).
    """
    super(cls, instance).__init__(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- trainer
def wrap_checkpoint_loader(trainer: Any, wrapper: Callable[[Any], Any], kind: type) -> None:
    """Wrap the trainer strategy's checkpoint IO in ``wrapper`` once (no-op when it is already a ``kind``)."""
    strategy = trainer.strategy
    if not isinstance(strategy.checkpoint_io, kind):
        strategy.checkpoint_io = wrapper(strategy.checkpoint_io)


def validation_batches(trainer: Any) -> Any:
    """The trainer's validation batch limit (``limit_val_batches``)."""
    return trainer.limit_val_batches


def set_validation_batches(trainer: Any, limit: Any) -> None:
    """Set the trainer's validation batch limit (0 skips the validation loop of the next run)."""
    trainer.limit_val_batches = limit


def validation_source_is(trainer: Any, module: Any) -> bool:
    """Whether the trainer's validation data comes from ``module`` itself (no datamodule, no dataloaders given)."""
    source = getattr(getattr(trainer, "validate_loop", None), "_data_source", None)
    return getattr(source, "instance", None) is module


def validation_data_of(datamodule: Any) -> Any:
    """The validation dataset of an anomalib datamodule, ``None`` when it has none (``val_split_mode="none"``)."""
    return getattr(datamodule, "val_data", None)


def set_validation_data(datamodule: Any, dataset: Any) -> None:
    """Give an anomalib datamodule a validation dataset (what its ``val_dataloader`` serves)."""
    datamodule.val_data = dataset


def mark_checkpoint_written(callback: Any, path: str) -> None:
    """Tell a ``ModelCheckpoint`` that ``path`` is its best checkpoint (anomalib's Engine loads it for test)."""
    callback.best_model_path = str(path)


# ---------------------------------------------------------------------------------------------- post-processor
#: The decision buffers of anomalib's ``PostProcessor``, by the public name of what they hold.
THRESHOLD_BUFFERS: dict[str, str] = {
    "image_threshold": "_image_threshold",
    "pixel_threshold": "_pixel_threshold",
    "image_min": "image_min",
    "image_max": "image_max",
    "pixel_min": "pixel_min",
    "pixel_max": "pixel_max",
}


def decision_buffers(post_processor: Any) -> dict[str, Any]:
    """The post-processor's raw threshold and normalisation buffers, writable in place, by public name.

    Its ``image_threshold`` / ``pixel_threshold`` properties fall back to each other; the buffers do not.
    """
    return {name: getattr(post_processor, buffer) for name, buffer in THRESHOLD_BUFFERS.items()}


def threshold_state_key(name: str, prefix: str = "post_processor.") -> str:
    """The state-dict key of a decision buffer (:data:`THRESHOLD_BUFFERS`) of the model's post-processor.

    Example:
        >>> threshold_state_key("image_threshold"), threshold_state_key("image_max")
        ('post_processor._image_threshold', 'post_processor.image_max')
    """
    return f"{prefix}{THRESHOLD_BUFFERS[name]}"


def threshold_metrics(post_processor: Any) -> tuple[Any, ...]:
    """The metrics a post-processor accumulates over a validation pass (thresholds, then min-max)."""
    return (
        post_processor._image_threshold_metric,
        post_processor._pixel_threshold_metric,
        post_processor._image_min_max_metric,
        post_processor._pixel_min_max_metric,
    )


def pixel_threshold_seen(post_processor: Any) -> bool:
    """Whether the validation pass fed the pixel threshold metric (it had masks)."""
    return bool(post_processor._pixel_threshold_metric.update_called)


def kcenter_projection(candidates: Any, size: int, seed: int) -> tuple[Any, int]:
    """The seeded projection of ``candidates`` ``(N, d)`` by anomalib's ``KCenterGreedy``, and its coreset size.

    The sampler's sparse random projection (its ``model``) draws with numpy: it is seeded with ``seed``
    and fitted here, as ``KCenterGreedy.sample_coreset`` would fit it; the farthest-point loop is ours
    (:func:`anomalib_protorefine.coreset.greedy_indices`). Call it with the torch RNG seeded: the
    sampler's construction may draw from it.

    Returns:
        The projected rows and the sampler's ``coreset_size`` (``int(N * size / N)``).
    """
    from anomalib.models.components import KCenterGreedy

    sampler = KCenterGreedy(embedding=candidates, sampling_ratio=size / candidates.shape[0])
    sampler.model.random_state = seed
    sampler.model.fit(candidates)
    return sampler.model.transform(candidates), sampler.coreset_size


# ---------------------------------------------------------------------------------------------- data, CLI, logs
def replace_samples(dataset: Any, samples: Any) -> None:
    """Replace the ``samples`` frame of an anomalib dataset (e.g. cut it to a subset), in place."""
    dataset.samples = samples


def register_pipeline(name: str, pipeline: type) -> None:
    """Point the ``anomalib <name>`` pipeline command at ``pipeline`` (anomalib's ``PIPELINE_REGISTRY``)."""
    from anomalib.cli import pipelines

    if pipelines.PIPELINE_REGISTRY is not None:
        pipelines.PIPELINE_REGISTRY[name] = pipeline


def pipeline_config(pipeline: Any, args: Any) -> dict[str, Any]:
    """The config of a pipeline run as anomalib's pipeline reads it (``--config`` file or parsed arguments)."""
    return pipeline._get_args(args)


#: anomalib's engine logger and its warning on ``Engine.predict`` without ``ckpt_path``.
ENGINE_LOGGER = "anomalib.engine.engine"
MISSING_CHECKPOINT_NOTICE = "ckpt_path is not provided"


def model_being_predicted() -> Any:
    """The model of the ``Engine.predict`` call running in this thread, found on the call stack (``None`` outside one).

    anomalib logs :data:`MISSING_CHECKPOINT_NOTICE` from ``Engine.predict(model, ..., ckpt_path=None)``
    without naming the model; its frame holds it as ``model``.
    """
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "predict" and "ckpt_path" in frame.f_locals):
        frame = frame.f_back
    return None if frame is None else frame.f_locals.get("model")


def filter_engine_log(log_filter: logging.Filter) -> None:
    """Put ``log_filter`` on anomalib's engine logger once (one filter per type)."""
    engine_logger = logging.getLogger(ENGINE_LOGGER)
    if not any(isinstance(item, type(log_filter)) for item in engine_logger.filters):
        engine_logger.addFilter(log_filter)
