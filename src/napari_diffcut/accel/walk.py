"""Walk in torch: aggregation, stationary distribution, power walk and graphs.

The torch twin of :mod:`napari_diffcut.core.walk` (method.md 2.4, 3.1, 3.2,
4 B). Every function computes on the device of its input tensor, with the
same arithmetic and dtypes as the numpy path: the transition matrix and the
graph in float32, the stationary distribution in float64 from float32
products (as the numpy path does from 1024 nodes on).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from numpy.typing import NDArray

from napari_diffcut.accel.krylov import leading_eigenvector
from napari_diffcut.core.errors import check_choice
from napari_diffcut.core.walk import GRAPHS, default_weights, interpolation_matrix


def as_tensor(
    array: NDArray[np.floating] | torch.Tensor,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``array`` as a tensor of ``dtype`` on ``device`` (default: where it already is, else CPU)."""
    if isinstance(array, torch.Tensor):
        return array.to(device=device or array.device, dtype=dtype)
    return torch.as_tensor(np.asarray(array), dtype=dtype, device=device)


def normalize_rows_torch(matrix: torch.Tensor) -> torch.Tensor:
    """Rescale rows to sum to 1 in place (zero rows stay zero), as ``core.walk.normalize_rows``."""
    sums = matrix.sum(dim=1, keepdim=True)
    sums[sums <= 0] = 1
    return matrix.div_(sums)


def _upsample_keys_torch(
    attention: torch.Tensor, grid: tuple[int, int], fine_grid: tuple[int, int]
) -> torch.Tensor:
    """Key side of the lift (method.md 2.4 step 1): rows as ``grid`` images, bilinear, rows sum 1.

    The separable operator ``Ry X Rx^T`` as two matmuls, as in ``core.walk``.
    """
    (h, w), (fh, fw) = grid, fine_grid
    dev = attention.device
    ry = torch.from_numpy(interpolation_matrix(fh, h)).to(dev)
    rx = torch.from_numpy(interpolation_matrix(fw, w)).to(dev)
    keys = attention.to(torch.float32).reshape(h * w * h, w)
    up = (keys @ rx.T).reshape(h * w, h, fw)  # along x: (q, h, fw)
    up = torch.matmul(ry, up).reshape(h * w, fh * fw)  # along y: (q, fh, fw)
    return normalize_rows_torch(up)


def aggregate_attention_torch(
    per_resolution: Mapping[tuple[int, int], torch.Tensor | NDArray[np.float32]],
    weights: Mapping[tuple[int, int], float] | None = None,
    *,
    fine_grid: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Combine per-resolution attention into one row-stochastic matrix P (torch).

    ``P = sum_l w_l lift(A_l) / sum_l w_l`` on the finest grid (method.md 2.4,
    step 3); the same lift as :func:`napari_diffcut.core.walk.aggregate_attention`
    (bilinear on the key side, nearest copy on the query side).

    Parameters
    ----------
    per_resolution : mapping of (h, w) to tensor or ndarray (h*w, h*w)
        Head- and layer-averaged attention per grid.
    weights : mapping of (h, w) to float, optional
        Non-negative weights; default proportional to the grid side. A positive
        weight on a grid that ``per_resolution`` lacks is an error.
    fine_grid : (H, W), optional
        Grid to lift onto (the engine's patch grid, which a zero weight may
        leave uncaptured); default the finest grid in ``per_resolution``.
    device : torch device, optional
        Where to compute; default the device of the finest grid's tensor.

    Returns
    -------
    torch.Tensor of float32, shape (N, N)
        Row-stochastic, on ``device``.
    """
    if not per_resolution:
        raise ValueError("per_resolution is empty: no self-attention was captured")
    grids = sorted(per_resolution, key=lambda g: g[0] * g[1], reverse=True)
    fine = (int(fine_grid[0]), int(fine_grid[1])) if fine_grid is not None else grids[0]
    first = per_resolution[grids[0]]
    dev = (
        torch.device(device)
        if device is not None
        else (first.device if isinstance(first, torch.Tensor) else torch.device("cpu"))
    )
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
    scale = {g: float(np.float32(v / sum(used.values()))) for g, v in used.items()}
    total = torch.zeros((n, n), dtype=torch.float32, device=dev)
    for g in grids:
        if used[g] == 0:
            continue
        a = as_tensor(per_resolution[g], device=dev)
        if g == fine:
            sums = a.sum(dim=1, keepdim=True)
            sums[sums <= 0] = 1
            total += a * (scale[g] / sums)
            continue
        (h, w) = g
        if fine[0] % h or fine[1] % w or fine[0] // h != fine[1] // w:
            raise ValueError(f"grid {g} does not divide fine_grid {fine} by one integer factor")
        r = fine[0] // h
        up = _upsample_keys_torch(a, g, fine).mul_(scale[g])
        # Query side: every one of the r x r fine queries of a coarse patch gets its row.
        total.view(h, r, w, r, n).add_(up.view(h, 1, w, 1, n))
    return normalize_rows_torch(total)


def stationary_distribution_torch(transition: torch.Tensor, *, tol: float = 1e-12) -> torch.Tensor:
    """Stationary distribution pi of a row-stochastic matrix (pi P = pi), in float64.

    The leading left eigenvector of P by Krylov-Schur
    (:func:`napari_diffcut.accel.krylov.leading_eigenvector`), as
    :func:`napari_diffcut.core.walk.stationary_distribution` finds it with
    ARPACK: softmax attention is strictly positive, so the eigenvalue 1 is
    simple and pi unique (Perron-Frobenius; method.md 3.1). Products, basis
    and small eigenproblems are float64: a float32 product's rounding is
    amplified by 1/gap of the walk. The numpy path multiplies in float32 from
    1024 nodes on and agrees with this to about 1e-5 on attention-like walks;
    on nearly reducible walks (the pixels backbone) its float32 pi can be off
    by O(1) in the mass shared between weakly joined parts, this one is not.

    Parameters
    ----------
    transition : torch.Tensor, shape (N, N)
        Row-stochastic P, on any device.
    tol : float
        Relative residual ``|P^T v - theta v| / theta`` of the unit Ritz vector to stop at.

    Returns
    -------
    torch.Tensor of float64, shape (N,)
        Non-negative, sums to 1, on P's device.
    """
    n = transition.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.float64, device=transition.device)
    # x^T P = (P^T x)^T; float64 products: a float32 product's rounding (1e-6 of
    # each sum at 4096 terms) is amplified by 1/gap of the walk (method.md 3.1).
    pt = transition.T.to(torch.float64)
    start = torch.full((n,), 1.0 / n, dtype=torch.float64, device=transition.device)
    vec, _, _ = leading_eigenvector(pt, start, tol=tol)
    vec = vec.abs()
    return vec / vec.sum()


def power_walk_torch(transition: torch.Tensor, power: int) -> torch.Tensor:
    """k-step transition matrix P^k by repeated squaring in float32 (method.md 3.2)."""
    if not isinstance(power, int | np.integer) or power < 1:
        raise ValueError(f"power must be an integer >= 1, got {power!r}")
    result: torch.Tensor | None = None
    base = transition.to(torch.float32, copy=True)
    k = int(power)
    while k:
        if k & 1:
            result = base.clone() if result is None else result @ base
        k >>= 1
        if k:
            base = base @ base
    assert result is not None
    return normalize_rows_torch(result)


def walk_affinity_torch(
    transition: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    pi: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random-walk graph ``W = (Pi P + P^T Pi) / 2`` in torch (method.md 3.1, "S1").

    Edge weights are the stationary probability flow, so row sums equal pi and
    NCut on W is the escape-probability NCut of the non-reversible walk
    (Meila & Shi 2001). ``F = Pi P`` is rounded to ``dtype`` once and
    ``W = (F + F^T) / 2``, so W is exactly symmetric.

    Parameters
    ----------
    transition : torch.Tensor, shape (N, N)
        Row-stochastic P.
    dtype : torch float dtype
        Output dtype (float32 is what the NCut tree uses).
    pi : torch.Tensor, optional
        Its stationary distribution, if already known.

    Returns
    -------
    torch.Tensor of ``dtype``, shape (N, N)
    """
    if pi is None:
        pi = stationary_distribution_torch(transition)
    flow = pi.to(dtype)[:, None] * transition.to(dtype)
    return flow.add_(flow.T.clone()).mul_(0.5)


def similarity_affinity_torch(
    transition: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Cosine similarity of attention rows, clipped to [0, 1] (method.md 4 B); Gram in float32."""
    rows = transition.to(torch.float32, copy=True)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    norms[norms == 0] = 1
    rows /= norms
    return (rows @ rows.T).to(dtype).clamp_(0.0, 1.0)


def build_affinity_torch(
    transition: torch.Tensor,
    *,
    power: int = 1,
    graph: str = "walk",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Power walk and symmetric graph for NCut, in torch (see ``core.walk.build_affinity``).

    Parameters
    ----------
    transition : torch.Tensor, shape (N, N)
        Row-stochastic transition matrix P, on any device.
    power : int
        Number of walk steps k (P^k).
    graph : {"walk", "similarity"}
        Random-walk graph (S1) or cosine similarity of rows of P^k.
    dtype : torch float dtype
        dtype of the affinity.

    Returns
    -------
    affinity : torch.Tensor of ``dtype``, shape (N, N)
        Symmetric, non-negative W.
    walk : torch.Tensor of float32, shape (N, N)
        P^k (used again for the soft pixel upsampling).
    """
    check_choice("graph", graph, GRAPHS)
    _check_transition_torch(transition)
    walk = power_walk_torch(transition, power) if power != 1 else transition.to(torch.float32)
    if graph == "walk":
        return walk_affinity_torch(walk, dtype=dtype), walk
    return similarity_affinity_torch(walk, dtype=dtype), walk


def _check_transition_torch(transition: torch.Tensor) -> None:
    """Raise ValueError unless ``transition`` is a square, row-stochastic matrix."""
    if transition.ndim != 2 or transition.shape[0] != transition.shape[1] or len(transition) < 2:
        raise ValueError(
            "transition must be a square (N, N) matrix with N >= 2, "
            f"got shape {tuple(transition.shape)}"
        )
    if not bool(torch.isfinite(transition).all()) or float(transition.min()) < 0:
        raise ValueError("transition must be finite and non-negative")
    sums = transition.sum(dim=1, dtype=torch.float64)
    if not bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
        raise ValueError(
            "transition must be row-stochastic (rows sum to 1); row sums range "
            f"{float(sums.min()):.4g}..{float(sums.max()):.4g}. Normalise rows first."
        )
