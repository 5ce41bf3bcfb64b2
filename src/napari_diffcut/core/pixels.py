"""The weight-free "pixels" backbone: a transition matrix from colour and position.

It builds a row-stochastic matrix on the same patch grid the diffusion backbone
uses, so the same walk, cut and upsampling run on it. It serves offline
previews, tests, and comparing the cut engine on real images.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.image import resize
from napari_diffcut.core.walk import normalize_rows


def pixel_transition(
    rgb: NDArray[np.float32],
    grid_shape: tuple[int, int],
    *,
    spatial_sigma: float = 0.1,
    global_weight: float = 0.2,
) -> NDArray[np.float32]:
    """Row-stochastic transition between patches from colour and position.

    ``P_ij ~ exp(-|c_i - c_j|^2 / (2 s_c^2)) * (exp(-|x_i - x_j|^2 / (2 s_x^2)) + b)``
    where ``c`` is the mean colour of a patch, ``x`` its centre in units of the
    grid diagonal, ``s_x = spatial_sigma``, ``b = global_weight`` and ``s_c``
    the median colour step between 4-neighbour patches (at least 0.1), so
    contrast adapts per image.

    The constant ``b`` lets the walk jump between patches of the same colour
    anywhere in the image (the long-range relations of a random walk,
    method.md 0.1): objects of one kind that lie apart (nuclei) join one
    segment instead of being cut apart by distance. Measured
    (first 6 images per set, issue 11): median fg/bg mIoU at the automatic cut, b = 0
    -> 0.2: nuclei 0.61 -> 0.78, one-image nuclei 0.42 -> 0.73; EM unchanged.

    Parameters
    ----------
    rgb : ndarray of float32, shape (Y, X, 3)
        Image in [0, 1].
    grid_shape : (h, w)
        Patch grid.
    spatial_sigma : float
        Spatial bandwidth relative to the grid diagonal.
    global_weight : float
        Weight ``b >= 0`` of the distance-free part of the spatial term; 0
        gives the purely local graph.

    Returns
    -------
    ndarray of float32, shape (h*w, h*w)
    """
    h, w = grid_shape
    colours = resize(rgb, (h, w)).reshape(h * w, -1).astype(np.float32)
    grid = colours.reshape(h, w, -1)
    steps = np.concatenate(
        [
            np.linalg.norm(np.diff(grid, axis=0), axis=-1).ravel(),
            np.linalg.norm(np.diff(grid, axis=1), axis=-1).ravel(),
        ]
    )
    sigma_c = max(0.1, float(np.median(steps)) * 2.0) if steps.size else 0.1
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    diag = float(np.hypot(h, w))
    pos = np.stack([yy.ravel(), xx.ravel()], 1) / diag
    sq_c = _sq_dists(colours)
    sq_x = _sq_dists(pos)
    if global_weight < 0:
        raise ValueError(f"global_weight must be >= 0, got {global_weight}")
    spatial = np.exp(-sq_x / (2 * spatial_sigma**2))
    if global_weight:
        spatial += np.float32(global_weight)
    logits = -sq_c / (2 * sigma_c**2) + np.log(spatial, out=spatial)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    return normalize_rows(logits.astype(np.float32, copy=False))


def _sq_dists(x: NDArray[np.float32]) -> NDArray[np.float32]:
    """Pairwise squared Euclidean distances, clipped at 0."""
    sq = (x * x).sum(1)
    d = sq[:, None] + sq[None, :] - 2 * (x @ x.T)
    return np.maximum(d, 0, out=d)
