"""Tiny random-weight folders of the other checkpoint families (SDXL-class, SD 2.x v-prediction).

Built with :func:`napari_diffcut.testing.make_random_model`, saved with
``save_pretrained`` and loaded through the real loader, like ``tiny_model``.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _build(factory: pytest.TempPathFactory, config: str) -> Path:
    from napari_diffcut.testing import make_random_model

    return make_random_model(factory.mktemp("models") / config, config)


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SDXL layout: two text encoders, text_time added embedding, attention at 1/2 and 1/4."""
    return _build(tmp_path_factory, "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_ssd1b_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Distilled-SDXL layout (SSD-1B / Vega): uneven up-block depths, no mid-block attention."""
    return _build(tmp_path_factory, "tiny-ssd1b")


@pytest.fixture(scope="session")
def tiny_sd2_v_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 2.x layout with a v-prediction scheduler (the 768 px SD 2.x checkpoints)."""
    return _build(tmp_path_factory, "tiny-sd2-v")
