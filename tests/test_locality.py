"""Tests of the locality option of the refiner (``neighbors``, ``affine``): each row of W uses only the
query patch's K nearest bank prototypes (optionally summing to one). Reference values are computed
independently in float64.
"""

from __future__ import annotations

import pytest
import torch

from anomalib_protorefine.refinement import PrototypeRefiner, RefinerOptions
from anomalib_protorefine.refinement.bank import BankFactors
from anomalib_protorefine.refinement.m_step import LocalClosedFormStep, QueryTerms, gradient_step, objective

B, M, N, C = 2, 40, 24, 12


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _data(seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, M, C, generator=gen), torch.randn(n, C, generator=gen)


def _neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, M, k)`` of the k nearest bank rows, from explicit float64 distances."""
    return torch.cdist(queries.double(), bank.double()).topk(k, dim=-1, largest=False).indices


def _local_minimiser64(
    queries: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, weight: float, rho: float, k: int, affine: bool
) -> torch.Tensor:
    """Row-wise float64 minimiser of ||f - w M_I||^2 + rho ||w||^2 + weight ||t - w M_I||^2 over w (sum 1 if affine).

    With ``target = B_j`` (the plan's barycentre) and ``weight = lambda`` this is the local M-step.
    """
    index = _neighbours(queries, bank, k)
    bank64 = bank.double()
    out = torch.zeros(B, M, bank.shape[0], dtype=torch.float64)
    for b in range(B):
        for j in range(M):
            local = bank64[index[b, j]]  # (k, c)
            a = (1 + weight) * local @ local.T + rho * torch.eye(k, dtype=torch.float64)
            r = local @ (queries[b, j].double() + weight * target[b, j].double())
            if affine:  # KKT system with one multiplier
                kkt = torch.zeros(k + 1, k + 1, dtype=torch.float64)
                kkt[:k, :k], kkt[:k, k], kkt[k, :k] = a, 1.0, 1.0
                w = torch.linalg.solve(kkt, torch.cat((r, torch.ones(1, dtype=torch.float64))))[:k]
            else:
                w = torch.linalg.solve(a, r)
            out[b, j, index[b, j]] = w
    return out


@pytest.mark.parametrize("affine", [False, True])
def test_initial_weights_are_the_local_ridge_projection(affine: bool) -> None:
    queries, bank = _data()
    result = PrototypeRefiner(neighbors=5, affine=affine, transport=False).refine(queries, bank)
    expected = _local_minimiser64(queries, bank, torch.zeros_like(queries), 0.0, result.factors.ridge, 5, affine)
    torch.testing.assert_close(result.transform.double(), expected, rtol=1e-4, atol=1e-5)
    assert (result.transform != 0).sum(-1).max() <= 5
    if affine:
        torch.testing.assert_close(result.transform.sum(-1), torch.ones(B, M), rtol=0, atol=1e-5)


@pytest.mark.parametrize("affine", [False, True])
def test_local_m_step_is_the_exact_constrained_minimiser(affine: bool) -> None:
    """For a fixed plan the local step solves the restricted problem: w_j is the minimiser over rows
    supported on the patch's neighbours, toward the plan's barycentre ``B_j = m sum_i T_ij M_i``."""
    queries, bank = _data(1)
    lam = 0.7
    factors = BankFactors.from_bank(bank, lambda_=lam, ridge=1e-3, normalize=False)
    terms = QueryTerms.from_features(queries, factors)
    gen = torch.Generator().manual_seed(3)
    plan = torch.rand(B, N, M, generator=gen, dtype=torch.float64)
    plan = plan / (M * plan.sum(-2, keepdim=True))  # columns sum to 1/m exactly
    step = LocalClosedFormStep(terms, factors, lam, neighbors=6, affine=affine)
    weights, weighted_gram = step(plan.float())
    barycentre = M * plan.transpose(1, 2) @ bank.double()
    expected = _local_minimiser64(queries, bank, barycentre, lam, factors.ridge, 6, affine)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weighted_gram, weights @ factors.gram)
    # It is the minimiser of J among rows with the same support (and sum): random feasible moves increase J.
    j_best = objective(weights, terms, factors, plan.float(), lam)
    for _ in range(3):
        move = torch.randn(weights.shape, generator=gen) * step.mask * 1e-2
        if affine:
            move = (move - move.sum(-1, keepdim=True) / 6) * step.mask
        assert (objective(weights + move, terms, factors, plan.float(), lam) > j_best).all()


def test_one_affine_neighbour_is_plain_patchcore() -> None:
    queries, bank = _data(2)
    scores = PrototypeRefiner(neighbors=1, affine=True, scoring_bank="matched").patch_scores(queries, bank)
    nearest = torch.cdist(queries.double(), bank.double()).amin(-1)
    torch.testing.assert_close(scores.double(), nearest, rtol=1e-4, atol=1e-4)


def test_neighbours_covering_the_bank_give_the_global_refinement() -> None:
    queries, bank = _data(3)
    whole = PrototypeRefiner(num_iterations=3).refine(queries, bank)
    local = PrototypeRefiner(num_iterations=3, neighbors=N).refine(queries, bank)  # K >= n: the paper's form
    torch.testing.assert_close(local.transform, whole.transform)


def test_locality_keeps_an_outlier_far_from_its_prototype() -> None:
    """A wide bank (n > c) spans every feature: the whole-bank refinement rebuilds an outlier patch,
    the local one cannot (the reason for the option)."""
    gen = torch.Generator().manual_seed(4)
    bank = torch.randn(60, 8, generator=gen)
    outlier = torch.full((1, 1, 8), 6.0)
    whole = PrototypeRefiner(transport=False).patch_scores(outlier, bank)
    local = PrototypeRefiner(transport=False, neighbors=4, affine=True).patch_scores(outlier, bank)
    nearest = torch.cdist(outlier, bank).amin()
    assert whole.item() < 0.1 * nearest
    assert local.item() > 0.5 * nearest


def test_gradient_m_step_keeps_weights_on_the_neighbours() -> None:
    queries, bank = _data(5)
    result = PrototypeRefiner(neighbors=4, m_step="gradient", num_iterations=2).refine(queries, bank)
    assert (result.transform != 0).sum(-1).max() <= 4
    factors = result.factors
    terms = QueryTerms.from_features(queries, factors)
    mask = LocalClosedFormStep(terms, factors, 0.3, 4, affine=False).mask
    moved = gradient_step(result.transform, terms, factors, result.plan, 0.3, "sgd", 1.0, 3, mask)
    assert ((moved != 0) <= mask).all()


@pytest.mark.parametrize("transport", [False, True])
def test_local_prototype_norms_are_those_of_the_refined_prototypes(transport: bool) -> None:
    """The local forms give ``||(W M)_j||^2`` from each patch's K neighbours; they must be the norms of
    the prototypes ``W M`` formed explicitly in float64."""
    queries, bank = _data(7)
    result = PrototypeRefiner(neighbors=5, transport=transport, num_iterations=2).refine(queries, bank)
    assert result.proto_sq is not None
    explicit = (result.transform.double() @ bank.double()).pow(2).sum(-1)
    torch.testing.assert_close(result.proto_sq.double(), explicit, rtol=1e-5, atol=1e-5)


def test_local_matched_scores_are_each_patch_distance_to_its_own_local_projection() -> None:
    """The m-linear form (K neighbours, no transport, own prototype, fused): each patch is scored by
    sqrt(||f - P_j|| ||f - nearest||), with P_j its float64 ridge projection onto its neighbours."""
    queries, bank = _data(8)
    refiner = PrototypeRefiner(neighbors=6, transport=False, scoring_bank="matched", score_fusion="geometric")
    scores = refiner.patch_scores(queries, bank)
    rho = BankFactors.from_bank(bank, lambda_=0.3, ridge=refiner.options.ridge, normalize=False).ridge
    weights = _local_minimiser64(queries, bank, torch.zeros_like(queries), 0.0, rho, 6, False)
    own = (queries.double() - weights @ bank.double()).norm(dim=-1)
    nearest = torch.cdist(queries.double(), bank.double()).amin(-1)
    torch.testing.assert_close(scores.double(), (own * nearest).sqrt(), rtol=1e-4, atol=1e-4)
    assert PrototypeRefiner(transport=False, neighbors=6).refine(queries, bank).proto_sq is not None
    assert PrototypeRefiner(transport=False).refine(queries, bank).proto_sq is None  # whole bank: formed when scored


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"neighbors": 0}, ValueError, "^neighbors must be >= 1"),
        ({"neighbors": 2.5}, TypeError, "^neighbors must be an integer"),
        ({"neighbors": True}, TypeError, "^neighbors must be an integer"),
        ({"affine": 1, "neighbors": 4}, TypeError, "^affine must be True or False"),
        ({"affine": True}, ValueError, "affine=True needs neighbors"),
        ({"affine": True, "neighbors": 4, "m_step": "gradient"}, ValueError, "affine=True needs m_step='closed_form'"),
    ],
)
def test_invalid_locality_options(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        RefinerOptions(**options)


@pytest.mark.parametrize("scoring_bank", ["refined", "matched", "union"])
def test_geometric_fusion_is_the_geometric_mean_with_the_nearest_neighbour(scoring_bank: str) -> None:
    queries, bank = _data(6)
    result = PrototypeRefiner(scoring_bank=scoring_bank).refine(queries, bank)
    plain = PrototypeRefiner(scoring_bank=scoring_bank).score_result(result)
    fused = PrototypeRefiner(scoring_bank=scoring_bank, score_fusion="geometric").score_result(result)
    nearest = torch.cdist(queries.double(), bank.double()).amin(-1)
    torch.testing.assert_close(fused.double(), (plain.double() * nearest).sqrt(), rtol=1e-4, atol=1e-5)
    assert (fused - plain).abs().max() > 1e-2  # the fusion changes the scores


def test_invalid_score_fusion_names_the_option() -> None:
    with pytest.raises(ValueError, match=r"^score_fusion must be one of 'none', 'geometric'"):
        RefinerOptions(score_fusion="mean")


def _flops(refiner: PrototypeRefiner, queries: torch.Tensor, bank: torch.Tensor) -> int:
    """Multiply-add flops of scoring ``queries`` once the bank's factors (formed once per bank) are cached."""
    from torch.utils.flop_counter import FlopCounterMode

    refiner.patch_scores(queries, bank)
    with FlopCounterMode(display=False) as counter:
        refiner.patch_scores(queries, bank)
    return counter.get_total_flops()


def test_local_preset_costs_what_the_nearest_neighbour_search_costs() -> None:
    """The ``"local"`` preset's products grow like PatchCore's search (``2 m n c`` multiply-adds, counted by
    hand) as the image grows (m patches, a bank a fixed share of them), the whole-bank EM's (``m n^2``) do not."""
    from anomalib_protorefine.models.patchcore_plus.lightning_model import (
        PATCHCORE_FUSED_REFINER,
        PATCHCORE_LOCAL_REFINER,
    )

    channels = 64
    local_ratio, fused_ratio = [], []
    for patches in (256, 1024):
        gen = torch.Generator().manual_seed(patches)
        queries = torch.randn(1, patches, channels, generator=gen)
        bank = torch.randn(patches // 8, channels, generator=gen)
        search = 2 * patches * bank.shape[0] * channels
        local_ratio.append(_flops(PrototypeRefiner(**PATCHCORE_LOCAL_REFINER), queries, bank) / search)
        fused_ratio.append(_flops(PrototypeRefiner(**PATCHCORE_FUSED_REFINER), queries, bank) / search)
    assert max(local_ratio) < 2.0, local_ratio
    assert local_ratio[1] < 1.1 * local_ratio[0], local_ratio
    assert fused_ratio[1] > 2.0 * fused_ratio[0], fused_ratio  # the whole-bank EM: m n^2, n grows with m


def test_whole_bank_refinement_of_a_large_map_warns_once_and_the_local_form_does_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from anomalib_protorefine.refinement.refiner import LARGE_MAP_PATCHES

    gen = torch.Generator().manual_seed(9)
    bank = torch.randn(20, 4, generator=gen)
    large, small = torch.randn(1, LARGE_MAP_PATCHES + 1, 4, generator=gen), torch.randn(1, 64, 4, generator=gen)
    with caplog.at_level("WARNING", logger="anomalib_protorefine.refinement.refiner"):
        PrototypeRefiner(num_iterations=1).refine(small, bank)
        assert not caplog.records
        whole = PrototypeRefiner(num_iterations=1)
        whole.refine(large, bank)
        whole.refine(large, bank)
        PrototypeRefiner(neighbors=4, transport=False).refine(large, bank)
    assert len(caplog.records) == 1
    assert "refiner='local'" in caplog.records[0].getMessage()
