"""Shared fixtures: synthetic images, block transition matrices, tiny random SD models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from napari_diffcut.testing import planted_transition  # noqa: F401 - used by tests

if TYPE_CHECKING:
    from napari_diffcut.pipeline.segmentation import Segmentation


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def quadrant_regions() -> np.ndarray:
    """24 x 24 grid, four quadrants (ids 0..3)."""
    yy, xx = np.mgrid[:24, :24]
    return (yy >= 12).astype(int) * 2 + (xx >= 12)


@pytest.fixture
def quadrant_transition(quadrant_regions: np.ndarray) -> np.ndarray:
    return planted_transition((24, 24), quadrant_regions)


@pytest.fixture
def two_tone_image() -> np.ndarray:
    """RGB uint8 image, dark left half, bright disc on the right."""
    img = np.zeros((96, 144, 3), np.uint8)
    img[:, :] = (30, 40, 60)
    yy, xx = np.mgrid[:96, :144]
    img[(yy - 48) ** 2 + (xx - 100) ** 2 < 30**2] = (220, 180, 160)
    return img


def _three_region_image() -> np.ndarray:
    img = np.zeros((40, 56, 3), np.uint8)
    img[:, 28:] = 200
    img[4:18, 4:18] = (200, 0, 0)
    img[24:36, 34:50] = (0, 0, 150)
    return img


@pytest.fixture
def three_regions() -> np.ndarray:
    """RGB uint8, 40 x 56: dark left, grey right half, a red and a blue square."""
    return _three_region_image()


@pytest.fixture(scope="module")
def pixels_seg() -> Segmentation:
    """A real three-level result of the weight-free backbone on ``three_regions``."""
    import napari_diffcut

    return napari_diffcut.segment(
        _three_region_image(),
        backbone="pixels",
        working_size=128,
        min_size=4,
        max_depth=3,
        threshold=0.9,
        # Patch-grid edges: threshold 0.9 keeps splits through flat regions, whose small
        # leaves PAMR may absorb; the editing tests want every leaf on the pixel map.
        refine=False,
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD folder (diffusers layout, safetensors), loaded like a real one."""
    from napari_diffcut.testing import make_random_model

    return make_random_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_sd2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD 2.x-style model (fixed head dimension, linear projections, upcast attention)."""
    from napari_diffcut.testing import make_random_model

    return make_random_model(tmp_path_factory.mktemp("models") / "tiny_sd2", "tiny-sd2")
