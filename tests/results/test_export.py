"""Export: uint32 label TIFF and the per-label CSV table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.pipeline.segmentation import Segmentation
from napari_diffcut.results.export import (
    COLUMNS,
    export_labels,
    free_stem,
    label_table,
    safe_stem,
    table_csv,
)


@pytest.fixture(scope="module")
def seg(pixels_seg: Segmentation) -> Segmentation:
    """The shared three-level result of the weight-free backbone (conftest)."""
    return pixels_seg


def test_area_and_centroid_by_hand() -> None:
    labels = np.zeros((5, 6), np.uint16)
    labels[1:3, 1:4] = 7  # rows 1-2, cols 1-3
    labels[4, 5] = 2
    rows = label_table(labels)
    assert [r["label"] for r in rows] == [2, 7]  # sorted, no background
    assert rows[0] == {
        "label": 2,
        "area": 1,
        "centroid_y": 4.0,
        "centroid_x": 5.0,
        "level": None,
        "parent": None,
        "ncut_cost": None,
    }
    assert rows[1]["area"] == 6
    assert rows[1]["centroid_y"] == pytest.approx(1.5)
    assert rows[1]["centroid_x"] == pytest.approx(2.0)


def test_tree_columns_follow_the_tree(seg: Segmentation) -> None:
    labels = seg.levels[1].copy()
    labels[0, :3] = 5000  # painted with a label that is not in the tree
    rows = {r["label"]: r for r in label_table(labels, seg)}
    tree = seg.tree
    assert 5000 in rows and rows[5000]["level"] is None and rows[5000]["parent"] is None
    for label, row in rows.items():
        assert row["area"] == int(np.sum(labels == label))
        if label == 5000:
            continue
        node = tree[label - 1]
        assert row["level"] == node.depth
        assert row["parent"] == (node.parent + 1 if node.parent >= 0 else None)
        if node.children:
            assert row["ncut_cost"] == pytest.approx(node.cost)
        else:
            assert row["ncut_cost"] is None
    # Level 2 regions are depth-2 nodes whose parents are shown in level 1.
    assert {rows[k]["parent"] for k in rows if k != 5000} <= set(np.unique(seg.levels[0]).tolist())


def test_export_writes_tiff_and_csv(seg: Segmentation, tmp_path: Path) -> None:
    labels = seg.levels[2].astype(np.int32)
    tif, table = export_labels(tmp_path / "out", labels, seg, name="cells diffcut")
    assert tif.name == "cells_diffcut.tif" and table.name == "cells_diffcut.csv"
    back = tifffile.imread(tif)
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, labels)
    with table.open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COLUMNS
    assert [int(r["label"]) for r in rows] == sorted(np.unique(labels).tolist())
    assert sum(int(r["area"]) for r in rows) == labels.size
    for r in rows:
        node = seg.tree[int(r["label"]) - 1]
        assert int(r["level"]) == node.depth
        assert r["ncut_cost"] == ("" if not node.children else repr(float(node.cost)))
        if r["ncut_cost"]:
            assert math.isfinite(float(r["ncut_cost"]))
    with pytest.raises(DiffCutError, match="overwrite=True"):
        export_labels(tmp_path / "out", labels, seg, name="cells diffcut")
    export_labels(tmp_path / "out", labels, seg, name="cells diffcut", overwrite=True)


def test_names_and_bad_input(seg: Segmentation, tmp_path: Path) -> None:
    assert safe_stem("a/b: c") == "a_b__c"
    assert safe_stem("///") == "labels"
    (tmp_path / "x.tif").write_bytes(b"")
    assert free_stem(tmp_path, "x") == "x-1"
    with pytest.raises(ValueError, match="2-D integer"):
        label_table(np.zeros((2, 2), float))
    with pytest.raises(ValueError, match=">= 0"):
        label_table(np.full((2, 2), -1))
    with pytest.raises(ValueError, match="do not match"):
        label_table(np.ones((3, 3), np.uint32), seg)
    assert table_csv([]) == ",".join(COLUMNS) + "\n"
