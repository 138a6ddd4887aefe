"""Tests of the refinement's shortcuts: each gives the plain computation's result.

* the EM iterates on the coupling ``G W^T`` with a cost that leaves out row and column constants
  (``coupling_cost``) and forms W once: same W as the textbook EM (full cost, POT's log-domain
  Sinkhorn, full closed-form M-step every iteration) written out here;
* ``solve_plans`` warm-started from row potentials: the cold plan, in fewer iterations, and blind
  to a column constant added to the cost;
* the kernel floor: no float32 subnormals in the plans (slow CPU arithmetic), same plan as POT;
* the closed-form gradient of the gradient M-step equals autograd's, and SGD computed in closed
  form in the eigenbasis of ``G`` equals torch's SGD;
* the finiteness check by a sum still rejects NaN/Inf and accepts huge finite features.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from anomalib_protorefine.refinement import PrototypeRefiner
from anomalib_protorefine.refinement.bank import BankFactors
from anomalib_protorefine.refinement.m_step import (
    ClosedFormStep,
    QueryTerms,
    coupling_cost,
    gradient_step,
    objective,
    objective_gradient,
    transport_cost,
)
from anomalib_protorefine.refinement.transport import solve_plan, solve_plans

TINY = torch.finfo(torch.float32).tiny


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(seed: int = 0, batch: int = 3, m: int = 40, n: int = 24, c: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, m, c, generator=gen), torch.randn(n, c, generator=gen)


def _costs(batch: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    """Squared-distance costs ``(batch, n, m)`` with mean 1."""
    gen = torch.Generator().manual_seed(seed)
    costs = torch.cdist(torch.randn(batch, n, 8, generator=gen), torch.randn(batch, m, 8, generator=gen)).pow(2)
    return costs / costs.mean((-1, -2), keepdim=True)


def _subnormals(tensor: torch.Tensor) -> int:
    return int(((tensor != 0) & (tensor.abs() < TINY)).sum())


@pytest.mark.parametrize("n", [24, 60])  # n < c... and n > c (the bank factors' feature-space branch)
@pytest.mark.parametrize("lambda_", [0.3, 3.0])
def test_coupling_em_equals_textbook_em(n: int, lambda_: float) -> None:
    """Refiner (coupling cost, row warm starts, W formed once) == the EM of the paper written out."""
    queries, bank = _data(n=n, c=32)
    epsilon, iterations = 0.05, 4
    refiner = PrototypeRefiner(lambda_=lambda_, num_iterations=iterations, sinkhorn_tol=1e-7, sinkhorn_max_iter=20000)
    result = refiner.refine(queries, bank)

    factors = BankFactors.from_bank(bank, lambda_, 1e-3, normalize=False)
    terms = QueryTerms.from_features(queries, factors)
    step = ClosedFormStep(terms, factors, lambda_)
    weights = terms.initial_weights(factors)
    scale = transport_cost(weights, factors).mean((-1, -2))
    for _ in range(iterations):
        cost = transport_cost(weights, factors) / scale[:, None, None]
        plan = torch.stack([solve_plan(c.double(), epsilon, "sinkhorn_log", 20000, 1e-7)[0] for c in cost]).float()
        weights = step(plan)[0]
    assert float((result.plan - plan).abs().sum((-1, -2)).max()) < 1e-3
    torch.testing.assert_close(result.transform, weights, rtol=1e-3, atol=1e-4)


def test_coupling_is_the_weighted_gram_and_cost_differs_by_constants() -> None:
    queries, bank = _data()
    factors = BankFactors.from_bank(bank, 0.3, 1e-3, normalize=False)
    step = ClosedFormStep(QueryTerms.from_features(queries, factors), factors, 0.3)
    plan = torch.softmax(torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(2)), dim=1) / 40
    weights, weighted_gram = step(plan)
    coupling = step.coupling(plan)
    torch.testing.assert_close(coupling, weighted_gram.transpose(1, 2), rtol=1e-4, atol=1e-4)
    scale, offset = torch.tensor([2.0, 1.0, 0.5]), torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    cost = transport_cost(weights, factors) / scale[:, None, None]
    difference = cost.double() - coupling_cost(coupling, scale, offset).double()
    # Row i, column j: (|M_i|^2 + |p_j|^2 - offset_j) / s, i.e. rank one in (row constant, column constant).
    rows, cols = difference - difference[:, :, :1], difference - difference[:, :1, :]
    assert float((rows - rows[:, :1, :]).abs().max()) < 1e-3
    assert float((cols - cols[:, :, :1]).abs().max()) < 1e-3


def test_row_potential_warm_start() -> None:
    costs = _costs(3, 20, 50)
    _cold, state = solve_plans(costs, 0.05, 5000, 1e-6)
    nearby = costs + 0.01 * _costs(3, 20, 50, seed=1)
    fresh, fresh_state = solve_plans(nearby, 0.05, 5000, 1e-6)
    warm, warm_state = solve_plans(nearby, 0.05, 5000, 1e-6, row_potential=state.row_potential)
    assert (warm_state.iterations < fresh_state.iterations).all()
    assert float((warm - fresh).abs().sum((-1, -2)).max()) < 1e-4
    # A column constant (how the refiner's E-step cost changes between EM iterations) is absorbed
    # by the first column update: same iterations, same plan.
    shifted = nearby + 3.0 * torch.rand(3, 1, 50, generator=torch.Generator().manual_seed(3))
    again, again_state = solve_plans(shifted, 0.05, 5000, 1e-6, row_potential=state.row_potential)
    assert float((again - warm).abs().sum((-1, -2)).max()) < 1e-4
    assert (again_state.iterations <= warm_state.iterations + 10).all()
    # The returned potentials reproduce the plan: T = exp((f + g - C) / epsilon).
    rebuilt = torch.exp((state.row_potential[:, :, None] + state.potential[:, None, :] - costs) / 0.05)
    assert float((rebuilt - _cold).abs().sum((-1, -2)).max()) < 1e-4


def test_kernel_floor_leaves_no_subnormals() -> None:
    """A nearly deterministic plan (cost range 60 epsilon and more) has no float32 subnormals, and is POT's plan."""
    costs = _costs(2, 30, 40) * 3.0
    plans, state = solve_plans(costs, 0.05, 20000, 1e-6, overrelaxation=1.7)
    assert state.converged.all()
    assert _subnormals(plans) == 0
    assert int((plans == 0).sum()) > 0  # the floor did cut entries
    reference = torch.stack([solve_plan(c.double(), 0.05, "sinkhorn_log", 20000, 1e-7)[0] for c in costs])
    assert float((plans.double() - reference).abs().sum((-1, -2)).max()) < 1e-4


def test_refined_plans_and_weights_have_no_subnormals() -> None:
    """lambda 3, epsilon 0.01: without the floor, hundreds of the plans' entries are subnormal."""
    queries, bank = _data()
    result = PrototypeRefiner(lambda_=3.0, epsilon=0.01).refine(queries, bank)
    assert _subnormals(result.plan) == 0
    assert _subnormals(result.transform) == 0


@pytest.mark.parametrize("lambda_", [0.0, 0.3, 3.0])
def test_objective_gradient_equals_autograd(lambda_: float) -> None:
    queries, bank = _data()
    factors = BankFactors.from_bank(bank, lambda_, 1e-3, normalize=False)
    terms = QueryTerms.from_features(queries, factors)
    gen = torch.Generator().manual_seed(4)
    plan = torch.softmax(torch.randn(3, 24, 40, generator=gen), dim=1) / 40
    weights = (terms.initial_weights(factors) + 0.1 * torch.randn(3, 40, 24, generator=gen)).requires_grad_(True)
    objective(weights, terms, factors, plan, lambda_).sum().backward()
    detached = weights.detach()
    gradient = objective_gradient(detached, detached @ factors.gram, terms, factors, plan, lambda_)
    torch.testing.assert_close(gradient, weights.grad, rtol=1e-4, atol=1e-6)


def test_finiteness_check_by_sum() -> None:
    queries, bank = _data()
    refiner = PrototypeRefiner(num_iterations=1)
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = queries.clone()
        bad[1, 3, 2] = value
        with pytest.raises(ValueError, match="queries contains NaN or Inf"):
            refiner.refine(bad, bank)
    # Finite features whose sum overflows float32 are valid: the full check runs and passes.
    huge = torch.full((1, 4, 16), 3e38)
    assert not torch.isfinite(huge.sum())
    refiner._validate_inputs(huge, torch.randn(5, 16))


@pytest.mark.parametrize(("n", "c"), [(24, 16), (20, 40)])
@pytest.mark.parametrize(("lr", "steps"), [(1.0, 5), (1.5, 3), (0.5, 1)])
def test_sgd_in_closed_form_equals_the_optimizer(n: int, c: int, lr: float, steps: int) -> None:
    """SGD without a mask (eigenbasis of G, closed form over the steps) == torch's SGD step by step."""
    queries, bank = _data(n=n, c=c)
    factors = BankFactors.from_bank(bank, 0.3, 1e-3, normalize=False)
    torch.testing.assert_close(
        factors.gram_eigvecs @ torch.diag(factors.gram_eigvals) @ factors.gram_eigvecs.T,
        factors.gram,
        rtol=1e-4,
        atol=1e-4,
    )
    terms = QueryTerms.from_features(queries, factors)
    plan = torch.softmax(torch.randn(3, n, 40, generator=torch.Generator().manual_seed(5)), dim=1) / 40
    weights = terms.initial_weights(factors)
    fast = gradient_step(weights, terms, factors, plan, 0.3, "sgd", lr, steps)
    everywhere = torch.ones(3, 40, n, dtype=torch.bool)  # a mask that masks nothing: the optimizer path
    reference = gradient_step(weights, terms, factors, plan, 0.3, "sgd", lr, steps, everywhere)
    assert not torch.equal(fast, weights)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.parametrize(("optimizer", "masked"), [("sgd", False), ("sgd", True), ("adam", False)])
def test_gradient_step_reuses_the_loops_weighted_gram_exactly(optimizer: str, masked: bool) -> None:
    """The EM loop passes the ``W G`` it holds for the E-step's cost: the same M-step, bit for bit."""
    queries, bank = _data()
    factors = BankFactors.from_bank(bank, 0.3, 1e-3, normalize=False)
    terms = QueryTerms.from_features(queries, factors)
    plan = torch.softmax(torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(5)), dim=1) / 40
    weights = terms.initial_weights(factors)
    mask = (torch.rand(3, 40, 24, generator=torch.Generator().manual_seed(6)) < 0.5) if masked else None
    own = gradient_step(weights, terms, factors, plan, 0.3, optimizer, 1.0, 3, mask)
    reused = gradient_step(weights, terms, factors, plan, 0.3, optimizer, 1.0, 3, mask, weights @ factors.gram)
    assert not torch.equal(own, weights)
    assert torch.equal(own, reused)
