"""Seeded greedy coreset (anomalib's ``KCenterGreedy``), shared by the models.

anomalib's sampler draws its random start from the global torch RNG and its sparse random
projection from numpy (through scikit-learn), so two runs give different banks. Here both are
seeded, and the global RNG state is left untouched. Its tqdm progress bar is off: a few-shot
coreset takes seconds, and the bar would interleave with Lightning's and rich's progress output.

Example:
    >>> import torch
    >>> from anomalib_protorefine.coreset import seeded_coreset
    >>> x = torch.randn(100, 8)
    >>> torch.equal(seeded_coreset(x, 0.1, seed=0), seeded_coreset(x, 0.1, seed=0))
    True
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from anomalib.models.components import KCenterGreedy
from anomalib.models.components.sampling import k_center_greedy
from torch.nn import functional as F  # noqa: N812


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """Inside the block, anomalib's coreset sampler draws no tqdm bar (its loop is unchanged)."""
    original = k_center_greedy.tqdm
    k_center_greedy.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        k_center_greedy.tqdm = original


def seeded_coreset(embeddings: torch.Tensor, sampling_ratio: float, seed: int, normalize: bool = False) -> torch.Tensor:
    """Select ``max(1, int(N * sampling_ratio))`` rows of ``embeddings`` ``(N, c)`` by k-center greedy.

    Args:
        embeddings: Candidate features.
        sampling_ratio: Fraction of rows to keep, in ``(0, 1]``; ``1`` returns all rows.
        seed: Seed of the random start and of the random projection.
        normalize: Select on L2-normalised rows (cosine geometry); the original rows are returned.

    Returns:
        The selected rows, ``(n, c)``.
    """
    if not 0 < sampling_ratio <= 1:
        msg = f"sampling_ratio must be in (0, 1], got {sampling_ratio!r}."
        raise ValueError(msg)
    if sampling_ratio == 1:
        return embeddings
    size = max(int(embeddings.shape[0] * sampling_ratio), 1)
    candidates = F.normalize(embeddings.float(), dim=-1) if normalize else embeddings
    devices = [embeddings.device] if embeddings.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _no_progress_bar():
        torch.manual_seed(seed)
        sampler = KCenterGreedy(embedding=candidates, sampling_ratio=size / embeddings.shape[0])
        sampler.model.random_state = seed  # the sparse random projection draws with numpy
        indices = sampler.select_coreset_idxs()
    return embeddings[indices]
