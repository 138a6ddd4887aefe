"""E-step: entropic optimal transport between the bank and the refined prototypes (POT).

The plan ``T`` (n x m) couples the n original prototypes (uniform mass ``1/n``) with the m refined
prototypes (uniform mass ``1/m``). It is the minimiser of ``<C, T> - epsilon * s * H(T)`` where
``s`` is the cost scale fixed at the first E-step of each query, i.e. POT's Sinkhorn on ``C / s``
with regularisation ``epsilon``. POT's torch backend keeps everything on the tensors' device.

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
from dataclasses import dataclass

import ot
import torch


@dataclass
class TransportState:
    """Sinkhorn duals (log scalings) kept between EM iterations for a warm start.

    Attributes:
        log_u: Log row scaling, shape ``(n,)``.
        log_v: Log column scaling, shape ``(m,)``.
        iterations: Sinkhorn iterations spent by the last solve.
        iterations_total: Sinkhorn iterations spent by all solves of this query so far.
    """

    log_u: torch.Tensor
    log_v: torch.Tensor
    iterations: int
    iterations_total: int = 0


def _is_valid_plan(plan: torch.Tensor, row_marginal: torch.Tensor, col_marginal: torch.Tensor) -> bool:
    """A finite plan whose rows carry their mass and whose columns are not far off.

    Rows are exact after every completed scaling update; a numerical breakdown (underflow of
    ``exp(-C / epsilon)`` for a small epsilon) leaves a stale iterate whose marginals are far off.
    """
    if not torch.isfinite(plan).all():
        return False
    rows_ok = ((plan.sum(1) - row_marginal).abs() <= 1e-2 * row_marginal).all()
    cols_ok = ((plan.sum(0) - col_marginal).abs() <= 0.1 * col_marginal).all()
    return bool(rows_ok and cols_ok)


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
    if not _is_valid_plan(plan, a, b):
        # POT's scaling iterations stop at the last finite iterate when they hit a numerical error,
        # and a warm start from a far-away problem can overflow: restart cold in the log domain.
        plan, log = ot.sinkhorn(
            a, b, shifted, epsilon, method="sinkhorn_log", numItermax=max_iter, stopThr=tol / m**0.5, log=True,
            warn=False,
        )  # fmt: skip
        log_u, log_v = log["log_u"], log["log_v"]
    iterations = int(log["niter"]) + 1
    total = iterations + (warm_start.iterations_total if warm_start is not None else 0)
    return plan, TransportState(log_u=log_u, log_v=log_v, iterations=iterations, iterations_total=total)
