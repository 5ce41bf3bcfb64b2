"""Stacks: plane-by-plane segmentation, progress and cancel per plane, consistent labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from napari_diffcut import Segmentation, iter_segment, segment
from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.large.stacks import StackSegmentation, _last_user, match_planes, predecessor

FAST = {"backbone": "pixels", "working_size": 128, "min_size": 4}


def moving_disc_stack(n: int = 4, shape: tuple[int, int] = (64, 96), step: int = 6) -> np.ndarray:
    """(Z, C, Y, X) uint16: a bright disc moving right in channel 0, a band in channel 1."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    stack = np.zeros((n, 2, *shape), np.uint16)
    for z in range(n):
        stack[z, 0] = 800 + rng.integers(0, 40, shape)
        stack[z, 0][(yy - 30) ** 2 + (xx - 30 - step * z) ** 2 < 16**2] = 12000
        stack[z, 1] = 500
        stack[z, 1][yy > 52] = 9000
    return stack


def disc(shape: tuple[int, int], centre: tuple[int, int], r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < r**2


class CountingArray:
    """An array-like that records which planes were read (a lazy store stand-in)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.reads: list[int] = []

    def __getitem__(self, key: Any) -> np.ndarray:
        self.reads.append(int(key[0]))
        return self.data[key]


def test_16bit_multichannel_stack_equals_plane_by_plane() -> None:
    stack = moving_disc_stack()  # (Z, C, Y, X)
    seg = segment(stack, channel_axis=1, **FAST)
    assert isinstance(seg, StackSegmentation)
    assert seg.labels.shape == (4, 64, 96) and seg.labels.dtype == np.uint32
    assert len(seg.planes) == 4 and all(isinstance(p, Segmentation) for p in seg.planes)
    for z in range(4):
        alone = segment(np.moveaxis(stack[z], 0, -1), **FAST)  # the same plane as a 2-D image
        np.testing.assert_array_equal(seg.labels[z], alone.labels)
        assert seg.planes[z].settings["plane_index"] == [z]
    record = json.loads(json.dumps(seg.settings))
    assert record["stack_shape"] == [4] and record["channel_axis"] == 1
    assert record["channel_axis_used"] == 1 and record["channels_used"] == [0, 1]
    assert record["planes"] == 4 and record["consistent_stack"] is False


def test_channels_last_stack_and_picked_channels() -> None:
    stack = np.moveaxis(moving_disc_stack(n=2), 1, -1)  # (Z, Y, X, C=2), channels inferred
    seg = segment(stack, channels=[1, 0], **FAST)
    assert seg.labels.shape == (2, 64, 96)
    alone = segment(stack[1], channels=[1, 0], **FAST)
    np.testing.assert_array_equal(seg.labels[1], alone.labels)


def test_progress_per_plane_and_cancel_between_planes() -> None:
    data = CountingArray(moving_disc_stack(n=4))
    gen = iter_segment(data, channel_axis=1, **FAST)
    plane_events = []
    for event in gen:
        if event.stage == "plane":
            plane_events.append(event)
            if len(plane_events) == 2:
                break
        else:
            assert event.message.startswith(f"plane {len(plane_events)}/4: ")
    gen.close()
    assert [(e.step, e.total) for e in plane_events] == [(0, 4), (1, 4)]
    assert sorted(set(data.reads)) == [0]  # plane 2 was announced but never read
    events = []
    seg = segment(CountingArray(moving_disc_stack(n=3)), channel_axis=1,
                  progress=events.append, **FAST)
    steps = [(e.step, e.total) for e in events if e.stage == "plane"]
    assert steps == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert seg.labels.shape == (3, 64, 96)


def test_consistent_stack_keeps_labels_of_a_moving_object() -> None:
    stack = moving_disc_stack(n=4)
    seg = segment(stack, channel_axis=1, consistent_stack=True, **FAST)
    assert seg.consistent and len(seg.plane_luts) == 4
    inside = [np.bincount(seg.labels[z][disc((64, 96), (30, 30 + 6 * z), 11)]).argmax()
              for z in range(4)]
    band = [np.bincount(seg.labels[z][58:, :].ravel()).argmax() for z in range(4)]
    assert len(set(inside)) == 1 and len(set(band)) == 1 and inside[0] != band[0]
    # Each plane's own labels map one to one onto stack labels.
    for z in range(4):
        own = seg.planes[z].labels
        lut = seg.plane_luts[z]
        np.testing.assert_array_equal(np.vectorize(lut.get)(own), seg.labels[z])
        assert len(set(lut.values())) == len(lut)
    assert seg.settings["stack_labels"] >= int(seg.labels.max())
    # Without matching, planes keep their own node labels.
    plain = segment(stack, channel_axis=1, **FAST)
    for z in range(4):
        np.testing.assert_array_equal(plain.labels[z], seg.planes[z].labels)


def test_cut_recuts_every_plane_and_rematches() -> None:
    seg = segment(moving_disc_stack(n=3), channel_axis=1, consistent_stack=True, **FAST)
    coarse = seg.cut(1e-6)  # only the band's near-perfect split (cost ~1e-9) survives
    assert coarse.shape == (3, 64, 96)
    assert np.unique(coarse).tolist() == [1, 2]  # the same two segments in every plane
    for z in range(3):
        assert len(np.unique(seg.planes[z].cut(1e-6))) == 2
        np.testing.assert_array_equal(coarse[z][58:], np.full((6, 96), coarse[0][60, 0]))
    again = seg.cut(seg.planes[0].threshold)
    assert again.shape == seg.labels.shape and again.max() >= 2


def test_predecessor_chain_for_several_leading_axes() -> None:
    shape = (2, 3)
    seen: set[tuple[int, ...]] = set()
    for index in np.ndindex(*shape):
        pred = predecessor(index)
        assert pred is None or pred in seen  # always already segmented
        seen.add(index)
    assert predecessor((1, 0)) == (0, 0) and predecessor((1, 2)) == (1, 1)
    # (0, 0) is needed by (0, 1) and (1, 0); (0, 2) by nobody.
    assert _last_user((0, 0), shape) == 3 and _last_user((0, 2), shape) == -1


def test_time_and_z_stack_consistent() -> None:
    plane = np.full((48, 64), 300, np.uint16)
    plane[disc((48, 64), (24, 30), 12)] = 9000
    stack = np.broadcast_to(plane, (2, 2, 48, 64)).copy()  # (T, Z, Y, X)
    seg = segment(stack, consistent_stack=True, **FAST)
    assert seg.labels.shape == (2, 2, 48, 64)
    values = {int(np.bincount(seg.labels[t, z][disc((48, 64), (24, 30), 9)]).argmax())
              for t in range(2) for z in range(2)}
    assert len(values) == 1
    np.testing.assert_array_equal(seg.labels[1, 1], seg.labels[0, 0])


def test_match_planes_one_to_one() -> None:
    prev = np.zeros((10, 10), np.uint32) + 4
    prev[:, 5:] = 9
    cur = np.ones((10, 10), np.int64)
    cur[:, 5:] = 2
    cur[:, 8:] = 3  # region 9 split in two: the larger part continues it
    lut, next_id = match_planes(prev, cur, 10)
    assert lut == {1: 4, 2: 9, 3: 10} and next_id == 11
    lut, next_id = match_planes(prev, cur, 10, min_iou=0.9)  # nothing overlaps that well
    assert lut[1] == 4 and lut[2] == 10 and lut[3] == 11 and next_id == 12


def test_stack_beyond_budget_streams_to_zarr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # temporary stores go here
    plane = np.full((380, 400), 40, np.uint8)
    plane[disc((380, 400), (190, 200), 90)] = 220
    stack = np.stack([plane, np.roll(plane, 30, axis=1), np.roll(plane, 60, axis=1)])
    # Planes beyond the budget are labelled lazily and never refined: compare unrefined.
    small = segment(stack, memory_budget=1, consistent_stack=True, refine=False, **FAST)
    assert small.planes is None and small.store is not None
    assert Path(small.store).name == "labels.zarr" and small.labels.shape == (3, 380, 400)
    assert Path(small.store).parent.parent == tmp_path
    big = segment(stack, consistent_stack=True, refine=False, **FAST)
    np.testing.assert_array_equal(np.asarray(small.labels[:]), big.labels)
    with pytest.raises(DiffCutError, match="cut needs per-plane trees"):
        small.cut(0.5)
    out = tmp_path / "mine.zarr"
    seg = segment(stack, out=str(out), **FAST)
    assert seg.store == str(out)
    import zarr

    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[:], seg.labels[:])


def test_stack_with_tiny_model(tiny_model: Path) -> None:
    rng = np.random.default_rng(2)
    stack = (rng.random((2, 40, 72, 3)) * 255).astype(np.uint8)
    stack[:, :, :30] //= 4
    events = []
    seg = segment(stack, model=str(tiny_model), min_size=2, consistent_stack=True,
                  working_size=128, progress=events.append)
    assert seg.labels.shape == (2, 40, 72) and seg.labels.min() >= 1
    assert [e.step for e in events if e.stage == "plane"] == [0, 1, 2]
    assert any(e.stage == "diffuse" and e.message.startswith("plane 2/2: ") for e in events)
    assert seg.planes[1].settings["grid"] == seg.planes[0].settings["grid"]
