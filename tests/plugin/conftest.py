"""Fixtures of the napari tests."""

from __future__ import annotations

from collections.abc import Iterator

import napari
import pytest


@pytest.fixture
def viewer() -> Iterator[napari.Viewer]:
    """A viewer created hidden and never shown."""
    v = napari.Viewer(show=False)
    try:
        yield v
    finally:
        v.close()
