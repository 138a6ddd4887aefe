"""The EM loop of the refinement, with its M-step and E-step chosen once, and its statistics.

One loop (:func:`expectation_maximization`) alternates an E-step (:mod:`~.e_step`, by
``sinkhorn_method``) and an M-step (:data:`M_STEPS`, by ``m_step``). Each EM iteration forms the
E-step's transport cost once, from the coupling ``G W^T`` that the previous M-step returned
(:func:`~.m_step.coupling_cost`); the M-steps that update W every iteration keep ``W G`` so that
the next cost and the gradient steps share it.

Example:
    >>> import torch
    >>> from anomalib_protorefine.refinement.bank import BankFactors
    >>> from anomalib_protorefine.refinement.m_step import QueryTerms
    >>> from anomalib_protorefine.refinement.options import RefinerOptions
    >>> factors = BankFactors.from_bank(torch.randn(5, 8), lambda_=0.3, ridge=1e-3, normalize=False)
    >>> terms = QueryTerms.from_features(torch.randn(2, 7, 8), factors)
    >>> em = expectation_maximization(terms, factors, terms.initial_weights(factors), None, RefinerOptions())
    >>> em.weights.shape, em.plan.shape, em.em_iterations
    (torch.Size([2, 7, 5]), torch.Size([2, 5, 7]), 10)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .bank import BankFactors
from .e_step import POT_METHODS, select_e_step
from .m_step import ClosedFormStep, LocalClosedFormStep, QueryTerms, coupling_cost, gradient_step, objective
from .m_step import transport_cost as full_transport_cost
from .options import RefinerOptions
from .transport import WarmStart

__all__ = [
    "M_STEPS",
    "DenseClosedForm",
    "EMResult",
    "MStep",
    "WeightUpdate",
    "cost_scale",
    "expectation_maximization",
    "refinement_stats",
]


class MStep(Protocol):
    """An M-step as the EM loop drives it: one call per EM iteration, then the final ``(W, W G)``."""

    def coupling(self, plan: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """Run the M-step for ``plan`` ``(B, n, m)``; return the next E-step's coupling ``G W^T`` ``(B, n, m)``.

        ``active`` ``(B,)`` marks the queries still moving (``None``: all of them, ``em_tol = 0``);
        a frozen query keeps its W.
        """
        ...

    def result(self, plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, W G)`` after the last EM iteration, whose plan is ``plan``."""
        ...


class DenseClosedForm:
    """The whole-bank closed form: iterates on the coupling ``G W^T`` alone and forms W once, at the end.

    Each iteration is half the closed form's product (:meth:`ClosedFormStep.coupling`). A frozen
    query keeps its plan, hence its coupling: no masking needed.

    Args:
        step: The closed-form M-step of the batch.
    """

    def __init__(self, step: ClosedFormStep) -> None:
        self.step = step

    def coupling(self, plan: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """``G W^T`` of the minimiser for ``plan``."""
        return self.step.coupling(plan)

    def result(self, plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, W G)`` of the minimiser for the last plan."""
        return self.step(plan)


#: ``update(plan, W, W G) -> (W', W' G)``: one M-step from the current W (and its ``W G``).
WeightUpdateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class WeightUpdate:
    """An M-step that forms W every iteration (the local closed form, the gradient steps).

    Keeps ``W`` and ``W G``; the coupling ``G W^T`` of the next E-step is ``(W G)^T``.

    Args:
        update: One M-step, ``update(plan, W, W G) -> (W', W' G)``.
        weights: The initial ``W``, ``(B, m, n)``.
        weighted_gram: Its ``W G``.
    """

    def __init__(self, update: WeightUpdateFn, weights: torch.Tensor, weighted_gram: torch.Tensor) -> None:
        self.update = update
        self.weights = weights
        self.weighted_gram = weighted_gram

    def coupling(self, plan: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """Update ``W`` (of the active queries) for ``plan``; return ``(W G)^T``."""
        new_weights, new_weighted_gram = self.update(plan, self.weights, self.weighted_gram)
        if active is None or bool(active.all()):
            self.weights, self.weighted_gram = new_weights, new_weighted_gram
        else:
            keep = active[:, None, None]
            self.weights = torch.where(keep, new_weights, self.weights)
            self.weighted_gram = torch.where(keep, new_weighted_gram, self.weighted_gram)
        return self.weighted_gram.transpose(1, 2)

    def result(self, plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``(W, W G)``."""
        return self.weights, self.weighted_gram


def _closed_form(
    terms: QueryTerms,
    factors: BankFactors,
    weights: torch.Tensor,
    weighted_gram: torch.Tensor,
    local: LocalClosedFormStep | None,
    options: RefinerOptions,
) -> MStep:
    """``m_step="closed_form"``: the exact minimiser, over the patch's neighbours with ``local``."""
    if local is not None:
        return WeightUpdate(lambda plan, _weights, _weighted_gram: local(plan), weights, weighted_gram)
    return DenseClosedForm(ClosedFormStep(terms, factors, options.lambda_))


def _gradient_steps(
    terms: QueryTerms,
    factors: BankFactors,
    weights: torch.Tensor,
    weighted_gram: torch.Tensor,
    local: LocalClosedFormStep | None,
    options: RefinerOptions,
) -> MStep:
    """``m_step="gradient"``: ``gradient_steps`` optimizer steps (the paper); masked to the neighbours by ``local``."""
    mask = None if local is None else local.mask

    def update(
        plan: torch.Tensor, weights: torch.Tensor, weighted_gram: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The loop's W G of these weights (the E-step's cost came from it) serves the first gradient.
        new_weights = gradient_step(
            weights, terms, factors, plan, options.lambda_, options.optimizer, options.lr, options.gradient_steps,
            mask, weighted_gram,
        )  # fmt: skip
        return new_weights, new_weights @ factors.gram

    return WeightUpdate(update, weights, weighted_gram)


#: The M-step of each ``m_step`` (every choice of the option has one; a test checks it):
#: ``M_STEPS[m_step](terms, factors, W0, W0 G, local, options)``.
M_STEPS: dict[str, Callable[..., MStep]] = {"closed_form": _closed_form, "gradient": _gradient_steps}


def cost_scale(
    weights: torch.Tensor,
    weighted_gram: torch.Tensor,
    proto_sq: torch.Tensor,
    factors: BankFactors,
    mode: str,
) -> torch.Tensor:
    """Per-query cost scale ``s`` (B,) of the transport cost at the initial ``W``.

    ``"mean"`` comes from the mean norms and the mean of ``W G`` (no ``(B, n, m)`` cost is formed).

    Args:
        weights: The initial ``W``, ``(B, m, n)``.
        weighted_gram: Its ``W G``.
        proto_sq: Its prototypes' squared norms ``((W G) * W).sum(-1)``, ``(B, m)``.
        factors: Bank factors.
        mode: ``cost_normalization``: ``"mean"``, ``"max"`` or ``"none"``.
    """
    if mode == "none":
        return torch.ones(weights.shape[0], dtype=weights.dtype, device=weights.device)
    if mode == "mean":
        scale = factors.sq_norms.mean() + proto_sq.mean(-1) - 2.0 * weighted_gram.mean((-1, -2))
    else:
        scale = full_transport_cost(weights, factors, weighted_gram, proto_sq).amax((-1, -2))
    # A zero cost means the refined prototypes coincide with the bank: any positive scale works.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


@dataclass
class EMResult:
    """What the EM loop returns.

    Attributes:
        weights: The final ``W``, ``(B, m, n)``.
        weighted_gram: Its ``W G``.
        plan: The last plans ``(B, n, m)``.
        em_iterations: EM iterations run (the loop stops early when every query froze, ``em_tol``).
        sinkhorn_iterations: Sinkhorn iterations spent per query, ``(B,)`` int64 (not counted in an export).
    """

    weights: torch.Tensor
    weighted_gram: torch.Tensor
    plan: torch.Tensor
    em_iterations: int
    sinkhorn_iterations: torch.Tensor


def expectation_maximization(
    terms: QueryTerms,
    factors: BankFactors,
    weights: torch.Tensor,
    local: LocalClosedFormStep | None,
    options: RefinerOptions,
    *,
    exporting: bool = False,
) -> EMResult:
    """Run the EM from the initial ``W`` (paper Algorithm 1): E-step, then M-step, ``num_iterations`` times.

    Queries whose plan stopped moving (``em_tol``) are frozen, so a query's result never depends on
    the other queries of its batch; the loop stops once every query is frozen.

    Args:
        terms: Query products.
        factors: Bank factors.
        weights: The initial ``W0``, ``(B, m, n)``.
        local: The local closed form of ``neighbors``/``affine`` (its mask restricts the gradient steps), or ``None``.
        options: The refiner's options (``transport=True``).
        exporting: Whether a static graph is being traced (no data-dependent check or count).

    Returns:
        The final ``W``, ``W G`` and plans, and the iteration counts.
    """
    batch = weights.shape[0]
    # Sinkhorn warm starts of the batch: row potentials, or POT's duals per query.
    warm_start = WarmStart.cold(batch, weights.device, duals=options.sinkhorn_method in POT_METHODS)
    e_step = select_e_step(options, exporting=exporting)
    weighted_gram = weights @ factors.gram
    initial_sq = (weighted_gram * weights).sum(-1)  # ||(W0 M)_j||^2, the costs' column offset
    scale = cost_scale(weights, weighted_gram, initial_sq, factors, options.cost_normalization)
    m_step = M_STEPS[options.m_step](terms, factors, weights, weighted_gram, local, options)
    coupling = weighted_gram.transpose(1, 2)
    active = torch.ones(batch, dtype=torch.bool, device=weights.device)
    plan: torch.Tensor | None = None
    em_iterations = 0
    for _ in range(options.num_iterations):
        previous = plan
        plan = e_step(coupling_cost(coupling, scale, initial_sq), warm_start, active, previous)
        em_iterations += 1
        coupling = m_step.coupling(plan, None if options.em_tol == 0 else active)  # em_tol = 0: all stay active
        if previous is not None and options.em_tol > 0:
            # Total-variation change of each query's plan (plans sum to 1).
            active &= (plan - previous).abs().sum((-1, -2)) / 2 >= options.em_tol
            if not active.any():
                break
    weights, weighted_gram = m_step.result(plan)  # type: ignore[arg-type]  # num_iterations >= 1: plan is set
    return EMResult(weights, weighted_gram, plan, em_iterations, warm_start.iterations)


def refinement_stats(
    weights: torch.Tensor,
    weighted_gram: torch.Tensor | None,
    plan: torch.Tensor | None,
    terms: QueryTerms,
    factors: BankFactors,
    lambda_: float,
    em: EMResult | None,
    start: float,
    proto_sq: torch.Tensor | None = None,
) -> dict[str, float]:
    """The statistics of one refinement, as :attr:`PrototypeRefiner.last_stats` holds them.

    Args:
        weights: The final ``W``.
        weighted_gram: Its ``W G`` (``None`` without transport).
        plan: The last plans (``None`` without transport).
        terms: Query products.
        factors: Bank factors.
        lambda_: Weight of the transport term.
        em: The EM's result (``None`` without transport).
        start: ``time.perf_counter()`` at the start of the refinement.
        proto_sq: ``||(W M)_j||^2`` if already known (the local forms), else formed here.

    Returns:
        ``em_iterations``, ``sinkhorn_iterations`` (per query), ``objective`` and ``ot_cost`` (batch
        means) and ``seconds``.
    """
    batch = weights.shape[0]
    transport: torch.Tensor | None = None
    if plan is not None and weighted_gram is not None:
        # <C, T> from the marginals: sum_i |M_i|^2 T_i. + sum_j |p_j|^2 T_.j - 2 <W G, T^T>.
        if proto_sq is None:
            proto_sq = (weighted_gram * weights).sum(-1)
        transport = (
            (plan.sum(-1) * factors.sq_norms).sum(-1)
            + (plan.sum(-2) * proto_sq).sum(-1)
            - 2.0 * (plan * weighted_gram.transpose(1, 2)).sum((-1, -2))
        )
    em_iterations = 0 if em is None else em.em_iterations
    sinkhorn_iterations = 0 if em is None else int(em.sinkhorn_iterations.sum())
    return {
        "em_iterations": float(em_iterations),
        "sinkhorn_iterations": sinkhorn_iterations / max(batch, 1),
        "objective": float(objective(weights, terms, factors, plan, lambda_, transport, proto_sq).mean()),
        "ot_cost": 0.0 if transport is None else float(transport.mean()),
        "seconds": time.perf_counter() - start,
    }
