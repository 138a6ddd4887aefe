"""Make ``anomalib benchmark`` run :class:`FewShotBenchmark` (imported by the autoload hook).

anomalib's CLI looks its pipelines up in a registry
(:func:`anomalib_protorefine.upstream.register_pipeline`). The few-shot
pipeline is a strict extension of anomalib's ``Benchmark``: a config without ``k_shot`` runs
anomalib's own benchmark unchanged, so replacing the entry changes nothing for other configs.
"""

from __future__ import annotations


def register() -> None:
    """Point the CLI's ``benchmark`` pipeline at :class:`FewShotBenchmark` (idempotent)."""
    from anomalib_protorefine import upstream
    from anomalib_protorefine.benchmark.pipeline import FewShotBenchmark

    upstream.register_pipeline("benchmark", FewShotBenchmark)


register()
