"""Test-time prototype refinement (pure torch + POT, no Lightning training logic).

Example:
    >>> import torch
    >>> from anomalib_protorefine.refinement import PrototypeRefiner
    >>> PrototypeRefiner()(torch.randn(1, 4, 3), torch.randn(5, 3)).shape
    torch.Size([1, 4, 3])
"""

from .options import RefinerOptions
from .refiner import PrototypeRefiner, RefinementResult

__all__ = ["PrototypeRefiner", "RefinementResult", "RefinerOptions"]
