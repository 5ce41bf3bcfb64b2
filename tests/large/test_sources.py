"""Lazy inputs: dask and zarr stacks one plane at a time, multiscale lists, lazy labels."""

from __future__ import annotations

import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from napari_diffcut import Segmentation, segment
from napari_diffcut.core.image import resize, to_rgb
from napari_diffcut.core.upsample import soft_upsample
from napari_diffcut.large.sources import ImageSource, choose_level, is_multiscale, open_image
from napari_diffcut.pipeline.segmentation import LazySegmentation, leaf_window

FAST = {"backbone": "pixels", "working_size": 128, "min_size": 4}


def blob_plane(i: int, shape: tuple[int, int] = (80, 120)) -> np.ndarray:
    """uint16 plane with a bright disc that moves with ``i``."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    plane = np.full(shape, 1000, np.uint16)
    plane[(yy - 40) ** 2 + (xx - 40 - 8 * i) ** 2 < 18**2] = 20000
    return plane


def test_dask_stack_reads_one_plane_at_a_time() -> None:
    """Each plane is loaded once, and never two planes are alive at the same time."""
    import dask
    import dask.array as da

    n, shape = 5, (80, 120)
    loads: Counter[int] = Counter()
    alive = [0]
    peak = [0]

    def release() -> None:
        alive[0] -= 1

    def load(i: int) -> np.ndarray:
        loads[i] += 1
        plane = blob_plane(i, shape)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(plane, release)
        return plane

    planes = [da.from_delayed(dask.delayed(load)(i), shape, np.uint16) for i in range(n)]
    stack = da.stack(planes)
    assert loads == Counter()  # building the graph reads nothing
    seg = segment(stack, **FAST)
    assert dict(loads) == dict.fromkeys(range(n), 1)
    assert peak[0] == 1 and alive[0] == 0
    assert seg.labels.shape == (n, *shape)
    eager = segment(np.stack([blob_plane(i, shape) for i in range(n)]), **FAST)
    np.testing.assert_array_equal(seg.labels, eager.labels)


def test_zarr_channels_first_stack_matches_numpy(tmp_path: Path) -> None:
    import zarr

    data = np.stack([np.stack([blob_plane(i), blob_plane(4 - i)]) for i in range(3)])  # ZCYX
    z = zarr.open_array(str(tmp_path / "img.zarr"), mode="w", shape=data.shape,
                        chunks=(1, 1, 40, 60), dtype=data.dtype)
    z[:] = data
    lazy = segment(z, channel_axis=1, consistent_stack=True, **FAST)
    eager = segment(data, channel_axis=1, consistent_stack=True, **FAST)
    np.testing.assert_array_equal(lazy.labels, eager.labels)
    assert lazy.labels.shape == (3, 80, 120)


def test_image_source_reads_regions_channels_and_samples(tmp_path: Path) -> None:
    import zarr

    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, (2, 4, 50, 70)).astype(np.uint16)  # (Z, C, Y, X)
    z = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=data.shape,
                        chunks=(1, 2, 16, 16), dtype=data.dtype)
    z[:] = data
    src = ImageSource(z, channel_axis=1, channels=[3, 0])
    assert src.stack_shape == (2,) and src.plane_shape == (50, 70)
    assert src.labels_shape == (2, 50, 70) and src.picked == [3, 0]
    region = src.read((1,), slice(5, 20), slice(10, 40))
    np.testing.assert_array_equal(region, np.moveaxis(data[1, [3, 0], 5:20, 10:40], 0, -1))
    contiguous = ImageSource(z, channel_axis=1, channels=[1, 2, 3]).read((0,))
    np.testing.assert_array_equal(contiguous, np.moveaxis(data[0, 1:4], 0, -1))
    assert ImageSource(z, channel_axis=1).sample((0,), max_pixels=100).shape[:2] == (9, 12)
    with pytest.raises(ValueError, match="no channel axis"):
        ImageSource(np.zeros((3, 50, 70)), channel_axis="none", channels=[0])


def test_shrunk_rgb_equals_resize_of_full_rgb() -> None:
    rng = np.random.default_rng(3)
    plane = rng.integers(0, 60000, (300, 420, 3)).astype(np.uint16)
    src = ImageSource(plane)
    limits = src.limits((), (1.0, 99.8))
    shrunk = src.shrunk_rgb((), (100, 140), limits)
    full = to_rgb(plane, contrast_limits=limits)
    np.testing.assert_allclose(shrunk, resize(full, (100, 140)), atol=1e-5)


def test_leaf_window_tiles_soft_upsample_exactly() -> None:
    rng = np.random.default_rng(1)
    n, grid, out = 48, (6, 8), (61, 83)
    walk = rng.random((n, n)).astype(np.float32)
    walk /= walk.sum(1, keepdims=True)
    leaf = rng.integers(3, 9, n)
    full = soft_upsample(walk, leaf, grid, out)
    from napari_diffcut.pipeline.segmentation import leaf_maps

    maps, uniq = leaf_maps(walk, leaf, grid)
    pieces = np.block([
        [leaf_window(maps, uniq, out, (r0, r1), (c0, c1), max_elements=100)
         for c0, c1 in ((0, 30), (30, 83))]
        for r0, r1 in ((0, 17), (17, 40), (40, 61))
    ])
    np.testing.assert_array_equal(pieces, full)


def two_disc_image(n: int) -> np.ndarray:
    img = np.full((n, n), 25, np.uint8)
    yy, xx = np.ogrid[:n, :n]
    img[(yy - n * 0.45) ** 2 + (xx - n * 0.55) ** 2 < (n * 0.25) ** 2] = 200
    return img


def test_multiscale_runs_on_closest_level_and_writes_level0_lazily() -> None:
    import dask.array as da

    img = two_disc_image(1024)
    levels = [da.from_array(img[::f, ::f], chunks=256) for f in (1, 2, 4, 8)]
    assert is_multiscale(levels) and not is_multiscale(img)
    assert not is_multiscale([img, img]) and not is_multiscale(levels[:1])
    eight = [np.zeros((256, 256, 8), np.uint16), np.zeros((128, 128, 8), np.uint16)]
    assert choose_level(eight, 128, 2) == 1  # resolved channel axis: no ambiguity error
    assert choose_level(levels, 128, None) == 3 and choose_level(levels, 512, None) == 1
    # Lazy labels are never refined (no full-resolution image beside them): compare unrefined.
    eager = segment(levels, **FAST, refine=False)
    assert isinstance(eager, Segmentation) and eager.labels.shape == (1024, 1024)
    assert eager.settings["source_level"] == 3 and eager.settings["image_shape"] == [128, 128]
    lazy = segment(levels, memory_budget=4, **FAST)  # level 0 labels: 8 MB > 4 MiB
    assert isinstance(lazy, LazySegmentation) and lazy.settings["refined"] is False
    labels = lazy.labels
    assert type(labels).__name__ == "Array" and labels.shape == (1024, 1024)
    np.testing.assert_array_equal(np.asarray(labels), eager.labels)
    np.testing.assert_array_equal(np.asarray(lazy.cut(0.5)), eager.cut(0.5))
    assert [np.asarray(v).shape for v in lazy.levels] == [v.shape for v in eager.levels]
    assert "LazySegmentation(shape=(1024, 1024)" in repr(lazy)


def test_large_lazy_2d_image_is_shrunk_while_read() -> None:
    import dask.array as da

    img = two_disc_image(1200)
    lazy = segment(da.from_array(img, chunks=300), memory_budget=4, **FAST)  # 17 MB RGB
    eager = segment(img, **FAST)
    assert lazy.settings["grid"] == eager.settings["grid"]
    agree = (np.asarray(lazy.labels) == eager.labels).mean()
    assert agree > 0.98  # same tree up to float rounding of the shrunk input


@pytest.mark.parametrize("shape", [(90, 400), (400, 90)])
def test_non_square_keeps_aspect(shape: tuple[int, int]) -> None:
    img = np.full(shape, 30, np.uint8)
    img[: shape[0] // 2, : shape[1] // 2] = 220
    seg = segment(img, **FAST)
    assert seg.labels.shape == shape
    gh, gw = seg.settings["grid"]
    wh, ww = seg.settings["working_size"]
    assert (gw > gh) == (shape[1] > shape[0]) and ww / wh == gw / gh
    assert abs(np.log((gw / gh) / (shape[1] / shape[0]))) < np.log(2)
    top_left = np.bincount(seg.labels[: shape[0] // 2 - 8, : shape[1] // 2 - 8].ravel()).argmax()
    other = np.bincount(seg.labels[shape[0] // 2 + 8 :, shape[1] // 2 + 8 :].ravel()).argmax()
    assert top_left != other  # the bright quadrant stays where it is (no transposition)


def test_open_image_reads_big_tiffs_lazily(tmp_path: Path) -> None:
    import tifffile

    data = np.zeros((3, 2, 64, 80), np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX"})
    eager, axes = open_image(path)
    assert isinstance(eager, np.ndarray) and axes == "ZCYX"
    lazy, axes = open_image(path, memory_budget=0)
    assert not isinstance(lazy, np.ndarray) and lazy.shape == (3, 2, 64, 80) and axes == "ZCYX"
    np.testing.assert_array_equal(lazy[1, 1, 5:9], data[1, 1, 5:9])
