"""Test-time prototype refinement: a plain ``nn.Module`` (torch and POT; no Lightning, no anomalib).

For every query image with patch features ``F`` (m x c) and a memory bank ``M`` (n x c) the
refiner finds refined prototypes ``P = W M`` (m x c) by the EM algorithm of the paper:

* init ``W0 = F M^T (M M^T + rho I)^-1``;
* E-step: entropic OT plan ``T`` between ``M`` (mass 1/n) and ``P`` (mass 1/m) with POT;
* M-step: W with T fixed, closed form (default) or a torch optimizer (the paper).

Patch scores are the distances of the query patches to the refined prototypes (paper Eq. 6).
Everything runs batched over B queries on the tensors' device, in float32 whatever the input
dtype, in the bank's n-dimensional coefficient space.

This module holds the refiner (options, input checks, the bank-factor cache, export mode, scoring);
the EM loop and its statistics are in :mod:`~.em`, the E-steps in :mod:`~.e_step`, the M-steps in
:mod:`~.m_step`.

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
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_protorefine._deprecation import warn_renamed

from .bank import BankFactors, bank_key
from .e_step import POT_METHODS
from .em import EMResult, expectation_maximization, refinement_stats
from .m_step import LocalClosedFormStep, QueryTerms, prototype_sq_norms
from .options import RefinerOptions, document_options, takes_options
from .precision import float32_compute

__all__ = ["EXPORT_SINKHORN_ITERATIONS", "POT_METHODS", "PrototypeRefiner", "RefinementResult"]

logger = logging.getLogger(__name__)

_CACHE_SIZE = 8
#: Patches per image above which the whole-bank EM (``m n^2`` per iteration, ``n`` growing with ``m``) is
#: announced as costly: a 32 x 32 feature map, i.e. a CNN at 256 px.
LARGE_MAP_PATCHES = 1024
#: Largest block of query-prototype dot products formed at once when scoring (elements, 8 MB).
_SCORE_CHUNK = 1 << 21
#: Sinkhorn iterations per E-step of an exported refiner (``sinkhorn_method="fixed"``), unless the
#: refiner already uses ``"fixed"`` (then its ``sinkhorn_max_iter``) or the export names another number.
EXPORT_SINKHORN_ITERATIONS = 100


@dataclass
class RefinementResult:
    """Output of :meth:`PrototypeRefiner.refine`.

    Attributes:
        transform: Transform matrices ``W``, ``(B, m, n)`` (the refined prototypes are ``W M``).
        plan: Transport plans ``T``, ``(B, n, m)``, or ``None`` when ``transport=False``.
        terms: Query products ``F M^T`` and ``||F||^2`` used for scoring.
        factors: The bank factors.
        stats: Refinement statistics (iterations, OT cost, objective, seconds).
        proto_sq: ``||(W M)_j||^2``, ``(B, m)``, where the refinement formed them more cheaply than
            ``W G W^T`` (the local forms: from each patch's neighbours); ``None``: formed when scoring.
    """

    transform: torch.Tensor
    plan: torch.Tensor | None
    terms: QueryTerms
    factors: BankFactors
    stats: dict[str, float] = field(default_factory=dict)
    proto_sq: torch.Tensor | None = None

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

    The arguments are the fields of :class:`~anomalib_protorefine.refinement.options.RefinerOptions`,
    by name or in their order, validated there and kept in :attr:`options`; the signature and the
    entries below are generated from those fields.

    Args:
        *args: Options in the field order of ``RefinerOptions``.
        **options: Options by name, each documented below.

    Example:
        >>> import torch
        >>> refiner = PrototypeRefiner(distance="cosine", lambda_=0.1)
        >>> result = refiner.refine(torch.randn(1, 9, 4), torch.randn(6, 4))
        >>> result.plan.shape, result.transform.shape
        (torch.Size([1, 6, 9]), torch.Size([1, 9, 6]))
    """

    @takes_options
    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__()
        self.options = RefinerOptions(*args, **options)
        self._factor_cache: OrderedDict[tuple, BankFactors] = OrderedDict()
        self._export_factors: BankFactors | None = None  # set while a static graph is being exported
        self.last_stats: dict[str, float] = {}
        self._cost_announced = False

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
            # pass (which writes a boolean tensor); the full check only runs when the sum is not finite.
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

    def _announce_cost(self, num_patches: int, num_bank: int) -> None:
        """Warn once when the whole-bank EM runs on a large feature map, where its cost outgrows PatchCore's."""
        opts = self.options
        whole_bank = opts.transport and (opts.neighbors is None or opts.neighbors >= num_bank)
        if self._cost_announced or not whole_bank or num_patches <= LARGE_MAP_PATCHES or self.is_exporting:
            return
        self._cost_announced = True
        logger.warning(
            "Refining %d patches per image against the whole bank of %d prototypes: the EM costs about m n^2 per "
            "iteration, several times a nearest-neighbour search at this size (docs/benchmarks.md, 'Resolution'). "
            "For large inputs refine each patch from its 16 nearest prototypes at about PatchCore's cost: "
            "PatchCorePlus(refiner='local'), elsewhere refiner={'neighbors': 16, 'transport': False, "
            "'scoring_bank': 'matched'}.",
            num_patches,
            num_bank,
        )

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
        self._announce_cost(queries.shape[1], bank.shape[0])
        local = None
        if (opts.neighbors is not None and opts.neighbors < bank.shape[0]) or opts.affine:
            local = LocalClosedFormStep(terms, factors, opts.lambda_, opts.neighbors or bank.shape[0], opts.affine)
            weights = local.initial_weights()
        else:
            weights = terms.initial_weights(factors)
        em: EMResult | None = None
        plan: torch.Tensor | None = None
        weighted_gram: torch.Tensor | None = None
        if opts.transport:
            em = expectation_maximization(terms, factors, weights, local, opts, exporting=exporting)
            weights, weighted_gram, plan = em.weights, em.weighted_gram, em.plan
        # A local W has K non-zeros per row: its prototype norms cost m K^2, not the m n^2 of W G W^T.
        proto_sq = None if local is None else local.prototype_sq_norms(weights)
        if exporting:  # statistics are Python floats of the data: not part of a static graph
            return RefinementResult(transform=weights, plan=plan, terms=terms, factors=factors, proto_sq=proto_sq)
        stats = refinement_stats(weights, weighted_gram, plan, terms, factors, opts.lambda_, em, start, proto_sq)
        self.last_stats = stats
        return RefinementResult(
            transform=weights, plan=plan, terms=terms, factors=factors, stats=stats, proto_sq=proto_sq
        )

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
        proto_sq = result.proto_sq if result.proto_sq is not None else prototype_sq_norms(weights, factors.gram)
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


PrototypeRefiner.__doc__ = document_options(PrototypeRefiner.__doc__ or "")
