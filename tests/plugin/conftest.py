"""Fixtures of the napari tests."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def viewer(make_napari_viewer: Any) -> Any:
    """A viewer created hidden and never shown.

    Through napari's own fixture: it gives every test a fresh plugin and
    command registry (a bare ``napari.Viewer`` after a fixture-made one can
    find napari-diffcut's commands registered twice) and closes it afterwards.
    """
    return make_napari_viewer(show=False)
