"""Few-shot benchmark on anomalib's benchmark pipeline: ``anomalib benchmark --config configs/benchmark/<name>.yaml``.

Every method of a (dataset, category, k, seed) cell sees the same support draw; test features are
computed once per dataset and backbone (disk cache); each finished job is appended to the long-form
``results.csv`` at once and a re-run skips finished jobs; the report (paper-style Markdown tables,
plots, heat-map grids, Fig. 7) is written into the results folder. See docs/benchmarks.md.

Example:
    >>> from anomalib_protorefine.benchmark import FewShotBenchmark, plan_from_config
    >>> FewShotBenchmark.__name__
    'FewShotBenchmark'
"""

from .config import BenchmarkConfigError, BenchmarkPlan, DataSpec, MethodSpec, plan_from_config
from .pipeline import FewShotBenchmark, is_few_shot_config, main

__all__ = [
    "BenchmarkConfigError",
    "BenchmarkPlan",
    "DataSpec",
    "FewShotBenchmark",
    "MethodSpec",
    "is_few_shot_config",
    "main",
    "plan_from_config",
]
