"""Walk: attention as a random-walk transition matrix, power walks and graphs.

Implements method.md sections 2.4 (aggregation across resolutions), 3.1 (the
stationary-distribution symmetrisation "S1"), 3.2 (power walk P^k) and 4 B
(attention-row similarity graph).  Pure numpy: no torch, no Qt.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.errors import check_choice

GRAPHS = ("walk", "similarity")


def interpolation_matrix(n_out: int, n_in: int) -> NDArray[np.float32]:
    """Return the (n_out, n_in) matrix of 1-D linear interpolation.

    Pixel centres are aligned as in ``torch.nn.functional.interpolate`` with
    ``align_corners=False``: output sample ``i`` sits at input coordinate
    ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the edge samples.

    Parameters
    ----------
    n_out, n_in : int
        Output and input lengths.

    Returns
    -------
    ndarray of float32, shape (n_out, n_in)
        Rows sum to 1.

    Examples
    --------
    >>> interpolation_matrix(4, 2).round(2)
    array([[1.  , 0.  ],
           [0.75, 0.25],
           [0.25, 0.75],
           [0.  , 1.  ]], dtype=float32)
    """
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float32)
    mat = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(mat, (rows, lo), 1 - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


def normalize_rows(matrix: NDArray[np.floating]) -> NDArray[np.floating]:
    """Rescale rows to sum to 1 in place (kills drift after upsampling or powers)."""
    sums = matrix.sum(axis=1, keepdims=True)
    sums[sums <= 0] = 1
    matrix /= sums
    return matrix


def lift_attention(
    attention: NDArray[np.float32],
    grid: tuple[int, int],
    fine_grid: tuple[int, int],
) -> NDArray[np.float32]:
    """Lift a coarse self-attention matrix onto the finest patch grid.

    Key side: each row, seen as an ``grid`` image, is bilinearly upsampled to
    ``fine_grid`` and renormalised to sum 1. Query side: each coarse row is
    copied to the fine query positions it covers (method.md 2.4, steps 1-2).

    Parameters
    ----------
    attention : ndarray, shape (h*w, h*w)
        Row-stochastic attention on the coarse grid ``(h, w)``.
    grid, fine_grid : tuple of int
        Coarse ``(h, w)`` and fine ``(H, W)``; ``H/h == W/w`` is an integer.

    Returns
    -------
    ndarray of float32, shape (H*W, H*W)
        Row-stochastic.
    """
    (h, w), (fh, fw) = grid, fine_grid
    if (h, w) == (fh, fw):
        return normalize_rows(np.array(attention, np.float32, copy=True))
    if fh % h or fw % w or fh // h != fw // w:
        raise ValueError(
            f"grid {grid} does not divide fine_grid {fine_grid} by one integer factor"
        )
    r = fh // h
    ry = interpolation_matrix(fh, h)
    rx = interpolation_matrix(fw, w)
    keys = attention.reshape(h * w, h, w).astype(np.float32, copy=False)
    # (q, h, w) -> (q, fh, fw) by the separable bilinear operator Ry X Rx^T.
    up = np.einsum("Yh,qhw->qYw", ry, keys, optimize=True)
    up = np.einsum("qYw,Xw->qYX", up, rx, optimize=True).reshape(h * w, fh * fw)
    normalize_rows(up)
    # Query side: nearest (tile) copy of each coarse row to its r x r fine block.
    lifted = np.broadcast_to(
        up.reshape(h, 1, w, 1, fh * fw), (h, r, w, r, fh * fw)
    ).reshape(fh * fw, fh * fw)
    return np.ascontiguousarray(lifted)


def default_weights(grids: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """Per-resolution weights proportional to grid side (DiffSeg's rule, method.md 2.4)."""
    total = sum(g[0] for g in grids)
    return {g: g[0] / total for g in grids}


def aggregate_attention(
    per_resolution: Mapping[tuple[int, int], NDArray[np.float32]],
    weights: Mapping[tuple[int, int], float] | None = None,
) -> NDArray[np.float32]:
    """Combine per-resolution attention into one row-stochastic matrix P.

    ``P = sum_l w_l lift(A_l) / sum_l w_l`` on the finest grid (method.md 2.4,
    step 3). A convex combination of row-stochastic matrices is row-stochastic.

    Parameters
    ----------
    per_resolution : mapping of (h, w) to ndarray (h*w, h*w)
        Head- and layer-averaged attention per grid.
    weights : mapping of (h, w) to float, optional
        Non-negative weights; default proportional to the grid side.

    Returns
    -------
    ndarray of float32, shape (N, N)
        With ``N = H*W`` of the finest grid.
    """
    if not per_resolution:
        raise ValueError("per_resolution is empty: no self-attention was captured")
    grids = sorted(per_resolution, key=lambda g: g[0] * g[1], reverse=True)
    fine = grids[0]
    weights = dict(weights) if weights else default_weights(grids)
    used = {g: float(weights.get(g, 0.0)) for g in grids}
    if any(v < 0 for v in used.values()) or sum(used.values()) <= 0:
        raise ValueError(f"resolution weights must be >= 0 with a positive sum, got {used}")
    n = fine[0] * fine[1]
    total = np.zeros((n, n), np.float32)
    for g in grids:
        if used[g] == 0:
            continue
        total += np.float32(used[g]) * lift_attention(per_resolution[g], g, fine)
    total /= np.float32(sum(used.values()))
    return normalize_rows(total)


def stationary_distribution(transition: NDArray[np.floating]) -> NDArray[np.float64]:
    """Stationary distribution pi of a row-stochastic matrix (pi P = pi).

    The leading left eigenvector by Arnoldi iteration (``scipy.sparse.linalg.eigs``
    on P^T). Softmax attention is strictly positive, so the chain is irreducible
    and aperiodic and pi is unique (method.md 3.1). Arnoldi converges in a few
    dozen products even for the slowly mixing, spatially local walks where plain
    power iteration needs thousands.
    """
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigs

    n = transition.shape[0]
    pt = np.ascontiguousarray(transition.T, dtype=np.float64)
    if n <= 64:
        vals, vecs = np.linalg.eig(pt)
        vec = vecs[:, int(np.argmax(vals.real))].real
    else:
        try:
            _, vecs = eigs(pt, k=1, which="LR", v0=np.full(n, 1.0 / n), tol=1e-12)
            vec = vecs[:, 0].real
        except (ArpackNoConvergence, ArpackError):
            vec = np.full(n, 1.0 / n)
            for _ in range(10000):
                vec = pt @ vec
    vec = np.abs(vec)
    return vec / vec.sum()


def power_walk(transition: NDArray[np.float32], power: int) -> NDArray[np.float32]:
    """k-step transition matrix P^k by repeated squaring (method.md 3.2)."""
    if not isinstance(power, int | np.integer) or power < 1:
        raise ValueError(f"power must be an integer >= 1, got {power!r}")
    result: NDArray[np.float32] | None = None
    base = transition.astype(np.float32, copy=True)
    k = int(power)
    while k:
        if k & 1:
            result = base.copy() if result is None else result @ base
        k >>= 1
        if k:
            base = base @ base
    assert result is not None
    return normalize_rows(result)


def walk_affinity(transition: NDArray[np.floating]) -> NDArray[np.float64]:
    """Random-walk graph ``W = (Pi P + P^T Pi) / 2`` (method.md 3.1, "S1").

    Edge weights are the stationary probability flow, so row sums equal pi and
    the NCut of W equals the escape-probability NCut of the original,
    non-reversible walk (Meila & Shi 2001).
    """
    pi = stationary_distribution(transition)
    flow = transition.astype(np.float64) * pi[:, None]
    w = flow + flow.T
    w *= 0.5
    return w


def similarity_affinity(transition: NDArray[np.floating]) -> NDArray[np.float64]:
    """Cosine similarity of attention rows (method.md 4 B).

    Entries are in [0, 1] because the rows are non-negative; cosine removes the
    row-mass effects a plain dot product ``P P^T`` would keep.
    """
    rows = transition.astype(np.float32, copy=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    norms[norms == 0] = 1
    rows /= norms
    w = (rows @ rows.T).astype(np.float64)
    np.clip(w, 0.0, 1.0, out=w)
    return w


def build_affinity(
    transition: NDArray[np.float32], *, power: int = 1, graph: str = "walk"
) -> tuple[NDArray[np.float64], NDArray[np.float32]]:
    """Apply the power walk and build the symmetric graph for NCut.

    Parameters
    ----------
    transition : ndarray, shape (N, N)
        Row-stochastic transition matrix P.
    power : int
        Number of walk steps k (P^k).
    graph : {"walk", "similarity"}
        Random-walk graph (S1) or cosine similarity of rows of P^k.

    Returns
    -------
    affinity : ndarray of float64, shape (N, N)
        Symmetric, non-negative W.
    walk : ndarray of float32, shape (N, N)
        P^k (used again for the soft pixel upsampling).
    """
    check_choice("graph", graph, GRAPHS)
    check_transition(transition)
    walk = power_walk(transition, power) if power != 1 else transition
    if graph == "walk":
        return walk_affinity(walk), walk
    return similarity_affinity(walk), walk


def check_transition(transition: NDArray[np.floating]) -> None:
    """Raise ValueError unless ``transition`` is a square, row-stochastic matrix."""
    arr = np.asarray(transition)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 2:
        raise ValueError(
            f"transition must be a square (N, N) matrix with N >= 2, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)) or arr.min() < 0:
        raise ValueError("transition must be finite and non-negative")
    sums = arr.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError(
            "transition must be row-stochastic (rows sum to 1); row sums range "
            f"{sums.min():.4g}..{sums.max():.4g}. Normalise rows first."
        )
