"""E-step strategies: one Sinkhorn solver per ``sinkhorn_method``, chosen once per refinement.

Every solver takes the E-step's normalised costs ``(B, n, m)`` of the batch, the batch's
:class:`~anomalib_protorefine.refinement.transport.WarmStart` (updated in place: warm starts and the
Sinkhorn iterations spent per query), the mask of the queries still active (``em_tol``) and the
previous plans (frozen queries keep theirs), and returns the new plans. :data:`E_STEPS` maps each
``sinkhorn_method`` to its solver; :func:`select_e_step` binds one to the options.

* ``"auto"``: :func:`batched_e_step`, all active queries at once (:func:`~.sinkhorn.solve_plans`);
* ``"sinkhorn"``, ``"sinkhorn_log"``: :func:`pot_e_step`, POT once per query (the reference);
* ``"fixed"``: :func:`fixed_e_step`, a fixed number of log-domain iterations (the exportable graph).

Example:
    >>> import torch
    >>> from anomalib_protorefine.refinement.e_step import select_e_step
    >>> from anomalib_protorefine.refinement.options import RefinerOptions
    >>> from anomalib_protorefine.refinement.transport import WarmStart
    >>> e_step = select_e_step(RefinerOptions(), exporting=False)
    >>> start, active = WarmStart.cold(2, torch.device("cpu")), torch.ones(2, dtype=torch.bool)
    >>> e_step(torch.rand(2, 4, 6), start, active, None).shape
    torch.Size([2, 4, 6])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch

from .options import RefinerOptions
from .transport import WarmStart, check_marginals, plan_is_valid, solve_plan, solve_plans, solve_plans_fixed

__all__ = [
    "E_STEPS",
    "POT_METHODS",
    "EStep",
    "batched_e_step",
    "fixed_e_step",
    "pot_e_step",
    "select_e_step",
]

#: The Sinkhorn methods that call POT once per query (warm-started from POT's duals).
POT_METHODS = ("sinkhorn", "sinkhorn_log")


class EStep(Protocol):
    """The signature of an E-step solver (see the module docstring)."""

    def __call__(
        self,
        costs: torch.Tensor,
        start: WarmStart,
        active: torch.Tensor,
        previous: torch.Tensor | None,
        *,
        options: RefinerOptions,
        exporting: bool,
    ) -> torch.Tensor:
        """Return the plans ``(B, n, m)`` for the costs ``(B, n, m)``."""
        ...


def _active_queries(
    costs: torch.Tensor, active: torch.Tensor, previous: torch.Tensor | None
) -> tuple[bool, torch.Tensor]:
    """Whether every query is solved (first E-step, or none frozen), and the indices of those solved."""
    everyone = previous is None or bool(active.all())
    index = torch.arange(costs.shape[0], device=costs.device) if everyone else active.nonzero()[:, 0]
    return everyone, index


def batched_e_step(
    costs: torch.Tensor,
    start: WarmStart,
    active: torch.Tensor,
    previous: torch.Tensor | None,
    *,
    options: RefinerOptions,
    exporting: bool = False,  # unused: the common signature of E_STEPS
) -> torch.Tensor:
    """``sinkhorn_method="auto"``: the active queries at once (:func:`solve_plans`), warm-started from row potentials.

    A plan that comes back non-finite or far from its marginals (numerical breakdown: tiny
    ``epsilon``, far warm start) is recomputed cold in the log domain by POT, and one that still
    misses its marginals raises :class:`~anomalib_protorefine.refinement.transport.SinkhornMarginalError`.
    """
    everyone, index = _active_queries(costs, active, previous)
    # Warm start from the row potentials: the E-step cost (coupling_cost) changes between
    # EM iterations by a column constant (the prototypes' norms), which they are blind to.
    warm = None if start.row_potential is None else start.row_potential[index]
    solved, state = solve_plans(
        costs if everyone else costs[index],
        options.epsilon,
        options.sinkhorn_max_iter,
        options.sinkhorn_tol,
        overrelaxation=options.sinkhorn_overrelaxation,
        row_potential=warm,
    )
    row_potential, iterations = state.row_potential, state.iterations
    valid = plan_is_valid(solved)
    for row, query in enumerate(index.tolist()):
        if valid[row]:
            continue
        # Numerical breakdown (tiny epsilon, far warm start): recompute cold in the log domain.
        plan, duals = solve_plan(
            costs[query], options.epsilon, "sinkhorn_log", options.sinkhorn_max_iter, options.sinkhorn_tol
        )
        solved[row] = plan
        # POT solved the row-shifted cost C - min_j C_ij: undo the shift for f.
        row_potential[row] = options.epsilon * duals.log_u + costs[query].amin(1)
        iterations[row] += duals.iterations
        check_marginals(plan[None], options.epsilon, options.sinkhorn_max_iter, options.cost_normalization)
    if start.row_potential is None:
        start.row_potential = row_potential
    else:
        start.row_potential[index] = row_potential
    start.iterations[index] += iterations
    if everyone:
        return solved
    plans = previous.clone()  # type: ignore[union-attr]
    plans[index] = solved
    return plans


def pot_e_step(
    costs: torch.Tensor,
    start: WarmStart,
    active: torch.Tensor,
    previous: torch.Tensor | None,
    *,
    options: RefinerOptions,
    exporting: bool = False,  # unused: the common signature of E_STEPS
) -> torch.Tensor:
    """``sinkhorn_method="sinkhorn"`` or ``"sinkhorn_log"``: POT once per active query, warm-started from its duals."""
    _, index = _active_queries(costs, active, previous)
    plans = torch.empty_like(costs) if previous is None else previous.clone()
    for query in index.tolist():
        plans[query], duals = solve_plan(
            costs[query],
            options.epsilon,
            options.sinkhorn_method,
            options.sinkhorn_max_iter,
            options.sinkhorn_tol,
            start.duals[query],
        )
        start.duals[query] = duals
        start.iterations[query] += duals.iterations
        check_marginals(plans[query][None], options.epsilon, options.sinkhorn_max_iter, options.cost_normalization)
    return plans


def fixed_e_step(
    costs: torch.Tensor,
    start: WarmStart,
    active: torch.Tensor,
    previous: torch.Tensor | None,
    *,
    options: RefinerOptions,
    exporting: bool = False,
) -> torch.Tensor:
    """``sinkhorn_method="fixed"``: all queries at once, exactly ``sinkhorn_max_iter`` iterations.

    Warm-started from the batch's row potentials (like the batched solver's, blind to the column
    constant by which the E-step cost changes between EM iterations). Frozen queries (``em_tol``) keep
    their previous plan. With ``exporting`` (a static graph being traced) the iterations run as one
    graph loop and nothing depends on the data; otherwise a plan that misses its marginals raises
    :class:`~anomalib_protorefine.refinement.transport.SinkhornMarginalError`, and every query is
    counted ``sinkhorn_max_iter`` iterations.
    """
    plans, start.row_potential = solve_plans_fixed(
        costs,
        options.epsilon,
        options.sinkhorn_max_iter,
        start.row_potential,
        graph_loop=exporting,
    )
    if not exporting:
        check_marginals(plans, options.epsilon, options.sinkhorn_max_iter, options.cost_normalization)
        start.iterations += options.sinkhorn_max_iter
    if previous is not None and options.em_tol > 0:
        plans = torch.where(active[:, None, None], plans, previous)
    return plans


#: The E-step solver of each ``sinkhorn_method`` (every choice of the option has one; a test checks it).
E_STEPS: dict[str, EStep] = {
    "auto": batched_e_step,
    **dict.fromkeys(POT_METHODS, pot_e_step),
    "fixed": fixed_e_step,
}


def select_e_step(
    options: RefinerOptions, *, exporting: bool
) -> Callable[[torch.Tensor, WarmStart, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The E-step of ``options.sinkhorn_method``, bound to the options: ``e_step(costs, start, active, previous)``.

    Args:
        options: The refiner's options.
        exporting: Whether a static graph is being traced (see :func:`fixed_e_step`).

    Returns:
        The solver.
    """
    return functools.partial(E_STEPS[options.sinkhorn_method], options=options, exporting=exporting)
