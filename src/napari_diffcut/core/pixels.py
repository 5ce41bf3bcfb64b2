"""The weight-free "pixels" backbone: a transition matrix from colour and position.

It builds a row-stochastic matrix on the same patch grid the diffusion backbone
uses, so the same walk, cut and upsampling run on it. It serves offline
previews, tests, and comparing the cut engine on real images.

The walk is reversible by construction: ``P = D^-1 K`` with a symmetric kernel
``K``, so its stationary distribution is known in closed form,
``pi_i = d_i / sum(d)`` (detailed balance ``pi_i P_ij = K_ij / sum(K) = pi_j
P_ji``), and the random-walk graph of method.md 3.1 ("S1") is exactly
``W = K / sum(K)``. :func:`pixel_graph` returns both, so a caller that has it
needs no eigen solve for pi (:func:`napari_diffcut.core.walk.walk_affinity`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.image import resize

#: Smallest colour bandwidth, in units of the [0, 1] intensity range: below it
#: the sensor noise of smooth regions, not their content, would set the scale.
MIN_COLOUR_SIGMA = 0.1


class PixelGraph(NamedTuple):
    """The pixels backbone on a patch grid (see :func:`pixel_graph`).

    Attributes
    ----------
    affinity : ndarray of float32, shape (N, N)
        ``W = K / sum(K)``: the stationary probability flow of the walk, exactly
        symmetric; what :func:`napari_diffcut.core.walk.build_affinity` would
        build from ``transition`` (``graph="walk"``, ``power=1``).
    transition : ndarray of float32, shape (N, N)
        Row-stochastic ``P = D^-1 K``.
    stationary : ndarray of float64, shape (N,)
        ``pi = d / sum(d)``, the row sums of ``affinity``.
    """

    affinity: NDArray[np.float32]
    transition: NDArray[np.float32]
    stationary: NDArray[np.float64]


def colour_sigma(colours: NDArray[np.float32], grid_shape: tuple[int, int]) -> float:
    """Colour bandwidth ``s_c``: the median colour step between 4-neighbour patches.

    The median heuristic for a Gaussian kernel's bandwidth (the median of the
    distances; e.g. Gretton et al., JMLR 2012, for MMD), restricted to
    neighbouring patches so that it measures the variation *inside* regions
    (noise, texture): boundaries are a minority of neighbour pairs and barely
    move the median. A typical within-region step then keeps weight
    ``exp(-1/2) = 0.61`` and a step of three times that ``0.011``. At least
    :data:`MIN_COLOUR_SIGMA`.

    Issue 11: twice the median (used before) kept 0.88 at the typical step, so
    a contrast of the size of the texture (EM membranes in grainy cell
    interiors) was nearly invisible: the first split of the ISBI 2012 images
    cut only 13-18 % below the locality null (ratio 0.82-0.90, refused by the
    automatic cut); at the median it cuts 49-59 % below (ratio 0.41-0.51).
    Smooth images (the nuclei sets) stay at the floor either way.
    """
    h, w = grid_shape
    grid = np.asarray(colours, np.float32).reshape(h, w, -1)
    steps = np.concatenate(
        [
            np.linalg.norm(np.diff(grid, axis=0), axis=-1).ravel(),
            np.linalg.norm(np.diff(grid, axis=1), axis=-1).ravel(),
        ]
    )
    if not steps.size:
        return MIN_COLOUR_SIGMA
    return max(MIN_COLOUR_SIGMA, float(np.median(steps)))


def pixel_graph(
    rgb: NDArray[np.float32],
    grid_shape: tuple[int, int],
    *,
    spatial_sigma: float = 0.1,
    global_weight: float = 0.2,
) -> PixelGraph:
    """Symmetric graph, transition and stationary distribution from colour and position.

    ``K_ij = exp(-|c_i - c_j|^2 / (2 s_c^2)) * (exp(-|x_i - x_j|^2 / (2 s_x^2)) + b)``
    where ``c`` is the mean colour of a patch, ``x`` its centre in units of the
    grid diagonal, ``s_x = spatial_sigma``, ``b = global_weight`` and ``s_c``
    from :func:`colour_sigma` (contrast adapts per image). ``P = D^-1 K``,
    ``pi = d / sum(d)`` and ``W = K / sum(K)`` (module docstring).

    The constant ``b`` lets the walk jump between patches of the same colour
    anywhere in the image (the long-range relations of a random walk,
    method.md 0.1): objects of one kind that lie apart (nuclei) join one
    segment instead of being cut apart by distance. Measured
    (first 6 images per set, issue 11): median fg/bg mIoU at the automatic cut, b = 0
    -> 0.2: nuclei 0.61 -> 0.78, one-image nuclei 0.42 -> 0.73; EM unchanged.

    The spatial factor is separable, ``exp(-(dy^2 + dx^2) / 2 s^2) =
    g_y(dy) g_x(dx)``, so it is an outer product of two small matrices, and the
    colour factor is summed channel by channel (identical channels, as in a
    grey image, once): no N x N x C temporary and no matrix product with an
    inner dimension of 3 (a slow BLAS case). About 0.1 s at 4096 nodes
    (benchmarks/quality.py).

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
    PixelGraph
    """
    if global_weight < 0:
        raise ValueError(f"global_weight must be >= 0, got {global_weight}")
    h, w = (int(grid_shape[0]), int(grid_shape[1]))
    n = h * w
    colours = resize(rgb, (h, w)).reshape(n, -1).astype(np.float32)
    sigma_c = colour_sigma(colours, (h, w))
    # Two N x N buffers (a third for a second distinct channel): fresh large
    # arrays are page-faulted in, which costs as much as the arithmetic on a
    # busy machine, so everything is computed in place.
    kernel = np.empty((n, n), np.float32)
    _spatial_kernel(h, w, spatial_sigma, global_weight, out=kernel)
    colour = _colour_kernel(colours, sigma_c, out=np.empty((n, n), np.float32))
    kernel *= colour
    degree = kernel.sum(axis=1, dtype=np.float64)
    total = float(degree.sum())
    transition = np.divide(kernel, degree.astype(np.float32)[:, None], out=colour)
    kernel *= np.float32(1.0 / total)  # W = K / sum(K), in place
    return PixelGraph(kernel, transition, degree / total)


def pixel_transition(
    rgb: NDArray[np.float32],
    grid_shape: tuple[int, int],
    *,
    spatial_sigma: float = 0.1,
    global_weight: float = 0.2,
) -> NDArray[np.float32]:
    """Row-stochastic transition between patches from colour and position.

    The ``transition`` of :func:`pixel_graph` (see there for the formula).

    Parameters
    ----------
    rgb : ndarray of float32, shape (Y, X, 3)
        Image in [0, 1].
    grid_shape : (h, w)
        Patch grid.
    spatial_sigma : float
        Spatial bandwidth relative to the grid diagonal.
    global_weight : float
        Weight ``b >= 0`` of the distance-free part of the spatial term.

    Returns
    -------
    ndarray of float32, shape (h*w, h*w)
    """
    return pixel_graph(
        rgb, grid_shape, spatial_sigma=spatial_sigma, global_weight=global_weight
    ).transition


def _spatial_kernel(
    h: int, w: int, sigma: float, offset: float, *, out: NDArray[np.float32]
) -> NDArray[np.float32]:
    """``exp(-|x_i - x_j|^2 / (2 sigma^2)) + offset`` on the (h, w) grid, into ``out`` (N x N).

    Separable: ``g_y(y - y') g_x(x - x')``, one broadcast product into ``out``
    seen as ``(y, x, y', x')`` (node ``i = y * w + x``).
    """
    diag = float(np.hypot(h, w))

    def gauss(m: int) -> NDArray[np.float32]:
        d = (np.arange(m)[:, None] - np.arange(m)[None, :]) / diag
        return np.exp(-(d * d) / (2.0 * sigma**2)).astype(np.float32)

    gy, gx = gauss(h), gauss(w)
    np.multiply(gy[:, None, :, None], gx[None, :, None, :], out=out.reshape(h, w, h, w))
    if offset:
        out += np.float32(offset)
    return out


def _colour_kernel(
    colours: NDArray[np.float32], sigma: float, *, out: NDArray[np.float32]
) -> NDArray[np.float32]:
    """``exp(-|c_i - c_j|^2 / (2 sigma^2))`` into ``out`` (N x N), one channel at a time.

    Identical channels (a grey image as RGB) are summed once, weighted by
    their count.
    """
    scaled = np.asarray(colours, np.float32) / np.float32(np.sqrt(2.0) * sigma)
    channels: list[tuple[NDArray[np.float32], int]] = []
    for c in range(scaled.shape[1]):
        col = np.ascontiguousarray(scaled[:, c])
        for k, (seen, count) in enumerate(channels):
            if np.array_equal(seen, col):
                channels[k] = (seen, count + 1)
                break
        else:
            channels.append((col, 1))
    spare: NDArray[np.float32] | None = None
    for k, (col, count) in enumerate(channels):
        if k == 0:
            target = out
        else:
            spare = np.empty_like(out) if spare is None else spare
            target = spare
        np.subtract.outer(col, col, out=target)
        np.multiply(target, target, out=target)
        if count != 1:
            target *= np.float32(count)
        if k:
            out += target
    del spare
    np.negative(out, out=out)
    return np.exp(out, out=out)
