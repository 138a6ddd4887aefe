"""E-step: entropic optimal transport between the bank and the refined prototypes (POT).

The plan ``T`` (n x m) couples the n original prototypes (uniform mass ``1/n``) with the m refined
prototypes (uniform mass ``1/m``). It is the minimiser of ``<C, T> - epsilon * s * H(T)`` where
``s`` is the cost scale fixed at the first E-step of each query, i.e. POT's Sinkhorn on ``C / s``
with regularisation ``epsilon``. POT's torch backend keeps everything on the tensors' device.

This module holds POT's per-query solver (:func:`solve_plan`, the reference), the marginal checks
and the warm starts kept between EM iterations (:class:`WarmStart`); the batched solvers
(:func:`solve_plans`, :func:`solve_plans_fixed`) live in :mod:`~anomalib_protorefine.refinement.sinkhorn`
and are re-exported here.

Example:
    >>> import torch
    >>> from anomalib_protorefine.refinement.transport import solve_plan
    >>> cost = torch.rand(4, 6)
    >>> plan, state = solve_plan(cost, epsilon=0.1, method="auto", max_iter=500, tol=1e-6)
    >>> torch.allclose(plan.sum(1), torch.full((4,), 1 / 4), atol=1e-4)
    True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import ot
import torch

from .sinkhorn import BatchTransportState, solve_plans, solve_plans_fixed

__all__ = [
    "BatchTransportState",
    "SinkhornMarginalError",
    "TransportState",
    "WarmStart",
    "check_marginals",
    "marginal_errors",
    "plan_is_valid",
    "solve_plan",
    "solve_plans",
    "solve_plans_fixed",
]


@dataclass
class TransportState:
    """Sinkhorn duals (log scalings) kept between EM iterations for a warm start.

    Attributes:
        log_u: Log row scaling, shape ``(n,)``.
        log_v: Log column scaling, shape ``(m,)``.
        iterations: Sinkhorn iterations spent by the solve.
    """

    log_u: torch.Tensor
    log_v: torch.Tensor
    iterations: int


def marginal_errors(plans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest relative row and column marginal errors of each plan ``(..., n, m)`` (NaN if non-finite).

    Returns:
        ``(row_error, column_error)``, each of the plans' batch shape: ``max_i |T_i. - 1/n| n`` and
        ``max_j |T_.j - 1/m| m``.
    """
    n, m = plans.shape[-2:]
    # A NaN or infinite entry makes its row sum non-finite: no full pass over the plan needed.
    row_sums, col_sums = plans.sum(-1), plans.sum(-2)
    rows = (row_sums * n - 1).abs().amax(-1)
    cols = (col_sums * m - 1).abs().amax(-1)
    bad = ~torch.isfinite(row_sums).all(-1)
    nan = torch.tensor(float("nan"), dtype=rows.dtype, device=rows.device)
    return torch.where(bad, nan, rows), torch.where(bad, nan, cols)


def plan_is_valid(plans: torch.Tensor) -> list[bool]:
    """Whether each plan ``(..., n, m)`` is finite with rows within 1 % and columns within 10 % of their mass.

    Rows are exact after every completed scaling update; a numerical breakdown (underflow of
    ``exp(-C / epsilon)`` for a small epsilon) leaves a stale iterate whose marginals are far off.
    """
    rows, cols = marginal_errors(plans)
    return ((rows <= 1e-2) & (cols <= 0.1)).reshape(-1).tolist()  # NaN compares False


class SinkhornMarginalError(RuntimeError):
    """Sinkhorn returned plans that miss their marginals even after the log-domain fallback."""


def check_marginals(plans: torch.Tensor, epsilon: float, max_iter: int, cost_normalization: str) -> None:
    """Raise :class:`SinkhornMarginalError` when a plan ``(B, n, m)`` misses its marginals.

    A plan that misses its marginals is not the entropic OT plan: the M-step and the scores built
    on it would be wrong, so it raises instead. This only happens when Sinkhorn cannot converge
    within ``max_iter`` iterations, i.e. for an ``epsilon`` far below the safe range.
    """
    rows, cols = marginal_errors(plans)
    bad = ~((rows <= 1e-2) & (cols <= 0.1))
    if not bool(bad.any()):
        return
    worst = float(torch.nan_to_num(torch.maximum(rows, cols)[bad], nan=float("inf")).max())
    scale = (
        "epsilon is in squared feature units because cost_normalization='none'; use cost_normalization='mean'"
        if cost_normalization == "none"
        else "keep epsilon within [0.01, 1] (relative to the mean transport cost)"
    )
    msg = (
        f"Sinkhorn did not reach the marginals of the transport plan for {int(bad.sum())} of {bad.numel()} "
        f"queries (largest relative marginal error {worst:.0%}) with epsilon={epsilon:g} and "
        f"sinkhorn_max_iter={max_iter}, even in the log domain; the refined scores would be wrong. "
        f"Fix: {scale}, or raise sinkhorn_max_iter."
    )
    raise SinkhornMarginalError(msg)


def solve_plan(
    cost: torch.Tensor,
    epsilon: float,
    method: str,
    max_iter: int,
    tol: float,
    warm_start: TransportState | None = None,
) -> tuple[torch.Tensor, TransportState]:
    """Solve one entropic OT problem with uniform marginals.

    Args:
        cost: Cost matrix ``(n, m)`` (float32 or float64), already normalised.
        epsilon: Entropy weight (> 0).
        method: ``"auto"``, ``"sinkhorn"`` or ``"sinkhorn_log"``. Whatever the method, a plan that is
            not finite or misses its marginals (numerical breakdown) is recomputed cold in the
            log domain, which cannot underflow.
        max_iter: Maximum number of Sinkhorn iterations.
        tol: Relative tolerance on the L2 violation of the column marginal.
        warm_start: Duals of a previous solve of a nearby problem.

    Returns:
        The plan ``T`` ``(n, m)`` and the duals for the next warm start.
    """
    n, m = cost.shape
    a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device)
    b = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=cost.device)
    # The row minimum is a per-row constant: it changes the duals, not the plan, and keeps
    # exp(-C/eps) away from underflow in the scaling iterations.
    shifted = cost - cost.min(dim=1, keepdim=True).values
    chosen = "sinkhorn" if method == "auto" else method  # auto: fast scaling first, log domain if it breaks
    start = None if warm_start is None else (warm_start.log_u, warm_start.log_v)
    with warnings.catch_warnings():
        # Non-convergence within max_iter is reported through TransportState.iterations.
        warnings.simplefilter("ignore")
        plan, log = ot.sinkhorn(
            a,
            b,
            shifted,
            epsilon,
            method=chosen,
            numItermax=max_iter,
            stopThr=tol / m**0.5,
            log=True,
            warn=False,
            warmstart=start,
        )
    if chosen == "sinkhorn_log":
        log_u, log_v = log["log_u"], log["log_v"]
    else:
        log_u, log_v = torch.log(log["u"]), torch.log(log["v"])
    if not plan_is_valid(plan)[0]:
        # POT's scaling iterations stop at the last finite iterate when they hit a numerical error,
        # and a warm start from a far-away problem can overflow: restart cold in the log domain.
        plan, log = ot.sinkhorn(
            a, b, shifted, epsilon, method="sinkhorn_log", numItermax=max_iter, stopThr=tol / m**0.5, log=True,
            warn=False,
        )  # fmt: skip
        log_u, log_v = log["log_u"], log["log_v"]
    return plan, TransportState(log_u=log_u, log_v=log_v, iterations=int(log["niter"]) + 1)


@dataclass
class WarmStart:
    """The Sinkhorn warm starts of a batch of B queries, kept by the refiner between EM iterations.

    The batched and fixed-iteration solvers (:func:`solve_plans`, :func:`solve_plans_fixed`) start from
    the row potentials; POT's single-problem solver (:func:`solve_plan`) from each query's duals.

    Attributes:
        iterations: Sinkhorn iterations spent so far by each query, ``(B,)`` int64.
        row_potential: Row potentials ``f`` ``(B, n)`` in cost units, ``None`` before the first solve.
        duals: POT's log scalings of each query (``None`` before its first solve; empty for the
            batched solvers).

    Example:
        >>> start = WarmStart.cold(3, torch.device("cpu"))
        >>> start.iterations.tolist(), start.row_potential is None
        ([0, 0, 0], True)
    """

    iterations: torch.Tensor
    row_potential: torch.Tensor | None = None
    duals: list[TransportState | None] = field(default_factory=list)

    @classmethod
    def cold(cls, batch: int, device: torch.device, duals: bool = False) -> WarmStart:
        """No warm start yet for ``batch`` queries (``duals``: room for POT's per-query duals)."""
        return cls(torch.zeros(batch, dtype=torch.int64, device=device), None, [None] * batch if duals else [])
