"""Per-bank factors of the refinement, computed once and reused for every query.

All EM work runs in the n-dimensional coefficient space of the bank ``M`` (n x c): with the Gram
matrix ``G = M M^T`` and the cross products ``F M^T`` of a query, the costs, both M-steps and the
scores never touch the c-dimensional features again. The factors below depend only on the bank
(and on ``lambda_`` and ``ridge``), so they are computed in float64 once per bank and cached.

Example:
    >>> import torch
    >>> from anomalib_protorefine.refinement.bank import BankFactors
    >>> factors = BankFactors.from_bank(torch.randn(8, 16), lambda_=0.3, ridge=1e-3, normalize=False)
    >>> factors.gram.shape, factors.init_solve.shape
    (torch.Size([8, 8]), torch.Size([8, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F  # noqa: N812


@dataclass(frozen=True)
class BankFactors:
    """Cached linear algebra of one memory bank.

    Attributes:
        bank: The bank in float32 (L2-normalised rows for the cosine distance), ``(n, c)``.
        gram: ``G = M M^T``, ``(n, n)``.
        sq_norms: Squared row norms ``diag(G)``, ``(n,)``.
        ridge: Absolute ridge ``rho = ridge * mean(diag(G))``.
        init_solve: ``(G + rho I)^-1``: ``W0 = F M^T init_solve``.
        em_solve: ``H^-1 = ((1 + lambda) G + rho I)^-1``: closed-form M-step.
        em_pair: ``[H^-1 | H^-1 G]``, ``(n, 2n)``: ``F M^T em_pair`` gives the fixed part of W and of W G.
        gram_em_pair: ``[G H^-1 | G H^-1 G]``, ``(n, 2n)``: ``T^T gram_em_pair`` gives the plan part.
        gram_max_eig: Largest eigenvalue of ``G`` (step size of the gradient M-step).
    """

    bank: torch.Tensor
    gram: torch.Tensor
    sq_norms: torch.Tensor
    ridge: float
    init_solve: torch.Tensor
    em_solve: torch.Tensor
    em_pair: torch.Tensor
    gram_em_pair: torch.Tensor
    gram_max_eig: float

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
        bank32 = bank.detach().float()
        if normalize:
            bank32 = F.normalize(bank32, dim=-1)
        bank64 = bank32.double()
        gram64 = bank64 @ bank64.T
        eye = torch.eye(gram64.shape[0], dtype=gram64.dtype, device=gram64.device)
        # A bank of all-zero rows has a zero Gram matrix: fall back to an absolute ridge.
        rho = ridge * float(gram64.diagonal().mean()) or ridge
        init_solve = torch.cholesky_inverse(torch.linalg.cholesky(gram64 + rho * eye))
        em_solve = torch.cholesky_inverse(torch.linalg.cholesky((1.0 + lambda_) * gram64 + rho * eye))
        return cls(
            bank=bank32,
            gram=gram64.float(),
            sq_norms=gram64.diagonal().float(),
            ridge=rho,
            init_solve=init_solve.float(),
            em_solve=em_solve.float(),
            em_pair=torch.cat((em_solve, em_solve @ gram64), dim=1).float(),
            gram_em_pair=torch.cat((gram64 @ em_solve, gram64 @ em_solve @ gram64), dim=1).float(),
            gram_max_eig=float(torch.linalg.eigvalsh(gram64)[-1]),
        )


def bank_key(bank: torch.Tensor) -> tuple:
    """Identify a bank's content for caching: storage, shape, dtype, device and two checksums.

    Inference-mode tensors (Lightning's val/test loops) have no version counter, so in-place
    edits are detected through the checksums instead.
    """
    with torch.no_grad():
        checksums = torch.stack((bank.double().sum(), bank.double().abs().sum())).tolist()
    return (bank.data_ptr(), tuple(bank.shape), str(bank.device), bank.dtype, *checksums)
