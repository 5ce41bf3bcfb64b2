"""Null model of a patch graph: the same locality, no content (issue 11, part 1).

A random walk that only knows *where* patches are, not *what* they show,
still has a cheap cut: a spatially local walk escapes a half-plane slowly, so
a straight cut through a uniform region costs NCut 0.3-0.5, far below the
"structureless cost 1" of a walk without locality (method.md 3.1, section 6
"Measured on real images"). To tell structure from tiling, a split is
compared with what the *same* split costs in a graph that has the graph's own
spatial kernel and nothing else.

The null graph (:func:`offset_kernel`): the mean transition probability
``k(delta) = mean_{j - i = delta} P_ij`` of the walk ``P = D^-1 W`` over all
patch pairs at grid offset ``delta``, symmetrised (``k(delta) = k(-delta)``).
``W0_ij = k(x_j - x_i)`` is translation invariant: a stationary walk with
exactly the locality profile of the real one, averaged over the image, so
every region boundary and every colour is averaged away. For the
content-free walks of the issue (constant image, noise, a Gaussian-in-distance
softmax) ``W`` is itself close to such a ``W0``.

The null cost of a node's split (:func:`null_cut_costs`) is the NCut of the
same two node sets under ``W0`` restricted to the node (edges to the outside
dropped, as the tree does for ``W``; Shi & Malik 2000). ``W0`` is a
convolution, so every sum is an FFT convolution of a mask image with the
kernel: O(N log N) per node, no N x N matrix.

The ratio ``cost / null_cost`` is then the fraction of the crossing flow that
locality alone predicts and that the graph actually carries (Meila & Shi
2001: NCut = escape probability of the stationary walk). Near 1 the split is
explained by distance alone; a real boundary blocks most of it.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

#: Rows of the walk processed at a time by the torch twin
#: (:mod:`napari_diffcut.accel.null`; bounds its index temporaries at
#: ``OFFSET_ROWS * N`` entries).
OFFSET_ROWS = 256


def offset_kernel(
    affinity: NDArray[np.floating], grid_shape: tuple[int, int]
) -> NDArray[np.float64]:
    """Mean transition probability per grid offset (the graph's spatial kernel).

    One pass over W by grid rows: the ``w`` rows of grid row ``y``, divided by
    their degrees and seen as ``(x, y', x')``, are added to the running
    ``(dy, x, x')`` sums of ``dy = y' - y``; the diagonals ``x' - x = dx`` of
    those sums are the kernel's bins. No index array, no ``bincount`` (about 3x
    faster than binning every entry at 4096 nodes).

    Parameters
    ----------
    affinity : ndarray, shape (N, N)
        Symmetric non-negative W with positive row sums, nodes in row-major
        order of the ``(h, w)`` grid.
    grid_shape : (h, w)
        Patch grid, ``h * w == N``.

    Returns
    -------
    ndarray of float64, shape (2h - 1, 2w - 1)
        ``k[dy + h - 1, dx + w - 1]`` = mean of ``W_ij / d_i`` over the pairs
        with ``(y_j - y_i, x_j - x_i) = (dy, dx)``; point-symmetric
        (``k(delta) = k(-delta)``), so that ``W0_ij = k(x_j - x_i)`` is symmetric.

    Examples
    --------
    >>> w = np.ones((4, 4))
    >>> offset_kernel(w, (2, 2)).round(2)
    array([[0.25, 0.25, 0.25],
           [0.25, 0.25, 0.25],
           [0.25, 0.25, 0.25]])
    """
    h, w = (int(grid_shape[0]), int(grid_shape[1]))
    n = h * w
    if affinity.shape != (n, n):
        raise ValueError(f"affinity {affinity.shape} does not match grid {grid_shape}")
    degree = np.asarray(affinity.sum(axis=1, dtype=np.float64))
    degree[degree <= 0] = 1.0
    by_row = np.zeros((2 * h - 1, w, w), np.float64)  # [dy + h - 1, x, x']
    for y in range(h):
        rows = slice(y * w, (y + 1) * w)
        walk = np.asarray(affinity[rows], np.float64) / degree[rows, None]  # (x, N)
        by_row[h - 1 - y : 2 * h - 1 - y] += walk.reshape(w, h, w).transpose(1, 0, 2)
    sums = np.empty((2 * h - 1, 2 * w - 1), np.float64)
    for dx in range(-(w - 1), w):
        sums[:, dx + w - 1] = np.trace(by_row, offset=dx, axis1=1, axis2=2)
    kernel = sums / _offset_counts(h, w)
    return 0.5 * (kernel + kernel[::-1, ::-1])


def _offset_counts(h: int, w: int) -> NDArray[np.float64]:
    """Number of ordered patch pairs at each offset of an (h, w) grid."""
    cy = h - np.abs(np.arange(-(h - 1), h))
    cx = w - np.abs(np.arange(-(w - 1), w))
    return np.outer(cy, cx).astype(np.float64)


def _fft_shape(h: int, w: int) -> tuple[int, int]:
    """FFT size for a linear (not circular) convolution of an (h, w) image with the kernel."""
    from scipy.fft import next_fast_len

    return next_fast_len(2 * h - 1 + h - 1), next_fast_len(2 * w - 1 + w - 1)


class NullModel:
    """Cut costs of node sets under the content-free graph ``W0_ij = k(x_j - x_i)``.

    Parameters
    ----------
    kernel : ndarray, shape (2h - 1, 2w - 1)
        From :func:`offset_kernel`.
    grid_shape : (h, w)
        Patch grid.
    """

    def __init__(self, kernel: NDArray[np.float64], grid_shape: tuple[int, int]) -> None:
        from scipy.fft import rfft2

        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        h, w = self.grid_shape
        if kernel.shape != (2 * h - 1, 2 * w - 1):
            raise ValueError(f"kernel {kernel.shape} does not match grid {grid_shape}")
        self._shape = _fft_shape(h, w)
        self.kernel = np.asarray(kernel, np.float64)
        self._kernel_f = rfft2(self.kernel, s=self._shape)
        self._dense: NDArray[np.float32] | None = None
        self._dense_row_sums: NDArray[np.float64] | None = None

    @property
    def dense(self) -> NDArray[np.float32]:
        """The null graph as a dense float32 matrix (built on first use, then kept)."""
        if self._dense is None:
            self._dense = null_affinity(self.kernel, self.grid_shape)
        return self._dense

    @property
    def dense_row_sums(self) -> NDArray[np.float64]:
        """float64 row sums of :attr:`dense` (computed on first use, then kept)."""
        if self._dense_row_sums is None:
            self._dense_row_sums = self.dense.sum(axis=1, dtype=np.float64)
        return self._dense_row_sums

    def smooth(self, mask: NDArray[np.bool_]) -> NDArray[np.float64]:
        """``(W0 1_mask)_i`` for every patch i, as an (h, w) image."""
        from scipy.fft import irfft2, rfft2

        h, w = self.grid_shape
        image = np.asarray(mask, np.float64).reshape(h, w)
        full = irfft2(rfft2(image, s=self._shape) * self._kernel_f, s=self._shape)
        # Linear convolution: output index (y + h - 1, x + w - 1) is patch (y, x).
        return full[h - 1 : 2 * h - 1, w - 1 : 2 * w - 1]

    def ncut(self, side_a: NDArray[np.bool_], side_b: NDArray[np.bool_]) -> float:
        """NCut of the split (A, B) of the node A | B under W0 restricted to A | B.

        ``cut = 1_A^T W0 1_B``, ``vol(X) = 1_X^T W0 1_(A|B)`` (Shi & Malik 2000, eq. 2).
        """
        a = np.asarray(side_a, bool).ravel()
        b = np.asarray(side_b, bool).ravel()
        to_b = self.smooth(b).ravel()
        to_a = self.smooth(a).ravel()
        cut = float(to_b[a].sum())
        vol_a = cut + float(to_a[a].sum())
        vol_b = cut + float(to_b[b].sum())
        if vol_a <= 0 or vol_b <= 0:
            return float("nan")
        return max(cut / vol_a + cut / vol_b, 0.0)


def null_affinity(
    kernel: NDArray[np.float64], grid_shape: tuple[int, int], dtype: type[np.floating] = np.float32
) -> NDArray[np.floating]:
    """The dense null graph ``W0_ij = k(x_j - x_i)`` (N x N), for eigen solves on node sets.

    ``W0`` is block Toeplitz with Toeplitz blocks: the block of grid rows
    ``(y, y')`` is the ``w x w`` Toeplitz matrix of kernel row ``y' - y``, so
    the ``2h - 1`` blocks are built once and each grid row of ``W0`` is one
    contiguous copy of ``h`` of them.
    """
    h, w = (int(grid_shape[0]), int(grid_shape[1]))
    n = h * w
    k = np.asarray(kernel, dtype).reshape(2 * h - 1, 2 * w - 1)
    blocks = k[:, np.arange(w)[None, :] - np.arange(w)[:, None] + w - 1]  # [dy + h - 1, x, x']
    out = np.empty((h, w, h, w), dtype)
    for y in range(h):
        out[y] = blocks[h - 1 - y : 2 * h - 1 - y].transpose(1, 0, 2)
    return out.reshape(n, n)


def null_model(affinity: NDArray[np.floating], grid_shape: tuple[int, int]) -> NullModel:
    """The content-free graph with ``affinity``'s own spatial kernel (see module docstring)."""
    return NullModel(offset_kernel(affinity, grid_shape), grid_shape)
