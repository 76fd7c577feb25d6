"""Linear algebra the SVD-based methods share: thin SVDs of task matrices and the polar (orthogonal) factor.

Every function takes float32 tensors on whatever device the engine chose (the GPU when there is one) and returns
tensors there. SVDs run in float64 on the CPU for matrices up to ``FLOAT64_ELEMENTS`` (cheap, and the results then
do not depend on the LAPACK build's float32 rounding), in float32 above (as the papers' code).
"""

from __future__ import annotations

import torch

FLOAT64_ELEMENTS = 1 << 16


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vᵀ with ``matrix = U diag(S) Vᵀ``, S descending, shapes (m, r), (r,), (r, n), r = min(m, n); in the
    input's dtype and on its device."""
    work = matrix.double() if matrix.numel() <= FLOAT64_ELEMENTS and matrix.device.type == "cpu" else matrix
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of ``matrix`` = P Σ Qᵀ: the nearest matrix with orthonormal columns (rows,
    for a wide matrix) in Frobenius norm (the orthogonal Procrustes solution TSV-M and Iso-CTS use)."""
    p, _, qh = thin_svd(matrix)
    return p @ qh


def low_rank(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-``k`` approximation of ``matrix`` (Eckart–Young): its top-k singular triplets."""
    u, s, vh = thin_svd(matrix)
    return (u[:, :k] * s[:k]) @ vh[:k]


def is_matrix(tensor: torch.Tensor) -> bool:
    """Whether the SVD-based methods treat ``tensor`` as a layer matrix (2-D); other tensors get each paper's
    rule for non-matrix parameters."""
    return tensor.dim() == 2 and min(tensor.shape) > 0
