"""Walk: attention as a random-walk transition matrix, power walks and graphs.

Implements method.md sections 2.4 (aggregation across resolutions), 3.1 (the
stationary-distribution symmetrisation "S1"), 3.2 (power walk P^k) and 4 B
(attention-row similarity graph).  Pure numpy: no torch, no Qt.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import check_choice
from napari_diffcut.core.ncut import single_thread_blas

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
    up = _upsample_keys(attention, grid, fine_grid)
    # Query side: nearest (tile) copy of each coarse row to its r x r fine block.
    lifted = np.broadcast_to(
        up.reshape(h, 1, w, 1, fh * fw), (h, r, w, r, fh * fw)
    ).reshape(fh * fw, fh * fw)
    return np.ascontiguousarray(lifted)


def _upsample_keys(
    attention: NDArray[np.floating], grid: tuple[int, int], fine_grid: tuple[int, int]
) -> NDArray[np.float32]:
    """Key side of the lift: rows seen as ``grid`` images, bilinear to ``fine_grid``, rows sum 1.

    Two plain matmuls with the separable operator ``Ry X Rx^T`` (faster than
    the equivalent einsum; benchmarks/NOTES.md).
    """
    (h, w), (fh, fw) = grid, fine_grid
    ry = interpolation_matrix(fh, h)
    rx = interpolation_matrix(fw, w)
    keys = np.asarray(attention, np.float32).reshape(h * w * h, w)
    up = (keys @ rx.T).reshape(h * w, h, fw)  # along x: (q, h, fw)
    up = np.matmul(ry, up).reshape(h * w, fh * fw)  # along y: (q, fh, fw)
    return normalize_rows(up)


def _add_lifted(
    total: NDArray[np.float32],
    up: NDArray[np.float32],
    grid: tuple[int, int],
    fine_grid: tuple[int, int],
) -> None:
    """``total += lift`` without building the lifted (N, N) matrix.

    ``total`` viewed as (h, r, w, r, N): every one of the r x r fine query
    offsets gets the coarse rows added. One strided add per offset is about
    50x faster than numpy's 5-D broadcast add here (benchmarks/NOTES.md).
    """
    (h, w), (fh, fw) = grid, fine_grid
    r = fh // h
    view = total.reshape(h, r, w, r, fh * fw)
    rows = up.reshape(h, w, fh * fw)
    for dy in range(r):
        for dx in range(r):
            view[:, dy, :, dx, :] += rows


def default_weights(grids: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """Per-resolution weights proportional to grid side (DiffSeg's rule, method.md 2.4)."""
    total = sum(g[0] for g in grids)
    return {g: g[0] / total for g in grids}


def default_factor_weights(factors: Collection[int]) -> dict[int, float]:
    """DiffSeg's side-proportional rule by downsampling factor: ``w_f`` proportional to ``1/f``.

    The same rule as :func:`default_weights`, for the factors a model has:
    SD 1.x/2.x (factors 1, 2, 4, 8) get 0.533/0.267/0.133/0.067, SDXL-class
    UNets (factors 2, 4) 0.667/0.333 (method.md 2.4).

    Examples
    --------
    >>> default_factor_weights([2, 4])
    {2: 0.6666666666666666, 4: 0.3333333333333333}
    """
    inverse = {int(f): 1.0 / int(f) for f in sorted(set(factors))}
    total = sum(inverse.values())
    return {f: v / total for f, v in inverse.items()}


def check_resolution_weights(
    weights: Mapping[int, float] | None, factors: Collection[int]
) -> dict[int, float]:
    """Validate per-factor resolution weights against the factors a model really has.

    Parameters
    ----------
    weights : mapping of int to float, optional
        Downsampling factor (1 = latent grid, 2, 4, 8) to weight; None: the
        default of :func:`default_factor_weights`.
    factors : collection of int
        Factors at which the model has self-attention (SD 1.5: 1, 2, 4, 8;
        SDXL: 2, 4).

    Returns
    -------
    dict of int to float
        Weights for exactly ``factors`` (absent ones 0), not normalised.

    Raises
    ------
    ValueError
        A positive weight on a factor the model has no self-attention at, a
        negative weight, or no positive weight left.

    Examples
    --------
    >>> check_resolution_weights({1: 0.0, 2: 1.0}, [2, 4])
    {2: 1.0, 4: 0.0}
    """
    have = sorted({int(f) for f in factors})
    if not have:
        raise ValueError("the model has no self-attention grids")
    if weights is None:
        return default_factor_weights(have)
    w = {int(f): float(v) for f, v in dict(weights).items()}
    if any(v < 0 or not np.isfinite(v) for v in w.values()):
        raise ValueError(f"resolution weights must be finite and >= 0, got {w}")
    missing = sorted(f for f, v in w.items() if v > 0 and f not in have)
    if missing:
        raise ValueError(
            f"resolution_weights give weight to factor(s) {missing}, but this model has "
            f"self-attention only at downsampling factor(s) {have} of the latent grid; "
            "use those factors (weight 0 for the others)"
        )
    out = {f: w.get(f, 0.0) for f in have}
    if sum(out.values()) <= 0:
        raise ValueError(
            f"resolution_weights {w} give no positive weight to any factor this model has "
            f"self-attention at ({have})"
        )
    return out


def aggregate_attention(
    per_resolution: Mapping[tuple[int, int], NDArray[np.float32]],
    weights: Mapping[tuple[int, int], float] | None = None,
    *,
    fine_grid: tuple[int, int] | None = None,
) -> NDArray[np.float32]:
    """Combine per-resolution attention into one row-stochastic matrix P.

    ``P = sum_l w_l lift(A_l) / sum_l w_l`` on the fine grid (method.md 2.4,
    step 3). A convex combination of row-stochastic matrices is row-stochastic.

    Parameters
    ----------
    per_resolution : mapping of (h, w) to ndarray (h*w, h*w)
        Head- and layer-averaged attention per grid.
    weights : mapping of (h, w) to float, optional
        Non-negative weights; default proportional to the grid side. A positive
        weight on a grid that ``per_resolution`` lacks is an error.
    fine_grid : (H, W), optional
        Grid to lift onto: the patch grid the caller segments on (the engine's
        grid). Default: the finest grid in ``per_resolution``. Every captured
        grid must divide it by one integer factor.

    Returns
    -------
    ndarray of float32, shape (N, N)
        With ``N = H*W`` of the fine grid.

    Raises
    ------
    ValueError
        Empty input, bad weights, or a grid that does not divide ``fine_grid``.
    """
    if not per_resolution:
        raise ValueError("per_resolution is empty: no self-attention was captured")
    grids = sorted(per_resolution, key=lambda g: g[0] * g[1], reverse=True)
    fine = (int(fine_grid[0]), int(fine_grid[1])) if fine_grid is not None else grids[0]
    weights = dict(weights) if weights else default_weights(grids)
    absent = sorted(g for g, v in weights.items() if v > 0 and g not in per_resolution)
    if absent:
        raise ValueError(
            f"resolution weights name grid(s) {absent} where no attention was captured; "
            f"captured grids: {grids}"
        )
    used = {g: float(weights.get(g, 0.0)) for g in grids}
    if any(v < 0 for v in used.values()) or sum(used.values()) <= 0:
        raise ValueError(f"resolution weights must be >= 0 with a positive sum, got {used}")
    n = fine[0] * fine[1]
    scale = {g: np.float32(v / sum(used.values())) for g, v in used.items()}
    total = np.zeros((n, n), np.float32)
    for g in grids:
        if used[g] == 0:
            continue
        (h, w) = g
        if g == fine:
            # lift of the fine grid = its rows renormalised: total += s * A / rowsum.
            a = np.asarray(per_resolution[g], np.float32)
            sums = a.sum(axis=1, keepdims=True)
            sums[sums <= 0] = 1
            total += a * (scale[g] / sums)
            continue
        if fine[0] % h or fine[1] % w or fine[0] // h != fine[1] // w:
            raise ValueError(
                f"grid {g} does not divide fine_grid {fine} by one integer factor"
            )
        up = _upsample_keys(per_resolution[g], g, fine)
        up *= scale[g]
        _add_lifted(total, up, g, fine)
    return normalize_rows(total)


#: From this many nodes on, a float32 transition matrix is multiplied in float32
#: when its stationary distribution is computed (benchmarks/NOTES.md), if its
#: spectral gap allows it (:data:`FLOAT32_MIN_GAP`).
FLOAT32_MIN_NODES = 1024

#: The float32 products are trusted only when the walk's spectral gap
#: ``1 - |lambda_2|`` is at least this (issue 11). The rounding of a float32
#: product (about 1e-7 of each sum) is amplified by about 1/gap in pi
#: (the condition number of a Markov chain's stationary distribution, Meyer
#: 1980; Cho & Meyer 2001): measured on 4096-node walks, relative error of pi
#: 1e-5 at gap 1.4e-3, 5e-3 at gap 1.4e-4 and 0.8 (the mass of weakly joined
#: parts wrong by O(1)) at gap 1e-5; float64 is right to 1e-8 on all of them.
FLOAT32_MIN_GAP = 1e-2


def stationary_distribution(transition: NDArray[np.floating]) -> NDArray[np.float64]:
    """Stationary distribution pi of a row-stochastic matrix (pi P = pi).

    The leading left eigenvector by Arnoldi iteration (``scipy.sparse.linalg.eigs``
    on P^T). Softmax attention is strictly positive, so the chain is irreducible
    and aperiodic and pi is unique (method.md 3.1). Arnoldi converges in a few
    dozen products even for the slowly mixing, spatially local walks where plain
    power iteration needs thousands.

    A float32 ``transition`` with at least ``FLOAT32_MIN_NODES`` nodes is first
    used as it is (``x @ P`` in float32, no float64 copy; about 4x faster at
    4096 nodes), solving for the two eigenvalues of largest modulus. If the
    gap ``1 - |lambda_2|`` is at least :data:`FLOAT32_MIN_GAP` the result
    agrees with the float64 solve to about 1e-5 relative, the sensitivity of pi
    to the float32 rounding of P itself. A nearly reducible walk (weakly joined
    parts, e.g. the pixels backbone on an image of two flat colours) has a
    smaller gap, and its pi is then solved with float64 products, which get the
    mass of each part right (the float32 products can be off by O(1) there).
    """
    n = transition.shape[0]
    if n <= 64:
        vals, vecs = np.linalg.eig(np.asarray(transition, np.float64).T)
        vec = vecs[:, int(np.argmax(vals.real))].real
        vec = np.abs(vec)
        return vec / vec.sum()
    with single_thread_blas()():  # dozens of short products (core/ncut.py docstring)
        vec = _leading_left_vector(transition)
    vec = np.abs(vec)
    return vec / vec.sum()


def _leading_left_vector(transition: NDArray[np.floating]) -> NDArray[np.float64]:
    """Arnoldi for the leading left eigenvector (see :func:`stationary_distribution`)."""
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigs

    n = transition.shape[0]
    start = np.full(n, 1.0 / n)
    if n >= FLOAT32_MIN_NODES and transition.dtype == np.float32:
        p32 = np.ascontiguousarray(transition)

        def left_product(x: NDArray[np.float64]) -> NDArray[np.float64]:
            return np.asarray(np.ravel(x).astype(np.float32) @ p32, np.float64)

        op = LinearOperator((n, n), matvec=left_product, dtype=np.float64)
        try:
            vals, vecs = eigs(op, k=2, which="LM", v0=start, tol=1e-8)
        except (ArpackNoConvergence, ArpackError):
            vals = None
        if vals is not None:
            lead = int(np.argmax(vals.real))
            gap = 1.0 - float(np.abs(vals[1 - lead]))
            if gap >= FLOAT32_MIN_GAP:
                return np.asarray(vecs[:, lead].real, np.float64)
    # float64 products: x^T P with P row-major is a transposed gemv, no P^T copy.
    # The matrix is used as given (as the torch path, accel.walk, does): pi of a
    # nearly reducible P is then right up to what the rounding of P's row sums
    # leaves undetermined (1e-7 of a float32 row sum against the coupling of
    # its parts); a walk known in closed form should bring its own pi
    # (core.pixels.pixel_graph).
    p64 = np.asarray(transition, np.float64)

    def left_product64(x: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.ravel(x) @ p64

    op64 = LinearOperator((n, n), matvec=left_product64, dtype=np.float64)
    try:
        return np.asarray(eigs(op64, k=1, which="LR", v0=start, tol=1e-12)[1][:, 0].real)
    except (ArpackNoConvergence, ArpackError):
        vec = start
        for _ in range(10000):
            vec = vec @ p64
        return vec


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


def walk_affinity(
    transition: NDArray[np.floating], *, dtype: type[np.floating] = np.float64
) -> NDArray[np.floating]:
    """Random-walk graph ``W = (Pi P + P^T Pi) / 2`` (method.md 3.1, "S1").

    Edge weights are the stationary probability flow, so row sums equal pi and
    the NCut of W equals the escape-probability NCut of the original,
    non-reversible walk (Meila & Shi 2001).

    Parameters
    ----------
    transition : ndarray, shape (N, N)
        Row-stochastic P.
    dtype : numpy float type
        Output dtype; float32 halves memory and is what the NCut tree uses.

    Returns
    -------
    ndarray, shape (N, N)
        Exactly symmetric.
    """
    pi = stationary_distribution(transition)
    return _symmetric_flow(transition, pi, dtype)


def _symmetric_flow(
    transition: NDArray[np.floating],
    pi: NDArray[np.float64],
    dtype: type[np.floating],
    block: int = 256,
) -> NDArray[np.floating]:
    """``(pi_i P_ij + pi_j P_ji) / 2`` by tiles, each computed once and mirrored.

    Tiling keeps both the tile and its transposed partner in cache, never
    materialises ``Pi P`` (an N x N temporary) and halves the work by symmetry
    (about 3x faster than ``flow + flow.T`` at 4096 nodes; benchmarks/NOTES.md).
    Diagonal tiles are exactly symmetric because addition commutes.
    """
    n = transition.shape[0]
    out = np.empty((n, n), dtype)
    weights = pi.astype(dtype)[:, None]
    half = dtype(0.5)
    for i in range(0, n, block):
        rows = slice(i, min(n, i + block))
        for j in range(i, n, block):
            cols = slice(j, min(n, j + block))
            tile = weights[rows] * transition[rows, cols].astype(dtype, copy=False)
            tile += (weights[cols] * transition[cols, rows].astype(dtype, copy=False)).T
            tile *= half
            out[rows, cols] = tile
            if j != i:
                out[cols, rows] = tile.T
    return out


def similarity_affinity(
    transition: NDArray[np.floating], *, dtype: type[np.floating] = np.float64
) -> NDArray[np.floating]:
    """Cosine similarity of attention rows (method.md 4 B).

    Entries are in [0, 1] because the rows are non-negative; cosine removes the
    row-mass effects a plain dot product ``P P^T`` would keep. The Gram matrix
    is computed in float32 and returned as ``dtype``.
    """
    rows = transition.astype(np.float32, copy=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    norms[norms == 0] = 1
    rows /= norms
    w = (rows @ rows.T).astype(dtype, copy=False)
    np.clip(w, 0.0, 1.0, out=w)
    return w


def build_affinity(
    transition: NDArray[np.float32],
    *,
    power: int = 1,
    graph: str = "walk",
    dtype: type[np.floating] = np.float64,
) -> tuple[NDArray[np.floating], NDArray[np.float32]]:
    """Apply the power walk and build the symmetric graph for NCut.

    Parameters
    ----------
    transition : ndarray, shape (N, N)
        Row-stochastic transition matrix P.
    power : int
        Number of walk steps k (P^k).
    graph : {"walk", "similarity"}
        Random-walk graph (S1) or cosine similarity of rows of P^k.
    dtype : numpy float type
        dtype of the affinity; float32 is what the NCut tree computes with,
        so passing it saves a conversion and half the memory.

    Returns
    -------
    affinity : ndarray of ``dtype``, shape (N, N)
        Symmetric, non-negative W.
    walk : ndarray of float32, shape (N, N)
        P^k (used again for the soft pixel upsampling).
    """
    check_choice("graph", graph, GRAPHS)
    check_transition(transition)
    walk = power_walk(transition, power) if power != 1 else transition
    if graph == "walk":
        return walk_affinity(walk, dtype=dtype), walk
    return similarity_affinity(walk, dtype=dtype), walk


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
