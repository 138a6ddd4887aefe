"""Make ``anomalib benchmark`` run :class:`FewShotBenchmark` (imported by the autoload hook).

anomalib's CLI looks its pipelines up in ``anomalib.cli.pipelines.PIPELINE_REGISTRY``. The few-shot
pipeline is a strict extension of anomalib's ``Benchmark``: a config without ``k_shot`` runs
anomalib's own benchmark unchanged, so replacing the entry changes nothing for other configs.
"""

from __future__ import annotations


def register() -> None:
    """Point the CLI's ``benchmark`` pipeline at :class:`FewShotBenchmark` (idempotent)."""
    from anomalib.cli import pipelines

    from anomalib_protorefine.benchmark.pipeline import FewShotBenchmark

    if pipelines.PIPELINE_REGISTRY is not None:
        pipelines.PIPELINE_REGISTRY["benchmark"] = FewShotBenchmark


register()
