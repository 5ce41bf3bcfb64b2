"""Run the Examples sections of the core docstrings."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "napari_diffcut.core.walk",
        "napari_diffcut.core.ncut",
        "napari_diffcut.core.hierarchy",
        "napari_diffcut.core.image",
        "napari_diffcut.large.dispatch",
    ],
)
def test_doctests(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0
