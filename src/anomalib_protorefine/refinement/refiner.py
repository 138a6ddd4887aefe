"""Test-time prototype refinement: a plain ``nn.Module`` (torch and POT; no Lightning, no anomalib).

For every query image with patch features ``F`` (m x c) and a memory bank ``M`` (n x c) the
refiner finds refined prototypes ``P = W M`` (m x c) by the EM algorithm of the paper:

* init ``W0 = F M^T (M M^T + rho I)^-1``;
* E-step: entropic OT plan ``T`` between ``M`` (mass 1/n) and ``P`` (mass 1/m) with POT;
* M-step: W with T fixed, closed form (default) or a torch optimizer (the paper).

Patch scores are the distances of the query patches to the refined prototypes (paper Eq. 6).
Everything runs batched over B queries on the tensors' device, in float32 whatever the input
dtype, in the bank's n-dimensional coefficient space.

The statistics of the last refinement (EM iterations, Sinkhorn iterations, objective, OT cost, time)
are kept in :attr:`PrototypeRefiner.last_stats`; the models' Lightning callback reads and logs them.

Example:
    >>> import torch
    >>> from anomalib_protorefine.refinement import PrototypeRefiner
    >>> refiner = PrototypeRefiner(lambda_=0.3, num_iterations=3)
    >>> queries, bank = torch.randn(2, 16, 8), torch.randn(10, 8)
    >>> refiner(queries, bank).shape
    torch.Size([2, 16, 8])
    >>> refiner.patch_scores(queries, bank).shape
    torch.Size([2, 16])
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_protorefine._deprecation import warn_renamed

from .bank import BankFactors, bank_key
from .m_step import (
    ClosedFormStep,
    LocalClosedFormStep,
    QueryTerms,
    coupling_cost,
    gradient_step,
    objective,
    prototype_sq_norms,
    transport_cost,
)
from .options import RefinerOptions
from .precision import float32_compute
from .transport import WarmStart, check_marginals, plan_is_valid, solve_plan, solve_plans, solve_plans_fixed

logger = logging.getLogger(__name__)

_CACHE_SIZE = 8
#: Largest block of query-prototype dot products formed at once when scoring (elements, 8 MB).
_SCORE_CHUNK = 1 << 21
#: Sinkhorn iterations per E-step of an exported refiner (``sinkhorn_method="fixed"``), unless the
#: refiner already uses ``"fixed"`` (then its ``sinkhorn_max_iter``) or the export names another number.
EXPORT_SINKHORN_ITERATIONS = 100


#: The Sinkhorn methods that call POT once per query (warm-started from POT's duals).
POT_METHODS = ("sinkhorn", "sinkhorn_log")


@dataclass
class RefinementResult:
    """Output of :meth:`PrototypeRefiner.refine`.

    Attributes:
        transform: Transform matrices ``W``, ``(B, m, n)`` (the refined prototypes are ``W M``).
        plan: Transport plans ``T``, ``(B, n, m)``, or ``None`` when ``transport=False``.
        terms: Query products ``F M^T`` and ``||F||^2`` used for scoring.
        factors: The bank factors.
        stats: Refinement statistics (iterations, OT cost, objective, seconds).
    """

    transform: torch.Tensor
    plan: torch.Tensor | None
    terms: QueryTerms
    factors: BankFactors
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def prototypes(self) -> torch.Tensor:
        """Refined prototypes ``P = W M``, ``(B, m, c)`` (in the normalised space for cosine)."""
        return self.transform @ self.factors.bank

    @property
    def weights(self) -> torch.Tensor:
        """Deprecated name of :attr:`transform` (``weights=`` names a backbone's weights file elsewhere)."""
        warn_renamed("RefinementResult.weights", "RefinementResult.transform")
        return self.transform


class PrototypeRefiner(nn.Module):
    """EM refinement of a memory bank for each query (paper Sec. 4, Algorithm 1).

    Args:
        lambda_: Weight of the OT term (paper: 0.3 PatchCore+, 0.1 WinCLIP+).
        num_iterations: Maximum EM iterations N (paper: 10).
        em_tol: Early stop on the plan's total-variation change (0: always N iterations).
        epsilon: Sinkhorn entropy weight relative to the mean transport cost.
        transport: ``False`` gives the "W only" ablation (no OT term).
        distance: ``"euclidean"`` or ``"cosine"``.
        m_step: ``"closed_form"`` or ``"gradient"``.
        optimizer: ``"sgd"`` or ``"adam"`` for the gradient M-step.
        lr: Gradient M-step size in units of 1/L.
        gradient_steps: Optimizer steps per gradient M-step.
        ridge: Relative ridge on ``M M^T`` (> 0).
        cost_normalization: ``"mean"``, ``"max"`` or ``"none"``.
        sinkhorn_method: ``"auto"``, ``"sinkhorn"`` or ``"sinkhorn_log"``.
        sinkhorn_max_iter: Maximum Sinkhorn iterations per E-step.
        sinkhorn_tol: Relative marginal tolerance of Sinkhorn.
        scoring_bank: ``"refined"``, ``"matched"`` or ``"union"``.
        neighbors: Restrict each row of W to the patch's K nearest bank prototypes (``None``: all).
        affine: With ``neighbors``, rows of W sum to one (refined prototypes on the neighbours' affine hull).
        sinkhorn_overrelaxation: Over-relaxation of the batched Sinkhorn, in ``[1, 2)``.
        score_fusion: ``"none"`` or ``"geometric"`` (geometric mean with the nearest-neighbour distance).

    See :class:`~anomalib_protorefine.refinement.options.RefinerOptions` for details.

    Example:
        >>> import torch
        >>> refiner = PrototypeRefiner(distance="cosine", lambda_=0.1)
        >>> result = refiner.refine(torch.randn(1, 9, 4), torch.randn(6, 4))
        >>> result.plan.shape, result.transform.shape
        (torch.Size([1, 6, 9]), torch.Size([1, 9, 6]))
    """

    def __init__(
        self,
        lambda_: float = 0.3,
        num_iterations: int = 10,
        em_tol: float = 0.0,
        epsilon: float = 0.05,
        transport: bool = True,
        distance: str = "euclidean",
        m_step: str = "closed_form",
        optimizer: str = "sgd",
        lr: float = 1.0,
        gradient_steps: int = 5,
        ridge: float = 1e-3,
        cost_normalization: str = "mean",
        sinkhorn_method: str = "auto",
        sinkhorn_max_iter: int = 1000,
        sinkhorn_tol: float = 1e-3,
        scoring_bank: str = "refined",
        neighbors: int | None = None,
        affine: bool = False,
        sinkhorn_overrelaxation: float = 1.7,
        score_fusion: str = "none",
    ) -> None:
        super().__init__()
        self.options = RefinerOptions(
            lambda_=lambda_,
            num_iterations=num_iterations,
            em_tol=em_tol,
            epsilon=epsilon,
            transport=transport,
            distance=distance,  # type: ignore[arg-type]
            m_step=m_step,  # type: ignore[arg-type]
            optimizer=optimizer,  # type: ignore[arg-type]
            lr=lr,
            gradient_steps=gradient_steps,
            ridge=ridge,
            cost_normalization=cost_normalization,  # type: ignore[arg-type]
            sinkhorn_method=sinkhorn_method,  # type: ignore[arg-type]
            sinkhorn_max_iter=sinkhorn_max_iter,
            sinkhorn_tol=sinkhorn_tol,
            scoring_bank=scoring_bank,  # type: ignore[arg-type]
            neighbors=neighbors,
            affine=affine,
            sinkhorn_overrelaxation=sinkhorn_overrelaxation,
            score_fusion=score_fusion,  # type: ignore[arg-type]
        )
        self._factor_cache: OrderedDict[tuple, BankFactors] = OrderedDict()
        self._export_factors: BankFactors | None = None  # set while a static graph is being exported
        self.last_stats: dict[str, float] = {}

    def extra_repr(self) -> str:
        """Show the options in ``print(model)``."""
        return ", ".join(f"{k}={v!r}" for k, v in self.options.as_dict().items())

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate_inputs(queries: torch.Tensor, bank: torch.Tensor, *, check_values: bool = True) -> None:
        """Check shapes, dtypes and (with ``check_values``; not in an exported graph) finiteness before any work."""
        if not isinstance(queries, torch.Tensor) or queries.ndim != 3:
            shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            msg = f"queries must be a tensor of shape (B, m, c) (batch, patches, channels), got {shape}."
            raise ValueError(msg)
        if not isinstance(bank, torch.Tensor) or bank.ndim != 2:
            shape = tuple(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
            msg = f"bank must be a tensor of shape (n, c) (prototypes, channels), got {shape}."
            raise ValueError(msg)
        if bank.shape[0] == 0:
            msg = "bank is empty (n = 0): build the memory bank from support images before refining."
            raise ValueError(msg)
        if check_values and queries.shape[0] == 0:  # the batch size of an exported graph is symbolic
            msg = "queries is an empty batch (B = 0): pass features of shape (B, m, c) with B >= 1."
            raise ValueError(msg)
        if queries.shape[1] == 0:
            msg = "queries has no patches (m = 0): pass features of shape (B, m, c) with m >= 1."
            raise ValueError(msg)
        if queries.shape[-1] != bank.shape[-1]:
            msg = (
                f"queries and bank must have the same number of channels c, got {queries.shape[-1]} and "
                f"{bank.shape[-1]}: extract both with the same backbone and layers."
            )
            raise ValueError(msg)
        for name, tensor in (("queries", queries), ("bank", bank)):
            if not tensor.is_floating_point():
                msg = f"{name} must be a floating-point tensor, got {tensor.dtype}: cast it with .float()."
                raise TypeError(msg)
            # A NaN or Inf entry makes the sum non-finite: one reduction instead of a full isfinite
            # pass (a tenth of its time); the full check only runs when the sum is not finite.
            if check_values and not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
                msg = f"{name} contains NaN or Inf values: check the feature extractor and its input."
                raise ValueError(msg)
        if queries.device != bank.device:
            msg = f"queries ({queries.device}) and bank ({bank.device}) must be on the same device."
            raise ValueError(msg)

    # ------------------------------------------------------------------ core
    def bank_factors(self, bank: torch.Tensor) -> BankFactors:
        """Return the cached factors of ``bank`` (computed on first use)."""
        key = (*bank_key(bank), self.options.lambda_, self.options.ridge, self.options.distance)
        factors = self._factor_cache.get(key)
        if factors is None or not factors.matches(bank):
            factors = BankFactors.from_bank(
                bank, self.options.lambda_, self.options.ridge, normalize=self.options.distance == "cosine"
            )
            self._factor_cache[key] = factors
            while len(self._factor_cache) > _CACHE_SIZE:
                self._factor_cache.popitem(last=False)
        else:
            self._factor_cache.move_to_end(key)
        return factors

    @property
    def is_exporting(self) -> bool:
        """Whether the refiner is inside :meth:`exporting` (its forward is being traced into a static graph)."""
        return self._export_factors is not None

    def check_exportable(self) -> None:
        """Raise an error naming the option when these options cannot be exported as a static graph.

        Example:
            >>> PrototypeRefiner(m_step="gradient").check_exportable()  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: ONNX/OpenVINO export needs m_step='closed_form', got m_step='gradient' ...
        """
        opts = self.options
        if opts.m_step != "closed_form":
            msg = (
                f"ONNX/OpenVINO export needs m_step='closed_form', got m_step={opts.m_step!r} (a torch optimizer "
                "cannot be exported): export a model with refiner={'m_step': 'closed_form'}, or use "
                "--export_type torch."
            )
            raise ValueError(msg)
        if opts.neighbors is not None or opts.affine:
            msg = (
                f"ONNX/OpenVINO export supports the whole-bank M-step only, got neighbors={opts.neighbors!r}, "
                f"affine={opts.affine!r} (per-patch Cholesky solves have no ONNX operator): export a model with "
                "refiner={'neighbors': None, 'affine': False}, or use --export_type torch."
            )
            raise ValueError(msg)

    @contextlib.contextmanager
    def exporting(self, bank: torch.Tensor, sinkhorn_iterations: int | None = None) -> Iterator[PrototypeRefiner]:
        """Make :meth:`refine` and :meth:`score_result` a static graph for ``torch.export`` (ONNX/OpenVINO).

        Inside the block the refiner computes exactly what it computes with ``sinkhorn_method="fixed"``,
        ``sinkhorn_max_iter=sinkhorn_iterations`` and ``em_tol=0`` (all ``num_iterations`` EM iterations,
        a fixed number of log-domain Sinkhorn iterations per E-step, closed-form M-step), with the
        factors of ``bank`` computed here once (their Cholesky solves become constants of the graph)
        and no data-dependent check or statistic. The options are restored on exit.

        Args:
            bank: The memory bank that the exported model refines against.
            sinkhorn_iterations: Sinkhorn iterations per E-step. ``None``: the refiner's
                ``sinkhorn_max_iter`` if it already uses ``sinkhorn_method="fixed"``, else
                :data:`EXPORT_SINKHORN_ITERATIONS`.

        Yields:
            The refiner, in export mode.

        Example:
            >>> import torch
            >>> refiner, bank = PrototypeRefiner(num_iterations=2), torch.randn(6, 4)
            >>> with refiner.exporting(bank, sinkhorn_iterations=50):
            ...     refiner.options.sinkhorn_method, refiner.options.sinkhorn_max_iter, refiner.is_exporting
            ('fixed', 50, True)
            >>> refiner.options.sinkhorn_method, refiner.is_exporting
            ('auto', False)
        """
        self.check_exportable()
        saved = self.options
        if sinkhorn_iterations is None:
            fixed = saved.sinkhorn_method == "fixed"
            sinkhorn_iterations = saved.sinkhorn_max_iter if fixed else EXPORT_SINKHORN_ITERATIONS
        if saved.em_tol > 0:
            logger.warning(
                "Export runs all num_iterations=%d EM iterations: em_tol=%g stops on the data, which a static "
                "graph cannot do.",
                saved.num_iterations,
                saved.em_tol,
            )
        self.options = replace(saved, sinkhorn_method="fixed", sinkhorn_max_iter=sinkhorn_iterations, em_tol=0.0)
        self._validate_inputs(bank[None], bank)
        with torch.no_grad():
            self._export_factors = self.bank_factors(bank)
        try:
            yield self
        finally:
            self.options, self._export_factors = saved, None

    def _cost_scale(
        self, weights: torch.Tensor, weighted_gram: torch.Tensor, proto_sq: torch.Tensor, factors: BankFactors
    ) -> torch.Tensor:
        """Per-query cost scale ``s`` (B,) of the transport cost at the initial ``W`` (with ``W G``).

        ``"mean"`` comes from the mean norms and the mean of ``W G`` (no ``(B, n, m)`` cost is formed).
        """
        mode = self.options.cost_normalization
        if mode == "none":
            return torch.ones(weights.shape[0], dtype=weights.dtype, device=weights.device)
        if mode == "mean":
            scale = factors.sq_norms.mean() + proto_sq.mean(-1) - 2.0 * weighted_gram.mean((-1, -2))
        else:
            scale = transport_cost(weights, factors, weighted_gram).amax((-1, -2))
        # A zero cost means the refined prototypes coincide with the bank: any positive scale works.
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    @float32_compute
    def refine(self, queries: torch.Tensor, bank: torch.Tensor) -> RefinementResult:
        """Refine ``bank`` for each query.

        Args:
            queries: Query patch features ``(B, m, c)``.
            bank: Memory bank ``(n, c)``.

        Returns:
            The transform matrices, plans and statistics.
        """
        exporting = self._export_factors is not None
        self._validate_inputs(queries, bank, check_values=not exporting)
        opts = self.options
        start = time.perf_counter()
        factors = self._export_factors if self._export_factors is not None else self.bank_factors(bank)
        features = queries.detach().float()
        if opts.distance == "cosine":
            features = F.normalize(features, dim=-1)
        terms = QueryTerms.from_features(features, factors)
        local = None
        if (opts.neighbors is not None and opts.neighbors < bank.shape[0]) or opts.affine:
            local = LocalClosedFormStep(terms, factors, opts.lambda_, opts.neighbors or bank.shape[0], opts.affine)
            weights = local.initial_weights()
        else:
            weights = terms.initial_weights(factors)
        plan: torch.Tensor | None = None
        sinkhorn_iterations = em_iterations = 0
        weighted_gram: torch.Tensor | None = None
        proto_sq: torch.Tensor | None = None
        if opts.transport:
            # Sinkhorn warm starts of the batch: row potentials, or POT's duals per query.
            warm_start = WarmStart.cold(queries.shape[0], queries.device, duals=opts.sinkhorn_method in POT_METHODS)
            closed_form = None
            if opts.m_step == "closed_form":
                closed_form = local if local is not None else ClosedFormStep(terms, factors, opts.lambda_)
            # The dense closed form iterates on the coupling G W^T alone (half the M-step product)
            # and forms W once, after the last E-step; the other M-steps update W every iteration.
            dense = isinstance(closed_form, ClosedFormStep)
            weighted_gram = weights @ factors.gram
            initial_sq = (weighted_gram * weights).sum(-1)  # ||(W0 M)_j||^2, the costs' column offset
            scale = self._cost_scale(weights, weighted_gram, initial_sq, factors)
            coupling = weighted_gram.transpose(1, 2)
            # Queries whose plan stopped moving (em_tol) are frozen, so a query's result never
            # depends on the other queries of its batch.
            active = torch.ones(queries.shape[0], dtype=torch.bool, device=queries.device)
            for _ in range(opts.num_iterations):
                previous = plan
                plan = self._e_step(coupling_cost(coupling, scale, initial_sq), warm_start, active, previous)
                em_iterations += 1
                if dense:
                    # A frozen query keeps its plan, hence its coupling: no masking needed.
                    coupling = closed_form.coupling(plan)  # type: ignore[union-attr]
                else:
                    if closed_form is not None:
                        new_weights, new_weighted_gram = closed_form(plan)
                    else:
                        mask = None if local is None else local.mask
                        new_weights = gradient_step(
                            weights, terms, factors, plan, opts.lambda_, opts.optimizer, opts.lr, opts.gradient_steps,
                            mask,
                        )  # fmt: skip
                        new_weighted_gram = new_weights @ factors.gram
                    if opts.em_tol == 0 or bool(active.all()):  # em_tol = 0: every query stays active
                        weights, weighted_gram = new_weights, new_weighted_gram
                    else:
                        keep = active[:, None, None]
                        weights = torch.where(keep, new_weights, weights)
                        weighted_gram = torch.where(keep, new_weighted_gram, weighted_gram)
                    coupling = weighted_gram.transpose(1, 2)
                if previous is not None and opts.em_tol > 0:
                    # Total-variation change of each query's plan (plans sum to 1).
                    active &= (plan - previous).abs().sum((-1, -2)) / 2 >= opts.em_tol
                    if not active.any():
                        break
            if dense:
                weights, weighted_gram = closed_form(plan)  # type: ignore[misc]
            if opts.sinkhorn_method == "fixed":  # no count in the (exportable) graph: known in advance
                sinkhorn_iterations = em_iterations * opts.sinkhorn_max_iter * queries.shape[0]
            else:
                sinkhorn_iterations = int(warm_start.iterations.sum())
        if exporting:  # statistics are Python floats of the data: not part of a static graph
            return RefinementResult(transform=weights, plan=plan, terms=terms, factors=factors)
        transport = None
        if plan is not None and weighted_gram is not None:
            # <C, T> from the marginals: sum_i |M_i|^2 T_i. + sum_j |p_j|^2 T_.j - 2 <W G, T^T>.
            proto_sq = (weighted_gram * weights).sum(-1)
            transport = (
                (plan.sum(-1) * factors.sq_norms).sum(-1)
                + (plan.sum(-2) * proto_sq).sum(-1)
                - 2.0 * (plan * weighted_gram.transpose(1, 2)).sum((-1, -2))
            )
        stats = {
            "em_iterations": float(em_iterations),
            "sinkhorn_iterations": sinkhorn_iterations / max(queries.shape[0], 1),
            "objective": float(objective(weights, terms, factors, plan, opts.lambda_, transport, proto_sq).mean()),
            "ot_cost": 0.0 if transport is None else float(transport.mean()),
            "seconds": time.perf_counter() - start,
        }
        self.last_stats = stats
        return RefinementResult(transform=weights, plan=plan, terms=terms, factors=factors, stats=stats)

    def _e_step(
        self,
        costs: torch.Tensor,
        start: WarmStart,
        active: torch.Tensor,
        previous: torch.Tensor | None,
    ) -> torch.Tensor:
        """Sinkhorn for each active query's normalised cost ``(B, n, m)``, warm-started from ``start``.

        ``sinkhorn_method="auto"`` solves all active queries at once (:func:`solve_plans`), ``"fixed"``
        too, with a fixed number of iterations (:meth:`_e_step_fixed`); ``"sinkhorn"`` and
        ``"sinkhorn_log"`` call POT once per query (:func:`solve_plan`, the reference). Frozen (converged)
        queries keep their previous plan. ``start`` is updated in place.
        """
        opts = self.options
        if opts.sinkhorn_method == "fixed":
            return self._e_step_fixed(costs, start, active, previous)
        everyone = previous is None or bool(active.all())
        index = torch.arange(costs.shape[0], device=costs.device) if everyone else active.nonzero()[:, 0]
        if opts.sinkhorn_method == "auto":
            # Warm start from the row potentials: the E-step cost (coupling_cost) changes between
            # EM iterations by a column constant (the prototypes' norms), which they are blind to.
            warm = None if start.row_potential is None else start.row_potential[index]
            solved, state = solve_plans(
                costs if everyone else costs[index],
                opts.epsilon,
                opts.sinkhorn_max_iter,
                opts.sinkhorn_tol,
                overrelaxation=opts.sinkhorn_overrelaxation,
                row_potential=warm,
            )
            row_potential, iterations = state.row_potential, state.iterations
            valid = plan_is_valid(solved)
            for row, query in enumerate(index.tolist()):
                if valid[row]:
                    continue
                # Numerical breakdown (tiny epsilon, far warm start): recompute cold in the log domain.
                plan, duals = solve_plan(
                    costs[query], opts.epsilon, "sinkhorn_log", opts.sinkhorn_max_iter, opts.sinkhorn_tol
                )
                solved[row] = plan
                # POT solved the row-shifted cost C - min_j C_ij: undo the shift for f.
                row_potential[row] = opts.epsilon * duals.log_u + costs[query].amin(1)
                iterations[row] += duals.iterations
                check_marginals(plan[None], opts.epsilon, opts.sinkhorn_max_iter, opts.cost_normalization)
            if start.row_potential is None:
                start.row_potential = row_potential
            else:
                start.row_potential[index] = row_potential
            start.iterations[index] += iterations
            if everyone:
                return solved
            plans = previous.clone()
            plans[index] = solved
            return plans
        plans = torch.empty_like(costs) if previous is None else previous.clone()
        for query in index.tolist():
            plans[query], duals = solve_plan(
                costs[query],
                opts.epsilon,
                opts.sinkhorn_method,
                opts.sinkhorn_max_iter,
                opts.sinkhorn_tol,
                start.duals[query],
            )
            start.duals[query] = duals
            start.iterations[query] += duals.iterations
            check_marginals(plans[query][None], opts.epsilon, opts.sinkhorn_max_iter, opts.cost_normalization)
        return plans

    def _e_step_fixed(
        self,
        costs: torch.Tensor,
        start: WarmStart,
        active: torch.Tensor,
        previous: torch.Tensor | None,
    ) -> torch.Tensor:
        """E-step of ``sinkhorn_method="fixed"``: all queries at once, a fixed number of iterations.

        Warm-started from the batch's row potentials (updated in place; like the batched solver's,
        blind to the column constant by which the E-step cost changes between EM iterations). Frozen
        queries (``em_tol``) keep their previous plan. Outside an export a plan that misses its marginals
        raises :class:`~anomalib_protorefine.refinement.transport.SinkhornMarginalError`.
        """
        opts = self.options
        plans, start.row_potential = solve_plans_fixed(
            costs,
            opts.epsilon,
            opts.sinkhorn_max_iter,
            start.row_potential,
            graph_loop=self._export_factors is not None,
        )
        if self._export_factors is None:
            check_marginals(plans, opts.epsilon, opts.sinkhorn_max_iter, opts.cost_normalization)
        if previous is not None and opts.em_tol > 0:
            plans = torch.where(active[:, None, None], plans, previous)
        return plans

    def forward(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Return the refined prototypes ``P = W M``, ``(B, m, c)``, in the input dtype."""
        return self.refine(queries, bank).prototypes.to(queries.dtype)

    # ------------------------------------------------------------------ scoring
    @float32_compute
    def score_result(self, result: RefinementResult) -> torch.Tensor:
        """Distance of every query patch to its scoring bank, ``(B, m)``, float32.

        Euclidean: ``||f_j - p||``; cosine: ``(1 - cos(f_j, p)) / 2``; ``p`` ranges over the
        prototypes chosen by ``scoring_bank``. With ``score_fusion="geometric"`` the result is the
        geometric mean of that distance and the distance to the nearest prototype of the original bank.
        """
        terms, factors, weights = result.terms, result.factors, result.transform
        proto_sq = prototype_sq_norms(weights, factors.gram)  # (B, m)
        cosine = self.options.distance == "cosine"
        mode = self.options.scoring_bank
        if mode == "matched":
            dots = (terms.cross * weights).sum(-1)  # f_j . p_j
            refined = self._distance(dots, terms.sq_norms, proto_sq, cosine=cosine)
        else:
            # Nearest refined prototype of every query patch, in chunks of query patches so that the
            # (B, rows, m) block of dot products f_j . p_k stays below _SCORE_CHUNK elements: memory
            # linear in m, and the values of one (B, m, m) block up to BLAS rounding (each row's minimum is whole).
            batch, num_patches = proto_sq.shape
            # An exported graph's batch size is symbolic: there the block size is set per image.
            images = 1 if self._export_factors is not None else batch
            rows = max(1, _SCORE_CHUNK // max(images * num_patches, 1))
            refined = torch.cat(
                [
                    self._nearest(cross @ weights.transpose(1, 2), sq, proto_sq, cosine=cosine)
                    for cross, sq in zip(terms.cross.split(rows, 1), terms.sq_norms.split(rows, 1), strict=True)
                ],
                dim=1,
            )
        if mode == "union" or self.options.score_fusion == "geometric":
            sq_bank = factors.sq_norms[None].expand(terms.cross.shape[0], -1)
            nearest = self._nearest(terms.cross.clone(), terms.sq_norms, sq_bank, cosine=cosine)
            if mode == "union":
                refined = torch.minimum(refined, nearest)
            if self.options.score_fusion == "geometric":
                refined = (refined * nearest).sqrt()
        return refined

    @staticmethod
    def _nearest(dots: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor, *, cosine: bool) -> torch.Tensor:
        """``_distance(dots, sq_a[..., None], sq_b[:, None], cosine).amin(-1)`` without its temporaries.

        ``dots`` ``(B, rows, k)`` is overwritten. The distances are monotone in one expression
        (``sq_b - 2 dots`` or the cosine), so its extremum is taken first and the rest is applied to
        the ``(B, rows)`` result: the same values, but only one ``(B, rows, k)`` block in memory.
        """
        if cosine:
            dots.div_((sq_a[..., None] * sq_b[:, None, :]).clamp_min(torch.finfo(dots.dtype).tiny).sqrt())
            return ((1.0 - dots.amax(-1)) / 2.0).clamp(0.0, 1.0)
        closest = dots.mul_(-2.0).add_(sq_a[..., None] + sq_b[:, None, :]).amin(-1)
        return closest.clamp_min(0.0).sqrt()

    @staticmethod
    def _distance(dots: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor, *, cosine: bool) -> torch.Tensor:
        """Euclidean or cosine distance from dot products and squared norms (broadcasting)."""
        if cosine:
            denom = (sq_a * sq_b).clamp_min(torch.finfo(dots.dtype).tiny).sqrt()
            # |cos| <= 1 exactly; rounding can overshoot by ~1e-7, which would give a score below 0.
            return ((1.0 - dots / denom) / 2.0).clamp(0.0, 1.0)
        return (sq_a + sq_b - 2.0 * dots).clamp_min(0.0).sqrt()

    def patch_scores(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Refine, then score every query patch: ``(B, m)`` in the input dtype."""
        return self.score_result(self.refine(queries, bank)).to(queries.dtype)
