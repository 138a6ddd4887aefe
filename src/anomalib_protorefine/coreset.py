"""Seeded greedy coreset (anomalib's ``KCenterGreedy``), shared by the models.

anomalib's sampler draws its random start from the global torch RNG and its sparse random
projection from numpy (through scikit-learn), so two runs give different banks. Here both are
seeded, and the global RNG state is left untouched.

The selection is anomalib's: its ``SparseRandomProjection`` of the rows, its random start, then
the farthest-point loop of ``KCenterGreedy.select_coreset_idxs``, with the same arithmetic and the
same indices (tested). Only the loop's memory differs: anomalib forms a new ``(N, d)`` difference
array at every step; on CPU, in a long-lived process, glibc's allocator can keep such freed
arrays on a fragmented heap, and the resident set then grows by about one array per step, enough
to exhaust the memory on a large augmented few-shot bank. Here the loop reuses two buffers, so its
memory stays at two ``(N, d)`` arrays. It draws no progress bar (few-shot banks are small).

Example:
    >>> import torch
    >>> from anomalib_protorefine.coreset import seeded_coreset
    >>> x = torch.randn(100, 8)
    >>> torch.equal(seeded_coreset(x, 0.1, seed=0), seeded_coreset(x, 0.1, seed=0))
    True
"""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_protorefine import upstream

__all__ = ["greedy_indices", "seeded_coreset"]


def greedy_indices(features: torch.Tensor, size: int, start: torch.Tensor) -> list[int]:
    """Farthest-point (k-center greedy) selection of ``size`` rows of ``features`` ``(N, d)``, from ``start``.

    anomalib's loop (``KCenterGreedy.select_coreset_idxs``): each step adds the row farthest from the
    rows chosen so far (ties: the first), whose distance is then set to 0; the start counts as chosen.
    The distances go through two preallocated buffers instead of a new ``(N, d)`` array per step.

    Args:
        features: The (projected) rows.
        size: Number of rows to select (>= 1).
        start: Index of the first row (a 0-d tensor or an int).

    Returns:
        The selected indices, the start first.

    Example:
        >>> points = torch.tensor([[0.0], [1.0], [10.0], [4.0]])
        >>> greedy_indices(points, 3, torch.tensor(0))
        [0, 2, 3]
    """
    index = torch.as_tensor(start, device=features.device).reshape(())
    selected = [index]
    difference = torch.empty_like(features)
    distances = torch.empty((features.shape[0], 1), dtype=features.dtype, device=features.device)
    nearest: torch.Tensor | None = None
    for _ in range(size - 1):
        torch.sub(features, features[index], out=difference)
        torch.linalg.vector_norm(difference, ord=2, dim=1, keepdim=True, out=distances)
        if nearest is None:
            nearest = distances.clone()
        else:
            torch.minimum(nearest, distances, out=nearest)
        _, index = torch.max(nearest.squeeze(1), dim=0)
        nearest[index] = 0.0
        selected.append(index)
    return torch.stack(selected).cpu().tolist()


def seeded_coreset(
    embeddings: torch.Tensor, sampling_ratio: float, seed: int, normalize: bool = False, size: int | None = None
) -> torch.Tensor:
    """Select ``max(1, int(N * sampling_ratio))`` rows (or ``size``) of ``embeddings`` ``(N, c)`` by k-center greedy.

    Args:
        embeddings: Candidate features.
        sampling_ratio: Fraction of rows to keep, in ``(0, 1]``; ``1`` returns all rows.
        seed: Seed of the random start and of the random projection.
        normalize: Select on L2-normalised rows (cosine geometry); the original rows are returned.
        size: Number of rows to keep instead of the ratio's (e.g. an augmented bank kept at the size of
            the unaugmented one); all rows when it is at least ``N``.

    Returns:
        The selected rows, ``(n, c)``.
    """
    if not 0 < sampling_ratio <= 1:
        msg = f"sampling_ratio must be in (0, 1], got {sampling_ratio!r}."
        raise ValueError(msg)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        msg = f"size must be an integer >= 1 or None, got {size!r}."
        raise ValueError(msg)
    if (sampling_ratio == 1 and size is None) or (size is not None and size >= embeddings.shape[0]):
        return embeddings
    explicit = size is not None
    size = size if explicit else max(int(embeddings.shape[0] * sampling_ratio), 1)
    candidates = F.normalize(embeddings.float(), dim=-1) if normalize else embeddings
    devices = [embeddings.device] if embeddings.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        features, coreset_size = upstream.kcenter_projection(candidates, size, seed)
        start = torch.randint(high=candidates.shape[0], size=(1,), device=features.device).squeeze()
        indices = greedy_indices(features, size if explicit else coreset_size, start)
    return embeddings[indices]
