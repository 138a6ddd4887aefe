"""M-step: update the transform matrix W with the plan T fixed.

Objective per query (coefficient space, see ``docs/method.md``)::

    J(W) = 1/m ||F - W M||^2 + rho/m ||W||^2 + lambda * sum_ij T_ij ||M_i - (W M)_j||^2

Two solvers:

* :class:`ClosedFormStep`: the exact minimiser ``W = (F M^T + lambda m T^T G) ((1+lambda) G + rho I)^-1``
  (exact when the columns of T sum to ``1/m``, which Sinkhorn enforces up to its tolerance).
* :func:`gradient_step`: the paper's variant, a few optimizer steps (SGD or Adam) on the
  closed-form gradient (:func:`objective_gradient`); unmasked SGD computes the same iterates in
  closed form in the eigenbasis of ``G``.

Example:
    >>> import torch
    >>> from anomalib_protorefine.refinement.bank import BankFactors
    >>> from anomalib_protorefine.refinement.m_step import ClosedFormStep, QueryTerms
    >>> factors = BankFactors.from_bank(torch.randn(5, 8), lambda_=0.3, ridge=1e-3, normalize=False)
    >>> terms = QueryTerms.from_features(torch.randn(1, 7, 8), factors)
    >>> plan = torch.full((1, 5, 7), 1 / 35)
    >>> weights, weighted_gram = ClosedFormStep(terms, factors, lambda_=0.3)(plan)
    >>> weights.shape
    torch.Size([1, 7, 5])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bank import BankFactors

__all__ = [
    "ClosedFormStep",
    "LocalClosedFormStep",
    "QueryTerms",
    "coupling_cost",
    "gradient_step",
    "objective",
    "objective_gradient",
    "prototype_sq_norms",
    "transport_cost",
]


@dataclass(frozen=True)
class QueryTerms:
    """The query-dependent products that the EM needs.

    Attributes:
        features: Float32 query features ``(B, m, c)`` (L2-normalised for the cosine distance).
        cross: ``F M^T``, ``(B, m, n)``.
        sq_norms: ``||F_j||^2``, ``(B, m)``.
    """

    features: torch.Tensor
    cross: torch.Tensor
    sq_norms: torch.Tensor

    @classmethod
    def from_features(cls, features: torch.Tensor, factors: BankFactors) -> QueryTerms:
        """Compute the products for float32 query features ``(B, m, c)`` (normalised if cosine)."""
        if features.stride(-1) == 1:
            # One fused reduction (pow + sum would write a (B, m, c) temporary)...
            sq_norms = torch.linalg.vector_norm(features, dim=-1).square()
        else:
            # ...but only along contiguous channels (backbone maps are often (B, c, m) in memory).
            sq_norms = features.pow(2).sum(-1)
        return cls(features=features, cross=features @ factors.bank.T, sq_norms=sq_norms)

    def initial_weights(self, factors: BankFactors) -> torch.Tensor:
        """``W0 = F M^T (G + rho I)^-1``, the minimiser without the transport term, ``(B, m, n)``."""
        return factors.solve_input(self.features, self.cross) @ factors.init_map


def prototype_sq_norms(weights: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Squared norms ``||(W M)_j||^2 = (W G W^T)_jj`` of the refined prototypes, ``(B, m)``."""
    return ((weights @ gram) * weights).sum(-1)


def transport_cost(
    weights: torch.Tensor,
    factors: BankFactors,
    weighted_gram: torch.Tensor | None = None,
    proto_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared Euclidean cost ``C_ij = ||M_i - (W M)_j||^2``, ``(B, n, m)``, from coefficients only.

    Args:
        weights: ``W``, ``(B, m, n)``.
        factors: Bank factors.
        weighted_gram: ``W G`` if already known (saves a matmul).
        proto_sq: ``||(W M)_j||^2 = ((W G) * W).sum(-1)``, ``(B, m)``, if already known.
    """
    if weighted_gram is None:
        weighted_gram = weights @ factors.gram  # (B, m, n): row j holds (W M)_j . M_i
    if proto_sq is None:
        proto_sq = (weighted_gram * weights).sum(-1)
    cost = factors.sq_norms[None, :, None] + proto_sq[:, None, :] - 2.0 * weighted_gram.transpose(1, 2)
    return cost.clamp_min(0.0)


def coupling_cost(coupling: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The E-step's cost ``(offset_j - 2 (G W^T)_ij) / s``, ``(B, n, m)``, from the coupling ``G W^T``.

    It differs from :func:`transport_cost` ``/ s`` by a row constant ``||M_i||^2 / s`` plus a column
    constant ``(||(W M)_j||^2 - offset_j) / s``, which the entropic plan does not depend on (they
    only shift the Sinkhorn potentials): the same plan without ``W`` itself or a clamp. The offset
    (the initial prototypes' squared norms) keeps the columns on the scale of the true cost, so
    that no column of the Sinkhorn kernel starts out negligible.

    Args:
        coupling: ``G W^T``, ``(B, n, m)``, any strides (e.g. ``(W G).transpose(1, 2)``).
        scale: Per-query cost scale ``s``, ``(B,)``.
        offset: Per-column offset, ``(B, m)``.

    Returns:
        The cost, contiguous ``(B, n, m)``.

    Example:
        >>> import torch
        >>> coupling_cost(torch.ones(1, 2, 3), torch.tensor([4.0]), torch.full((1, 3), 6.0))[0, 0].tolist()
        [1.0, 1.0, 1.0]
    """
    cost = torch.empty(coupling.shape, dtype=coupling.dtype, device=coupling.device)
    return torch.addcmul((offset / scale[:, None])[:, None, :], coupling, (-2.0 / scale)[:, None, None], out=cost)


def objective(
    weights: torch.Tensor,
    terms: QueryTerms,
    factors: BankFactors,
    plan: torch.Tensor | None,
    lambda_: float,
    transport: torch.Tensor | None = None,
    proto_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Value of ``J(W)`` per query, ``(B,)`` (the entropy term is constant in W and left out).

    Args:
        weights: ``W``, ``(B, m, n)``.
        terms: Query products.
        factors: Bank factors.
        plan: Transport plan ``(B, n, m)``, or ``None`` (no transport term).
        lambda_: Weight of the transport term.
        transport: ``<C(W), T>`` per query if already known (saves recomputing the cost).
        proto_sq: ``||(W M)_j||^2``, ``(B, m)``, if already known (saves a ``W G`` product).
    """
    num_patches = weights.shape[1]
    if proto_sq is None:
        proto_sq = prototype_sq_norms(weights, factors.gram)
    fidelity = (terms.sq_norms - 2.0 * (terms.cross * weights).sum(-1) + proto_sq).mean(-1)
    value = fidelity + factors.ridge * weights.pow(2).sum((-1, -2)) / num_patches
    if plan is not None and lambda_ > 0:
        if transport is None:
            transport = (plan * transport_cost(weights, factors)).sum((-1, -2))
        value = value + lambda_ * transport
    return value


class ClosedFormStep:
    """Exact minimiser of ``J`` for a fixed plan, with the plan-independent part precomputed.

    ``W = F M^T H^-1 + lambda m T^T G H^-1`` and ``W G = F M^T H^-1 G + lambda m T^T G H^-1 G``:
    one ``(m x n) @ (n x 2n)`` product per EM iteration gives both W and the ``W G`` that the next
    E-step's cost needs.

    Args:
        terms: Query products.
        factors: Bank factors.
        lambda_: Weight of the transport term.
    """

    def __init__(self, terms: QueryTerms, factors: BankFactors, lambda_: float) -> None:
        self.fixed = factors.solve_input(terms.features, terms.cross) @ factors.em_map  # (B, m, 2n)
        self.factors = factors
        self.lambda_ = lambda_
        self._fixed_coupling: torch.Tensor | None = None

    def __call__(self, plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(W, W G)`` for the plan ``(B, n, m)``."""
        num_bank, num_patches = plan.shape[-2:]
        # matmul + in-place add: one output buffer (baddbmm first copies `fixed` into its output,
        # and takes a slower path for the transposed-batch product on CPU; see docs/benchmarks.md).
        both = torch.matmul(plan.transpose(1, 2), self.factors.gram_em_pair).mul_(self.lambda_ * num_patches)
        both += self.fixed
        return both[..., :num_bank], both[..., num_bank:]

    def coupling(self, plan: torch.Tensor) -> torch.Tensor:
        """``(W G)^T = G W^T`` of the minimiser for the plan ``(B, n, m)``, as ``(B, n, m)``; W itself is not formed.

        ``G W^T = (F M^T H^-1 G)^T + lambda m (G H^-1 G) T``: one ``(n x n) @ (n x m)`` product per
        query, half of :meth:`__call__`'s, already in the ``(B, n, m)`` layout of the transport cost.
        This is all the next E-step needs (see :func:`coupling_cost`).

        Example:
            >>> import torch
            >>> from anomalib_protorefine.refinement.bank import BankFactors
            >>> factors = BankFactors.from_bank(torch.randn(5, 8), lambda_=0.3, ridge=1e-3, normalize=False)
            >>> step = ClosedFormStep(QueryTerms.from_features(torch.randn(2, 7, 8), factors), factors, 0.3)
            >>> plan = torch.full((2, 5, 7), 1 / 35)
            >>> torch.allclose(step.coupling(plan), step(plan)[1].transpose(1, 2), atol=1e-5)
            True
        """
        num_bank, num_patches = plan.shape[-2:]
        if self._fixed_coupling is None:
            self._fixed_coupling = self.fixed[..., num_bank:].transpose(1, 2).contiguous()
        return torch.baddbmm(
            self._fixed_coupling,
            self.factors.gram_em_gram.expand(plan.shape[0], -1, -1),
            plan,
            alpha=self.lambda_ * num_patches,
        )


class LocalClosedFormStep:
    """Exact M-step with each row of W restricted to the query patch's K nearest bank prototypes.

    Row ``j`` of ``W`` is non-zero only on ``I_j``, the indices of the ``K`` bank prototypes nearest
    to ``f_j``. With ``G_j = G[I_j, I_j]`` the minimiser of ``J`` over such rows is, per patch,

    ``w_j = (f_j M_{I_j}^T + lambda m (T^T G)_{j, I_j}) ((1 + lambda) G_j + rho I)^-1``

    (``lambda = 0`` gives the initial ``W0``), and with ``affine=True`` the same under the constraint
    ``sum(w_j) = 1`` (one Lagrange multiplier per patch), so that ``P_j`` lies on the affine hull of
    its neighbours and ``K = 1`` is exactly plain PatchCore. The ``K x K`` inverses are computed once
    per query in float64; each EM iteration is then one ``(m x n) @ (n x n)`` product for ``T^T G``
    and batched ``K x K`` mat-vecs.

    Args:
        terms: Query products.
        factors: Bank factors.
        lambda_: Weight of the transport term.
        neighbors: ``K`` (at most n).
        affine: Constrain each row of W to sum to one.
    """

    def __init__(self, terms: QueryTerms, factors: BankFactors, lambda_: float, neighbors: int, affine: bool) -> None:
        num_bank = factors.gram.shape[0]
        # ||f - M_i||^2 up to the per-patch constant ||f||^2.
        distance = factors.sq_norms - 2.0 * terms.cross
        self.index = distance.topk(min(neighbors, num_bank), dim=-1, largest=False).indices  # (B, m, K)
        self.mask = torch.zeros_like(terms.cross, dtype=torch.bool).scatter_(-1, self.index, True)
        gram64 = factors.gram.double()
        self._local_gram = gram64[self.index[..., :, None], self.index[..., None, :]]  # (B, m, K, K)
        self.factors = factors
        self._init_inverse = self._local_inverse(1.0)
        self._em_inverse: torch.Tensor | None = None
        self.local_cross = terms.cross.gather(-1, self.index)  # (B, m, K)
        self.lambda_ = lambda_
        self.affine = affine

    def _local_inverse(self, scale: float) -> torch.Tensor:
        """``(scale G_I + rho I)^-1`` of every patch's neighbours, in float64, returned as float32."""
        local = self._local_gram
        eye = torch.eye(local.shape[-1], dtype=local.dtype, device=local.device)
        return torch.cholesky_inverse(torch.linalg.cholesky(scale * local + self.factors.ridge * eye)).float()

    @property
    def _inverse(self) -> torch.Tensor:
        """The EM's inverse ``((1 + lambda) G_I + rho I)^-1``, formed on first use (never without transport)."""
        if self._em_inverse is None:
            self._em_inverse = self._local_inverse(1.0 + self.lambda_)
        return self._em_inverse

    def prototype_sq_norms(self, weights: torch.Tensor) -> torch.Tensor:
        """``||(W M)_j||^2`` from the neighbours alone, ``(B, m)``: ``K^2`` per patch instead of ``n^2``.

        ``weights`` must be a W of this step (each row non-zero only on its patch's neighbours).
        """
        local = weights.gather(-1, self.index).double()  # (B, m, K)
        return torch.einsum("bmk,bmkl,bml->bm", local, self._local_gram, local).float()

    def _solve(self, inverse: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Local coefficients ``(B, m, K)`` for the right-hand sides ``rhs`` ``(B, m, K)``."""
        weights = (inverse @ rhs.unsqueeze(-1)).squeeze(-1)
        if self.affine:
            ones = inverse.sum(-1)  # inverse @ 1
            weights = weights + ((1.0 - weights.sum(-1)) / ones.sum(-1))[..., None] * ones
        return weights

    def _dense(self, local: torch.Tensor) -> torch.Tensor:
        """Scatter local coefficients into a dense ``(B, m, n)`` W."""
        return torch.zeros_like(self.mask, dtype=local.dtype).scatter_(-1, self.index, local)

    def initial_weights(self) -> torch.Tensor:
        """``W0``: the (affine) ridge projection of each patch onto its neighbours, ``(B, m, n)``."""
        return self._dense(self._solve(self._init_inverse, self.local_cross))

    def __call__(self, plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(W, W G)`` for the plan ``(B, n, m)``."""
        num_patches = plan.shape[-1]
        pull = plan.transpose(1, 2) @ self.factors.gram  # (B, m, n): (T^T G)_j
        rhs = self.local_cross + self.lambda_ * num_patches * pull.gather(-1, self.index)
        weights = self._dense(self._solve(self._inverse, rhs))
        return weights, weights @ self.factors.gram


def objective_gradient(
    weights: torch.Tensor,
    weighted_gram: torch.Tensor,
    terms: QueryTerms,
    factors: BankFactors,
    plan: torch.Tensor,
    lambda_: float,
    pull: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of :func:`objective` in ``W``, ``(B, m, n)``, in closed form (no autograd).

    ``dJ/dW = 2/m (W G - F M^T + rho W) + 2 lambda (diag(T^T 1) W G - T^T G)``: the fidelity and
    ridge terms, and the transport term ``sum_ij T_ij (|M_i|^2 - 2 M_i . p_j + |p_j|^2)``.

    Args:
        weights: ``W``, ``(B, m, n)``.
        weighted_gram: ``W G``.
        terms: Query products.
        factors: Bank factors.
        plan: Transport plan ``(B, n, m)``.
        lambda_: Weight of the transport term.
        pull: ``T^T G`` if already known (it is constant over an M-step).

    Example:
        >>> import torch
        >>> from anomalib_protorefine.refinement.bank import BankFactors
        >>> factors = BankFactors.from_bank(torch.randn(5, 8), lambda_=0.3, ridge=1e-3, normalize=False)
        >>> terms = QueryTerms.from_features(torch.randn(1, 7, 8), factors)
        >>> plan, w = torch.full((1, 5, 7), 1 / 35), torch.zeros(1, 7, 5, requires_grad=True)
        >>> objective(w, terms, factors, plan, 0.3).sum().backward()
        >>> torch.allclose(objective_gradient(w.detach(), w.detach() @ factors.gram, terms, factors, plan, 0.3), w.grad)
        True
    """
    if pull is None:
        pull = plan.transpose(1, 2) @ factors.gram
    return _gradient(weights, weighted_gram, terms.cross, pull, plan.sum(-2)[..., None], factors.ridge, lambda_)


def _gradient(
    weights: torch.Tensor,
    weighted_gram: torch.Tensor,
    cross: torch.Tensor,
    pull: torch.Tensor,
    mass: torch.Tensor,
    ridge: float,
    lambda_: float,
) -> torch.Tensor:
    """``dJ/dW`` from ``W``, ``W G``, ``F M^T``, ``T^T G`` and the plan's column sums ``mass`` ``(B, m, 1)``.

    ``W G - F M^T`` is formed first: it is small where W fits F, and adding the two large terms
    separately first would cost their rounding errors in the difference.
    """
    fidelity = (weighted_gram - cross).add_(weights, alpha=ridge).mul_(2.0 / weights.shape[1])
    return fidelity.add_((weighted_gram * mass).sub_(pull), alpha=2.0 * lambda_)


def gradient_step(
    weights: torch.Tensor,
    terms: QueryTerms,
    factors: BankFactors,
    plan: torch.Tensor,
    lambda_: float,
    optimizer: str,
    lr: float,
    steps: int,
    mask: torch.Tensor | None = None,
    weighted_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``steps`` optimizer steps on ``J`` from ``weights`` with the plan fixed.

    With ``mask`` (``(B, m, n)`` booleans, locality) only the masked entries of W move.
    The step size is scale-free: for SGD ``lr / L`` with ``L = 2 ((1 + lambda) max_eig(G) + rho) / m``
    the Lipschitz constant of the gradient, for Adam ``lr`` times 1% of the mean ``|W|`` entry.
    Adam, and SGD with a mask, run the torch optimizer on the gradient of :func:`objective_gradient`
    (closed form, one ``(m x n)(n x n)`` product per step, where autograd would differentiate through
    the ``(B, n, m)`` cost). SGD without a mask computes the same iterates elementwise in the
    eigenbasis of ``G`` (:func:`_sgd_steps`). Works inside Lightning's ``torch.inference_mode()``.

    Args:
        weights: ``W`` to start from, ``(B, m, n)``.
        terms: Query products.
        factors: Bank factors.
        plan: Transport plan ``(B, n, m)``, fixed over the steps.
        lambda_: Weight of the transport term.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: Step size (scale-free, see above).
        steps: Number of optimizer steps.
        mask: Entries of W allowed to move, ``(B, m, n)`` booleans, or ``None`` (all).
        weighted_gram: ``W G`` of ``weights`` if already known (the EM loop holds it for the E-step's
            cost): the first step's gradient then reuses it instead of forming the same product again.

    Returns:
        The updated weights, detached, ``(B, m, n)``.
    """
    num_patches = weights.shape[1]
    lipschitz = 2.0 * ((1.0 + lambda_) * factors.gram_max_eig + factors.ridge) / num_patches
    if optimizer == "sgd" and mask is None:
        return _sgd_steps(weights, terms, factors, plan, lambda_, lr / lipschitz, steps, weighted_gram)
    pull, mass = plan.transpose(1, 2) @ factors.gram, plan.sum(-2)[..., None]  # constant over the steps
    with torch.inference_mode(False):
        # Lightning evaluates under inference_mode, whose tensors an optimizer cannot update in place.
        variable = weights.detach().clone().requires_grad_(True)
        if optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD([variable], lr=lr / lipschitz)
        else:
            scale = float(weights.abs().mean()) or 1.0
            opt = torch.optim.Adam([variable], lr=lr * 0.01 * scale)
        for _ in range(steps):
            with torch.no_grad():
                current = variable.detach()
                # W G of the first step is the caller's (same W), if given.
                product = current @ factors.gram if weighted_gram is None else weighted_gram
                weighted_gram = None
                grad = _gradient(current, product, terms.cross, pull, mass, factors.ridge, lambda_)
                if mask is not None:
                    grad.mul_(mask)
            variable.grad = grad
            opt.step()
    return variable.detach()


def _sgd_steps(
    weights: torch.Tensor,
    terms: QueryTerms,
    factors: BankFactors,
    plan: torch.Tensor,
    lambda_: float,
    step_size: float,
    steps: int,
    weighted_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """``steps`` plain gradient steps ``W <- W - step_size dJ/dW`` (torch's SGD), in closed form.

    With ``G = U Lambda U^T`` the gradient in the coordinates ``V = W U`` is elementwise,
    ``dJ/dW U = a * V - b`` with ``a_jk = 2/m (Lambda_k + rho) + 2 lambda (T^T 1)_j Lambda_k`` (the plan
    is fixed). Each coordinate follows ``v <- v - step_size (a v - b)``, so after K steps it has moved
    by ``-step_size (1 + r + ... + r^(K-1)) (a v_0 - b)`` with ``r = 1 - step_size a``. The first
    gradient is formed in W's coordinates (as the optimizer would) and only the move is rotated:
    the same iterates as the optimizer up to float rounding, with four ``(m x n)(n x n)`` products
    per call instead of one per step and about a third of the elementwise passes. ``weighted_gram``
    is ``W G`` of ``weights`` if already known (one of the four products).

    Returns:
        The weights after the steps, ``(B, m, n)``.
    """
    num_patches = weights.shape[1]
    eigvals, eigvecs = factors.gram_eigvals, factors.gram_eigvecs
    pull, mass = plan.transpose(1, 2) @ factors.gram, plan.sum(-2)[..., None]
    if weighted_gram is None:
        weighted_gram = weights @ factors.gram
    gradient = _gradient(weights, weighted_gram, terms.cross, pull, mass, factors.ridge, lambda_) @ eigvecs
    # r = 1 - step_size a, (B, m, n)
    rate = torch.addcmul((2.0 / num_patches) * (eigvals + factors.ridge), mass, eigvals, value=2.0 * lambda_)
    rate.mul_(-step_size).add_(1.0)
    geometric = torch.ones_like(rate)
    for _ in range(steps - 1):
        geometric.mul_(rate).add_(1.0)  # 1 + r (1 + r (...))
    move = geometric.mul_(gradient)  # in V's coordinates, per unit step size
    return torch.baddbmm(weights, move, eigvecs.T.expand(weights.shape[0], -1, -1), alpha=-step_size)
