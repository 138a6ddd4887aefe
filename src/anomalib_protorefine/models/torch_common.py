"""What the refined torch models share: refinement statistics, a cosine-refiner check, and no tiling where none works.

Example:
    >>> from anomalib_protorefine.refinement import PrototypeRefiner
    >>> require_cosine(PrototypeRefiner(distance="cosine"), "WinClipPlus")
    >>> require_cosine(PrototypeRefiner(distance="euclidean"), "WinClipPlus")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: WinClipPlus scores by cosine distance: the refiner needs distance='cosine', got 'euclidean'. ...
"""

from __future__ import annotations

from typing import Any

__all__ = ["RefinementStats", "require_cosine"]


class RefinementStats:
    """``refinement_stats``: the refiner's statistics of the last refined batch."""

    refiner: Any

    @property
    def refinement_stats(self) -> dict[str, float]:
        """Statistics of the last refined batch (empty without a refiner or before the first batch)."""
        return {} if self.refiner is None else dict(self.refiner.last_stats)


def require_cosine(refiner: Any, model: str) -> None:
    """Refuse a refiner of another distance than cosine for a model that scores by cosine distance.

    Args:
        refiner: The refiner (``None``: no refinement, nothing to check).
        model: The model's name, for the message.

    Raises:
        ValueError: ``refiner`` is not cosine; the message says how to keep the model's cosine defaults.
    """
    if refiner is None or refiner.options.distance == "cosine":
        return
    msg = (
        f"{model} scores by cosine distance: the refiner needs distance='cosine', got {refiner.options.distance!r}. "
        f"Give a dict of the options to change, which keeps {model}'s cosine defaults (refiner={{'lambda_': 0.2}}; "
        "CLI: --model.refiner.lambda_ 0.2), or PrototypeRefiner(distance='cosine', ...)."
    )
    raise ValueError(msg)
