"""Batched, thick-restarted Lanczos for the Fiedler vectors of many graphs at once.

All nodes of one tree depth are solved together (method.md 5 step 2): their
graphs ``W_b`` are stacked as zero-padded blocks ``(B, s, s)`` and every step
makes one batched product. For each graph the relaxed NCut problem
``(D - W) z = lambda D z`` (Shi & Malik 2000, eq. 7) is solved through the
largest eigenpair of the deflated operator

    ``A_b = D^-1/2 W_b D^-1/2 - q q^T``,  ``q = D^1/2 1 / |D^1/2 1|``,

whose top eigenvector is the second eigenvector of ``M = D^-1/2 W D^-1/2``
(``q`` is M's known top eigenvector, eigenvalue 1); the same deflation as
:func:`napari_diffcut.core.ncut.fiedler_vector`, which also keeps graphs with
nearly disconnected parts right.

Stability on clustered spectra: a planted graph with k regions has k - 1
eigenvalues of A within 1e-3 of each other near 1. The solver keeps

- full reorthogonalisation of the Krylov basis in float64 (classical
  Gram-Schmidt, twice per step: Giraud, Langou & Rozloznik 2005), so no ghost
  copies of converged Ritz values appear (Paige 1971; Parlett 1998, ch. 13);
- thick restart (Wu & Simon 2000; Stewart's Krylov-Schur 2001): each cycle
  restarts from the ``keep`` largest Ritz vectors and the residual vector, so
  the whole cluster stays in the basis and the restarted method converges to
  the top of the cluster instead of stalling between near-equal values;
- the Rayleigh-Ritz matrix taken from the computed projections
  ``H = V^T A V`` (not only the three-term coefficients), which stays exact
  after a thick restart.

Only the products with W run in float32 (W's dtype); the basis, the projected
problem and all sums are float64, as in the numpy path (core/ncut.py
docstring). A block whose Krylov space is exhausted (the graph has fewer
nodes than the basis) is solved exactly: the dead basis vectors are zero and
their Ritz values are pushed below the spectrum. Converged blocks leave the
batch at the next restart. The small eigenproblems run on the CPU in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Basis size of one cycle (the largest Krylov dimension kept at once).
BASIS = 48
#: Ritz vectors kept at a thick restart.
KEEP = 16
#: Columns expanded between two convergence tests.
CHECK_EVERY = 8
#: Most restart cycles.
MAX_CYCLES = 100
#: Relative norm below which a new basis vector is a breakdown (exhausted space).
BREAKDOWN = 1e-10
#: Ritz value given to dead (zero) basis vectors: below every eigenvalue of A (>= -2).
DEAD_VALUE = -10.0


@dataclass(frozen=True)
class DeflatedBlocks:
    """Stacked graphs and the pieces of their deflated operators ``A_b`` (module docstring).

    Attributes
    ----------
    blocks : torch.Tensor, shape (B, s, s)
        Zero-padded symmetric W_b (float32 or float64).
    inv_sqrt : torch.Tensor of float64, shape (B, s)
        ``D^-1/2``, 0 on padding.
    q : torch.Tensor of float64, shape (B, s)
        Unit ``D^1/2 1`` per block, 0 on padding.
    """

    blocks: torch.Tensor
    inv_sqrt: torch.Tensor
    q: torch.Tensor

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, degree: torch.Tensor) -> DeflatedBlocks:
        """Build from padded blocks and their float64 row sums (0 on padding)."""
        valid = degree > 0
        safe = torch.where(valid, degree, torch.ones_like(degree))
        inv_sqrt = torch.where(valid, safe.rsqrt(), torch.zeros_like(degree))
        q = degree.clamp(min=0).sqrt()
        q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
        return cls(blocks, inv_sqrt, q)

    def select(self, rows: torch.Tensor) -> DeflatedBlocks:
        """The blocks at the given batch indices."""
        return DeflatedBlocks(self.blocks[rows], self.inv_sqrt[rows], self.q[rows])

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``D^-1/2 W D^-1/2 x`` per block, W's dtype inside, float64 out."""
        return self.inv_sqrt * block_product(self.blocks, self.inv_sqrt * x)

    def deflate(self, x: torch.Tensor) -> torch.Tensor:
        """``x - q (q . x)`` per block."""
        return x - self.q * (self.q * x).sum(-1, keepdim=True)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The deflated operator ``A x`` (x is kept orthogonal to q)."""
        return self.deflate(self.product(x))


def block_product(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``W_b x_b`` for every block: products in W's dtype, float64 out.

    One batched product on accelerators. On the CPU, one matrix-vector
    product per block: torch's CPU ``bmm`` with a vector operand is 3-10x
    slower than a loop of ``mv`` (benchmarks/bench_accel.py).
    """
    xw = x.to(blocks.dtype)
    if blocks.device.type != "cpu":
        return torch.bmm(blocks, xw.unsqueeze(-1)).squeeze(-1).to(torch.float64)
    return torch.stack([torch.mv(blocks[b], xw[b]) for b in range(blocks.shape[0])]).to(
        torch.float64
    )


def top_eigenvectors(
    op: DeflatedBlocks,
    start: torch.Tensor,
    *,
    tol: float = 1e-8,
    basis: int = BASIS,
    keep: int = KEEP,
    max_cycles: int = MAX_CYCLES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest eigenpair of every block's deflated operator by thick-restarted Lanczos.

    Parameters
    ----------
    op : DeflatedBlocks
        B stacked operators of padded size s.
    start : torch.Tensor of float64, shape (B, s)
        Start vectors (0 on padding); deflated and normalised here.
    tol : float
        A block has converged when its top Ritz residual ``|A u - theta u|`` is
        at most ``tol * max(|theta|, 1e-3)`` (ARPACK's relative test, with a floor).
    basis, keep : int
        Basis size per cycle and Ritz vectors kept at a restart (``keep < basis``).
    max_cycles : int
        Restart cycles before the current Ritz vectors are returned.

    Returns
    -------
    vectors : torch.Tensor of float64, shape (B, s)
        Unit eigenvectors, orthogonal to q (sign arbitrary).
    values : torch.Tensor of float64, shape (B,)
        Their Ritz values.
    cycles : torch.Tensor of int64, shape (B,)
        Cycles each block took.
    """
    n_blocks, size = start.shape
    dev = start.device
    full = op
    m = max(1, min(basis, size))
    keep = max(1, min(keep, m - 1)) if m > 1 else 0
    out_vec = torch.zeros_like(start)
    out_val = torch.zeros(n_blocks, dtype=torch.float64)
    out_cycles = torch.zeros(n_blocks, dtype=torch.int64)
    active = torch.arange(n_blocks)
    state = _initial_state(op, start, m)
    cycle = 1
    while True:
        # Expand a few columns, then test (one host sync and small eigh per test).
        k = min(state.first + CHECK_EVERY, m)
        _expand(op, state, k)
        ritz_val, ritz_vec, residual = _ritz(state, k)
        done = residual <= tol * ritz_val[:, -1].abs().clamp(min=1e-3)
        if k == m and (cycle == max_cycles or keep == 0):
            done[:] = True
        finished = torch.nonzero(done).flatten()
        if finished.numel():
            idx = active[finished]
            out_vec[idx.to(dev)] = _top_vectors(state, ritz_vec, finished)
            out_val[idx] = ritz_val[finished, -1]
            out_cycles[idx] = cycle
        remaining = torch.nonzero(~done).flatten()
        if not remaining.numel():
            break
        if remaining.numel() < len(active):  # converged blocks leave the batch
            op = op.select(remaining.to(dev))
            state = state.select(remaining.to(dev))
            ritz_val, ritz_vec = ritz_val[remaining], ritz_vec[remaining]
            active = active[remaining]
        if k == m:
            state = _restart(state, ritz_val, ritz_vec, keep)
            cycle += 1
    # Clean the last rounding off the deflation and the norm (as core.ncut.fiedler_vector).
    out_vec = full.deflate(out_vec)
    out_vec = out_vec / torch.linalg.vector_norm(out_vec, dim=-1, keepdim=True)
    return out_vec, out_val.to(start.device), out_cycles


@dataclass
class _State:
    """Krylov decomposition ``A V = V H + f e^T`` of a batch (B blocks)."""

    basis: torch.Tensor  # (B, m + 1, s) float64; row m holds the normalised residual
    proj: torch.Tensor  # (B, m, m) float64, upper triangle filled by Gram-Schmidt
    alive: torch.Tensor  # (B, m + 1) bool: basis vector is nonzero
    beta: torch.Tensor  # (B,) norm of the residual f
    first: int  # first column still to expand

    def select(self, rows: torch.Tensor) -> _State:
        """The state of the given batch rows."""
        return _State(
            self.basis[rows], self.proj[rows], self.alive[rows], self.beta[rows], self.first
        )


def _initial_state(op: DeflatedBlocks, start: torch.Tensor, m: int) -> _State:
    """Basis holding the deflated, normalised start vector."""
    n_blocks, size = start.shape
    dev = start.device
    v = op.deflate(start.to(torch.float64))
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    basis = torch.zeros((n_blocks, m + 1, size), dtype=torch.float64, device=dev)
    basis[:, 0] = v
    alive = torch.zeros((n_blocks, m + 1), dtype=torch.bool, device=dev)
    alive[:, 0] = True
    proj = torch.zeros((n_blocks, m, m), dtype=torch.float64, device=dev)
    beta = torch.zeros(n_blocks, dtype=torch.float64, device=dev)
    return _State(basis, proj, alive, beta, 0)


def _expand(op: DeflatedBlocks, state: _State, stop: int) -> None:
    """Arnoldi steps (= Lanczos with full reorthogonalisation) up to column ``stop``.

    Step j: ``w = A v_j``; classical Gram-Schmidt against ``v_0..v_j`` twice,
    the coefficients summed into column j of H; ``v_{j+1} = w / |w|``, or a dead
    (zero) vector when ``|w|`` collapsed (exhausted Krylov space). No host sync.
    """
    basis, proj = state.basis, state.proj
    for j in range(state.first, stop):
        w = op.apply(basis[:, j])
        norm0 = torch.linalg.vector_norm(w, dim=-1)
        prev = basis[:, : j + 1]  # (B, j + 1, s)
        for _ in range(2):
            coef = torch.bmm(prev, w.unsqueeze(-1))  # (B, j + 1, 1): V^T w
            w = op.deflate(w - torch.bmm(coef.transpose(1, 2), prev).squeeze(1))
            proj[:, : j + 1, j] += coef.squeeze(-1)
        beta = torch.linalg.vector_norm(w, dim=-1)
        ok = (beta > BREAKDOWN * norm0) & state.alive[:, j]
        safe = torch.where(ok, beta, torch.ones_like(beta))
        basis[:, j + 1] = torch.where(ok[:, None], w / safe[:, None], torch.zeros_like(w))
        state.alive[:, j + 1] = ok
        state.beta = torch.where(ok, beta, torch.zeros_like(beta))
    state.first = stop


def _ritz(state: _State, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz values (ascending), vectors of H and residual norms of the top pair (on the CPU).

    H is symmetrised from its upper triangle, which holds the Gram-Schmidt
    projections ``v_i^T A v_j`` (i <= j); dead columns get ``DEAD_VALUE`` on
    the diagonal so that their Ritz values are never selected. With ``k``
    columns expanded, ``A V_k = V_k H_k + f e_k^T`` and the residual of Ritz
    pair i is ``|f| |s_{k-1, i}|``.
    """
    proj = state.proj[:, :k, :k].cpu()
    alive = state.alive[:, :k].cpu()
    h = torch.triu(proj) + torch.triu(proj, 1).transpose(1, 2)
    h = h * (alive[:, :, None] & alive[:, None, :])
    h = h + torch.diag_embed(torch.where(alive, 0.0, DEAD_VALUE).to(h))
    vals, vecs = torch.linalg.eigh(h)
    beta = state.beta.cpu()
    residual = beta * vecs[:, -1, -1].abs()
    return vals, vecs, residual


def _top_vectors(state: _State, ritz_vec: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Top Ritz vectors ``V s`` of the given batch rows, shape (len(rows), s)."""
    k = ritz_vec.shape[-1]
    dev = state.basis.device
    s = ritz_vec[rows, :, -1:].to(dev)  # (r, m, 1)
    sub = state.basis[rows.to(dev), :k]  # (r, k, s)
    return torch.bmm(s.transpose(1, 2), sub).squeeze(1)


def _restart(state: _State, ritz_val: torch.Tensor, ritz_vec: torch.Tensor, keep: int) -> _State:
    """Thick restart: ``V' = [V S_keep, f/|f|]``, ``H' = diag(theta_keep)``.

    Then ``A V' = V' H' + f (e_m^T S_keep)`` (Wu & Simon 2000); the coupling
    column is found again by Gram-Schmidt when ``f/|f|`` is expanded.
    """
    dev = state.basis.device
    m = ritz_vec.shape[-1]
    n_rows = ritz_vec.shape[0]
    s_keep = ritz_vec[:, :, -keep:].to(dev)  # (r, m, keep)
    old = state.basis  # (r, m + 1, s)
    basis = torch.zeros_like(old)
    basis[:, :keep] = torch.bmm(s_keep.transpose(1, 2), old[:, :m])
    basis[:, keep] = old[:, m]
    theta = ritz_val[:, -keep:].to(dev)
    alive = torch.zeros((n_rows, m + 1), dtype=torch.bool, device=dev)
    alive[:, :keep] = theta > DEAD_VALUE / 2
    alive[:, keep] = state.alive[:, m]
    basis[:, :keep] *= alive[:, :keep, None]
    proj = torch.zeros((n_rows, m, m), dtype=torch.float64, device=dev)
    idx = torch.arange(keep, device=dev)
    proj[:, idx, idx] = torch.where(alive[:, :keep], theta, torch.zeros_like(theta))
    return _State(basis, proj, alive, state.beta, keep)
