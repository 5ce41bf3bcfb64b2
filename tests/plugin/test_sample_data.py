"""Synthetic sample images: seeded, made in code, and containing what they claim."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from scipy import ndimage

from napari_diffcut.plugin import sample_data as _sample_data
from napari_diffcut.plugin.sample_data import (
    blood_smear,
    fluorescence_nuclei,
    make_blood_smear,
    make_nuclei,
)


def test_smear_is_seeded_rgb_uint8() -> None:
    a, ca = make_blood_smear(128, seed=3)
    b, cb = make_blood_smear(128, seed=3)
    c, _ = make_blood_smear(128, seed=4)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ca, cb)
    assert not np.array_equal(a, c)


def test_smear_has_red_cells_and_one_white_cell_with_nucleus() -> None:
    image, classes = make_blood_smear()
    rgb = image.astype(float)
    mean = {k: rgb[classes == k].mean(axis=0) for k in range(4)}
    # Red cells are redder than the background (R - G larger).
    assert mean[1][0] - mean[1][1] > mean[0][0] - mean[0][1] + 50
    # Several separate red cells.
    _, n_red = ndimage.label(classes == 1)
    assert n_red >= 6
    # Exactly one white cell, its nucleus inside it and darker than its cytoplasm.
    white = classes >= 2
    _, n_white = ndimage.label(white)
    assert n_white == 1
    nucleus = classes == 3
    assert nucleus.any() and not (nucleus & ~white).any()
    assert mean[3].sum() < mean[2].sum() - 150
    # The nucleus is purple: blue above green.
    assert mean[3][2] > mean[3][1] + 40


def test_nuclei_are_16_bit_and_brighter_than_background() -> None:
    image, instances = make_nuclei(seed=2)
    assert image.dtype == np.uint16 and image.ndim == 2
    assert image.max() > 255  # really needs more than 8 bits
    assert instances.max() >= 5
    inside = image[instances > 0].astype(float)
    outside = image[instances == 0].astype(float)
    assert np.median(inside) > 3 * np.median(outside)
    np.testing.assert_array_equal(make_nuclei(seed=2)[0], image)


@pytest.mark.parametrize("size", [10, 63, 64.5, True])
def test_bad_size(size: object) -> None:
    with pytest.raises(ValueError, match="size must be an integer >= 64"):
        make_blood_smear(size)  # type: ignore[arg-type]


def test_sample_commands_return_layer_data() -> None:
    [(smear, smear_kw, smear_kind)] = blood_smear()
    assert smear_kind == "image" and smear_kw["rgb"] is True
    assert smear.shape[-1] == 3
    [(nuclei, nuclei_kw, nuclei_kind)] = fluorescence_nuclei()
    assert nuclei_kind == "image" and nuclei.dtype == np.uint16
    low, high = nuclei_kw["contrast_limits"]
    assert nuclei.min() <= low < high <= nuclei.max()


def test_doctests() -> None:
    result = doctest.testmod(_sample_data, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_open_sample_through_napari(make_napari_viewer_proxy) -> None:
    viewer = make_napari_viewer_proxy()
    layers = viewer.open_sample("napari-diffcut", "blood_smear")
    assert [lay.name for lay in layers] == ["synthetic blood smear"]
    assert layers[0].rgb
    layers = viewer.open_sample("napari-diffcut", "nuclei")
    assert layers[0].data.dtype == np.uint16
