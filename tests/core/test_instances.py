"""Instance labels for counting (core/instances.py, issue 11 part 5)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_diffcut.core.instances import INSTANCE_COLUMNS, instance_labels


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_two_separate_discs_of_one_segment_get_two_ids() -> None:
    a, b = _disc((64, 80), 20, 20, 9), _disc((64, 80), 40, 60, 12)
    seg = np.full((64, 80), 3, np.uint32)  # background segment
    seg[a | b] = 8  # both discs are one segment
    inst, table = instance_labels(seg, min_size=10, segments=[8])
    assert inst.dtype == np.uint32 and sorted(np.unique(inst).tolist()) == [0, 1, 2]
    assert len(table) == 2 and list(table[0]) == list(INSTANCE_COLUMNS)
    assert (inst[a] == 1).all() and (inst[b] == 2).all() and (inst[~(a | b)] == 0).all()
    assert [row["area"] for row in table] == [int(a.sum()), int(b.sum())]
    assert all(row["segment"] == 8 for row in table)
    assert table[0]["centroid_y"] == pytest.approx(20)
    assert table[1]["centroid_x"] == pytest.approx(60)
    # All segments: the background is one more instance, numbered in raster order.
    inst_all, table_all = instance_labels(seg, min_size=10)
    assert [row["segment"] for row in table_all] == [3, 8, 8]
    assert inst_all[0, 0] == 1


def test_min_size_connectivity_and_segments_never_merge() -> None:
    seg = np.zeros((6, 6), np.int64)
    seg[0, 0] = seg[1, 1] = 5  # diagonal neighbours
    seg[3:5, 3:6] = 5  # 6 pixels
    seg[3:5, 2] = 6  # touches the block, other segment
    four, t4 = instance_labels(seg, min_size=1)
    eight, t8 = instance_labels(seg, min_size=1, connectivity=2)
    assert len(t4) == 4 and len(t8) == 3  # the diagonal pair joins only with corners
    assert four[0, 0] != four[1, 1] and eight[0, 0] == eight[1, 1]
    assert four[3, 2] != four[3, 3]  # different segments stay apart
    big, tb = instance_labels(seg, min_size=3)
    assert [r["area"] for r in tb] == [6] and (big[0:2, 0:2] == 0).all() and big[3, 2] == 0
    assert instance_labels(np.zeros((4, 4), int))[1] == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"min_size": 0}, "min_size"), ({"connectivity": 3}, "connectivity")],
)
def test_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        instance_labels(np.ones((3, 3), int), **kwargs)
    with pytest.raises(ValueError, match="2-D integer"):
        instance_labels(np.ones((3, 3)))


# -- count_instances: what the API, the CLI and the widget count ---------------------


def test_count_leaves_out_the_largest_segment_and_joins_touching_pieces() -> None:
    from napari_diffcut.core.instances import count_instances

    shape = (64, 80)
    core, rim = _disc(shape, 20, 20, 5), _disc(shape, 20, 20, 9)
    other = _disc(shape, 40, 60, 8)
    seg = np.full(shape, 1, np.uint32)  # the background: the largest segment
    seg[rim] = 4  # a nucleus: a dim rim ...
    seg[core] = 5  # ... around a bright core: two segments, one object
    seg[other] = 5
    found = count_instances(seg, min_size=10)
    assert found.background == 1 and found.count == 2
    assert found.labels.dtype == np.uint32 and (found.labels[seg == 1] == 0).all()
    assert found.areas.tolist() == [int(rim.sum()), int(other.sum())]
    assert found.table[0]["segment"] == 4  # the rim covers most of the first object
    assert found.record() == {"count": 2, "min_size": 10, "background": 1,
                              "connectivity": 1, "by_segment": False}
    apart = count_instances(seg, min_size=10, by_segment=True)
    assert apart.count == 3 and apart.by_segment  # rim, core, other
    everything = count_instances(seg, min_size=10, background=None)
    assert everything.count == 1  # all touch: the whole image is one piece
    assert count_instances(seg, min_size=10, background=5).background == 5


def test_count_rejects_a_bad_background_in_one_line() -> None:
    from napari_diffcut.core.instances import count_instances

    with pytest.raises(ValueError, match="background must be 'largest', a label or None"):
        count_instances(np.ones((4, 4), int), background="biggest")
    assert count_instances(np.zeros((4, 4), int)).count == 0  # nothing to count
