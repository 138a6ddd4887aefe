"""Jobs, job generator and runner of the few-shot benchmark (anomalib's pipeline classes, extended).

A job is one (dataset, k, seed, method) cell. Its rows are appended to ``results.csv`` (long form:
one row per dataset, category, k, seed, method and metric) as soon as it finishes, so a crash or
Ctrl-C loses at most the running job; the generator skips the jobs already in the file. On one
device the runner is anomalib's :class:`~anomalib.pipelines.components.runners.SerialRunner` with a
progress bar that knows the number of jobs (so it shows an ETA); with several CUDA devices it is
anomalib's :class:`~anomalib.pipelines.components.runners.ParallelRunner`, one worker process per
device (the job's ``task_id`` is its device index), as in anomalib's own benchmark.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from anomalib.data import AnomalibDataModule
from anomalib.pipelines.components import Job, JobGenerator
from anomalib.pipelines.components.runners import ParallelRunner, SerialRunner
from anomalib.pipelines.types import GATHERED_RESULTS, PREV_STAGE_RESULT
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import CSV_COLUMNS, BenchmarkPlan, DataSpec, MethodSpec
from .features import CachedTestSet, feature_model_args, load_test_features, make_datamodule
from .methods import build_feature_model, run_cached, run_engine

logger = logging.getLogger(__name__)


def results_file(plan: BenchmarkPlan) -> Path:
    """The long-form CSV of a run."""
    return plan.output / "results.csv"


def finished(plan: BenchmarkPlan) -> set[tuple[str, int, int, str]]:
    """``(dataset, k, seed, method)`` of the jobs already in the results file."""
    path = results_file(plan)
    if not path.exists():
        return set()
    with path.open(newline="") as handle:
        return {(r["dataset"], int(r["k_shot"]), int(r["seed"]), r["method"]) for r in csv.DictReader(handle)}


def read_results(plan: BenchmarkPlan) -> pd.DataFrame:
    """The results file as a data frame (empty with the columns when there is none)."""
    path = results_file(plan)
    if not path.exists():
        return pd.DataFrame(columns=list(CSV_COLUMNS))
    return pd.read_csv(path)


@dataclass
class RunContext:
    """What the jobs of one process share: set-up datamodules and loaded test features.

    A job sent to a worker process (:class:`ParallelFewShotRunner`) carries only the plan: in the worker
    it joins that process's own context (:func:`process_context`), so the datamodules and features are
    built once per process, never pickled.
    """

    plan: BenchmarkPlan
    datamodules: dict[str, AnomalibDataModule] = field(default_factory=dict)
    features: dict[tuple[str, str], CachedTestSet] = field(default_factory=dict)
    #: The CUDA device of this process's jobs (a parallel worker's ``task_id``); ``None``: the default one.
    device_index: int | None = None

    def __reduce__(self) -> tuple[Any, tuple[BenchmarkPlan]]:
        """Pickle the plan only: unpickled, the context is the receiving process's own."""
        return process_context, (self.plan,)

    @property
    def device(self) -> torch.device:
        """The device the feature-based methods run on."""
        if self.plan.accelerator != "cuda":
            return torch.device("cpu")
        return torch.device("cuda", self.device_index) if self.device_index is not None else torch.device("cuda")

    def datamodule(self, data: DataSpec) -> AnomalibDataModule:
        """The set-up datamodule of ``data`` (built once)."""
        if data.label not in self.datamodules:
            self.datamodules[data.label] = make_datamodule(data.config)
        return self.datamodules[data.label]

    def test_features(self, data: DataSpec, method: MethodSpec) -> CachedTestSet:
        """The cached test features of ``data`` under ``method``'s backbone (computed on first use)."""
        model_args = feature_model_args(method.init_args, method.model_class)
        key = (data.label, repr(sorted(model_args.items())))
        if key not in self.features:
            self.features.clear()  # one dataset at a time in memory
            model = build_feature_model(method, 1, 0, self.device)
            self.features[key] = load_test_features(
                model,
                self.datamodule(data),
                data.config,
                model_args,
                self.plan.output / "cache",
                self.plan.max_test_images,
            )
        return self.features[key]


#: The contexts of this process, by results folder (a worker process builds its own once).
_PROCESS_CONTEXTS: dict[str, RunContext] = {}


def process_context(plan: BenchmarkPlan) -> RunContext:
    """This process's context of ``plan`` (created on first use)."""
    key = str(plan.output)
    if key not in _PROCESS_CONTEXTS:
        _PROCESS_CONTEXTS[key] = RunContext(plan)
    return _PROCESS_CONTEXTS[key]


class FewShotBenchmarkJob(Job):
    """One method on one (dataset, k, seed) cell; appends its rows to the results file when done.

    Args:
        context: The run's shared state.
        data: The dataset (and category).
        k: Number of support images.
        seed: Seed of the support draw (and of the coreset).
        method: The method.
    """

    name = "benchmark"  # the config section anomalib's Pipeline hands to this job's runner

    def __init__(self, context: RunContext, data: DataSpec, k: int, seed: int, method: MethodSpec) -> None:
        super().__init__()
        self.context = context
        self.data = data
        self.k = k
        self.seed = seed
        self.method = method

    @property
    def label(self) -> str:
        """Short description for the progress bar."""
        return f"{self.data.label} k={self.k} seed={self.seed} {self.method.name}"

    def run(self, task_id: int | None = None) -> list[dict[str, Any]]:
        """Score the cell, append its rows to the results file and return them.

        Args:
            task_id: The worker's index under :class:`ParallelFewShotRunner`: its CUDA device.
        """
        if task_id is not None:
            self.context.device_index = task_id
        plan = self.context.plan
        if self.method.uses_cached_features:
            test = self.context.test_features(self.data, self.method)
            datamodule = self.context.datamodule(self.data)
            batch_size = getattr(datamodule, "eval_batch_size", 32)
            values = run_cached(
                self.method,
                datamodule,
                test,
                self.k,
                self.seed,
                self.context.device,
                batch_size,
                plan.decision_rules,
                plan.line_simulation,
            )
        else:
            values = run_engine(self.method, make_datamodule(self.data.config), plan, self.k, self.seed)
        name, _, category = self.data.label.partition("/")
        rows = [
            {
                "dataset": self.data.label,
                "category": category or name,
                "k_shot": self.k,
                "seed": self.seed,
                "method": self.method.name,
                "metric": metric,
                "value": value,
            }
            for metric, value in values.items()
            if not (isinstance(value, float) and math.isnan(value))
        ]
        append_rows(results_file(plan), rows)
        return rows

    @staticmethod
    def collect(results: list[list[dict[str, Any]]]) -> GATHERED_RESULTS:
        """Rows of this run's jobs as one data frame (the results file holds earlier runs too)."""
        return pd.DataFrame([row for rows in results for row in rows], columns=list(CSV_COLUMNS))

    @staticmethod
    def save(results: GATHERED_RESULTS) -> None:
        """Nothing to do: every job appended its rows already; the report is written by the pipeline."""
        del results


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to the CSV in one write (header first when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    if not path.exists():
        writer.writeheader()
    writer.writerows(rows)
    with path.open("a", newline="") as handle:
        handle.write(buffer.getvalue())


class FewShotJobGenerator(JobGenerator):
    """Jobs of every (dataset, k, seed, method) cell not yet in the results file.

    Args:
        plan: The checked plan.
    """

    def __init__(self, plan: BenchmarkPlan) -> None:
        self.plan = plan
        self.context = RunContext(plan)

    @property
    def job_class(self) -> type:
        """:class:`FewShotBenchmarkJob`."""
        return FewShotBenchmarkJob

    def pending(self) -> list[FewShotBenchmarkJob]:
        """The jobs still to run, in run order (dataset outermost, so its features load once)."""
        done = finished(self.plan)
        return [
            FewShotBenchmarkJob(self.context, data, k, seed, method)
            for data, k, seed in self.plan.cells
            for method in self.plan.methods
            if (data.label, k, seed, method.name) not in done
        ]

    def prepare_features(self) -> None:
        """Compute (and cache on disk) the test features of every pending job in this process, once each.

        Parallel workers then load them from the cache instead of computing the same features side by side.
        """
        for job in self.pending():
            if job.method.uses_cached_features:
                self.context.test_features(job.data, job.method)
        self.context.features.clear()

    def generate_jobs(
        self, args: dict | None = None, prev_stage_result: PREV_STAGE_RESULT = None
    ) -> Generator[Job, None, None]:
        """Yield the pending jobs (``args`` is the config section; the plan was read from it already)."""
        del args, prev_stage_result
        yield from self.pending()


class FewShotRunner(SerialRunner):
    """anomalib's serial runner with a rich progress bar over jobs (count, elapsed time, ETA)."""

    generator: FewShotJobGenerator

    def run(self, args: dict, prev_stage_results: PREV_STAGE_RESULT = None) -> GATHERED_RESULTS:
        """Run the pending jobs one after the other; a failed job is logged and the others still run.

        Raises:
            RuntimeError: After all jobs ran, if any failed (their rows are missing; a re-run retries them).
        """
        del args, prev_stage_results
        jobs = self.generator.pending()
        results, failed = [], []
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns) as progress:
            task = progress.add_task("benchmark", total=len(jobs))
            for job in jobs:
                progress.update(task, description=job.label)
                try:
                    results.append(job.run())
                except Exception as error:
                    logger.exception("job %s failed", job.label)
                    progress.console.print(f"[red]failed: {job.label}: {type(error).__name__}: {error}")
                    failed.append(job.label)
                progress.advance(task)
        gathered = self.generator.job_class.collect(results)
        if failed:
            msg = f"{len(failed)} job(s) failed (re-run to retry them; see the log): {failed}"
            raise RuntimeError(msg)
        return gathered


class ParallelFewShotRunner(ParallelRunner):
    """anomalib's parallel runner, one worker process per CUDA device; the test features are cached first.

    Each worker scores whole jobs on its device (``cuda:<task_id>``) and appends their rows to the
    results file itself (one write per job), so a stop loses at most the running jobs and a re-run
    resumes as with the serial runner.
    """

    generator: FewShotJobGenerator

    def run(self, args: dict, prev_stage_results: PREV_STAGE_RESULT = None) -> GATHERED_RESULTS:
        """Cache the features in this process, then run the pending jobs on ``n_jobs`` workers."""
        self.generator.prepare_features()
        return super().run(args, prev_stage_results)
