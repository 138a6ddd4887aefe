"""Tests of the test-time prototype refinement (EM with a POT Sinkhorn E-step), offline and fast.

Notation (see ``docs/method.md``): bank ``M`` (n x c), query features ``F`` (m x c), transform ``W``
(m x n), refined prototypes ``P = W M``, plan ``T`` (n x m) with marginals ``1/n`` and ``1/m``,
``G = M M^T`` and ``rho = ridge * mean(diag(G))``. The objective per query is

    J(W) = 1/m ||F - W M||^2 + rho/m ||W||^2 + lambda * sum_ij T_ij ||M_i - P_j||^2.

Every reference value below is computed independently of the refiner, in float64.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import torch
from lightning.pytorch import LightningModule
from torch.nn import functional as F  # noqa: N812

from anomalib_protorefine.refinement import PrototypeRefiner, RefinementResult, RefinerOptions
from anomalib_protorefine.refinement.bank import BankFactors
from anomalib_protorefine.refinement.m_step import ClosedFormStep, QueryTerms, gradient_step, objective
from anomalib_protorefine.refinement.transport import (
    SinkhornMarginalError,
    marginal_errors,
    solve_plan,
    solve_plans,
)

B, M_PATCHES, N_BANK, C = 3, 50, 20, 16
DISTANCES = ("euclidean", "cosine")


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Run this module single-threaded: tiny tensors gain nothing from threads, and on a busy machine
    OpenMP's thread hand-off makes every small element-wise op (e.g. Adam's ``sqrt``) take milliseconds.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(seed: int = 0, batch: int = B, m: int = M_PATCHES, n: int = N_BANK, c: int = C) -> tuple[torch.Tensor, ...]:
    """Seeded Gaussian queries ``(batch, m, c)`` and bank ``(n, c)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, m, c, generator=gen), torch.randn(n, c, generator=gen)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius distance ``||a - b|| / ||b||``."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def _prepare(queries: torch.Tensor, bank: torch.Tensor, distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The features the refiner works on: float64, L2-normalised rows for the cosine distance."""
    queries, bank = queries.double(), bank.double()
    if distance == "cosine":
        queries, bank = F.normalize(queries, dim=-1), F.normalize(bank, dim=-1)
    return queries, bank


def _rho(bank64: torch.Tensor, ridge: float) -> float:
    return ridge * float((bank64 * bank64).sum(-1).mean())


def _objective64(
    weights: torch.Tensor,
    queries: torch.Tensor,
    bank: torch.Tensor,
    plan: torch.Tensor | None,
    lambda_: float,
    rho: float,
) -> torch.Tensor:
    """``J(W)`` per query, ``(B,)``, written directly from its definition (float64, differentiable)."""
    weights, queries, bank = weights.double(), queries.double(), bank.double()
    m = queries.shape[-2]
    prototypes = weights @ bank
    value = (queries - prototypes).pow(2).sum((-1, -2)) / m + rho * weights.pow(2).sum((-1, -2)) / m
    if plan is not None:
        cost = (bank[None, :, None, :] - prototypes[:, None, :, :]).pow(2).sum(-1)  # (B, n, m)
        value = value + lambda_ * (plan.double() * cost).sum((-1, -2))
    return value


def _ridge_weights64(queries64: torch.Tensor, bank64: torch.Tensor, rho: float) -> torch.Tensor:
    """``W0 = F M^T (G + rho I)^-1`` by a float64 linear solve, ``(B, m, n)``."""
    gram = bank64 @ bank64.T
    system = gram + rho * torch.eye(gram.shape[0], dtype=torch.float64)
    rhs = (queries64 @ bank64.T).transpose(1, 2)  # (B, n, m)
    return torch.linalg.solve(system, rhs).transpose(1, 2)


def _exact_plan(batch: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    """Random positive plans whose columns sum to exactly ``1/m`` (rows to ``1/n`` up to 1e-12)."""
    gen = torch.Generator().manual_seed(seed)
    plan = torch.rand(batch, n, m, generator=gen, dtype=torch.float64) + 0.1
    for _ in range(200):
        plan = plan / (n * plan.sum(-1, keepdim=True))
        plan = plan / (m * plan.sum(-2, keepdim=True))
    return plan


def _setup(distance: str = "euclidean", lambda_: float = 0.3, seed: int = 0) -> tuple:
    """Queries, bank, factors and query terms as the refiner builds them."""
    queries, bank = _data(seed)
    factors = BankFactors.from_bank(bank, lambda_=lambda_, ridge=1e-3, normalize=distance == "cosine")
    features = F.normalize(queries, dim=-1) if distance == "cosine" else queries
    return queries, bank, factors, QueryTerms.from_features(features, factors)


# ---------------------------------------------------------------------------------------------- M-step


@pytest.mark.parametrize("distance", DISTANCES)
def test_objective_matches_definition(distance: str) -> None:
    """The coefficient-space ``objective`` (also logged as a statistic) equals J from its definition."""
    queries, bank, factors, terms = _setup(distance)
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(B, M_PATCHES, N_BANK, generator=gen) * 0.1
    plan = _exact_plan(B, N_BANK, M_PATCHES).float()
    queries64, bank64 = _prepare(queries, bank, distance)
    expected = _objective64(weights, queries64, bank64, plan, 0.3, factors.ridge)
    assert factors.ridge == pytest.approx(_rho(bank64, 1e-3), rel=1e-6)
    torch.testing.assert_close(objective(weights, terms, factors, plan, 0.3).double(), expected, rtol=1e-5, atol=0)
    # Without a plan (or lambda = 0) only the fidelity and ridge terms remain.
    no_ot = _objective64(weights, queries64, bank64, None, 0.3, factors.ridge)
    torch.testing.assert_close(objective(weights, terms, factors, None, 0.3).double(), no_ot, rtol=1e-5, atol=0)
    torch.testing.assert_close(objective(weights, terms, factors, plan, 0.0).double(), no_ot, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("optimizer", "lr", "steps"), [("sgd", 1.9, 500), ("adam", 3.0, 600)])
def test_gradient_step_converges_to_closed_form(optimizer: str, lr: float, steps: int) -> None:
    """With the plan fixed, many optimizer steps reach the closed-form minimiser's objective and prototypes."""
    queries, bank, factors, terms = _setup()
    plan = PrototypeRefiner(lambda_=0.3, num_iterations=2, sinkhorn_tol=1e-6).refine(queries, bank).plan
    start = terms.initial_weights(factors)
    exact = ClosedFormStep(terms, factors, 0.3)(plan)[0]
    j_exact = objective(exact, terms, factors, plan, 0.3)
    # The start is far enough from the optimum for the comparison to mean something.
    assert (objective(start, terms, factors, plan, 0.3) / j_exact - 1).min() > 1e-2

    found = gradient_step(start, terms, factors, plan, 0.3, optimizer, lr, steps)
    j_found = objective(found, terms, factors, plan, 0.3)
    torch.testing.assert_close(j_found, j_exact, rtol=1e-4, atol=0)
    assert _rel(found @ factors.bank, exact @ factors.bank) < 1e-2
    assert not found.requires_grad


def test_sgd_step_decreases_objective() -> None:
    """One SGD step of size 1/L (L: Lipschitz constant of the gradient) never increases J."""
    queries, bank, factors, terms = _setup()
    plan = PrototypeRefiner(lambda_=0.3, num_iterations=1).refine(queries, bank).plan
    weights = terms.initial_weights(factors)
    values = [objective(weights, terms, factors, plan, 0.3)]
    for _ in range(3):
        weights = gradient_step(weights, terms, factors, plan, 0.3, "sgd", 1.0, 1)
        values.append(objective(weights, terms, factors, plan, 0.3))
    for before, after in itertools.pairwise(values):
        assert (after < before).all()


@pytest.mark.parametrize(("optimizer", "lr", "steps", "iterations"), [("sgd", 1.9, 400, 3), ("adam", 3.0, 600, 1)])
def test_refiner_gradient_m_step_matches_closed_form(optimizer: str, lr: float, steps: int, iterations: int) -> None:
    """The whole EM with a converged gradient M-step follows the closed-form EM."""
    queries, bank = _data(batch=2)
    common = {"num_iterations": iterations, "lambda_": 0.3}
    closed = PrototypeRefiner(**common).refine(queries, bank)
    gradient = PrototypeRefiner(m_step="gradient", optimizer=optimizer, lr=lr, gradient_steps=steps, **common)
    result = gradient.refine(queries, bank)
    assert _rel(result.prototypes, closed.prototypes) < 1e-2
    # A default (5-step) gradient M-step is visibly different: the comparison above can fail.
    few = PrototypeRefiner(m_step="gradient", optimizer=optimizer, **common).refine(queries, bank)
    assert _rel(few.prototypes, closed.prototypes) > 1e-2


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("plan_kind", ["uniform", "random"])
def test_closed_form_is_exact_minimiser(distance: str, plan_kind: str) -> None:
    """For a plan with column sums exactly 1/m the closed-form W zeroes the gradient of J."""
    queries, bank, factors, terms = _setup(distance)
    if plan_kind == "uniform":
        plan64 = torch.full((B, N_BANK, M_PATCHES), 1.0 / (N_BANK * M_PATCHES), dtype=torch.float64)
    else:
        plan64 = _exact_plan(B, N_BANK, M_PATCHES)
    best = ClosedFormStep(terms, factors, 0.3)(plan64.float())[0].double()
    queries64, bank64 = _prepare(queries, bank, distance)

    def grad(weights: torch.Tensor) -> torch.Tensor:
        weights = weights.detach().clone().requires_grad_(True)
        _objective64(weights, queries64, bank64, plan64, 0.3, factors.ridge).sum().backward()
        return weights.grad

    reference = grad(_ridge_weights64(queries64, bank64, factors.ridge))  # the OT term's pull at W0
    assert reference.norm() > 1e-3
    assert grad(best).norm() / reference.norm() < 1e-3

    j_best = _objective64(best, queries64, bank64, plan64, 0.3, factors.ridge)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        step = torch.randn(best.shape, generator=gen, dtype=torch.float64) * 1e-2 * best.abs().mean()
        assert (_objective64(best + step, queries64, bank64, plan64, 0.3, factors.ridge) > j_best).all()


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("config", [{"transport": False}, {"lambda_": 0.0}], ids=["no_transport", "lambda0"])
def test_without_ot_gives_ridge_projection(distance: str, config: dict) -> None:
    """Without the OT term the prototypes are the ridge least-squares projection of F on the bank."""
    queries, bank = _data()
    result = PrototypeRefiner(distance=distance, **config).refine(queries, bank)
    assert (result.plan is None) == (config.get("transport", True) is False)
    queries64, bank64 = _prepare(queries, bank, distance)
    weights64 = _ridge_weights64(queries64, bank64, _rho(bank64, 1e-3))
    assert _rel(result.prototypes, weights64 @ bank64) < 1e-4
    assert _rel(result.transform, weights64) < 1e-3


@pytest.mark.parametrize("distance", DISTANCES)
def test_tiny_ridge_full_rank_bank_reproduces_queries(distance: str) -> None:
    """A full-rank bank (n = c) spans every feature: with a tiny ridge the prototypes are the queries."""
    queries, bank = _data(n=C)
    result = PrototypeRefiner(distance=distance, transport=False, ridge=1e-6).refine(queries, bank)
    queries64, _ = _prepare(queries, bank, distance)
    assert _rel(result.prototypes, queries64) < 1e-3
    # With the default ridge the shrinkage is visible: the tolerance above is meaningful.
    default = PrototypeRefiner(distance=distance, transport=False).refine(queries, bank)
    assert _rel(default.prototypes, queries64) > 1e-3


# ---------------------------------------------------------------------------------------------- E-step


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize(
    ("method", "epsilon"),
    [("sinkhorn", 0.05), ("sinkhorn_log", 0.05), ("auto", 0.05), ("auto", 1e-2)],
)
def test_plan_marginals(distance: str, method: str, epsilon: float) -> None:
    """Rows of T sum to 1/n, columns to 1/m (within sinkhorn_tol, relative L2), entries >= 0."""
    queries, bank = _data()
    tol = 1e-3
    result = PrototypeRefiner(distance=distance, sinkhorn_method=method, epsilon=epsilon, sinkhorn_tol=tol).refine(
        queries, bank
    )
    plan = result.plan.double()
    assert plan.shape == (B, N_BANK, M_PATCHES)
    assert (plan >= 0).all()
    torch.testing.assert_close(
        plan.sum(-1), torch.full((B, N_BANK), 1 / N_BANK, dtype=torch.float64), rtol=0, atol=1e-6
    )
    columns = plan.sum(-2)
    b = torch.full((M_PATCHES,), 1 / M_PATCHES, dtype=torch.float64)
    assert ((columns - b).norm(dim=-1) / b.norm()).max() <= tol
    torch.testing.assert_close(plan.sum((-1, -2)), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-4)


def _pot_plans(costs: torch.Tensor, epsilon: float, tol: float = 1e-7) -> torch.Tensor:
    """Reference: POT's single-problem log-domain Sinkhorn on each cost, float64."""
    return torch.stack([solve_plan(c.double(), epsilon, "sinkhorn_log", 20000, tol)[0] for c in costs])


def _random_costs(batch: int, n: int, m: int, seed: int = 0, duplicate: bool = False) -> torch.Tensor:
    """Normalised squared-distance costs ``(batch, n, m)`` (mean 1), optionally with duplicate rows."""
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(n, 8, generator=gen)
    if duplicate:
        bank[n // 2 :] = bank[: n - n // 2]
    points = torch.randn(batch, m, 8, generator=gen)
    costs = torch.cdist(bank.expand(batch, -1, -1), points).pow(2)
    return costs / costs.mean((-1, -2), keepdim=True)


@pytest.mark.parametrize("overrelaxation", [1.0, 1.7])
@pytest.mark.parametrize(
    ("n", "m", "duplicate", "epsilon"),
    [(20, 50, False, 0.05), (50, 20, False, 0.05), (20, 50, True, 0.05), (30, 30, True, 0.2), (20, 50, False, 0.01)],
)
def test_batched_sinkhorn_matches_pot(n: int, m: int, duplicate: bool, epsilon: float, overrelaxation: float) -> None:
    """The batched solver's plans are POT's plans (n > m, n < m, duplicate bank rows, small epsilon)."""
    costs = _random_costs(4, n, m, duplicate=duplicate)
    plans, state = solve_plans(costs, epsilon, 5000, 1e-6, overrelaxation=overrelaxation)
    assert plans.shape == costs.shape
    assert plans.dtype == costs.dtype
    assert state.converged.all()
    reference = _pot_plans(costs, epsilon)
    # Both solvers stop at a relative L2 column violation of 1e-6: plans agree to ~1e-5 in L1 (mass 1).
    assert float((plans.double() - reference).abs().sum((-1, -2)).max()) < 1e-4
    # Each query is solved independently of the others in its batch.
    alone, _ = solve_plans(costs[2:3], epsilon, 5000, 1e-6, overrelaxation=overrelaxation)
    torch.testing.assert_close(alone[0], plans[2], rtol=1e-4, atol=1e-7)


def test_batched_sinkhorn_half_precision_costs() -> None:
    """float16 costs are solved in float32 (a plan entry 1/(n m) is below float16's normal range)."""
    costs = _random_costs(2, 20, 50).half()
    plans, state = solve_plans(costs, 0.05, 5000, 1e-6)
    assert plans.dtype == torch.float32
    assert state.converged.all()
    assert float((plans.double() - _pot_plans(costs.float(), 0.05)).abs().sum((-1, -2)).max()) < 1e-4


def test_batched_sinkhorn_tiny_epsilon_is_flagged_not_wrong() -> None:
    """Tiny epsilon: every query either converges to POT's log-domain plan or is reported unconverged."""
    costs = _random_costs(3, 20, 50)
    plans, state = solve_plans(costs, 1e-4, 100, 1e-3)
    assert not state.converged.any()
    rows, cols = marginal_errors(plans)
    assert not bool(((rows <= 1e-2) & (cols <= 0.1)).all())  # a plan that misses: the refiner's check fires
    # Small but workable epsilon: the stabilised iterations stay finite (no underflow to NaN).
    plans, state = solve_plans(costs, 5e-3, 5000, 1e-4)
    assert state.converged.all()
    assert torch.isfinite(plans).all()
    assert float((plans.double() - _pot_plans(costs, 5e-3, tol=1e-4)).abs().sum((-1, -2)).max()) < 1e-2


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("lambda_", [0.3, 3.0])
def test_auto_solver_matches_pot_refinement(distance: str, lambda_: float) -> None:
    """The refinement with the batched solver (auto) equals the one with POT's per-query solver."""
    queries, bank = _data()
    tol = 1e-6
    batched = PrototypeRefiner(distance=distance, lambda_=lambda_, sinkhorn_tol=tol).refine(queries, bank)
    pot = PrototypeRefiner(distance=distance, lambda_=lambda_, sinkhorn_tol=tol, sinkhorn_method="sinkhorn_log")
    reference = pot.refine(queries, bank)
    assert float((batched.plan - reference.plan).abs().sum((-1, -2)).max()) < 1e-3
    assert _rel(batched.transform, reference.transform) < 1e-3


# ---------------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("m_step", ["closed_form", "gradient"])
@pytest.mark.parametrize("distance", DISTANCES)
def test_batch_equals_single_runs(m_step: str, distance: str) -> None:
    queries, bank = _data()
    refiner = PrototypeRefiner(m_step=m_step, distance=distance)
    batched = refiner.refine(queries, bank)
    batched_scores = refiner.score_result(batched)
    for index in range(B):
        single = PrototypeRefiner(m_step=m_step, distance=distance).refine(queries[index : index + 1], bank)
        torch.testing.assert_close(batched.transform[index], single.transform[0], rtol=1e-5, atol=1e-6)
        # The batched Sinkhorn runs the same iterations; only float32 rounding of the batched products differs.
        torch.testing.assert_close(batched.plan[index], single.plan[0], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(batched_scores[index], refiner.score_result(single)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m_step", ["closed_form", "gradient"])
def test_deterministic(m_step: str) -> None:
    """Two fresh refiners, and the same refiner twice (cached factors), give bitwise identical outputs."""
    queries, bank = _data()
    refiner = PrototypeRefiner(m_step=m_step, scoring_bank="union")
    runs = [refiner.refine(queries, bank), refiner.refine(queries, bank)]
    runs.append(PrototypeRefiner(m_step=m_step, scoring_bank="union").refine(queries, bank))
    first = runs[0]
    for other in runs[1:]:
        assert torch.equal(other.transform, first.transform)
        assert torch.equal(other.plan, first.plan)
        assert torch.equal(other.prototypes, first.prototypes)
        assert torch.equal(refiner.score_result(other), refiner.score_result(first))
        assert other.stats["em_iterations"] == first.stats["em_iterations"]
        assert other.stats["objective"] == first.stats["objective"]


# ---------------------------------------------------------------------------------------------- robustness


def _assert_finite(result: RefinementResult, scores: torch.Tensor) -> None:
    for name, tensor in (("weights", result.transform), ("prototypes", result.prototypes), ("scores", scores)):
        assert torch.isfinite(tensor).all(), name
    if result.plan is not None:
        assert torch.isfinite(result.plan).all()
        assert (result.plan >= 0).all()
    assert all(math.isfinite(value) for value in result.stats.values()), result.stats


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("method", ["auto", "sinkhorn", "sinkhorn_log"])
@pytest.mark.parametrize("epsilon", [1e-4, 1e-6])
def test_small_epsilon_raises_instead_of_wrong_plans(distance: str, method: str, epsilon: float) -> None:
    """Below the safe range Sinkhorn cannot reach the marginals in sinkhorn_max_iter iterations.

    The plans used to come back with marginals off by 78-430 % and scores 10x too large, silently;
    now every method raises an error that names epsilon, sinkhorn_max_iter and the fix.
    """
    queries, bank = _data(batch=1)
    refiner = PrototypeRefiner(
        distance=distance, epsilon=epsilon, sinkhorn_method=method, num_iterations=3, sinkhorn_max_iter=200
    )
    with pytest.raises(SinkhornMarginalError, match=r"epsilon=.*sinkhorn_max_iter=200.*Fix: keep epsilon within"):
        refiner.refine(queries, bank)


def test_unnormalised_cost_error_names_the_normalisation() -> None:
    """``cost_normalization="none"`` makes epsilon absolute: large features give a tiny relative epsilon."""
    queries, bank = _data(batch=1)
    refiner = PrototypeRefiner(cost_normalization="none", num_iterations=2)
    with pytest.raises(SinkhornMarginalError, match="cost_normalization='mean'"):
        refiner.refine(queries * 30, bank * 30)


@pytest.mark.parametrize("epsilon", [0.01, 0.05, 1.0])
@pytest.mark.parametrize("distance", DISTANCES)
def test_safe_epsilon_range_converges(distance: str, epsilon: float) -> None:
    """The documented safe range (0.01 to 1, relative to the mean cost) meets the marginals."""
    queries, bank = _data()
    refiner = PrototypeRefiner(distance=distance, epsilon=epsilon)
    result = refiner.refine(queries, bank)
    rows, _ = marginal_errors(result.plan)
    assert float(rows.max()) < 1e-4
    # The stopping rule: L2 column-marginal violation relative to the marginal's norm below sinkhorn_tol.
    columns = result.plan.double().sum(-2)
    target = torch.full_like(columns, 1.0 / columns.shape[-1])
    relative = (columns - target).norm(dim=-1) / target.norm(dim=-1)
    assert float(relative.max()) <= refiner.options.sinkhorn_tol


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(distance: str, dtype: torch.dtype) -> None:
    """Half-precision features are refined in float32 and returned in their own dtype."""
    queries, bank = _data()
    refiner = PrototypeRefiner(distance=distance, num_iterations=3)
    scores = refiner.patch_scores(queries.to(dtype), bank.to(dtype))
    assert scores.dtype == dtype
    assert scores.shape == (B, M_PATCHES)
    assert torch.isfinite(scores).all()
    prototypes = refiner(queries.to(dtype), bank.to(dtype))
    assert prototypes.dtype == dtype
    assert torch.isfinite(prototypes).all()
    # Same as refining the (rounded) features in float32.
    reference = refiner.patch_scores(queries.to(dtype).float(), bank.to(dtype).float())
    torch.testing.assert_close(scores.float(), reference, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("m_step", ["closed_form", "gradient"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("case", ["duplicate_bank", "identical_bank", "zero_bank", "zero_queries"])
def test_degenerate_inputs_are_finite(m_step: str, distance: str, case: str) -> None:
    queries, bank = _data()
    if case == "duplicate_bank":
        bank = torch.cat([bank, bank])
    elif case == "identical_bank":
        bank = bank[:1].repeat(N_BANK, 1)
    elif case == "zero_bank":
        bank = torch.zeros_like(bank)
    else:
        queries = torch.zeros_like(queries)
    refiner = PrototypeRefiner(m_step=m_step, distance=distance, scoring_bank="union", num_iterations=3)
    result = refiner.refine(queries, bank)
    _assert_finite(result, refiner.score_result(result))


def test_duplicate_bank_rows_do_not_change_ridge_projection() -> None:
    """Duplicating the bank leaves its span unchanged: the no-OT prototypes match the float64 reference."""
    queries, bank = _data()
    doubled = torch.cat([bank, bank])
    result = PrototypeRefiner(transport=False).refine(queries, doubled)
    bank64 = doubled.double()
    expected = _ridge_weights64(queries.double(), bank64, _rho(bank64, 1e-3)) @ bank64
    assert _rel(result.prototypes, expected) < 1e-3


# ---------------------------------------------------------------------------------------------- validation

_BAD_OPTIONS = [
    ("lambda_", -0.1, ValueError),
    ("lambda_", math.nan, ValueError),
    ("lambda_", math.inf, ValueError),
    ("lambda_", "0.3", TypeError),
    ("lambda_", True, TypeError),
    ("epsilon", 0.0, ValueError),
    ("epsilon", -0.05, ValueError),
    ("epsilon", math.nan, ValueError),
    ("num_iterations", 0, ValueError),
    ("num_iterations", 1.5, TypeError),
    ("num_iterations", True, TypeError),
    ("em_tol", -1e-3, ValueError),
    ("em_tol", math.nan, ValueError),
    ("transport", 1, TypeError),
    ("transport", "yes", TypeError),
    ("distance", "l2", ValueError),
    ("m_step", "newton", ValueError),
    ("optimizer", "lbfgs", ValueError),
    ("scoring_bank", "all", ValueError),
    ("sinkhorn_method", "greenkhorn", ValueError),
    ("cost_normalization", "median", ValueError),
    ("ridge", 0.0, ValueError),
    ("ridge", -1e-3, ValueError),
    ("ridge", math.nan, ValueError),
    ("lr", 0.0, ValueError),
    ("gradient_steps", 0, ValueError),
    ("gradient_steps", False, TypeError),
    ("sinkhorn_max_iter", 0, ValueError),
    ("sinkhorn_max_iter", 10.0, TypeError),
    ("sinkhorn_tol", 0.0, ValueError),
    ("sinkhorn_tol", math.inf, ValueError),
]


@pytest.mark.parametrize(("name", "value", "error"), _BAD_OPTIONS, ids=lambda x: repr(x)[:20])
@pytest.mark.parametrize("factory", [PrototypeRefiner, RefinerOptions], ids=["refiner", "options"])
def test_invalid_options_name_the_parameter(factory: type, name: str, value: object, error: type) -> None:
    with pytest.raises(error, match=rf"^{re.escape(name)} must "):
        factory(**{name: value})


def test_valid_options_are_accepted() -> None:
    """The boundary values that are allowed (lambda 0, em_tol 0, integer-valued floats for floats)."""
    options = RefinerOptions(lambda_=0, em_tol=0.0, epsilon=1e-9, num_iterations=1, ridge=1e-12, transport=False)
    assert options.lambda_ == 0
    assert PrototypeRefiner(lambda_=1, epsilon=1).options.as_dict()["epsilon"] == 1


def _bad_inputs() -> list:
    queries, bank = _data(batch=1, m=5, n=3, c=4)
    nan_queries = queries.clone()
    nan_queries[0, 1, 2] = math.nan
    inf_bank = bank.clone()
    inf_bank[1, 0] = math.inf
    return [
        pytest.param(queries[0], bank, ValueError, "queries", id="queries_2d"),
        pytest.param(queries[None], bank, ValueError, "queries", id="queries_4d"),
        pytest.param(queries.tolist(), bank, ValueError, "queries", id="queries_list"),
        pytest.param(queries, bank[None], ValueError, "bank", id="bank_3d"),
        pytest.param(queries, bank[0], ValueError, "bank", id="bank_1d"),
        pytest.param(queries, bank[:, :3], ValueError, "channels", id="channel_mismatch"),
        pytest.param(queries, bank[:0], ValueError, "bank", id="empty_bank"),
        pytest.param(queries[:, :0], bank, ValueError, "queries", id="no_patches"),
        pytest.param(nan_queries, bank, ValueError, "queries", id="nan_queries"),
        pytest.param(queries, inf_bank, ValueError, "bank", id="inf_bank"),
        pytest.param(queries.long(), bank, TypeError, "queries", id="int_queries"),
        pytest.param(queries, bank.int(), TypeError, "bank", id="int_bank"),
    ]


@pytest.mark.parametrize(("queries", "bank", "error", "name"), _bad_inputs())
def test_invalid_inputs_raise_clear_errors(queries: object, bank: object, error: type, name: str) -> None:
    refiner = PrototypeRefiner()
    with pytest.raises(error, match=re.escape(name)):
        refiner.refine(queries, bank)
    with pytest.raises(error, match=re.escape(name)):
        refiner.patch_scores(queries, bank)


# ---------------------------------------------------------------------------------------------- inference mode


@pytest.mark.parametrize(("m_step", "optimizer"), [("gradient", "sgd"), ("gradient", "adam"), ("closed_form", "sgd")])
def test_inference_mode(m_step: str, optimizer: str) -> None:
    """Under ``torch.inference_mode()`` (Lightning's val/test loops) the EM runs and matches the normal run."""
    queries, bank = _data()
    options = {"m_step": m_step, "optimizer": optimizer, "num_iterations": 3}
    outside = PrototypeRefiner(**options).refine(queries, bank)
    refiner = PrototypeRefiner(**options)
    with torch.inference_mode():
        queries_inf, bank_inf = queries.clone(), bank.clone()  # inference tensors, as Lightning produces them
        assert queries_inf.is_inference()
        inside = refiner.refine(queries_inf, bank_inf)
        scores_inside = refiner.score_result(inside)
    torch.testing.assert_close(inside.transform, outside.transform, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(inside.plan, outside.plan, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(scores_inside, refiner.score_result(outside), rtol=1e-6, atol=1e-7)
    # Factors cached under inference mode are reused outside it (same bank) without error.
    again = refiner.refine(queries, bank_inf)
    assert again.factors is inside.factors
    torch.testing.assert_close(again.transform, outside.transform, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- scoring


def _pairwise_cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(1 - cos(a_j, b_k)) / 2``, ``(B, m, k)``, with ``F.cosine_similarity``."""
    return (1.0 - F.cosine_similarity(a[:, :, None, :], b[:, None, :, :], dim=-1)) / 2.0


@pytest.mark.parametrize("distance", DISTANCES)
def test_scores_match_explicit_distances(distance: str) -> None:
    """Scores equal the distances to ``result.prototypes`` (and the bank) computed explicitly in float64.

    A large lambda pulls the prototypes to bank barycenters, so that the three scoring banks differ.
    """
    queries, bank = _data()
    queries[:, 0] = bank[0]  # a patch on a bank row: distance 0 to the bank
    result = PrototypeRefiner(distance=distance, lambda_=10.0).refine(queries, bank)
    prototypes = result.prototypes.double()
    queries64, bank64 = _prepare(queries, bank, distance)
    if distance == "euclidean":
        matched = (queries64 - prototypes).norm(dim=-1)
        refined = torch.cdist(queries64, prototypes).amin(-1)
        to_bank = torch.cdist(queries64, bank64[None].expand(B, -1, -1)).amin(-1)
    else:
        matched = (1.0 - F.cosine_similarity(queries64, prototypes, dim=-1)) / 2.0
        refined = _pairwise_cosine_distance(queries64, prototypes).amin(-1)
        to_bank = _pairwise_cosine_distance(queries64, bank64[None].expand(B, -1, -1)).amin(-1)
        # Scores of the original (unnormalised) features: cosine is scale-invariant.
        raw = (1.0 - F.cosine_similarity(queries.double(), prototypes, dim=-1)) / 2.0
        torch.testing.assert_close(raw, matched)
    expected = {"matched": matched, "refined": refined, "union": torch.minimum(refined, to_bank)}
    # Distances come from float32 squared-norm expansions: for the Euclidean distance compare squares,
    # whose error is about float32 eps times ||f||^2 (the square root amplifies it near zero distance).
    square = (lambda x: x.double() ** 2) if distance == "euclidean" else (lambda x: x.double())
    atol = 1e-6 * float(queries64.pow(2).sum(-1).max())
    scores = {}
    for mode, reference in expected.items():
        refiner = PrototypeRefiner(distance=distance, scoring_bank=mode, lambda_=10.0)
        scores[mode] = refiner.score_result(result)
        assert scores[mode].dtype == torch.float32
        torch.testing.assert_close(square(scores[mode]), square(reference), rtol=1e-4, atol=atol)
    assert (square(scores["refined"]) <= square(scores["matched"]) + atol).all()
    assert (scores["union"] <= scores["refined"]).all()
    # patch_scores = refine + score_result.
    union = PrototypeRefiner(distance=distance, scoring_bank="union", lambda_=10.0).patch_scores(queries, bank)
    torch.testing.assert_close(union, scores["union"], rtol=1e-6, atol=1e-6)
    # The modes differ on this data (otherwise the checks above could not tell them apart).
    assert (scores["refined"] < scores["matched"] - 1e-3).any()
    assert (scores["union"] < scores["refined"] - 1e-3).any()


# ---------------------------------------------------------------------------------------------- OT term


@pytest.mark.parametrize("distance", DISTANCES)
def test_transport_term_moves_prototypes_to_barycentric_projection(distance: str) -> None:
    queries, bank = _data()
    without = PrototypeRefiner(distance=distance, transport=False).refine(queries, bank)
    with_ot = PrototypeRefiner(distance=distance, lambda_=0.3).refine(queries, bank)
    assert _rel(with_ot.prototypes, without.prototypes) > 0.05

    distances = []
    for lambda_ in (0.1, 1.0, 10.0):
        result = PrototypeRefiner(distance=distance, lambda_=lambda_).refine(queries, bank)
        # Barycentric projection of the bank through the plan: P_j -> m sum_i T_ij M_i.
        barycentric = M_PATCHES * result.plan.transpose(1, 2) @ result.factors.bank
        distances.append(_rel(result.prototypes, barycentric))
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.2 < distances[0]


# ---------------------------------------------------------------------------------------------- EM loop


def _easy_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Queries whose patches are copies of bank rows."""
    _, bank = _data()
    rows = torch.randint(0, N_BANK, (B, M_PATCHES), generator=torch.Generator().manual_seed(5))
    return bank[rows], bank


def test_em_tol_stops_early() -> None:
    queries, bank = _easy_problem()
    early = PrototypeRefiner(em_tol=1e-2, num_iterations=10).refine(queries, bank)
    iterations = int(early.stats["em_iterations"])
    assert 2 <= iterations < 10
    full = PrototypeRefiner(em_tol=0.0, num_iterations=10).refine(queries, bank)
    assert full.stats["em_iterations"] == 10
    # For one query, stopping early is the same as asking for that many iterations (in a batch,
    # each query is frozen at its own iteration).
    single = PrototypeRefiner(em_tol=1e-2, num_iterations=10).refine(queries[:1], bank)
    truncated = PrototypeRefiner(num_iterations=int(single.stats["em_iterations"])).refine(queries[:1], bank)
    assert single.stats["em_iterations"] < 10
    assert torch.equal(single.transform, truncated.transform)
    assert torch.equal(single.plan, truncated.plan)


# ---------------------------------------------------------------------------------------------- scale


@pytest.mark.parametrize("normalization", ["mean", "max"])
def test_cost_normalization_makes_epsilon_scale_free(normalization: str) -> None:
    queries, bank = _data()
    refiner = PrototypeRefiner(cost_normalization=normalization)
    small = refiner.refine(queries, bank)
    large = refiner.refine(queries * 1000, bank * 1000)
    torch.testing.assert_close(large.plan, small.plan, rtol=0, atol=1e-4)
    assert _rel(large.prototypes, small.prototypes * 1000) < 1e-3
    torch.testing.assert_close(refiner.score_result(large), refiner.score_result(small) * 1000, rtol=1e-3, atol=0)


def test_without_cost_normalization_epsilon_is_absolute() -> None:
    """Contrast: with ``cost_normalization="none"`` rescaling the features changes the plan."""
    queries, bank = _data()
    refiner = PrototypeRefiner(cost_normalization="none", num_iterations=1)
    assert (refiner.refine(queries * 0.1, bank * 0.1).plan - refiner.refine(queries, bank).plan).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- factor cache


@pytest.mark.parametrize("inference", [False, True])
def test_bank_factor_cache(inference: bool) -> None:
    queries, bank = _data()
    refiner = PrototypeRefiner()
    context = torch.inference_mode() if inference else torch.no_grad()
    with context:
        bank = bank.clone()
        assert bank.is_inference() == inference
        first = refiner.refine(queries, bank)
        second = refiner.refine(queries, bank)
        assert second.factors is first.factors
        assert refiner.bank_factors(bank) is first.factors
        bank.add_(1)
        third = refiner.refine(queries, bank)
    assert third.factors is not first.factors
    bank64 = bank.double()
    torch.testing.assert_close(third.factors.gram.double(), bank64 @ bank64.T, rtol=1e-6, atol=1e-4)
    fresh = PrototypeRefiner().refine(queries, bank.clone())
    torch.testing.assert_close(third.transform, fresh.transform)
    # The cache is keyed by the options that enter the factors, too.
    assert PrototypeRefiner(lambda_=1.0).bank_factors(bank) is not refiner.bank_factors(bank)


# ---------------------------------------------------------------------------------------------- Lightning


class _FakeModule(LightningModule):
    """A LightningModule whose ``log`` is a mock, holding a refiner the way the models' torch models do."""

    def __init__(self, refiner: PrototypeRefiner) -> None:
        super().__init__()
        self.log = MagicMock()
        self.model = SimpleNamespace(refinement_stats=refiner.last_stats)


def test_refinement_package_imports_neither_lightning_nor_anomalib() -> None:
    """The refinement core is torch + POT only: the models' Lightning callback logs its statistics."""
    import ast

    import anomalib_protorefine.refinement as package

    imported: dict[str, set[str]] = {}
    for path in Path(package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            imported.setdefault(path.name, set()).update(name.split(".")[0] for name in names)
    assert {"refiner.py", "transport.py", "m_step.py"} <= set(imported)
    banned = {"lightning", "pytorch_lightning", "anomalib"}
    offending = {name: sorted(roots & banned) for name, roots in imported.items()}
    assert not any(offending.values()), offending
    assert "torch" in imported["refiner.py"]


@pytest.mark.parametrize("hook", ["on_test_batch_end", "on_validation_batch_end"])
def test_callback_logs_statistics(hook: str) -> None:
    from anomalib_protorefine.models.callbacks import RefinementStatsCallback

    refiner = PrototypeRefiner(num_iterations=2)
    callback = RefinementStatsCallback()
    module = _FakeModule(refiner)
    batch = torch.zeros(B, 3, 8, 8)  # len(batch) is the batch size, like anomalib's ImageBatch
    getattr(callback, hook)(MagicMock(), module, None, batch, 0)
    module.log.assert_not_called()  # nothing refined yet

    queries, bank = _data()
    result = refiner.refine(queries, bank)
    module.model.refinement_stats = refiner.last_stats
    getattr(callback, hook)(MagicMock(), module, None, batch, 0)
    logged = {call.args[0]: call for call in module.log.call_args_list}
    # The batch's refinement time is logged per image; the other statistics as they are.
    names = {"seconds": "seconds_per_image"}
    expected = {"em_iterations", "sinkhorn_iterations", "objective", "ot_cost", "seconds"}
    assert set(logged) == {f"refinement/{names.get(key, key)}" for key in expected}
    for key in expected:
        call = logged[f"refinement/{names.get(key, key)}"]
        value = result.stats[key] / B if key == "seconds" else result.stats[key]
        assert call.args[1] == pytest.approx(value)
        assert call.kwargs["batch_size"] == B
        assert call.kwargs["on_epoch"] is True
        assert call.kwargs["sync_dist"] is True
    assert result.stats["em_iterations"] == 2
    assert result.stats["sinkhorn_iterations"] > 0
    assert result.stats["ot_cost"] > 0
    queries64, bank64 = queries.double(), bank.double()
    expected_objective = _objective64(result.transform, queries64, bank64, result.plan, 0.3, _rho(bank64, 1e-3))
    assert result.stats["objective"] == pytest.approx(float(expected_objective.mean()), rel=1e-5)


# ---------------------------------------------------------------- regressions found in review


@pytest.mark.parametrize("method", ["sinkhorn", "auto"])
def test_scaling_sinkhorn_recovers_from_numerical_breakdown(method: str) -> None:
    """POT's scaling iterations stop at a stale iterate on underflow; the plan must still be valid."""
    queries, bank = _data(seed=3, batch=1, m=50, n=20, c=16)
    # epsilon = 3e-3: POT's scaling iterations break down at 2 of the 10 E-steps on these features
    # (1e-3, used before, is now below the range where the log domain converges: it raises).
    result = PrototypeRefiner(sinkhorn_method=method, epsilon=3e-3, sinkhorn_max_iter=3000).refine(queries, bank)
    n = result.plan.shape[-2]
    assert torch.allclose(result.plan.sum((-1, -2)), torch.ones(1), atol=1e-3)
    assert torch.allclose(result.plan.sum(-1), torch.full((1, n), 1 / n), rtol=1e-2)


def test_in_place_row_swap_invalidates_cache_and_keeps_old_results() -> None:
    queries, bank = _data(seed=4)
    bank = bank.round()  # integer values: a row swap keeps every checksum
    refiner = PrototypeRefiner()
    first = refiner.refine(queries, bank)
    old_prototypes = first.prototypes.clone()
    bank[[0, 1]] = bank[[1, 0]]
    second = refiner.refine(queries, bank)
    fresh = PrototypeRefiner().refine(queries, bank.clone())
    assert torch.equal(first.prototypes, old_prototypes)  # factors hold their own copy of the bank
    assert second.factors is not first.factors  # the swap was seen: factors rebuilt, not served from the cache
    assert torch.allclose(second.prototypes, fresh.prototypes, atol=1e-5)


def test_wide_bank_projection_is_exact_in_float32() -> None:
    """n > c makes G singular; the solves then run in feature space and stay accurate."""
    queries, bank = _data(seed=5, batch=2, m=30, n=64, c=16)
    result = PrototypeRefiner(transport=False, ridge=1e-6).refine(queries, bank)
    assert result.factors.feature_space
    assert _rel(result.prototypes, queries) < 1e-4


def test_em_tol_result_does_not_depend_on_the_batch() -> None:
    queries, bank = _data(seed=6, batch=2)
    queries[1] = queries[1] * 5 + 3  # a harder query that keeps moving longer
    refiner = PrototypeRefiner(em_tol=1e-2, num_iterations=10)
    alone = refiner.patch_scores(queries[:1], bank)
    together = refiner.patch_scores(queries, bank)[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_empty_batch_is_rejected() -> None:
    _, bank = _data()
    with pytest.raises(ValueError, match="queries"):
        PrototypeRefiner().refine(torch.empty(0, 5, bank.shape[1]), bank)


def test_numpy_scalars_are_accepted_as_options() -> None:
    np = pytest.importorskip("numpy")
    options = RefinerOptions(lambda_=np.float64(0.3), num_iterations=np.int64(3))
    assert options.num_iterations == 3


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("scoring_bank", ["refined", "union"])
def test_chunked_scoring_is_exact(monkeypatch: pytest.MonkeyPatch, distance: str, scoring_bank: str) -> None:
    """Scoring in blocks of query patches (memory linear in m) gives the one-block scores.

    Not bitwise: BLAS may round a (rows x n)(n x m) product differently for different row counts.
    """
    import anomalib_protorefine.refinement.refiner as refiner_module

    queries, bank = _data()
    refiner = PrototypeRefiner(distance=distance, scoring_bank=scoring_bank, num_iterations=2)
    result = refiner.refine(queries, bank)
    whole = refiner.score_result(result)
    # Reference: the previous scoring, one (B, m, m) block of distances and its row minima.
    proto_sq = (result.transform @ result.factors.gram * result.transform).sum(-1)
    dots = result.terms.cross @ result.transform.transpose(1, 2)
    sq = result.terms.sq_norms
    one_block = refiner._distance(dots, sq[..., None], proto_sq[:, None, :], cosine=distance == "cosine").amin(-1)
    if scoring_bank == "union":
        to_bank = refiner._distance(
            result.terms.cross, sq[..., None], result.factors.sq_norms[None, None], cosine=distance == "cosine"
        )
        one_block = torch.minimum(one_block, to_bank.amin(-1))
    torch.testing.assert_close(whole, one_block, rtol=1e-6, atol=1e-6)
    for chunk in (1, 7 * B * M_PATCHES, 3 * B * M_PATCHES + 5):
        monkeypatch.setattr(refiner_module, "_SCORE_CHUNK", chunk)
        torch.testing.assert_close(refiner.score_result(result), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_and_fails_on_disagreement() -> None:
    """``scripts/gpu_check.py --device cpu`` (the CPU path of ``scripts/gpu.sh``): every row runs, CPU
    against itself differs by float rounding at most, and a difference above ``--tolerance`` fails the
    script (here a negative tolerance, so that every row disagrees: exit 1, every row "NO")."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "scripts" / "gpu_check.py"), "--device", "cpu", "--small"]
    done = subprocess.run(
        [*command, "--tolerance", "-1"], capture_output=True, text=True, check=False, timeout=600, cwd=root
    )
    assert done.returncode == 1, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "agree" not in line]
    names = {name.strip() for name, *_ in rows}
    assert {"PatchCorePlus lambda 3 closed_form", "PatchCore baseline", "WinClipPlus refined (tiny)"} <= names
    for name, patch, image, agree in rows:
        assert agree.strip() == "NO", name
        assert float(patch) <= 1e-6, name  # the same device: no difference
        assert float(image) <= 1e-6, name
