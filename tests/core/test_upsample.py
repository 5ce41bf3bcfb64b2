"""Leaves to pixels by soft upsampling (core/upsample.py)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_diffcut.core import upsample
from napari_diffcut.core.upsample import region_maps, soft_upsample, upsample_argmax
from napari_diffcut.testing import planted_transition


def _dense_reference(maps: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """argmax over maps of the bilinear (align_corners=False) upsampling, all pixels."""
    k, h, w = maps.shape
    y0, y1, wy = upsample._bilinear_taps(out_shape[0], h)
    x0, x1, wx = upsample._bilinear_taps(out_shape[1], w)
    a = wy[None, :, None]
    my = (1 - a) * maps[:, y0, :] + a * maps[:, y1, :]
    return np.argmax((1 - wx) * my[:, :, x0] + wx * my[:, :, x1], axis=0)


@pytest.mark.parametrize("out_shape", [(64, 64), (100, 37), (5, 9)])
def test_pruned_argmax_equals_the_dense_one(
    monkeypatch: pytest.MonkeyPatch, out_shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((6, 8, 8)).astype(np.float32) ** 4  # peaked: many uniform cells
    monkeypatch.setattr(upsample, "DENSE_ELEMENTS", 0)  # force the cell-pruned path
    expected = _dense_reference(maps, out_shape)
    np.testing.assert_array_equal(upsample_argmax(maps, out_shape), expected)


def test_region_maps_are_mean_walk_rows() -> None:
    rng = np.random.default_rng(1)
    walk = rng.random((12, 12)).astype(np.float32)
    region = np.array([0, 0, 1, 2, 2, 2, 1, 0, 1, 2, 0, 1])
    maps = region_maps(walk, region, 4)  # region 3 is empty
    for r in range(3):
        np.testing.assert_allclose(maps[r], walk[region == r].mean(0), rtol=1e-6)
    assert (maps[3] == 0).all()


def test_soft_upsample_keeps_planted_regions_and_leaf_ids() -> None:
    grid = (8, 8)
    regions = np.zeros(grid, np.int64)
    regions[:, 4:] = 1
    walk = planted_transition(grid, regions, noise=0.2)
    leaf = np.where(regions.ravel() == 1, 17, 4)  # any leaf ids
    px = soft_upsample(walk, leaf, grid, (64, 64))
    assert set(np.unique(px)) == {4, 17}
    np.testing.assert_array_equal(px[:, :28], 4)  # far from the boundary: the region's leaf
    np.testing.assert_array_equal(px[:, 36:], 17)
    assert (soft_upsample(walk, np.full(64, 9), grid, (16, 16)) == 9).all()
