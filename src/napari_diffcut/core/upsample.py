"""Patch labels -> pixel labels by attention-weighted soft upsampling (method.md 7, option 2).

For every region, the rows of the walk matrix over its patches are averaged:
a map of where a walker started in the region lands. The maps are bilinearly
upsampled to the output size and each pixel takes the region of the largest
value (DiffSeg's "NMS" step). Done once for the leaves of the whole tree, so
that every flat cut is a lookup on the same pixel map and levels nest exactly.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import sparse


def _bilinear_taps(n_out: int, n_in: int) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
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
    big_h, big_w = out_shape
    uniq, compact = np.unique(region_of_patch, return_inverse=True)
    k = uniq.size
    if k == 1:
        return np.full(out_shape, uniq[0], np.int64)
    maps = region_maps(walk, compact, k).reshape(k, h, w)
    y0, y1, wy = _bilinear_taps(big_h, h)
    x0, x1, wx = _bilinear_taps(big_w, w)
    out = np.empty(out_shape, np.int64)
    rows = max(1, max_elements // max(1, k * big_w))
    for start in range(0, big_h, rows):
        sl = slice(start, min(big_h, start + rows))
        a = wy[sl][None, :, None]
        my = (1 - a) * maps[:, y0[sl], :] + a * maps[:, y1[sl], :]
        vals = (1 - wx) * my[:, :, x0] + wx * my[:, :, x1]
        out[sl] = uniq[np.argmax(vals, axis=0)]
    return out
