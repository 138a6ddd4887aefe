"""Batched entropic OT: B Sinkhorn problems with uniform marginals solved at once, in torch.

Two solvers share one cold start and one warm start (row potentials in cost units):

* :func:`solve_plans`: stabilised, over-relaxed scaling iterations that stop at a tolerance (the
  refiner's default E-step, ``sinkhorn_method="auto"``);
* :func:`solve_plans_fixed`: a fixed number of log-domain iterations with no data-dependent control
  flow (``sinkhorn_method="fixed"``, the static graph that ONNX/OpenVINO export traces).

POT's per-query solver and the marginal checks are in :mod:`~anomalib_protorefine.refinement.transport`.

Example:
    >>> import torch
    >>> from anomalib_protorefine.refinement.sinkhorn import solve_plans
    >>> plans, state = solve_plans(torch.rand(2, 4, 6), epsilon=0.1, max_iter=500, tol=1e-6)
    >>> plans.shape, state.row_potential.shape
    (torch.Size([2, 4, 6]), torch.Size([2, 4]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ot
import torch

__all__ = ["BatchTransportState", "solve_plans", "solve_plans_fixed"]


@dataclass
class BatchTransportState:
    """The dual potentials and iteration counts of a batch of solved entropic OT problems.

    The plan of query ``k`` is ``T = exp((f[k]_i + g[k]_j - C[k]_ij) / epsilon)`` up to the tolerance.
    The potentials are *in cost units*: unlike POT's scalings ``(u, v)`` of a row-shifted kernel they
    do not depend on a shift of the cost, so the row potentials are a valid warm start for the next,
    nearby cost (:func:`solve_plans` ``row_potential``).

    Attributes:
        potential: Column potentials ``g``, ``(B, m)``, in the units of the (normalised) cost.
        iterations: Sinkhorn iterations spent by the solve of each query, ``(B,)`` int64.
        converged: Whether each query met the tolerance within ``max_iter``, ``(B,)`` bool.
        row_potential: Row potentials ``f``, ``(B, n)``, in cost units.
    """

    potential: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    row_potential: torch.Tensor


def _upcast(costs: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 costs run in float32 (a plan entry ``1/(n m)`` is below float16's normal range)."""
    return costs if costs.dtype in (torch.float32, torch.float64) else costs.float()


#: Kernel entries below ``exp(-_LOG_FLOOR)`` (relative to their row's largest entry, 1) are set to 0.
_LOG_FLOOR = 60.0


def _exp_kernel_(log_kernel: torch.Tensor) -> torch.Tensor:
    """``exp`` of a log-kernel in place, with entries below ``exp(-_LOG_FLOOR)`` set to exactly 0.

    Without the floor, a nearly deterministic plan fills the kernel (and then the plan) with
    float32 subnormals (below ``1.2e-38 = e^-87.3``), and every CPU pass over them (the exponential,
    the Sinkhorn products, the M-step's product with the plan) runs through the processor's slow
    subnormal path (see docs/benchmarks.md). The floor is
    ``e^-60 = 9e-27`` of the row's largest entry: with scalings within ``e^{+-20}`` (the solver absorbs
    larger ones) the dropped entries change a row or column sum by at most ``m e^-20 = 2e-6``
    relative (m = 1024), far below ``sinkhorn_tol`` and, in practice, below float32 rounding.
    Products with the scalings stay normal too (``e^-80`` and up), so the Sinkhorn products are fast.

    Example:
        >>> _exp_kernel_(torch.tensor([0.0, -1.0, -100.0])).tolist()
        [1.0, 0.3678794503211975, 0.0]
    """
    return torch.nn.functional.threshold_(log_kernel, -_LOG_FLOOR, -math.inf).exp_()


def _column_potential(costs: torch.Tensor, f: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Log-domain column update: the potentials ``g`` ``(B, m)`` that give every column its mass ``1/m``.

    ``f`` ``(B, n)`` are the row potentials; the plan is ``exp((f + g - C) / epsilon)``.
    """
    return epsilon * (-math.log(costs.shape[-1]) - torch.logsumexp((f[:, :, None] - costs) / epsilon, dim=1))


def _row_potential(costs: torch.Tensor, g: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Log-domain row update: the potentials ``f`` ``(B, n)`` that give every row its mass ``1/n``."""
    return epsilon * (-math.log(costs.shape[-2]) - torch.logsumexp((g[:, None, :] - costs) / epsilon, dim=2))


def _initial_potential(costs: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Column potentials ``(B, m)`` of a cold start: one log-domain column update from the row minima.

    Every column starts with its full mass (no column of the kernel underflows to zero).
    """
    return _column_potential(costs, costs.amin(dim=2), epsilon)


def solve_plans_fixed(
    costs: torch.Tensor,
    epsilon: float,
    iterations: int,
    row_potential: torch.Tensor | None = None,
    *,
    graph_loop: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``iterations`` log-domain Sinkhorn iterations for B problems: a static graph.

    The exportable E-step (``sinkhorn_method="fixed"``, ONNX/OpenVINO export): pure torch, no
    convergence check, no ``.item()``, no fallback and no POT, so ``torch.export`` traces it into a
    fixed sequence of operations whatever the data. It has the fixed point of :func:`solve_plans`
    (same cold start, same warm start by the row potentials in cost units, which a change of the
    cost by a column constant leaves valid) but runs a given number of iterations instead of
    stopping at a tolerance. Each iteration is a column then a row update in the log domain
    (``logsumexp``, which neither underflows nor overflows at any ``epsilon``), so the rows of the
    plan are exact and the columns meet their marginals as far as the iterations allow (check with
    :func:`marginal_errors`). Plan entries below ``e^-60`` are set to 0, as in :func:`solve_plans`
    (no float32 subnormals; every entry is at most ``1/n``).

    Args:
        costs: Costs ``(B, n, m)``, already normalised; float16/bfloat16 are computed in float32.
        epsilon: Entropy weight (> 0).
        iterations: Number of Sinkhorn iterations (>= 1).
        row_potential: Row potentials ``(B, n)`` of a previous solve (warm start), or ``None`` (cold
            start: one column update from the row minima, then a row update).
        graph_loop: Run the iterations as one ``torch.while_loop`` with a constant trip count (an ONNX
            ``Loop`` when exported) instead of a Python loop, which ``torch.export`` would unroll into
            ``iterations`` copies (a graph, and an export time, that grow with ``iterations``). Same arithmetic.

    Returns:
        The plans ``(B, n, m)`` and the row potentials ``(B, n)`` for the next warm start.

    Example:
        >>> import torch
        >>> plans, potential = solve_plans_fixed(torch.rand(3, 4, 6), epsilon=0.1, iterations=200)
        >>> torch.allclose(plans.sum(-2), torch.full((3, 6), 1 / 6), atol=1e-5), potential.shape
        (True, torch.Size([3, 4]))
    """
    costs = _upcast(costs)
    if row_potential is None:
        f = _row_potential(costs, _initial_potential(costs, epsilon), epsilon)
    else:
        f = row_potential.to(costs.dtype)

    def update(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = _column_potential(costs, f, epsilon)
        return _row_potential(costs, g, epsilon), g

    f, g = update(f)  # the first iteration gives the loop its column potentials
    if graph_loop:
        step = torch.ones((), dtype=torch.int64, device=costs.device)
        _, f, g = torch.while_loop(lambda i, f, g: i < iterations, lambda i, f, g: (i + 1, *update(f)), (step, f, g))
    else:
        for _ in range(iterations - 1):
            f, g = update(f)
    return _exp_kernel_((f[:, :, None] + g[:, None, :] - costs) / epsilon), f


def solve_plans(
    costs: torch.Tensor,
    epsilon: float,
    max_iter: int,
    tol: float,
    check_every: int = 10,
    overrelaxation: float = 1.0,
    first_check: int = 3,
    row_potential: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BatchTransportState]:
    """Solve B entropic OT problems with uniform marginals at once (stabilised scaling iterations).

    Same fixed point and stopping rule as :func:`~anomalib_protorefine.refinement.transport.solve_plan`
    (POT's ``ot.sinkhorn``), written once for a ``(B, n, m)`` batch. The array arithmetic goes through
    POT's backend (``ot.backend.get_backend``); the per-query bookkeeping (masks, indices) is torch, so
    the costs must be a torch tensor (any device).

    * a cold start is one log-domain column update from the row minima, then a row update with a
      row-max shift, so the kernel ``K = exp((f + g - C) / epsilon)`` starts with every entry ``<= 1``
      and every row holding a 1; with ``row_potential`` (a warm start from the previous EM
      iteration, in cost units) the first update is the column update from those row potentials
      (column-max shift): the warm start for a cost that changes by a column constant between
      solves (the refiner's E-step cost leaves out the refined prototypes' norms);
    * kernel entries below ``e^-60`` of their row's (column's) largest are set to 0 (no float32
      subnormals, whose arithmetic is slow on CPUs; see ``_exp_kernel_``);
    * then the usual scaling iterations ``v = b / K^T u``, ``u = a / K v`` (two batched
      matrix-vector products per iteration); every ``check_every`` iterations each query's column
      violation ``||T^T 1 - b||_2 / ||b||_2`` is compared with ``tol``, converged queries leave the
      batch, and scalings that grew beyond ``e^{+-20}`` are absorbed into the potentials (kernel
      recomputed) so they never overflow;
    * a query whose iterates become non-finite stops there and is reported as not converged
      (the caller recomputes it in the log domain).

    Args:
        costs: Costs ``(B, n, m)``, already normalised; float16/bfloat16 are computed in float32.
        epsilon: Entropy weight (> 0).
        max_iter: Maximum number of scaling iterations.
        tol: Relative tolerance on the L2 violation of the column marginal.
        row_potential: Row potentials ``(B, n)`` of a previous solve of nearby problems (warm
            start), or ``None`` (cold start).
        check_every: Iterations between convergence checks.
        first_check: Iterations before the first check (a good warm start converges in a few).
        overrelaxation: Over-relaxation factor ``omega`` in ``[1, 2)`` (1: plain Sinkhorn). Same fixed
            point; far fewer iterations when the plan is nearly deterministic. A query whose column
            violation grows between two checks continues with ``omega = 1``.

    Returns:
        The plans ``(B, n, m)`` (float32 for half-precision costs) and the state for the next warm start.

    Example:
        >>> import torch
        >>> plans, state = solve_plans(torch.rand(3, 4, 6), epsilon=0.1, max_iter=500, tol=1e-6)
        >>> torch.allclose(plans.sum(-1), torch.full((3, 4), 1 / 4), atol=1e-5)
        True
    """
    costs = _upcast(costs)
    nx = ot.backend.get_backend(costs)
    batch, n, m = costs.shape
    a, b = 1.0 / n, 1.0 / m
    b_norm = b * m**0.5
    if row_potential is not None:
        # Column update from the row potentials, with a column-max shift: K <= 1 and each column of
        # K holds a 1.
        f = row_potential.to(costs.dtype)
        kernel = torch.sub(f[:, :, None], costs, out=torch.empty_like(costs))
        kernel /= epsilon
        col_max = kernel.amax(1)
        kernel -= col_max[:, None, :]
        kernel = _exp_kernel_(kernel)
        g = -epsilon * col_max
        # Complete the column update (v) and do the row update (u): the same state as the branch below.
        v = b / nx.sum(kernel, axis=1)
        u = a / (kernel @ v[:, :, None])[..., 0]
    else:
        g = _initial_potential(costs, epsilon)
        # Row update in the log domain with a row-max shift: K <= 1 and each row of K holds a 1
        # (arithmetic in place on one (B, n, m) buffer).
        kernel = g[:, None, :] - costs
        kernel /= epsilon
        row_max = nx.max(kernel, axis=2)
        kernel -= row_max[:, :, None]
        kernel = _exp_kernel_(kernel)
        f = -epsilon * row_max  # potentials of K: K = exp((f + g - C) / epsilon)
        u = a / nx.sum(kernel, axis=2)
        v = nx.ones((batch, m), type_as=costs)
    plans = torch.empty_like(costs)  # every query's rows are written when it stops
    iterations = torch.zeros(batch, dtype=torch.int64, device=costs.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=costs.device)
    running = torch.arange(batch, device=costs.device)  # queries still iterating
    potentials = g.clone()  # outputs; f, g, kernel, u, v below follow the running queries
    row_potentials = f.clone()
    relaxed = overrelaxation != 1.0
    omega = nx.full((batch, 1), overrelaxation, type_as=costs)  # per query; 1 once its error grows
    last_error = nx.full((batch,), float("inf"), type_as=costs)
    done = 0
    ktu = (u[:, None, :] @ kernel)[:, 0]  # K^T u, reused by the next column update
    while running.numel() > 0:
        # A warm start is often converged after a few iterations: check first after `first_check`.
        steps = min(first_check if done == 0 else check_every, max_iter - done)
        for step in range(steps):
            if step > 0:
                ktu = (u[:, None, :] @ kernel)[:, 0]
            # Over-relaxed updates (same fixed point); the last one of a block is plain so that
            # the rows are exact when the columns are checked.
            if step == steps - 1 or not relaxed:
                v = b / ktu
                u = a / (kernel @ v[:, :, None])[..., 0]
            else:
                v = (b / ktu) ** omega * v ** (1.0 - omega)
                u = (a / (kernel @ v[:, :, None])[..., 0]) ** omega * u ** (1.0 - omega)
        done += steps
        # Column sums of diag(u) K diag(v); the rows are exact after the u update.
        ktu = (u[:, None, :] @ kernel)[:, 0]
        error = nx.norm(v * ktu - b, axis=1) / b_norm
        finite = torch.isfinite(error) & torch.isfinite(u).all(1) & torch.isfinite(v).all(1)
        ok = finite & (error <= tol)
        if relaxed:
            # Safeguard: over-relaxation is only locally convergent; a query whose violation grew
            # between two checks continues with plain Sinkhorn updates.
            omega = torch.where((error > last_error)[:, None], torch.ones_like(omega), omega)
            last_error = error
        stop = ok | ~finite | (done >= max_iter)
        iterations[running] = done
        converged[running[ok]] = True
        if bool(stop.all()) and running.numel() == batch:
            # Every query stops at once (the usual case with a warm start): the plans are the
            # kernel, scaled in place; no copies.
            plans = kernel.mul_(u[:, :, None]).mul_(v[:, None, :])
            potentials = g + epsilon * nx.log(v)
            row_potentials = f + epsilon * nx.log(u)
            break
        if bool(stop.any()):
            # Finished queries: final plans and potentials (NaN after a numerical breakdown).
            index = running[stop]
            plans[index] = u[stop][:, :, None] * kernel[stop] * v[stop][:, None, :]
            potentials[index] = g[stop] + epsilon * nx.log(v[stop])
            row_potentials[index] = f[stop] + epsilon * nx.log(u[stop])
            more = ~stop
            running, kernel, f, g, u, v = running[more], kernel[more], f[more], g[more], u[more], v[more]
            omega, last_error, ktu = omega[more], last_error[more], ktu[more]
            if running.numel() == 0:
                break
        if bool(((nx.log(u).abs().amax(1) > 20) | (nx.log(v).abs().amax(1) > 20)).any()):
            # Absorb large scalings into the potentials so that they never overflow.
            f, g = f + epsilon * nx.log(u), g + epsilon * nx.log(v)
            u, v = nx.ones(u.shape, type_as=costs), nx.ones(v.shape, type_as=costs)
            kernel = _exp_kernel_((f[:, :, None] + g[:, None, :] - costs[running]) / epsilon)
            ktu = (u[:, None, :] @ kernel)[:, 0]
    return plans, BatchTransportState(
        potential=potentials, iterations=iterations, converged=converged, row_potential=row_potentials
    )
