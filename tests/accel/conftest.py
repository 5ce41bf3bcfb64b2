"""Planted graphs shared by the torch-path tests (compared with the numpy path)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def voronoi_regions(grid: tuple[int, int], n_regions: int, seed: int) -> np.ndarray:
    """Voronoi cells of seeded random points: irregular, unequal planted regions."""
    h, w = grid
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, [h, w], (n_regions, 2))
    yy, xx = np.mgrid[:h, :w]
    d2 = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    return d2.argmin(-1)


def quadrants(grid: tuple[int, int]) -> np.ndarray:
    """Four equal quadrants: a clustered spectrum (three near-equal Fiedler candidates)."""
    h, w = grid
    yy, xx = np.mgrid[:h, :w]
    return (yy >= h // 2).astype(int) * 2 + (xx >= w // 2)


#: (name, grid, regions, planted_transition keywords): the planted graphs of the comparisons.
PLANTED = [
    ("quadrants24", (24, 24), quadrants((24, 24)), {"seed": 0}),
    ("voronoi7_32", (32, 32), voronoi_regions((32, 32), 7, 1), {"seed": 1}),
    ("voronoi5_weak", (28, 36), voronoi_regions((28, 36), 5, 2), {"seed": 2, "strength": 1.5}),
]


@pytest.fixture(params=PLANTED, ids=[p[0] for p in PLANTED])
def planted(request: pytest.FixtureRequest) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """(grid, regions, row-stochastic P) of one planted graph."""
    from napari_diffcut.testing import planted_transition

    _, grid, regions, kw = request.param
    return grid, regions, planted_transition(grid, regions, **kw)
