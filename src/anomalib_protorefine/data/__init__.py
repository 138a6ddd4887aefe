"""Data utilities: a procedurally generated, download-free industrial inspection dataset.

Example:
    >>> from anomalib_protorefine.data import CATEGORIES, synthetic_datamodule
    >>> datamodule = synthetic_datamodule(category=CATEGORIES[0])  # doctest: +SKIP

"""

from anomalib_protorefine.data.synthetic import (
    CATEGORIES,
    DATASET_VERSION,
    DEFECT_TYPES,
    default_cache_dir,
    folder_kwargs,
    generate_dataset,
    synthetic_datamodule,
)

__all__ = [
    "CATEGORIES",
    "DATASET_VERSION",
    "DEFECT_TYPES",
    "default_cache_dir",
    "folder_kwargs",
    "generate_dataset",
    "synthetic_datamodule",
]
