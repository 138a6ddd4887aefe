"""AnomalyDINOPlus: anomalib's AnomalyDINO with seeded k-shot support and cosine prototype refinement."""

from .lightning_model import AnomalyDINOPlus
from .torch_model import AnomalyDINOPlusModel

__all__ = ["AnomalyDINOPlus", "AnomalyDINOPlusModel"]
