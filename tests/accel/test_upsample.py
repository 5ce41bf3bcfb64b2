"""Pixel labels in torch against core.upsample.soft_upsample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffcut.accel.upsample import soft_upsample_torch
from napari_diffcut.core.hierarchy import build_tree
from napari_diffcut.core.upsample import soft_upsample
from napari_diffcut.core.walk import walk_affinity


@pytest.mark.parametrize("out_shape", [(96, 96), (200, 130), (7, 5)])
def test_pixel_labels_match_numpy(planted: tuple, out_shape: tuple[int, int]) -> None:
    grid, _, p = planted
    leaf = build_tree(walk_affinity(p, dtype=np.float32), min_size=8, max_depth=4).leaf_of_patch
    ref = soft_upsample(p, leaf, grid, out_shape)
    out = soft_upsample_torch(torch.from_numpy(p), leaf, grid, out_shape, max_elements=1 << 16)
    assert out.dtype == torch.int64 and tuple(out.shape) == out_shape
    assert set(np.unique(out.numpy())) <= set(np.unique(leaf))
    # Same taps and arithmetic; only the region means are summed in another order.
    assert (out.numpy() == ref).mean() >= 0.999


def test_one_region_and_a_wrong_map_fails(planted: tuple) -> None:
    grid, _, p = planted
    n = grid[0] * grid[1]
    out = soft_upsample_torch(torch.from_numpy(p), np.full(n, 7), grid, (20, 20))
    assert torch.all(out == 7)
    # The comparison can fail: labels from a transposed walk disagree.
    leaf = build_tree(walk_affinity(p, dtype=np.float32), min_size=8, max_depth=3).leaf_of_patch
    ref = soft_upsample(p, leaf, grid, (64, 64))
    bad = soft_upsample_torch(torch.from_numpy(np.ascontiguousarray(p.T)), leaf, grid, (64, 64))
    assert (bad.numpy() == ref).mean() < 0.999
