"""The locality null of a patch graph in torch, on the graph's device (issue 11 and 14).

The torch twin of :func:`napari_diffcut.core.null.offset_kernel` and
:func:`napari_diffcut.core.null.null_affinity`: the graph's spatial kernel
``k(delta)`` (the mean transition probability at grid offset ``delta``) and
the dense content-free graph ``W0_ij = k(x_j - x_i)`` of the automatic
threshold. Both pass over an N x N matrix, so on a GPU they stay there: the
numpy versions would need W copied to the host (64 MiB at 4096 nodes) and
W0 copied back, about 0.15 s of host work per run. The small kernel goes to
the host once, for :class:`~napari_diffcut.core.null.NullModel`'s FFT cut
costs of the few reached nodes.
"""

from __future__ import annotations

import torch

from napari_diffcut.core.null import OFFSET_ROWS


def _offset_index(rows: slice, grid_shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Flat kernel index of ``(y_j - y_i, x_j - x_i)`` for rows ``rows`` and every column j."""
    h, w = grid_shape
    n = h * w
    cols = torch.arange(n, device=device)
    yy, xx = cols // w, cols % w
    r = cols[rows]
    index = (yy[None, :] - yy[r, None] + h - 1) * (2 * w - 1)
    return index + (xx[None, :] - xx[r, None] + w - 1)


def offset_kernel_torch(affinity: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor:
    """Mean transition probability per grid offset, float64, on ``affinity``'s device.

    The same sums as :func:`napari_diffcut.core.null.offset_kernel` (row
    blocks of ``W_ij / d_i`` in float64 added into their offset's bin), so the
    kernels agree to float64 rounding.

    Parameters
    ----------
    affinity : torch.Tensor, shape (N, N)
        Symmetric non-negative W, nodes in row-major order of the grid.
    grid_shape : (h, w)
        Patch grid, ``h * w == N``.

    Returns
    -------
    torch.Tensor of float64, shape (2h - 1, 2w - 1)
        Point-symmetric kernel ``k[dy + h - 1, dx + w - 1]``.

    Examples
    --------
    >>> offset_kernel_torch(torch.ones(4, 4), (2, 2))[0].tolist()
    [0.25, 0.25, 0.25]
    """
    h, w = int(grid_shape[0]), int(grid_shape[1])
    n = h * w
    if tuple(affinity.shape) != (n, n):
        raise ValueError(f"affinity {tuple(affinity.shape)} does not match grid {grid_shape}")
    dev = affinity.device
    degree = affinity.sum(dim=1, dtype=torch.float64)
    degree[degree <= 0] = 1.0
    sums = torch.zeros((2 * h - 1) * (2 * w - 1), dtype=torch.float64, device=dev)
    for start in range(0, n, OFFSET_ROWS):
        rows = slice(start, min(n, start + OFFSET_ROWS))
        walk = affinity[rows].to(torch.float64) / degree[rows, None]
        sums.index_add_(0, _offset_index(rows, (h, w), dev).ravel(), walk.ravel())
    cy = h - torch.arange(-(h - 1), h, device=dev).abs()
    cx = w - torch.arange(-(w - 1), w, device=dev).abs()
    counts = torch.outer(cy, cx).to(torch.float64)
    kernel = sums.reshape(2 * h - 1, 2 * w - 1) / counts
    return 0.5 * (kernel + kernel.flip(0, 1))


def null_affinity_torch(
    kernel: torch.Tensor,
    grid_shape: tuple[int, int],
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense null graph ``W0_ij = k(x_j - x_i)`` (N x N) on ``kernel``'s device.

    ``kernel`` is rounded to ``dtype`` once, then gathered, as
    :func:`napari_diffcut.core.null.null_affinity` does: the entries are equal.
    """
    h, w = int(grid_shape[0]), int(grid_shape[1])
    n = h * w
    flat = kernel.to(dtype).ravel()
    out = torch.empty((n, n), dtype=dtype, device=kernel.device)
    for start in range(0, n, OFFSET_ROWS):
        rows = slice(start, min(n, start + OFFSET_ROWS))
        out[rows] = flat[_offset_index(rows, (h, w), kernel.device)]
    return out
