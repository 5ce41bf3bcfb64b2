"""Channels, bit depth and normalisation (core/image.py) and the channel axis rules."""

from __future__ import annotations

import numpy as np
import pytest

from napari_diffcut.core.image import (
    channel_limits,
    latent_grid,
    pick_channels,
    resolve_channel_axis,
    to_rgb,
)


@pytest.mark.parametrize(
    ("shape", "kwargs", "expected"),
    [
        ((64, 80), {}, None),  # grey
        ((64, 80, 3), {}, 2),  # RGB
        ((64, 80, 4), {}, 2),  # RGBA
        ((64, 80, 2), {}, 2),  # two fluorescence channels
        ((5, 64, 80), {}, None),  # Z stack of 5 planes
        ((3, 64, 80), {}, None),  # channels first is a stack unless told
        ((3, 64, 80), {"channel_axis": 0}, 0),
        ((2, 5, 64, 80), {"channel_axis": 1}, 1),  # ZCYX
        ((2, 5, 64, 80), {"channel_axis": -3}, 1),
        ((7, 64, 80, 3), {}, 3),  # stack of RGB planes
        ((64, 80, 8), {"channels": [0, 5, 7]}, 2),  # 2-D multichannel, channels picked
        ((64, 80, 3), {"channel_axis": "none"}, None),  # forced: 64 planes of 80 x 3
    ],
)
def test_channel_axis_rules(shape: tuple, kwargs: dict, expected: int | None) -> None:
    assert resolve_channel_axis(shape, **kwargs) == expected


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        ((64, 80, 8), {}, "last axis of 8"),  # channels or a narrow image? must say
        ((64, 80), {"channel_axis": 0}, "channel_axis must be an axis"),
        ((4, 64, 80), {"channel_axis": 3}, "channel_axis must be an axis"),
        ((4, 64, 80), {"channel_axis": "last"}, "channel_axis must be an int"),
        ((4, 64, 80), {"channel_axis": 1.5}, "channel_axis must be an axis"),
    ],
)
def test_channel_axis_errors(shape: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_channel_axis(shape, **kwargs)


def test_pick_channels_defaults_and_errors() -> None:
    assert pick_channels(1) == [0]
    assert pick_channels(3) == [0, 1, 2]
    assert pick_channels(4) == [0, 1, 2]  # RGBA drops alpha
    assert pick_channels(6) == [0, 1, 2]
    assert pick_channels(6, [5, -1, 0]) == [5, 5, 0]
    for bad in ([], [0, 1, 2, 3], [6]):
        with pytest.raises(ValueError, match="channels must list 1 to 3"):
            pick_channels(6, bad)


def _ramp(dtype: type, top: float) -> np.ndarray:
    return np.linspace(0, top, 100 * 120).reshape(100, 120).astype(dtype)


@pytest.mark.parametrize(("dtype", "top"), [(np.uint16, 65535), (np.uint16, 4095),
                                             (np.float32, 1e-3), (np.int32, -5e6)])
def test_percentile_normalisation_any_bit_depth(dtype: type, top: float) -> None:
    """16-bit, 12-bit in 16-bit, small floats, negative ints: same result, 1..99.8 %."""
    rgb = to_rgb(_ramp(dtype, top))
    assert rgb.shape == (100, 120, 3) and rgb.dtype == np.float32
    grey = rgb[..., 0]
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])  # grey composite
    assert grey.min() == 0 and grey.max() == 1
    # About 1 % of pixels at or below the low limit, 0.2 % at or above the high one.
    assert 0.005 < (grey == 0).mean() < 0.02
    assert 0.0005 < (grey == 1).mean() < 0.005
    reference = to_rgb(_ramp(np.float64, 1.0))[..., 0]
    np.testing.assert_allclose(np.sort(grey.ravel()), np.sort(reference.ravel()), atol=2e-3)


def test_uint8_is_display_range_and_rgba_drops_alpha() -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    rgb = to_rgb(rgba)
    np.testing.assert_allclose(rgb, rgba[..., :3] / 255.0, atol=1e-7)
    other_alpha = rgba.copy()
    other_alpha[..., 3] = 7
    np.testing.assert_array_equal(to_rgb(other_alpha), rgb)


def test_multichannel_16bit_pick_and_two_channels() -> None:
    img = np.zeros((40, 50, 5), np.uint16)
    img[..., 1] = 1000
    img[10:30, 10:30, 1] = 30000
    img[..., 4] = np.arange(50, dtype=np.uint16)[None] * 100
    rgb = to_rgb(img, channels=[4, 1])  # two channels: red and green, blue empty
    assert rgb.shape == (40, 50, 3)
    assert rgb[..., 2].max() == 0
    assert rgb[20, 20, 1] == 1 and rgb[0, 0, 1] == 0
    assert rgb[0, 49, 0] == 1 and rgb[0, 0, 0] == 0


def test_contrast_limits_scalar_and_per_channel() -> None:
    img = np.full((8, 8, 2), 150, np.uint16)
    img[..., 1] = 300
    one = to_rgb(img, contrast_limits=(100, 200))
    assert np.allclose(one[..., 0], 0.5) and np.allclose(one[..., 1], 1.0)
    per = to_rgb(img, contrast_limits=[(100, 200), (0, 600)])
    assert np.allclose(per[..., 0], 0.5) and np.allclose(per[..., 1], 0.5)
    with pytest.raises(ValueError, match="contrast_limits"):
        to_rgb(img, contrast_limits=[(0, 1), (0, 1), (0, 1)])


def test_channel_limits_match_to_rgb() -> None:
    rng = np.random.default_rng(1)
    img = rng.gamma(2.0, 500, (64, 64, 2)).astype(np.uint16)
    lim = channel_limits(img)
    assert lim.shape == (2, 2) and (lim[:, 0] < lim[:, 1]).all()
    np.testing.assert_allclose(to_rgb(img, contrast_limits=lim), to_rgb(img), atol=1e-6)
    np.testing.assert_array_equal(channel_limits(img.astype(np.uint8)), [[0, 255], [0, 255]])
    np.testing.assert_allclose(channel_limits(img, None)[0], [img[..., 0].min(), img[..., 0].max()])


@pytest.mark.parametrize("shape", [(480, 640), (300, 2000), (2000, 300), (100, 101)])
def test_latent_grid_keeps_aspect(shape: tuple[int, int]) -> None:
    gh, gw = latent_grid(shape, 64)
    assert gh % 8 == 0 and gw % 8 == 0
    aspect, grid_aspect = shape[1] / shape[0], gw / gh
    # Sides are rounded to multiples of 8 latent cells; never stretched further than that.
    assert abs(np.log(grid_aspect / aspect)) < np.log((min(gh, gw) + 8) / min(gh, gw))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile_overlap": 10}, "tile_overlap must be"),  # no tile_size
        ({"tile_size": 256, "tile_overlap": 200}, "tile_overlap must be"),
        ({"tile_size": 32}, "tile_size must be an integer >= 64"),
        ({"working_size": 8}, "working_size must be an integer >= 64"),
        ({"channel_axis": "first"}, "channel_axis must be an int"),
        ({"consistent_stack": "yes"}, "consistent_stack must be"),
        ({"memory_budget": 0}, "memory_budget must be"),
    ],
)
def test_large_image_settings_are_validated(kwargs: dict, match: str) -> None:
    from napari_diffcut import Settings

    with pytest.raises(ValueError, match=match):
        Settings(**kwargs)


def test_large_image_settings_round_trip_json() -> None:
    import json

    from napari_diffcut import Settings

    s = Settings(channel_axis="NONE", tile_size=512, tile_overlap=32, working_size=256,
                 consistent_stack=True, memory_budget=64, channels=(2, 0))
    assert s.channel_axis == "none"
    back = Settings.from_dict(json.loads(json.dumps(s.as_dict())))
    assert back == s


def test_dim_uint8_is_stretched_like_16_bit() -> None:
    """Issue 11 part 4: a uint8 image using a tenth of the range gets the percentile window."""
    from napari_diffcut.core.image import DIM_UINT8_LEVEL, intensity_rule, is_dim_uint8

    rng = np.random.default_rng(2)
    dim = rng.integers(2, 8, (60, 70)).astype(np.uint8)  # background
    dim[20:35, 20:40] = rng.integers(18, 26, (15, 20))  # nuclei at a tenth of the range
    assert is_dim_uint8(dim) and intensity_rule(dim) == "percentiles"
    grey = to_rgb(dim)[..., 0]
    np.testing.assert_allclose(grey, to_rgb(dim.astype(np.uint16))[..., 0], atol=1e-6)
    assert grey.max() == 1 and grey[25, 30] > 0.6  # stretched, not 25 / 255
    np.testing.assert_allclose(channel_limits(dim), channel_limits(dim.astype(np.uint16)))
    assert intensity_rule(dim, None) == "minmax" and to_rgb(dim, normalize=None).max() == 1
    # Bright uint8 (photographs, well-exposed fluorescence) stays / 255.
    bright = (dim * 10).astype(np.uint8)
    assert not is_dim_uint8(bright) and intensity_rule(bright) == "uint8"
    np.testing.assert_allclose(to_rgb(bright)[..., 0], bright / 255.0, atol=1e-7)
    # The rule looks at all picked channels together, at the high percentile.
    level = int(DIM_UINT8_LEVEL)
    edge = np.full((10, 10, 3), level - 1, np.uint8)
    assert is_dim_uint8(edge) and not is_dim_uint8(edge + 1)
    assert not is_dim_uint8(dim.astype(np.uint16)) and not is_dim_uint8(np.zeros((0,), np.uint8))
