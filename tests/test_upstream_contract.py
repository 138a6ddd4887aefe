"""Contract tests of :mod:`anomalib_protorefine.upstream`: each use of an anomalib or Lightning internal.

Every test checks one adapter function against the installed anomalib and Lightning, so that an
upgrade that renames or changes what we rely on fails here, by name.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib.models.components import MemoryBankMixin
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from anomalib_protorefine import upstream


class _Bank(MemoryBankMixin, torch.nn.Module):
    """anomalib's memory-bank mixin on a bare module, counting its ``fit`` calls."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        super().__init__()
        self.fits = 0

    def fit(self) -> None:
        self.fits += 1


def test_mark_fitted_decides_whether_anomalibs_mixin_fits_again() -> None:
    bank = _Bank()
    upstream.mark_fitted(bank, True)
    bank.on_validation_start()
    assert bank.fits == 0
    upstream.mark_fitted(bank, False)
    bank.on_validation_start()
    assert bank.fits == 1
    assert "_is_fitted" in bank.state_dict()  # checkpoints carry the flag


class _Saved(LightningModule):
    def __init__(self, a: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_saved_hparams_are_lightnings_checkpoint_and_yaml_mappings() -> None:
    module = _Saved()
    upstream.set_stored_hparam(module, "a", 2)
    assert module.hparams["a"] == 2
    assert module.hparams_initial["a"] == 1  # written separately
    upstream.set_stored_hparam(module, "a", 3, initial=True)
    assert module.hparams_initial["a"] == 3
    upstream.set_stored_hparam(module, "b", 4)  # an option that was not saved stays unsaved
    assert "b" not in module.hparams
    bare = LightningModule()
    assert upstream.stored_hparams(bare) is None  # reading does not create Lightning's mapping


def test_attached_trainer_is_none_until_a_trainer_holds_the_module() -> None:
    module = LightningModule()
    assert upstream.attached_trainer(module) is None
    with pytest.raises(RuntimeError):
        _ = module.trainer  # what the adapter avoids
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    assert upstream.attached_trainer(module) is trainer


def test_trainer_internals_exist_and_are_settable(tmp_path: Path) -> None:
    trainer = Trainer(default_root_dir=tmp_path, logger=False, limit_val_batches=3, enable_progress_bar=False)
    assert upstream.validation_batches(trainer) == 3
    upstream.set_validation_batches(trainer, 0)
    assert trainer.limit_val_batches == 0

    class Wrapped:
        def __init__(self, inner: object) -> None:
            self.inner = inner

    inner = trainer.strategy.checkpoint_io
    upstream.wrap_checkpoint_loader(trainer, Wrapped, Wrapped)
    upstream.wrap_checkpoint_loader(trainer, Wrapped, Wrapped)  # once
    assert isinstance(trainer.strategy.checkpoint_io, Wrapped)
    assert trainer.strategy.checkpoint_io.inner is inner
    source = trainer.validate_loop._data_source
    assert hasattr(source, "instance")
    module = LightningModule()
    source.instance = module
    assert upstream.validation_source_is(trainer, module)
    callback = ModelCheckpoint(dirpath=tmp_path)
    upstream.mark_checkpoint_written(callback, str(tmp_path / "model.ckpt"))
    assert callback.best_model_path == str(tmp_path / "model.ckpt")


def test_post_processor_buffers_state_keys_and_metrics() -> None:
    post = PostProcessor()
    buffers = upstream.decision_buffers(post)
    assert set(buffers) == set(upstream.THRESHOLD_BUFFERS)
    state = post.state_dict()
    for name in upstream.THRESHOLD_BUFFERS:
        assert upstream.threshold_state_key(name, prefix="") in state, name
    buffers["image_threshold"].fill_(2.0)
    buffers["pixel_threshold"].fill_(3.0)
    assert float(post.image_threshold) == 2.0
    assert float(post.pixel_threshold) == 3.0
    metrics = upstream.threshold_metrics(post)
    assert len(metrics) == 4
    assert all(hasattr(metric, "reset") for metric in metrics)
    assert upstream.pixel_threshold_seen(post) is False


def test_datamodule_samples_and_validation_data(quick_datamodule: Callable[..., Any]) -> None:
    datamodule = quick_datamodule(val_split_mode="none")
    datamodule.setup()
    assert upstream.validation_data_of(datamodule) is None
    test = datamodule.test_data
    upstream.replace_samples(test, test.samples.iloc[:2].reset_index(drop=True))
    assert len(test) == 2
    validated = quick_datamodule()
    validated.setup()
    assert len(upstream.validation_data_of(validated)) > 0


def test_the_benchmark_pipeline_is_registered_and_reads_configs(tmp_path: Path) -> None:
    from anomalib.cli import pipelines

    from anomalib_protorefine.benchmark.pipeline import FewShotBenchmark

    upstream.register_pipeline("benchmark", FewShotBenchmark)
    assert pipelines.PIPELINE_REGISTRY["benchmark"] is FewShotBenchmark
    config = tmp_path / "config.yaml"
    config.write_text("accelerator: cpu\nbenchmark:\n  k_shot: 1\n")
    from jsonargparse import Namespace

    assert upstream.pipeline_config(FewShotBenchmark(), Namespace(config=str(config)))["benchmark"] == {"k_shot": 1}


def test_anomalibs_engine_logs_the_notice_we_filter() -> None:
    from anomalib.engine import engine

    assert engine.logger.name == upstream.ENGINE_LOGGER
    assert upstream.MISSING_CHECKPOINT_NOTICE in inspect.getsource(engine.Engine.predict)
    parameters = inspect.signature(engine.Engine.predict).parameters
    assert "model" in parameters
    assert "ckpt_path" in parameters

    def predict(model: object, ckpt_path: object = None) -> object:  # the frame model_being_predicted looks for
        return upstream.model_being_predicted() if ckpt_path is None else None

    marker = object()
    assert predict(marker) is marker
    assert upstream.model_being_predicted() is None

    class Drop(logging.Filter):
        pass

    upstream.filter_engine_log(Drop())
    upstream.filter_engine_log(Drop())
    assert sum(isinstance(item, Drop) for item in logging.getLogger(upstream.ENGINE_LOGGER).filters) == 1


def test_skipped_upstream_constructors_take_the_arguments_we_redeclare() -> None:
    """Our models skip these constructors and set their attributes themselves: a new argument must be seen."""
    from anomalib.models import AnomalyDINO
    from anomalib.models.image.anomaly_dino.torch_model import AnomalyDINOModel
    from anomalib.models.image.winclip.torch_model import WinClipModel

    def arguments(cls: type) -> list[str]:
        return list(inspect.signature(cls.__init__).parameters)[1:]

    assert arguments(AnomalyDINO) == [
        "num_neighbours",
        "encoder_name",
        "masking",
        "coreset_subsampling",
        "sampling_ratio",
        "precision",
        "pre_processor",
        "post_processor",
        "evaluator",
        "visualizer",
    ]
    assert arguments(AnomalyDINOModel) == [
        "num_neighbours",
        "encoder_name",
        "masking",
        "coreset_subsampling",
        "sampling_ratio",
    ]
    assert arguments(WinClipModel) == ["class_name", "reference_images", "scales", "apply_transform"]
    # WinClipPlusModel extends these two steps of WinClipModel.setup and reads its embedding buffers.
    setup = inspect.getsource(WinClipModel.setup)
    assert "_collect_text_embeddings" in setup
    assert "_collect_visual_embeddings" in setup
    for name in ("_text_embeddings", "_visual_embeddings", "_patch_embeddings"):
        assert name in inspect.getsource(WinClipModel), name


def test_kcenter_projection_is_anomalibs_seeded_projection() -> None:
    from anomalib.models.components import KCenterGreedy

    candidates = torch.randn(200, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    features, size = upstream.kcenter_projection(candidates, 20, seed=3)
    torch.manual_seed(0)
    again, _ = upstream.kcenter_projection(candidates, 20, seed=3)
    assert size == 20
    assert torch.equal(features, again)  # seeded: the numpy projection does not draw from the global state
    sampler = KCenterGreedy(embedding=candidates, sampling_ratio=0.1)
    assert hasattr(sampler.model, "random_state")
    assert sampler.coreset_size == 20


def test_the_private_hooks_we_override_are_still_called_by_their_public_methods() -> None:
    """FewShotPostProcessor, FewShotBenchmark and WinClipPlusModel override or call these private members."""
    from anomalib.models.image.winclip.torch_model import WinClipModel
    from anomalib.pipelines import Benchmark

    post = inspect.getsource(PostProcessor)
    for name in ("_checkpoint_config_keys", "_normalize", "_apply_threshold"):
        assert hasattr(PostProcessor, name), name
        assert post.count(f"self.{name}") >= 2, name  # used by the class, not only defined
    assert hasattr(Benchmark, "_setup_runners")
    assert "self._setup_runners(" in inspect.getsource(Benchmark.__mro__[1])  # the Pipeline base calls it
    winclip = inspect.getsource(WinClipModel)
    for name in ("_generate_masks", "_compute_zero_shot_scores"):
        assert f"def {name}(" in winclip, name
    assert "self._transform" in inspect.getsource(WinClipModel.transform.fget)  # read by the public property


def test_init_skipping_runs_the_next_constructor_only() -> None:
    calls = []

    class Base:
        def __init__(self) -> None:
            calls.append("base")

    class Heavy(Base):
        def __init__(self) -> None:
            calls.append("heavy")
            super().__init__()

    class Ours(Heavy):
        def __init__(self) -> None:
            upstream.init_skipping(Heavy, self)

    Ours()
    assert calls == ["base"]


def test_the_private_upstream_names_appear_only_in_the_adapter(repo_root: Path) -> None:
    names = ("_is_fitted", "._hparams", "._trainer", "checkpoint_io", "PIPELINE_REGISTRY", "_get_args")
    names += ("_image_threshold", "_pixel_threshold", ".samples =")
    found = []
    for path in sorted((repo_root / "src" / "anomalib_protorefine").rglob("*.py")):
        if path.name == "upstream.py":
            continue
        text = path.read_text()
        found += [f"{path.relative_to(repo_root)}: {name}" for name in names if name in text]
    assert not found, found
