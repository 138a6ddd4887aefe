"""The few-shot benchmark pipeline: anomalib's ``Benchmark`` with a ``k_shot``/``few_shot_seed`` grid.

``anomalib benchmark --config CONFIG`` runs it (this package registers it as the ``benchmark``
pipeline; a config without ``k_shot`` runs anomalib's own benchmark unchanged), and so does
``python -m anomalib_protorefine.benchmark --config CONFIG``.

Why a subclass and not anomalib's job as is: its job builds one model per grid point and runs
``Engine.fit`` + ``Engine.test`` on it, so every method and seed would recompute the test
features, the support draw would depend on each model's own options, and results exist only at
the end of the run. Here the config format, :class:`~anomalib.pipelines.Benchmark`'s parsing and
the runner class are kept; the job is one (dataset, k, seed, method) cell on cached features.

Example:
    >>> from anomalib_protorefine.benchmark import FewShotBenchmark
    >>> FewShotBenchmark.__mro__[1].__name__
    'Benchmark'
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from anomalib.models import UnknownModelError
from anomalib.pipelines import Benchmark
from anomalib.pipelines.components.base import Runner
from jsonargparse import ArgumentParser, Namespace

from anomalib_protorefine import upstream
from anomalib_protorefine.few_shot import normal_paths

from .config import BenchmarkConfigError, BenchmarkPlan, describe, plan_from_config
from .features import make_datamodule
from .job import FewShotJobGenerator, FewShotRunner, ParallelFewShotRunner, results_file
from .lock import OutputLock
from .methods import build_engine_model, build_feature_model

logger = logging.getLogger(__name__)


#: Keys that only a few-shot config has (anomalib's own benchmark config has ``seed``, ``model`` and ``data``).
FEW_SHOT_MARKERS = ("k_shot", "few_shot_seed", "max_test_images", "heatmaps", "figure7", "shared", "sweeps", "output")


def is_few_shot_config(config: dict[str, Any]) -> bool:
    """Whether a benchmark config is a few-shot one: its ``benchmark`` section has a key only few-shot configs have.

    A misspelt key next to them (``k_shots``) is then reported by the few-shot parser instead of
    falling through to anomalib's stock pipeline.

    Example:
        >>> is_few_shot_config({"benchmark": {"k_shots": 1, "max_test_images": 10}})
        True
        >>> is_few_shot_config({"benchmark": {"seed": 42, "model": {}, "data": {}}})
        False
    """
    section = config.get("benchmark")
    if not isinstance(section, dict):
        return False
    return any(key in section for key in FEW_SHOT_MARKERS) or any(
        difflib.get_close_matches(key, FEW_SHOT_MARKERS, n=1, cutoff=0.8) for key in section
    )


def preflight(plan: BenchmarkPlan, echo: Any = print) -> BenchmarkPlan:
    """Check what can be checked before anything heavy runs; drop methods whose weights are missing.

    * every dataset builds and its training pool holds at least ``max(k_shot)`` normal images;
    * every method that does not run on cached features, and every AnomalyDINOPlus, is constructed
      once: a model that cannot load its weights (no internet, e.g. AnomalyDINO, WinClip, or an
      AnomalyDINOPlus without ``weights``) is skipped with a clear line;
    * the results folder, if it exists, was written by the same methods (resume is safe).

    Returns:
        The plan without the skipped methods.

    Raises:
        BenchmarkConfigError: A dataset cannot be built, k exceeds a training pool, or the results
            folder holds a different run.
    """
    for data in plan.datasets:
        try:
            datamodule = make_datamodule(data.config)
        except Exception as error:
            msg = f"dataset {data.label!r} cannot be built from {data.config}: {type(error).__name__}: {error}"
            raise BenchmarkConfigError(msg) from error
        pool = len(normal_paths(datamodule.train_data))
        if max(plan.k_shots) > pool:
            msg = (
                f"dataset {data.label!r} has {pool} normal training image(s) but k_shot goes up to "
                f"{max(plan.k_shots)}: lower benchmark.k_shot or add normal images."
            )
            raise BenchmarkConfigError(msg)
    kept = []
    for method in plan.methods:
        if method.uses_cached_features and method.model_class.loads_hub_weights:
            # its encoder's weights (hub or weights=) must load; bad arguments are config errors
            try:
                build_feature_model(method, 1, 0, torch.device("cpu"))
            except (ValueError, TypeError) as error:
                raise BenchmarkConfigError(f"benchmark.model {method.name!r}: {error}") from error
            except (RuntimeError, FileNotFoundError) as error:
                echo(f"skipped {method.name}: its encoder weights cannot be loaded here: {str(error)[:200]}")
                continue
        elif not method.uses_cached_features:
            try:
                build_engine_model(method)
            except UnknownModelError as error:
                msg = f"benchmark.model {method.name!r}: class_path {method.class_path!r} is not a model: {error}"
                raise BenchmarkConfigError(msg) from error
            except Exception as error:
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
                echo(f"skipped {method.name}: the model cannot be built here (weights?): {reason}")
                continue
        kept.append(method)
    names = {m.name for m in kept}
    plan.methods = [m for m in kept if m.base is None or m.base in names]
    for method in kept:
        if method not in plan.methods:
            echo(f"skipped {method.name}: its base method {method.base!r} was skipped")
    marker = plan.output / "run.json"
    if results_file(plan).exists() and marker.exists() and marker.read_text() != describe(plan):
        msg = (
            f"{plan.output} holds results of a different run (other methods, data sets, k, seeds, shared settings "
            "or test images): choose another benchmark.output, or delete the folder to start over."
        )
        raise BenchmarkConfigError(msg)
    plan.output.mkdir(parents=True, exist_ok=True)
    marker.write_text(describe(plan))
    return plan


class FewShotBenchmark(Benchmark):
    """anomalib's benchmark pipeline with few-shot cells, cached test features, resume and a report.

    Example:
        >>> parser = FewShotBenchmark.get_parser()
        >>> parser.parse_args(["--config", "x.yaml"]).config
        'x.yaml'
    """

    def __init__(self) -> None:
        self.plan: BenchmarkPlan | None = None

    def _setup_runners(self, args: dict) -> list[Runner]:
        """The few-shot runner for a few-shot config, anomalib's runners otherwise."""
        if not is_few_shot_config(args):
            return super()._setup_runners(args)
        if self.plan is None:
            self.plan = preflight(plan_from_config(args))
        devices = torch.cuda.device_count() if self.plan.accelerator == "cuda" else 0
        if devices > 1:  # as anomalib's benchmark: one worker process per GPU
            return [ParallelFewShotRunner(FewShotJobGenerator(self.plan), n_jobs=devices)]
        return [FewShotRunner(FewShotJobGenerator(self.plan))]

    def run(self, args: Namespace | None = None, only: list[str] | None = None) -> None:
        """Run the benchmark of ``args.config``, then write the report into the results folder.

        Args:
            args: ``Namespace(config=...)`` (``None``: parse the command line).
            only: Run only these datasets (labels); the report still covers every result in the folder.
                Two processes with different ``only`` can share one results folder (appends are atomic).

        Raises:
            BenchmarkConfigError: A bad config, or another process runs one of the data sets in the same
                results folder (:class:`~anomalib_protorefine.benchmark.lock.OutputLock`).
        """
        config = upstream.pipeline_config(self, args)
        if not is_few_shot_config(config):
            super().run(args)
            return
        plan = plan_from_config(config)
        if only:
            unknown = sorted(set(only) - {d.label for d in plan.datasets})
            if unknown:
                msg = f"--only {unknown}: no such dataset; the config has {[d.label for d in plan.datasets]}."
                raise BenchmarkConfigError(msg)
            plan.datasets = [d for d in plan.datasets if d.label in only]
        # Before preflight, which rewrites the folder's run marker: a second process must not touch it.
        with OutputLock(plan.output, [d.label for d in plan.datasets]):
            self.plan = preflight(plan)
            for runner in self._setup_runners(config):
                runner.run(config.get("benchmark", {}))
            from .report import write_report  # matplotlib: only when a report is written

            write_report(self.plan)
        print(f"results: {results_file(self.plan)}; report: {self.plan.output / 'report.md'}")


def main(argv: list[str] | None = None) -> None:
    """``python -m anomalib_protorefine.benchmark --config CONFIG [--report-only]``."""
    parser = ArgumentParser(description="Few-shot benchmark on anomalib's pipeline (anomalib-protorefine).")
    parser.add_argument("--config", type=str, required=True, help="benchmark config (configs/benchmark/*.yaml)")
    parser.add_argument("--report_only", type=bool, default=False, help="only rewrite the report from results.csv")
    parser.add_argument("--only", type=list[str] | None, default=None, help="run only these datasets (labels)")
    args = parser.parse_args(argv)
    if not args.report_only:
        try:
            FewShotBenchmark().run(Namespace(config=args.config), only=args.only)
        except KeyboardInterrupt:
            # One line instead of a traceback: every finished job is already in results.csv.
            print(
                "interrupted: the finished jobs are kept in the output folder's results.csv; run the same command "
                "again to resume.",
                file=sys.stderr,
            )
            raise SystemExit(130) from None
        return
    config = json.loads(json.dumps(upstream.pipeline_config(FewShotBenchmark(), Namespace(config=args.config))))
    plan = plan_from_config(config, check_data=False)
    from .report import write_report

    write_report(plan)
    print(f"report: {Path(plan.output) / 'report.md'}")
