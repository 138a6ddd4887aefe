"""The seeded coreset: anomalib's k-center greedy (same rows) with seeded randomness, buffers reused, no bar."""

from __future__ import annotations

import pytest
import torch
from anomalib.models.components import KCenterGreedy

from anomalib_protorefine.coreset import greedy_indices, seeded_coreset


def _anomalib_by_hand(embeddings: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    sampler = KCenterGreedy(embedding=embeddings, sampling_ratio=size / embeddings.shape[0])
    sampler.model.random_state = seed
    return embeddings[sampler.select_coreset_idxs()]


@pytest.mark.parametrize(("rows", "ratio"), [(300, 0.1), (2000, 0.05)])
def test_same_rows_as_anomalibs_sampler_seeded_by_hand(rows: int, ratio: float) -> None:
    embeddings = torch.randn(rows, 16, generator=torch.Generator().manual_seed(0))
    embeddings[rows // 2 :] = embeddings[: rows - rows // 2]  # duplicate rows: ties, zero distances
    size = int(rows * ratio)
    ours = seeded_coreset(embeddings, ratio, seed=3)
    assert ours.shape == (size, 16)
    assert torch.equal(ours, _anomalib_by_hand(embeddings, size, seed=3))
    assert not torch.equal(ours, seeded_coreset(embeddings, ratio, seed=4))


def test_greedy_loop_on_a_hand_computed_case() -> None:
    # From 0: the farthest is 10; then 4 (distance 4 to 0, 6 to 10) beats 1 (distance 1).
    points = torch.tensor([[0.0], [1.0], [10.0], [4.0], [9.0]])
    assert greedy_indices(points, 4, torch.tensor(0)) == [0, 2, 3, 1]


def test_leaves_the_global_rng_and_draws_no_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    embeddings = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    seeded_coreset(embeddings, 0.2, seed=0)
    assert torch.equal(torch.rand(3), expected)
    captured = capsys.readouterr()
    assert "Selecting Coreset Indices" not in captured.err + captured.out


def test_ratio_one_returns_every_row_and_bad_ratios_are_errors() -> None:
    embeddings = torch.randn(10, 4)
    assert seeded_coreset(embeddings, 1.0, seed=0) is embeddings
    for ratio in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="sampling_ratio must be in"):
            seeded_coreset(embeddings, ratio, seed=0)
