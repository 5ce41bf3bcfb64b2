"""Patch labels -> pixel labels by attention-weighted soft upsampling (method.md 7, option 2).

For every region, the rows of the walk matrix over its patches are averaged:
a map of where a walker started in the region lands. The maps are bilinearly
upsampled to the output size and each pixel takes the region of the largest
value (DiffSeg's "NMS" step). Done once for the leaves of the whole tree, so
that every flat cut is a lookup on the same pixel map and levels nest exactly.

Speed (benchmarks/NOTES.md): output pixels that share their four bilinear taps
form a cell. Bilinear weights are non-negative and floating-point products and
sums are monotone, so where one region is the largest at all four taps it is
the largest at every pixel of the cell; such cells are filled without
evaluating any map. In the other cells only regions that can still win are
evaluated (their largest tap value reaches the best guaranteed value of some
region), with the same arithmetic as the full evaluation, so the result is
the same as evaluating every region at every pixel, about 10x faster at 512 x 512.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import sparse

#: Relative margin of the candidate test (a convex combination computed in
#: float32 may exceed its largest input by a rounding error).
_PRUNE_MARGIN = 1e-5
#: Below this many region x pixel values the dense evaluation is used as is.
DENSE_ELEMENTS = 1 << 22


def _bilinear_taps(
    n_out: int, n_in: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """Indices (lo, hi) and weight of hi for align_corners=False bilinear sampling."""
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def region_maps(
    walk: NDArray[np.float32], region_of_patch: NDArray[np.int64], n_regions: int
) -> NDArray[np.float32]:
    """Mean walk row per region: (n_regions, N). O(N^2) via a sparse indicator."""
    n = region_of_patch.shape[0]
    counts = np.bincount(region_of_patch, minlength=n_regions).astype(np.float32)
    counts[counts == 0] = 1
    ind = sparse.csr_matrix(
        (1.0 / counts[region_of_patch], (region_of_patch, np.arange(n))),
        shape=(n_regions, n),
        dtype=np.float32,
    )
    return np.asarray(ind @ walk, np.float32)


def soft_upsample(
    walk: NDArray[np.float32],
    region_of_patch: NDArray[np.int64],
    grid_shape: tuple[int, int],
    out_shape: tuple[int, int],
    *,
    max_elements: int = 1 << 24,
) -> NDArray[np.int64]:
    """Pixel-level region index for an output image of ``out_shape``.

    Parameters
    ----------
    walk : ndarray, shape (N, N)
        Row-stochastic walk matrix on the patch grid.
    region_of_patch : ndarray of int, shape (N,)
        Region index (0..K-1) of each patch.
    grid_shape : (h, w)
        Patch grid, ``h * w == N``.
    out_shape : (H, W)
        Output size (any aspect; the grid covers the whole image).
    max_elements : int
        Bound of the transient K x rows x W buffer (memory stays bounded for
        large outputs).

    Returns
    -------
    ndarray of int64, shape (H, W)
        Region index per pixel.
    """
    h, w = grid_shape
    uniq, compact = np.unique(region_of_patch, return_inverse=True)
    k = uniq.size
    if k == 1:
        return np.full(out_shape, uniq[0], np.int64)
    maps = region_maps(walk, compact.ravel(), k).reshape(k, h, w)
    return uniq[upsample_argmax(maps, out_shape, max_elements=max_elements)]


def upsample_argmax(
    maps: NDArray[np.float32],
    out_shape: tuple[int, int],
    *,
    max_elements: int = 1 << 24,
) -> NDArray[np.int64]:
    """Per pixel, the index of the largest bilinearly upsampled map.

    Equal to ``argmax(bilinear(maps), axis=0)`` computed densely (same
    arithmetic, same tie order), but only cells whose four taps disagree are
    evaluated, and there only the regions that can win (module docstring).

    Parameters
    ----------
    maps : ndarray of float32, shape (K, h, w)
        Non-negative maps on the patch grid.
    out_shape : (H, W)
        Output size (any aspect; the grid covers the whole image).
    max_elements : int
        Bound of the transient candidates x rows x cols buffer.

    Returns
    -------
    ndarray of int64, shape (H, W)
        Index into ``maps`` per pixel.
    """
    maps = np.asarray(maps, np.float32)
    k, h, w = maps.shape
    big_h, big_w = out_shape
    y0, y1, wy = _bilinear_taps(big_h, h)
    x0, x1, wx = _bilinear_taps(big_w, w)
    if k * big_h * big_w <= DENSE_ELEMENTS:  # small output: one dense pass is cheaper
        return _dense_argmax(maps, y0, y1, wy, x0, x1, wx, (0, big_h), (0, big_w), max_elements)
    row_cells, row_of = _cells(y0, y1)
    col_cells, col_of = _cells(x0, x1)
    best = np.argmax(maps, axis=0)  # (h, w), first index among ties, like argmax below
    cy0, cy1 = y0[row_cells], y1[row_cells]
    cx0, cx1 = x0[col_cells], x1[col_cells]
    corner = best[cy0][:, cx0]
    uniform = (
        (best[cy0][:, cx1] == corner)
        & (best[cy1][:, cx0] == corner)
        & (best[cy1][:, cx1] == corner)
    )
    out = corner[row_of][:, col_of].astype(np.int64)
    row_start = np.append(row_cells, big_h)
    for i in np.flatnonzero(~uniform.all(axis=1)):
        cells = np.flatnonzero(~uniform[i])
        cand = _candidates(maps, (cy0[i], cy1[i]), (cx0[cells], cx1[cells]))
        cols = np.flatnonzero(np.isin(col_of, cells))
        rows = (int(row_start[i]), int(row_start[i + 1]))
        taps = (x0[cols], x1[cols], wx[cols])
        win = _dense_argmax(maps[cand], y0, y1, wy, *taps, rows, (0, cols.size), max_elements)
        out[rows[0] : rows[1], cols] = cand[win]
    return out


def _candidates(
    maps: NDArray[np.float32],
    row_taps: tuple[int, int],
    col_taps: tuple[NDArray[np.int64], NDArray[np.int64]],
) -> NDArray[np.int64]:
    """Regions that can win somewhere in a row of cells (ascending indices).

    In each cell some region is at least ``floor`` (the largest over regions of
    the smallest of its four taps) everywhere; a region whose largest tap is
    below that never wins there. The union over the row's cells is returned:
    evaluating a superset of the possible winners, in index order, gives the
    same argmax as evaluating all regions.
    """
    (y0, y1), (x0, x1) = row_taps, col_taps
    taps = np.stack(
        [maps[:, y0, x0], maps[:, y0, x1], maps[:, y1, x0], maps[:, y1, x1]], axis=-1
    )  # (K, cells, 4)
    floor = taps.min(axis=2).max(axis=0)  # (cells,)
    can_win = taps.max(axis=2) >= floor * (1 - _PRUNE_MARGIN)  # (K, cells)
    return np.flatnonzero(can_win.any(axis=1))


def _cells(
    lo: NDArray[np.int64], hi: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """First output index of each run of equal (lo, hi) taps, and each output's run."""
    new = np.ones(lo.size, bool)
    new[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    starts = np.flatnonzero(new)
    return starts, np.cumsum(new) - 1


def _dense_argmax(
    maps: NDArray[np.float32],
    y0: NDArray[np.int64],
    y1: NDArray[np.int64],
    wy: NDArray[np.float32],
    x0: NDArray[np.int64],
    x1: NDArray[np.int64],
    wx: NDArray[np.float32],
    rows: tuple[int, int],
    cols: tuple[int, int],
    max_elements: int,
) -> NDArray[np.int64]:
    """argmax over ``maps`` of the bilinear values in one window, in row chunks."""
    k = maps.shape[0]
    xs = slice(*cols)
    cx0, cx1, cwx = x0[xs], x1[xs], wx[xs]
    out = np.empty((rows[1] - rows[0], cols[1] - cols[0]), np.int64)
    step = max(1, max_elements // max(1, k * out.shape[1]))
    for start in range(rows[0], rows[1], step):
        sl = slice(start, min(rows[1], start + step))
        a = wy[sl][None, :, None]
        my = (1 - a) * maps[:, y0[sl], :] + a * maps[:, y1[sl], :]
        vals = (1 - cwx) * my[:, :, cx0] + cwx * my[:, :, cx1]
        out[start - rows[0] : sl.stop - rows[0]] = np.argmax(vals, axis=0)
    return out
