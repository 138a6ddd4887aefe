"""The seeded coreset: anomalib's k-center greedy with seeded randomness, no progress bar."""

from __future__ import annotations

import pytest
import torch
from anomalib.models.components import KCenterGreedy
from anomalib.models.components.sampling import k_center_greedy

from anomalib_protorefine.coreset import seeded_coreset


def _anomalib_by_hand(embeddings: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    sampler = KCenterGreedy(embedding=embeddings, sampling_ratio=size / embeddings.shape[0])
    sampler.model.random_state = seed
    return embeddings[sampler.select_coreset_idxs()]


def test_same_rows_as_anomalibs_sampler_seeded_by_hand() -> None:
    embeddings = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    ours = seeded_coreset(embeddings, 0.1, seed=3)
    assert ours.shape == (30, 16)
    assert torch.equal(ours, _anomalib_by_hand(embeddings, 30, seed=3))
    assert not torch.equal(ours, seeded_coreset(embeddings, 0.1, seed=4))


def test_leaves_the_global_rng_and_draws_no_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    embeddings = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    original = k_center_greedy.tqdm
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    seeded_coreset(embeddings, 0.2, seed=0)
    assert torch.equal(torch.rand(3), expected)
    captured = capsys.readouterr()
    assert "Selecting Coreset Indices" not in captured.err + captured.out
    assert k_center_greedy.tqdm is original  # anomalib's own sampler keeps its bar
    _anomalib_by_hand(embeddings, 40, seed=0)
    assert "Selecting Coreset Indices" in capsys.readouterr().err


def test_ratio_one_returns_every_row_and_bad_ratios_are_errors() -> None:
    embeddings = torch.randn(10, 4)
    assert seeded_coreset(embeddings, 1.0, seed=0) is embeddings
    for ratio in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="sampling_ratio must be in"):
            seeded_coreset(embeddings, ratio, seed=0)
