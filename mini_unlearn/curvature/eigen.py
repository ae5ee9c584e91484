"""The retained preconditioner P = curvature + λI, block-diagonal, each block in its eigenbasis;
and a robust eigendecomposition of PSD factors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NonFiniteError


# ---- the retained preconditioner in its eigenbasis -----------------------------------------------

@dataclass
class EigenBlock:
    """One block of P: a [rows, cols] view of the flat vector, rotated by U_out (left) and
    U_in (right; None for vector blocks), with curvature nu_ij = s_out[i] * s_in[j]."""

    gather: object  # vec -> [rows, cols]
    scatter: object  # (vec, [rows, cols]) -> None
    U_out: torch.Tensor | None
    s_out: torch.Tensor
    U_in: torch.Tensor | None
    s_in: torch.Tensor

    def to_eig(self, m: torch.Tensor) -> torch.Tensor:
        if self.U_out is not None:
            m = self.U_out.T @ m
        if self.U_in is not None:
            m = m @ self.U_in
        return m.contiguous()

    def from_eig(self, m: torch.Tensor) -> torch.Tensor:
        if self.U_out is not None:
            m = self.U_out @ m
        if self.U_in is not None:
            m = m @ self.U_in.T
        return m

    def nu(self) -> torch.Tensor:
        return self.s_out[:, None] * self.s_in[None, :]


def eigh_psd(m: torch.Tensor, dtype: torch.dtype = torch.float32, name: str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD matrix. float32 is the
    default: 3-4x faster than float64 and the same unlearning result (the small eigenvalues it
    gets wrong sit under λ); pass float64 for an oracle.

    Ill-conditioned factors (dead units: zero rows and columns, repeated eigenvalues) can make
    LAPACK's eigh fail to converge. Then the matrix is retried in float64 with a damping
    relative to its trace (1e-10, 1e-7, 1e-4 of the mean eigenvalue) that is subtracted from the
    eigenvalues afterwards. A non-finite factor raises NonFiniteError naming ``name``."""
    what = f"the curvature factor of {name!r}" if name else "a curvature factor"
    if not torch.isfinite(m).all():
        raise NonFiniteError(f"NaN/Inf in {what}: check that layer's inputs and outputs (overflow, "
                             f"a diverged model)")
    sym = (m + m.T) / 2
    try:
        s, U = torch.linalg.eigh(sym.to(dtype))
        if torch.isfinite(s).all() and torch.isfinite(U).all():
            return s.clamp_min(0).float(), U.float()
    except torch.linalg.LinAlgError:
        pass
    d = sym.shape[0]
    mean = float(sym.diagonal().double().abs().sum()) / max(d, 1)
    scale = mean if mean > 0 else 1.0
    eye = torch.eye(d, dtype=torch.float64, device=sym.device)
    last = None
    for rel in (1e-10, 1e-7, 1e-4):
        damp = rel * scale
        try:
            s, U = torch.linalg.eigh(sym.double() + damp * eye)
        except torch.linalg.LinAlgError as e:
            last = e
            continue
        return (s - damp).clamp_min(0).float(), U.float()
    raise NonFiniteError(f"the eigendecomposition of {what} failed even in float64 with damping "
                         f"({last}); check that layer for degenerate values")


class Preconditioner:
    """P = curvature of the retained loss + λI, block-diagonal, each block in its eigenbasis."""

    def __init__(self, blocks: list[EigenBlock], lam: float, numel: int):
        self.blocks, self.lam, self.numel = blocks, lam, numel

    def rotate(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return [b.to_eig(b.gather(vec)) for b in self.blocks]

    def unrotate(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(self.numel, device=parts[0].device)
        for b, m in zip(self.blocks, parts):
            b.scatter(out, b.from_eig(m))
        return out

    def solve(self, vec: torch.Tensor) -> torch.Tensor:
        """P⁻¹ vec."""
        return self.unrotate([m / (b.nu() + self.lam) for b, m in zip(self.blocks, self.rotate(vec))])
