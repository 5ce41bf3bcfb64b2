"""Shared fixtures: synthetic images, block transition matrices, tiny random SD models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def planted_transition(
    grid: tuple[int, int],
    regions: np.ndarray,
    *,
    locality: float = 50.0,
    strength: float = 3.0,
    noise: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Attention-like row-stochastic matrix: spatially local + planted regions + noise."""
    h, w = grid
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    pos = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32)
    d2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    same = regions.ravel()[:, None] == regions.ravel()[None]
    logits = -d2 / locality + strength * same + r.normal(0, noise, d2.shape)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


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
