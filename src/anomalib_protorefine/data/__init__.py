"""Data utilities: a procedurally generated, download-free industrial inspection dataset and its defect painters.

Example:
    >>> from anomalib_protorefine.data import CATEGORIES, synthetic_datamodule
    >>> datamodule = synthetic_datamodule(category=CATEGORIES[0])  # doctest: +SKIP

"""

from anomalib_protorefine.data.defects import DEFECT_TYPES, add_defect
from anomalib_protorefine.data.synthetic import (
    CATEGORIES,
    DATASET_VERSION,
    default_cache_dir,
    folder_kwargs,
    generate_dataset,
    synthetic_datamodule,
)

__all__ = [
    "CATEGORIES",
    "DATASET_VERSION",
    "DEFECT_TYPES",
    "add_defect",
    "default_cache_dir",
    "folder_kwargs",
    "generate_dataset",
    "synthetic_datamodule",
]
