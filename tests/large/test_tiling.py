"""Tiled mode: tile plan, stitching across tile borders, bounded memory, zarr output."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from napari_diffcut import DiffCutEngine, iter_segment, segment
from napari_diffcut.large.tiling import (
    Stitcher,
    TiledSegmentation,
    contingency,
    plan_tiles,
    relabel,
    tile_starts,
)

FAST = {"backbone": "pixels", "working_size": 128, "min_size": 4}


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [((3000, 3000), 1600, 200), ((1000, 700), 256, 32), ((181, 400), 100, 20),
     ((90, 2000), 512, 64), ((513, 512), 512, 0)],
)
def test_tile_plan_covers_the_plane_once(shape: tuple[int, int], tile: int, overlap: int) -> None:
    tiles = plan_tiles(shape, tile, overlap)
    cover = np.zeros(shape, int)
    for t in tiles:
        assert 0 <= t.ys[0] < t.ys[1] <= shape[0] and 0 <= t.xs[0] < t.xs[1] <= shape[1]
        assert t.ys[1] - t.ys[0] == min(tile, shape[0]) and t.xs[1] - t.xs[0] == min(tile, shape[1])
        assert t.ys[0] <= t.core_ys[0] < t.core_ys[1] <= t.ys[1]
        assert t.xs[0] <= t.core_xs[0] < t.core_xs[1] <= t.xs[1]
        cover[t.core_ys[0]:t.core_ys[1], t.core_xs[0]:t.core_xs[1]] += 1
    assert (cover == 1).all()  # cores partition the plane
    for axis_len, starts in ((shape[0], tile_starts(shape[0], tile, overlap)),
                             (shape[1], tile_starts(shape[1], tile, overlap))):
        ends = [min(axis_len, s + tile) for s in starts]
        assert all(ends[i] - starts[i + 1] >= overlap for i in range(len(starts) - 1))
    with pytest.raises(ValueError, match="tile_overlap"):
        plan_tiles(shape, tile, tile)


def voronoi_truth(shape: tuple[int, int], n: int, seed: int = 0) -> np.ndarray:
    """Ground-truth regions: Voronoi cells of random seeds (labels 1..n), many crossing tiles."""
    rng = np.random.default_rng(seed)
    seeds = rng.random((n, 2)) * shape
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    return (d.argmin(-1) + 1).astype(np.uint32)


def assert_same_partition(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to renaming labels (a bijection)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize("out_kind", ["numpy", "zarr"])
def test_stitcher_recovers_objects_across_tiles(out_kind: str, tmp_path: Path) -> None:
    """Tiles that each label the truth with their own ids stitch back to the truth."""
    import zarr

    shape = (700, 900)
    truth = voronoi_truth(shape, 40)
    tiles = plan_tiles(shape, 256, 32)
    if out_kind == "numpy":
        out: Any = np.zeros(shape, np.uint32)
    else:
        out = zarr.open_array(str(tmp_path / "l.zarr"), mode="w", shape=shape,
                              chunks=(128, 128), dtype="uint32")
    stitcher = Stitcher(shape, tiles, out)
    rng = np.random.default_rng(1)
    for t in tiles:
        crop = truth[t.ys[0]:t.ys[1], t.xs[0]:t.xs[1]]
        own_ids = rng.permutation(1000)[:41] + 5  # each tile names regions its own way
        stitcher.add(t, own_ids[crop])
    k = stitcher.finish()
    result = np.asarray(out[:])
    assert k == len(np.unique(truth)) == len(np.unique(result))
    assert_same_partition(result, truth)
    assert result.min() == 1 and result.max() == k


def test_stitcher_keeps_objects_apart_when_tiles_disagree() -> None:
    """A tile that merged two objects does not glue them together in the stitched output."""
    shape = (100, 380)
    truth = np.ones(shape, np.uint32)
    truth[:, 190:] = 2
    truth[40:60, 150:230] = 3  # small object crossing the border
    tiles = plan_tiles(shape, 200, 20)
    stitcher = Stitcher(shape, tiles, np.zeros(shape, np.uint32))
    left = truth[:, :200].copy()
    right = truth[:, 180:].copy()
    right[right == 3] = 2  # the right tile missed the object
    stitcher.add(tiles[0], left)
    stitcher.add(tiles[1], right)
    stitcher.finish()
    out = stitcher.out
    assert out[50, 160] != out[50, 300] and out[10, 10] != out[10, 300]


def test_contingency_fallback_for_wide_id_ranges() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (30, 40))
    b = rng.integers(0, 7, (30, 40))
    near = contingency(a, b)
    far = contingency(a.astype(np.int64) * 10**9, b.astype(np.int64) * 10**9 + 3)
    np.testing.assert_array_equal(near[2], far[2])
    np.testing.assert_array_equal(near[0] * 10**9, far[0])
    np.testing.assert_array_equal(near[3], far[3])


def test_relabel_zarr_in_chunks(tmp_path: Path) -> None:
    import zarr

    rng = np.random.default_rng(0)
    data = rng.integers(0, 50, (300, 500)).astype(np.uint32)
    z = zarr.open_array(str(tmp_path / "r.zarr"), mode="w", shape=data.shape,
                        chunks=(64, 96), dtype="uint32")
    z[:] = data
    lut = (np.arange(50, dtype=np.uint32) * 3) % 7
    relabel(z, lut, block=64 * 96 * 3)
    np.testing.assert_array_equal(z[:], lut[data])


def image_with_disc(shape: tuple[int, int], centre: tuple[int, int], r: int) -> np.ndarray:
    img = np.full(shape, 30, np.uint8)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    img[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < r**2] = 200
    return img


def traced_peak(run: Any) -> tuple[Any, int]:
    """Result and tracemalloc peak (bytes) of ``run()``."""
    tracemalloc.start()
    try:
        result = run()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def check_bounded_memory(**kwargs: Any) -> TiledSegmentation:
    """Tiled runs of a 1600 x 3000 and a 3000 x 3000 image: same peak memory.

    With 1600 px tiles overlapping by 200 px, both images are cut into tiles
    of the same size (2 and 4 tiles). Labels go to zarr (1 MiB budget). Any
    allocation that scales with the image (its float RGB: 58 vs 108 MB, its
    labels: 19 vs 36 MB) would show up as a larger peak for the larger image.
    """
    opts = {"tile_size": 1600, "tile_overlap": 200, "working_size": 128, "min_size": 4,
            "max_depth": 3, "memory_budget": 1, **kwargs}
    segment(image_with_disc((200, 300), (100, 150), 50), **{**opts, "tile_size": 160,
                                                             "tile_overlap": 20})  # warm up
    small, peak_small = traced_peak(
        lambda: segment(image_with_disc((1600, 3000), (800, 1500), 400), **opts))
    large, peak_large = traced_peak(
        lambda: segment(image_with_disc((3000, 3000), (1500, 1500), 400), **opts))
    assert isinstance(large, TiledSegmentation) and large.settings["tiles"] == 4
    assert small.settings["tiles"] == 2
    assert large.store is not None and type(large.labels).__module__.startswith("zarr")
    assert Path(large.store).parent.name.startswith("napari-diffcut-")
    assert peak_large <= peak_small * 1.03 + 4 * 2**20, (peak_small / 2**20, peak_large / 2**20)
    return large


@pytest.fixture
def temp_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temporary zarr label stores go under the test's tmp_path."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.mark.usefixtures("temp_stores")
def test_3000px_pixels_backbone_one_label_across_borders_and_bounded_memory() -> None:
    seg = check_bounded_memory(backbone="pixels")
    labels = np.asarray(seg.labels[:])
    assert labels.shape == (3000, 3000) and labels.dtype == np.uint32 and labels.min() >= 1
    yy, xx = np.ogrid[:3000, :3000]
    inside = (yy - 1500) ** 2 + (xx - 1500) ** 2 < 250**2  # crosses both core borders at 1500
    values = np.unique(labels[inside])
    assert values.size == 1
    label = values[0]
    assert label not in labels[:200, :200] and label not in labels[-200:, -200:]
    for t in seg.tiles:  # the one label was written by every tile's core
        core = labels[t["core_ys"][0]:t["core_ys"][1], t["core_xs"][0]:t["core_xs"][1]]
        assert (core == label).any()
    record = json.loads(json.dumps(seg.settings))
    assert record["tile_grid"] == [2, 2] and record["tile_overlap"] == 200
    assert record["stitched_labels"] == len(np.unique(labels))


@pytest.mark.usefixtures("temp_stores")
def test_3000px_tiny_model_bounded_memory(tiny_model: Path) -> None:
    engine = DiffCutEngine()
    seg = check_bounded_memory(model=str(tiny_model), engine=engine)
    labels = np.asarray(seg.labels[:])
    assert labels.shape == (3000, 3000) and labels.min() >= 1
    assert seg.n_labels == len(np.unique(labels))
    assert all(t["working_size"] == [128, 128] for t in seg.tiles)
    assert seg.settings["device_used"] == "cpu"


def test_tile_progress_and_cancel_between_tiles() -> None:
    img = image_with_disc((600, 700), (300, 350), 120)
    events = []
    seg = segment(img, tile_size=300, progress=events.append, **FAST)
    tiles = [e for e in events if e.stage == "tile"]
    n = seg.settings["tiles"]
    assert [(e.step, e.total) for e in tiles] == [(i, n) for i in range(n + 1)]
    assert [e.stage for e in events[-2:]] == ["stitch", "stitch"]
    assert any(e.message.startswith(f"tile {n}/{n}: ") for e in events)

    class Counting:
        def __init__(self, data: np.ndarray) -> None:
            self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, 0

        def __getitem__(self, key: Any) -> np.ndarray:
            self.reads += 1
            return self.data[key]

    source = Counting(img)
    gen = iter_segment(source, tile_size=300, **FAST)
    started = 0
    for event in gen:
        if event.stage == "tile":
            started += 1
            if started == 2:
                break
    gen.close()
    assert source.reads == 2  # the strided sample for limits, then tile 1; tile 2 never read


def test_small_image_with_tile_size_is_not_tiled_and_aspect_is_kept() -> None:
    img = image_with_disc((120, 500), (60, 250), 40)
    whole = segment(img, tile_size=512, **FAST)
    assert not isinstance(whole, TiledSegmentation)
    tiled = segment(img, tile_size=256, **FAST)  # 1 x 3 tiles, each 120 x 256
    assert isinstance(tiled, TiledSegmentation) and tiled.labels.shape == (120, 500)
    assert tiled.settings["tile_grid"] == [1, 3]
    assert all(t["working_size"][0] < t["working_size"][1] for t in tiled.tiles)  # not squashed


def test_stack_of_large_planes_is_tiled_per_plane() -> None:
    plane = image_with_disc((400, 500), (200, 250), 90)
    stack = np.stack([plane, np.roll(plane, 40, axis=1)])
    seg = segment(stack, tile_size=256, consistent_stack=True, **FAST)
    assert seg.labels.shape == (2, 400, 500)
    assert all(isinstance(p, TiledSegmentation) for p in seg.planes)
    centre = [np.bincount(seg.labels[z][180:220, 230 + 40 * z : 270 + 40 * z].ravel()).argmax()
              for z in range(2)]
    assert centre[0] == centre[1]


def test_cli_tiled_to_zarr_and_stack_tiff(tmp_path: Path) -> None:
    import tifffile
    import zarr

    from napari_diffcut.cli.main import main

    big = tmp_path / "field.tif"
    tifffile.imwrite(big, image_with_disc((700, 900), (350, 450), 150))
    out = tmp_path / "field_labels.zarr"
    rc = main(["segment", str(big), "--backbone", "pixels", "--working-size", "128",
               "--min-size", "4", "--tile-size", "400", "--tile-overlap", "50",
               "-o", str(out), "-q"])
    assert rc == 0
    labels = zarr.open_array(str(out), mode="r")[:]
    assert labels.shape == (700, 900) and labels.min() >= 1
    record = json.loads((tmp_path / "field_labels.diffcut.json").read_text())
    assert record["tile_size"] == 400 and record["tiles"] == 6
    assert record["labels_store"] == str(out)

    stack = np.zeros((3, 2, 64, 80), np.uint16)
    stack[:, 0, 20:40, 20:50] = 5000
    stack[:, 1, 40:, :] = 3000
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "ZCYX"})
    rc = main(["segment", str(path), "--backbone", "pixels", "--working-size", "128",
               "--min-size", "4", "--consistent-stack", "-q"])
    assert rc == 0
    out_labels = tifffile.imread(tmp_path / "cells.diffcut.tif")
    assert out_labels.shape == (3, 64, 80) and out_labels.dtype == np.uint32
    record = json.loads((tmp_path / "cells.diffcut.json").read_text())
    assert record["channel_axis"] == 1 and record["input_axes"] == "ZCYX"
    assert record["channel_axis_used"] == 1 and record["labels_axes"] == "ZYX"
    assert record["consistent_stack"] is True
    np.testing.assert_array_equal(out_labels[0], out_labels[2])  # a static stack, one set of ids
    rc = main(["segment", str(path), "--backbone", "pixels", "--levels", "-o",
               str(tmp_path / "x.tif"), "-q"])
    assert rc == 2  # refused before any work: levels need one tree
    assert not (tmp_path / "x.tif").exists()


@pytest.mark.parametrize("module", ["napari_diffcut.large.tiling", "napari_diffcut.large.stacks",
                                    "napari_diffcut.core.image"])
def test_doctests(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0
