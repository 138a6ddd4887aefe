"""Per-bank factors of the refinement, computed once and reused for every query.

All EM work runs in the n-dimensional coefficient space of the bank ``M`` (n x c): with the Gram
matrix ``G = M M^T`` and the cross products ``F M^T`` of a query, the costs, both M-steps and the
scores never touch the c-dimensional features again. The factors below depend only on the bank
(and on ``lambda_`` and ``ridge``), so they are computed in float64 once per bank and cached.

Example:
    >>> import torch
    >>> from anomalib_protorefine.refinement.bank import BankFactors
    >>> factors = BankFactors.from_bank(torch.randn(8, 16), lambda_=0.3, ridge=1e-3, normalize=False)
    >>> factors.gram.shape, factors.init_map.shape, factors.feature_space
    (torch.Size([8, 8]), torch.Size([8, 8]), False)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F  # noqa: N812

__all__ = ["BankFactors", "bank_key"]


@dataclass(frozen=True)
class BankFactors:
    """Cached linear algebra of one memory bank.

    The two solves that the EM applies to every query, ``W0 = F M^T (G + rho I)^-1`` and the fixed
    part ``F M^T [H^-1 | H^-1 G]`` of the closed-form M-step, run through whichever of c and n is
    smaller: for ``n <= c`` as ``(F M^T) @ solve`` (n x n matrices), for ``n > c`` as ``F @ (M^T solve)``
    (c x n matrices). The second form is also the numerically safe one when ``G`` is singular
    (``n > c``): ``(G + rho I)^-1`` then has eigenvalues ``1/rho`` whose float32 cancellation in
    ``(F M^T) @ solve`` would swamp the result.

    Attributes:
        source: Exact copy of the bank as given (to verify cache hits).
        bank: The bank in float32 (L2-normalised rows for the cosine distance), ``(n, c)``.
        gram: ``G = M M^T``, ``(n, n)``.
        sq_norms: Squared row norms ``diag(G)``, ``(n,)``.
        ridge: Absolute ridge ``rho = ridge * mean(diag(G))``.
        feature_space: Whether the query-side solves take ``F`` (``n > c``) or ``F M^T``.
        init_map: ``(G + rho I)^-1`` ``(n, n)``, or ``M^T (G + rho I)^-1`` ``(c, n)``.
        em_map: ``[H^-1 | H^-1 G]`` ``(n, 2n)``, or ``M^T [H^-1 | H^-1 G]`` ``(c, 2n)``, with
            ``H = (1 + lambda) G + rho I``.
        gram_em_pair: ``[G H^-1 | G H^-1 G]``, ``(n, 2n)``: ``T^T gram_em_pair`` gives the plan part.
        gram_em_gram: ``G H^-1 G``, ``(n, n)``, contiguous: ``gram_em_gram T`` is the plan part of ``G W^T``.
        gram_max_eig: Largest eigenvalue of ``G`` (step size of the gradient M-step).
        gram_eigvals: Eigenvalues ``Lambda`` of ``G``, ascending, ``(n,)`` (clamped at 0).
        gram_eigvecs: Orthonormal eigenvectors ``U`` of ``G`` (columns), ``(n, n)``: ``G = U Lambda U^T``.
    """

    source: torch.Tensor
    bank: torch.Tensor
    gram: torch.Tensor
    sq_norms: torch.Tensor
    ridge: float
    feature_space: bool
    init_map: torch.Tensor
    em_map: torch.Tensor
    gram_em_pair: torch.Tensor
    gram_em_gram: torch.Tensor
    gram_max_eig: float
    gram_eigvals: torch.Tensor
    gram_eigvecs: torch.Tensor

    @classmethod
    def from_bank(cls, bank: torch.Tensor, lambda_: float, ridge: float, normalize: bool) -> BankFactors:
        """Factorise a bank.

        Args:
            bank: Memory bank ``(n, c)`` of any floating dtype.
            lambda_: Weight of the transport term.
            ridge: Relative ridge (> 0).
            normalize: L2-normalise the rows first (cosine distance).

        Returns:
            The factors, float32, on the bank's device.
        """
        bank64 = bank.detach().double()
        if normalize:
            bank64 = F.normalize(bank64, dim=-1)
        gram64 = bank64 @ bank64.T
        num_bank, channels = bank64.shape
        eye = torch.eye(num_bank, dtype=gram64.dtype, device=gram64.device)
        # A bank of all-zero rows has a zero Gram matrix: fall back to an absolute ridge.
        rho = ridge * float(gram64.diagonal().mean()) or ridge
        init_solve = torch.cholesky_inverse(torch.linalg.cholesky(gram64 + rho * eye))
        em_solve = torch.cholesky_inverse(torch.linalg.cholesky((1.0 + lambda_) * gram64 + rho * eye))
        em_pair = torch.cat((em_solve, em_solve @ gram64), dim=1)
        eigvals, eigvecs = torch.linalg.eigh(gram64)
        gram_em_gram = gram64 @ em_solve @ gram64
        gram_em_gram = (gram_em_gram + gram_em_gram.T) / 2  # symmetric up to rounding: make it exact
        feature_space = num_bank > channels
        if feature_space:
            init_solve, em_pair = bank64.T @ init_solve, bank64.T @ em_pair
        return cls(
            source=bank.detach().clone(),
            bank=bank64.float(),
            gram=gram64.float(),
            sq_norms=gram64.diagonal().float(),
            ridge=rho,
            feature_space=feature_space,
            init_map=init_solve.float(),
            em_map=em_pair.float(),
            gram_em_pair=torch.cat((gram64 @ em_solve, gram_em_gram), dim=1).float(),
            gram_em_gram=gram_em_gram.float(),
            gram_max_eig=float(eigvals[-1]),
            gram_eigvals=eigvals.clamp_min(0.0).float(),
            gram_eigvecs=eigvecs.float(),
        )

    def solve_input(self, features: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """The query-side input of :attr:`init_map` and :attr:`em_map`: ``F`` or ``F M^T``."""
        return features if self.feature_space else cross

    def matches(self, bank: torch.Tensor) -> bool:
        """Whether ``bank`` still holds exactly the values these factors were computed from."""
        return self.source.shape == bank.shape and self.source.dtype == bank.dtype and torch.equal(self.source, bank)


def bank_key(bank: torch.Tensor) -> tuple:
    """Cache key of a bank: storage, shape, dtype and device (hits are verified with :meth:`BankFactors.matches`)."""
    return (bank.data_ptr(), tuple(bank.shape), str(bank.device), bank.dtype)
