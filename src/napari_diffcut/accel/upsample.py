"""Pixel labels in torch: attention-weighted soft upsampling and argmax (method.md 7, option 2).

The torch twin of :func:`napari_diffcut.core.upsample.soft_upsample`: per
region, the mean walk row over its patches (where a walker started in the
region lands), bilinearly upsampled with ``align_corners=False`` taps and
the same separable arithmetic (rows first, then columns, float32), then the
argmax per pixel (first index among ties, as numpy). On a GPU every map is
evaluated at every pixel, in row chunks that bound the buffer; the numpy
path's cell pruning (which gives the same result) pays on a CPU only.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray


def bilinear_taps(
    n_out: int, n_in: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """Indices (lo, hi) and the weight of hi of ``align_corners=False`` bilinear sampling.

    Output sample i sits at input coordinate ``(i + 0.5) n_in / n_out - 0.5``,
    clamped to the edge samples (the taps of ``core.upsample``).
    """
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def region_maps_torch(
    walk: torch.Tensor, region_of_patch: torch.Tensor, n_regions: int
) -> torch.Tensor:
    """Mean walk row per region, shape (n_regions, N), float32 (one matmul with an indicator)."""
    n = region_of_patch.shape[0]
    counts = torch.bincount(region_of_patch, minlength=n_regions).to(torch.float32)
    counts[counts == 0] = 1
    indicator = torch.zeros((n_regions, n), dtype=torch.float32, device=walk.device)
    cols = torch.arange(n, device=walk.device)
    indicator[region_of_patch, cols] = 1.0 / counts[region_of_patch]
    return indicator @ walk.to(torch.float32)


def soft_upsample_torch(
    walk: torch.Tensor,
    region_of_patch: torch.Tensor | NDArray[np.int64],
    grid_shape: tuple[int, int],
    out_shape: tuple[int, int],
    *,
    max_elements: int = 1 << 24,
) -> torch.Tensor:
    """Pixel-level region index for an output image of ``out_shape``, on ``walk``'s device.

    Parameters
    ----------
    walk : torch.Tensor, shape (N, N)
        Row-stochastic walk matrix on the patch grid.
    region_of_patch : int tensor or ndarray, shape (N,)
        Region id of each patch (e.g. ``TreeArrays.leaf_of_patch``).
    grid_shape : (h, w)
        Patch grid, ``h * w == N``.
    out_shape : (H, W)
        Output size.
    max_elements : int
        Bound of the transient regions x rows x W buffer.

    Returns
    -------
    torch.Tensor of int64, shape (H, W)
        Region id per pixel (the values of ``region_of_patch``).
    """
    dev = walk.device
    if not isinstance(region_of_patch, torch.Tensor):
        region_of_patch = torch.from_numpy(np.asarray(region_of_patch, np.int64))
    regions = region_of_patch.to(device=dev, dtype=torch.int64)
    uniq, compact = torch.unique(regions.ravel(), return_inverse=True)
    k = int(uniq.numel())
    if k == 1:
        return torch.full(tuple(out_shape), int(uniq[0]), dtype=torch.int64, device=dev)
    h, w = grid_shape
    maps = region_maps_torch(walk, compact, k).reshape(k, h, w)
    return uniq[upsample_argmax_torch(maps, out_shape, max_elements=max_elements)]


def upsample_argmax_torch(
    maps: torch.Tensor, out_shape: tuple[int, int], *, max_elements: int = 1 << 24
) -> torch.Tensor:
    """Per pixel, the index of the largest bilinearly upsampled map (dense, in row chunks).

    ``value = (1 - a) * ((1 - b) m[y0, x0] + ...)`` evaluated as the numpy path
    does: along rows, ``(1 - a) m[y0] + a m[y1]``, then along columns.
    """
    k, h, w = maps.shape
    big_h, big_w = out_shape
    dev = maps.device
    y0, y1, wy = (torch.from_numpy(t).to(dev) for t in bilinear_taps(big_h, h))
    x0, x1, wx = (torch.from_numpy(t).to(dev) for t in bilinear_taps(big_w, w))
    out = torch.empty((big_h, big_w), dtype=torch.int64, device=dev)
    step = max(1, max_elements // max(1, k * big_w))
    for start in range(0, big_h, step):
        rows = slice(start, min(big_h, start + step))
        a = wy[rows][None, :, None]
        along_y = (1 - a) * maps[:, y0[rows], :] + a * maps[:, y1[rows], :]  # (k, r, w)
        values = (1 - wx) * along_y[:, :, x0] + wx * along_y[:, :, x1]  # (k, r, W)
        out[rows] = values.argmax(dim=0)
    return out
