"""Cut: one two-way Normalized Cut (Shi & Malik 2000), solved in float64.

method.md section 5. The relaxed problem ``(D - W) z = lambda D z`` is solved
through the two largest eigenpairs of ``M = D^-1/2 W D^-1/2`` with a Lanczos
solver (``scipy.sparse.linalg.eigsh``) and a fixed start vector, then the best
split point of the Fiedler vector is found by an exact sweep over all
positions, not only 100 thresholds as DiffCut does.

Precision and speed (benchmarks/NOTES.md): every function works in the dtype
of the affinity it is given. The tree (:mod:`napari_diffcut.core.hierarchy`)
passes a float32 graph: the Lanczos recurrence, degrees, sweep sums and the
returned cost stay float64, only the products with W run in float32, which
halves the memory traffic that bounds them (matrix-vector products 4-10x
faster at 4096 nodes). Costs agree with the float64 graph to about 1e-6.

BLAS threads: a tree makes a few thousand matrix-vector products of a few
milliseconds each. A multi-threaded BLAS wakes its helper threads for each of
them, and when the cores are busy with other work a helper that has been
descheduled stalls every product (measured: a whole tree 4x slower with 2
threads than with 1 on 2 busy cores; on idle cores the threads save about
0.1 s per tree). :func:`single_thread_blas` lets the tree run its splits on
one BLAS thread; the limit is lifted between splits.

Sub-graphs without a copy: :func:`fiedler_vector`, :func:`sweep_cut` and
:func:`restricted_degree` take an optional ``index``, the node's positions in
a larger ``affinity``; they then work on ``W[index][:, index]`` without
building it (products pad the vector with zeros and read the node's rows of
the result; the sweep gathers the node's rows of W). The tree uses it for
nodes nearly as large as the whole graph (a chain of small peels off the
background), where gathering the sub-matrix costs as much as all of its
products (benchmarks/quality.py profile, issue 11).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh


@dataclass(frozen=True)
class Bipartition:
    """Result of one NCut split.

    Attributes
    ----------
    mask : ndarray of bool, shape (n,)
        True for side A (the side holding the largest-magnitude Fiedler entry).
    cost : float
        NCut(A, B) = cut/vol(A) + cut/vol(B), in [0, 2]; 1 for a structureless walk.
    eigenvalue : float
        lambda_2 of the normalised Laplacian (a lower bound of the relaxation).
    fiedler : ndarray of float64, shape (n,)
        The generalised eigenvector z = D^-1/2 u_2 (sign fixed).
    """

    mask: NDArray[np.bool_]
    cost: float
    eigenvalue: float
    fiedler: NDArray[np.float64]


#: Up to this size the Fiedler vector comes from a dense ``eigh`` (faster than
#: ARPACK's setup there; benchmarks/NOTES.md).
DENSE_MAX = 64
#: Lanczos basis size of the Fiedler solve (ARPACK's ``ncv``; its default is
#: 20 for one eigenpair). Most splits converge within the first basis, so a
#: smaller one saves products: 12 cut the products of the quality benchmark's
#: trees by a third with identical trees and costs (issue 11).
LANCZOS_NCV = 12
#: Up to this size the sweep gathers the sorted matrix; above it, block sums.
SWEEP_GATHER_MAX = 256
#: Rows of W gathered at a time by the blocked sweep (:func:`_earlier_sums`).
SWEEP_BLOCK = 64


def single_thread_blas() -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of ``with`` blocks that run BLAS (numpy's and scipy's) on one thread.

    Uses ``threadpoolctl`` when it is installed (the limit is process-wide for
    the duration of the block); otherwise the blocks do nothing. Build the
    factory once per tree: finding the BLAS libraries takes milliseconds, a
    block then costs microseconds.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it BLAS keeps its own thread count
        return contextlib.nullcontext
    import scipy.linalg  # noqa: F401 - load scipy's BLAS so that the controller sees it

    controller = ThreadpoolController()
    return lambda: controller.limit(limits=1, user_api="blas")


def start_vector(n: int, seed: int) -> NDArray[np.float64]:
    """Fixed, seeded Lanczos start vector (reproducible eigsh, style.md 6.5.5)."""
    return np.random.default_rng(seed).uniform(0.5, 1.5, n)


def fiedler_vector(
    affinity: NDArray[np.float64],
    degree: NDArray[np.float64],
    *,
    v0: NDArray[np.float64] | None = None,
    seed: int = 0,
    tol: float = 1e-6,
    index: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.float64], float]:
    """Second generalised eigenvector of ``(D - W) z = lambda D z``.

    The top eigenvector of ``M = D^-1/2 W D^-1/2`` is known exactly
    (``q = D^1/2 1 / |D^1/2 1|``, eigenvalue 1), so it is deflated and the
    Fiedler vector is the top eigenvector of ``M - q q^T``. Besides saving one
    Ritz pair, deflation keeps graphs with (nearly) disconnected parts right:
    there eigenvalue 1 is degenerate, and a single-vector Lanczos run on M
    would find only one vector of that space and return the wrong second pair.

    Parameters
    ----------
    affinity : ndarray, shape (n, n)
        Symmetric non-negative W with positive row sums ``degree``.
    degree : ndarray, shape (n,)
        Row sums of ``affinity``.
    v0 : ndarray, optional
        Lanczos start vector (e.g. the parent's eigenvector restricted); a fixed
        seeded vector by default.
    seed : int
        Seed of the default start vector.
    tol : float
        Lanczos tolerance.
    index : ndarray of int, optional
        Solve on ``affinity[index][:, index]`` without building it (module
        docstring); ``degree`` is then that sub-graph's, of length ``len(index)``.

    Returns
    -------
    fiedler : ndarray of float64, shape (n,)
        Sign fixed so that the largest-magnitude entry is positive (DiffCut's rule).
    eigenvalue : float
        lambda_2 of the normalised Laplacian ``I - M``.
    """
    degree = np.asarray(degree, np.float64)
    n = degree.shape[0]
    if index is not None and n <= DENSE_MAX:
        affinity, index = restrict(affinity, index), None
    inv_sqrt = 1.0 / np.sqrt(degree)
    q = np.sqrt(degree)
    q /= np.linalg.norm(q)
    if n <= DENSE_MAX:
        u2 = _top_eigenvector(affinity * inv_sqrt[:, None] * inv_sqrt[None, :] - np.outer(q, q))
    else:

        def matvec(x: NDArray[np.float64]) -> NDArray[np.float64]:
            x = np.ravel(x)
            y = inv_sqrt * _product(affinity, inv_sqrt * x, index)
            return y - q * (q @ x)

        op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
        start = start_vector(n, seed) if v0 is None else np.asarray(v0, np.float64)
        start = start - q * (q @ start)
        try:
            ncv = min(n - 1, LANCZOS_NCV)
            u2 = eigsh(op, k=1, which="LA", v0=start, tol=tol, ncv=ncv, maxiter=20 * n)[1][:, 0]
        except (ArpackNoConvergence, ArpackError):
            sub = affinity if index is None else restrict(affinity, index)
            m = sub * inv_sqrt[:, None] * inv_sqrt[None, :]
            u2 = _top_eigenvector(m - np.outer(q, q))
    u2 = u2 - q * (q @ u2)
    u2 /= np.linalg.norm(u2)
    mu2 = float(u2 @ (inv_sqrt * _product(affinity, inv_sqrt * u2, index)))
    z = inv_sqrt * u2
    if z[np.argmax(np.abs(z))] < 0:
        z = -z
    return z, float(1.0 - mu2)


def _top_eigenvector(matrix: NDArray[np.floating]) -> NDArray[np.float64]:
    """Eigenvector of the largest eigenvalue of a dense symmetric matrix (float64).

    LAPACK ``syevr`` restricted to one eigenpair: several times faster than a
    full ``eigh`` from 64 nodes up, and it does not stall when the BLAS
    threads compete for busy cores (benchmarks/NOTES.md).
    """
    from scipy.linalg import eigh

    n = matrix.shape[0]
    m64 = np.asarray(matrix, np.float64)
    return eigh(m64, subset_by_index=[n - 1, n - 1], driver="evr")[1][:, 0]


def _product(
    affinity: NDArray[np.floating],
    x: NDArray[np.float64],
    index: NDArray[np.int64] | None = None,
) -> NDArray[np.float64]:
    """``W @ x`` in W's dtype (a float64 vector would upcast a float32 W: an n x n copy).

    With ``index``: ``W[index][:, index] @ x`` as ``(W @ pad(x))[index]``.
    """
    if index is None:
        return np.asarray(affinity @ x.astype(affinity.dtype, copy=False), np.float64)
    full = np.zeros(affinity.shape[1], affinity.dtype)
    full[index] = x
    return np.asarray((affinity @ full)[index], np.float64)


def restrict(matrix: NDArray[np.floating], index: NDArray[np.int64]) -> NDArray[np.floating]:
    """``matrix[np.ix_(index, index)]`` as two ``take`` calls (2x faster at 1000-3000 nodes)."""
    return matrix.take(index, axis=0).take(index, axis=1)


def restricted_degree(
    affinity: NDArray[np.floating],
    index: NDArray[np.int64],
    row_sums: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Row sums of ``W[index][:, index]`` without building it, in float64.

    ``row_sums`` (float64 row sums of the whole ``affinity``) minus each row's
    weight to the nodes left out: only an ``n x (N - n)`` gather, cheap for
    the near-complete nodes this serves.
    """
    out_mask = np.ones(affinity.shape[1], bool)
    out_mask[index] = False
    outside = np.flatnonzero(out_mask)
    degree = np.asarray(row_sums, np.float64)[index].copy()
    if outside.size:
        degree -= affinity.take(index, axis=0).take(outside, axis=1).sum(axis=1, dtype=np.float64)
    return degree


def sweep_cut(
    affinity: NDArray[np.float64],
    degree: NDArray[np.float64],
    fiedler: NDArray[np.float64],
    min_size: int,
    index: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.bool_], float]:
    """Best NCut split along the sorted Fiedler vector.

    Every split position keeping at least ``min_size`` nodes per side is
    scored exactly: with nodes sorted by decreasing z, ``assoc(A_j)`` grows by
    ``2 W[o_j, A_{j-1}] + W[o_j, o_j]``; ``cut = vol(A) - assoc(A)`` and
    ``NCut = cut/vol(A) + cut/vol(B)`` (Shi & Malik 2000, eq. 2). O(n^2) once,
    without copying W (:func:`_earlier_sums`). The returned cost of the best
    position is recomputed with the cut summed directly (:func:`_split_cost`).
    With ``index`` the graph is ``affinity[index][:, index]``, not built
    (module docstring).

    Returns
    -------
    mask : ndarray of bool
        Side A (largest Fiedler values, which include the max-|z| entry).
    cost : float
        Its NCut; ``inf`` when no position respects ``min_size``.
    """
    n = fiedler.shape[0]
    order = np.argsort(-fiedler, kind="stable")
    nodes = order if index is None else np.asarray(index)[order]  # rows/columns of W
    earlier = _earlier_sums(affinity, nodes)
    diagonal = np.asarray(affinity[nodes, nodes], np.float64)
    assoc = np.cumsum(2.0 * earlier + diagonal)
    vol_a = np.cumsum(np.asarray(degree, np.float64)[order])
    total = vol_a[-1]
    vol_b = total - vol_a
    cut = vol_a - assoc
    sizes = np.arange(1, n + 1)
    valid = (sizes >= min_size) & (n - sizes >= min_size) & (vol_b > 0)
    if not valid.any():
        return np.zeros(n, bool), float("inf")
    with np.errstate(divide="ignore", invalid="ignore"):
        ncut = cut / vol_a + cut / vol_b
    ncut[~valid] = np.inf
    j = int(np.argmin(ncut))
    mask = np.zeros(n, bool)
    mask[order[: j + 1]] = True
    return mask, _split_cost(affinity, degree, mask, float(vol_a[j]), float(vol_b[j]), index)


def _earlier_sums(affinity: NDArray[np.floating], order: NDArray[np.int64]) -> NDArray[np.float64]:
    """``earlier[j] = sum_{i < j} W[o_j, o_i]`` for the node order ``o`` (float64).

    ``order`` may list only some of W's nodes (a sub-graph): the sums run over
    the listed nodes only. Small graphs gather the sorted matrix. Larger ones avoid that n x n copy
    and the triangular mask: the order is walked in blocks of 64 nodes, whose
    rows are gathered (contiguous copies); a running float64 vector holds every
    node's weight to all earlier blocks, and only the 64 x 64 diagonal block
    is masked for the weight inside a node's own block. One pass over W.
    """
    n = order.shape[0]
    if n <= SWEEP_GATHER_MAX:
        sorted_w = affinity[np.ix_(order, order)]
        return np.tril(sorted_w, -1).sum(axis=1, dtype=np.float64)
    earlier = np.empty(n, np.float64)
    # Weight of each of W's nodes to all earlier blocks (only listed nodes are read).
    to_earlier = np.zeros(affinity.shape[1], np.float64)
    for start in range(0, n, SWEEP_BLOCK):
        members = order[start : start + SWEEP_BLOCK]
        rows = affinity[members]  # (b, n) contiguous row copies
        inside = np.tril(rows[:, members], -1).sum(axis=1, dtype=np.float64)
        earlier[start : start + members.size] = to_earlier[members] + inside
        to_earlier += rows.sum(axis=0, dtype=np.float64)
    return earlier


def _split_cost(
    affinity: NDArray[np.floating],
    degree: NDArray[np.float64],
    mask: NDArray[np.bool_],
    vol_a: float,
    vol_b: float,
    index: NDArray[np.int64] | None = None,
) -> float:
    """NCut of the chosen split with ``cut`` summed directly, not as ``vol - assoc``.

    The sweep's ``vol(A) - assoc(A)`` loses relative precision when the cut is
    small (a float32 graph: ~1e-5); ``cut = sum_{i in A} (W 1_B)_i`` sums only
    non-negative terms, so the returned cost is as precise as W itself.
    """
    to_b = _product(affinity, (~mask).astype(np.float64), index)
    cut = float(to_b[mask].sum())
    return max(cut / vol_a + cut / vol_b, 0.0)


def ncut_cost(affinity: NDArray[np.floating], mask: NDArray[np.bool_]) -> float:
    """NCut(A, B) of a bipartition given by boolean ``mask`` (A = True).

    Examples
    --------
    >>> w = np.array([[1., 1, 0], [1, 1, 0], [0, 0, 1]])
    >>> ncut_cost(w, np.array([True, True, False]))
    0.0
    """
    degree = affinity.sum(axis=1)
    vol_a, vol_b = degree[mask].sum(), degree[~mask].sum()
    cut = affinity[np.ix_(mask, ~mask)].sum()
    if vol_a <= 0 or vol_b <= 0:
        return float("inf")
    return float(cut / vol_a + cut / vol_b)


def bipartition(
    affinity: NDArray[np.float64],
    *,
    min_size: int = 1,
    v0: NDArray[np.float64] | None = None,
    seed: int = 0,
) -> Bipartition:
    """Split a graph in two by Normalized Cut.

    Parameters
    ----------
    affinity : ndarray of float64, shape (n, n)
        Symmetric, non-negative W with positive row sums.
    min_size : int
        Minimum number of nodes on each side.
    v0 : ndarray, optional
        Lanczos start vector.
    seed : int
        Seed of the default start vector.

    Returns
    -------
    Bipartition

    Examples
    --------
    >>> w = np.kron(np.eye(2), np.ones((3, 3))) + 0.01
    >>> b = bipartition(w)
    >>> sorted(b.mask.tolist()) == [False] * 3 + [True] * 3, round(b.cost, 3)
    (True, 0.02)
    """
    degree = affinity.sum(axis=1, dtype=np.float64)
    z, lam = fiedler_vector(affinity, degree, v0=v0, seed=seed)
    mask, cost = sweep_cut(affinity, degree, z, min_size)
    return Bipartition(mask=mask, cost=cost, eigenvalue=lam, fiedler=z)
