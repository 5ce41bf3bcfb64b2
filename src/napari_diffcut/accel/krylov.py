"""Krylov-Schur for the leading eigenvector of a non-symmetric operator (the stationary walk).

Used by :func:`napari_diffcut.accel.walk.stationary_distribution_torch`. The
Arnoldi process (full reorthogonalisation: classical Gram-Schmidt twice,
Giraud et al. 2005) builds ``A V_m = V_m H_m + v_m h^T``; each restart keeps
the ``keep`` Schur vectors of ``H_m`` of largest real part (Stewart 2001, "A
Krylov-Schur algorithm for large eigenproblems", SIAM J. Matrix Anal. Appl.
23:601). Keeping a whole block of Schur vectors, not one Ritz vector, is what
makes slowly mixing walks converge: with the second eigenvalue within 1e-3 of
1, an explicitly restarted Arnoldi stalls where this converges in a few
hundred products (tests/accel/test_walk.py). ARPACK's implicit restart, used
by the numpy path, is the mathematically equivalent method.

Products run on the operator's device; the small Schur and eigen problems
on the host in float64 (one sync per restart).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import schur

#: Krylov dimension (basis vectors held at once).
DIM = 40
#: Schur vectors kept at a restart.
KEEP = 20
#: Most restarts.
MAX_RESTARTS = 300


def leading_eigenvector(
    op: torch.Tensor,
    start: torch.Tensor,
    *,
    tol: float = 1e-12,
    dim: int = DIM,
    keep: int = KEEP,
    max_restarts: int = MAX_RESTARTS,
) -> tuple[torch.Tensor, float, float]:
    """Eigenpair of the largest real eigenvalue of a square matrix, by Krylov-Schur.

    Parameters
    ----------
    op : torch.Tensor, shape (n, n)
        The matrix (float64 for full accuracy), on any device.
    start : torch.Tensor of float64, shape (n,)
        Start vector.
    tol : float
        Stop when ``|op u - theta u| <= tol * |theta|`` for the unit Ritz vector u.
    dim, keep : int
        Basis size and Schur vectors kept at a restart (``keep < dim``).
    max_restarts : int
        Restarts before the current Ritz vector is returned.

    Returns
    -------
    vector : torch.Tensor of float64, shape (n,)
        Unit Ritz vector (sign arbitrary).
    value : float
        Its Ritz value.
    residual : float
        ``|op u - theta u|`` as the Krylov decomposition gives it.
    """
    n = start.shape[0]
    m = min(dim, n)
    keep = max(1, min(keep, m - 1))
    dev = start.device
    basis = torch.zeros((m + 1, n), dtype=torch.float64, device=dev)
    proj = torch.zeros((m + 1, m), dtype=torch.float64, device=dev)
    basis[0] = start / torch.linalg.vector_norm(start)
    first = 0
    for _ in range(max_restarts):
        k = _arnoldi(op, basis, proj, first, m)
        h = proj.cpu().numpy()
        theta, y, residual = _top_ritz(h[:k, :k], h[k, :k] if k == m else None)
        if k < m or residual <= tol * max(abs(theta), 1e-300):
            break
        first = _schur_restart(basis, proj, h, keep)
    vector = torch.from_numpy(y).to(basis) @ basis[:k]
    return vector, theta, residual


def _arnoldi(op: torch.Tensor, basis: torch.Tensor, proj: torch.Tensor, first: int, m: int) -> int:
    """Expand columns ``first..m-1``; the number of columns (< m at an invariant subspace)."""
    for j in range(first, m):
        w = (op @ basis[j].to(op.dtype)).to(torch.float64)
        for _ in range(2):
            coef = basis[: j + 1] @ w
            w -= coef @ basis[: j + 1]
            proj[: j + 1, j] += coef
        beta = torch.linalg.vector_norm(w)
        proj[j + 1, j] = beta
        scale = float(torch.linalg.vector_norm(proj[: j + 2, j]))
        if float(beta) <= 1e-13 * max(scale, 1e-300):  # happy breakdown: exact eigenpairs
            return j + 1
        basis[j + 1] = w / beta
    return m


def _top_ritz(h: np.ndarray, coupling: np.ndarray | None) -> tuple[float, np.ndarray, float]:
    """Ritz value of largest real part, its unit (real) vector and residual ``|coupling . y|``."""
    vals, vecs = np.linalg.eig(h)
    top = int(np.argmax(vals.real))
    y = np.real(vecs[:, top])
    y /= np.linalg.norm(y)
    residual = 0.0 if coupling is None else abs(float(coupling @ y))
    return float(vals[top].real), y, residual


def _sorted_schur(hm: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Real Schur form with at least ``keep`` eigenvalues of largest real part leading.

    The cut between kept and dropped values is the middle of the first clear
    gap at or after position ``keep``, so that the rounding of the reordering
    cannot move a value across it (LAPACK ``trsen`` then refuses). Should it
    still refuse, a plain Schur form keeping one vector is used (an explicit
    restart from the leading Schur vector of the unsorted form is no use, so
    the top Ritz pair is rotated first).
    """
    m = hm.shape[0]
    parts = np.sort(np.linalg.eigvals(hm).real)[::-1]
    spread = max(float(np.abs(parts).max()), 1e-300)
    i = keep - 1
    while i < m - 2 and parts[i] - parts[i + 1] <= 1e-10 * spread:
        i += 1
    cut = 0.5 * (parts[i] + parts[i + 1])
    try:
        t, q, k = schur(hm, output="real", sort=lambda re, im: re > cut)
    except np.linalg.LinAlgError:
        top = float(parts[0])
        t, q, k = schur(hm, output="real", sort=lambda re, im: re >= top - 1e-8 * spread)
    return t, q, max(1, min(int(k), m - 1))


def _schur_restart(basis: torch.Tensor, proj: torch.Tensor, h: np.ndarray, keep: int) -> int:
    """Keep the Schur vectors of the ``keep`` largest real parts; the new first column.

    ``H_m = Q T Q^T`` sorted so that the wanted eigenvalues lead; then
    ``V' = V_m Q_k``, ``H'[:k, :k] = T_k``, ``H'[k, :k] = h_m^T Q_k`` and
    ``v'_k = v_m`` (Stewart 2001, section 3). A complex pair is never split
    (``schur`` reports how many it sorted).
    """
    m = h.shape[1]
    hm = h[:m, :m]
    t, q, k = _sorted_schur(hm, keep)
    qk = torch.from_numpy(np.ascontiguousarray(q[:, :k])).to(basis)
    residual_row = torch.from_numpy(h[m, :m] @ q[:, :k]).to(basis)
    basis[:k] = qk.T @ basis[:m]
    basis[k] = basis[m]
    basis[k + 1 :] = 0
    proj.zero_()
    proj[:k, :k] = torch.from_numpy(np.ascontiguousarray(t[:k, :k])).to(proj)
    proj[k, :k] = residual_row
    return k
