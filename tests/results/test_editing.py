"""Split / merge along the NCut tree and the edit history (pure numpy, no Qt)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.pipeline.segmentation import Segmentation
from napari_diffcut.results.editing import Edit, EditHistory, LabelTree, merge, split

# A hand-made tree:            0
#                            /   \
#                           1     2
#                          / \   / \
#                         3   4 5   6
#                                  / \
#                                 7   8
PARENT = np.array([-1, 0, 0, 1, 1, 2, 2, 6, 6])


@pytest.fixture
def pixel_leaf() -> np.ndarray:
    """4 x 8 pixel map: left half under node 1, right half under node 2."""
    leaf = np.empty((4, 8), np.int32)
    leaf[:, :2] = 3
    leaf[:, 2:4] = 4
    leaf[:, 4:6] = 5
    leaf[:2, 6:] = 7
    leaf[2:, 6:] = 8
    return leaf


@pytest.fixture
def tree(pixel_leaf: np.ndarray) -> LabelTree:
    return LabelTree(PARENT, pixel_leaf)


def level(pixel_leaf: np.ndarray, lut: list[int]) -> np.ndarray:
    """Labels from a node -> shown node table (label = node + 1)."""
    return (np.asarray(lut)[pixel_leaf] + 1).astype(np.uint32)


@pytest.fixture(scope="module")
def seg(pixels_seg: Segmentation) -> Segmentation:
    """The shared three-level result of the weight-free backbone (conftest)."""
    return pixels_seg


def test_split_gives_children_by_pixel_leaf(tree: LabelTree, pixel_leaf: np.ndarray) -> None:
    top = level(pixel_leaf, [1, 1, 2, 1, 1, 2, 2, 2, 2])  # labels 2 | 3
    out = tree.split(top, 3)
    np.testing.assert_array_equal(out, level(pixel_leaf, [1, 1, 2, 1, 1, 5, 6, 6, 6]))
    assert out.dtype == top.dtype
    # The input is not modified.
    assert set(np.unique(top)) == {2, 3}


def test_split_then_merge_returns_original(tree: LabelTree, pixel_leaf: np.ndarray) -> None:
    top = level(pixel_leaf, [0] * 9)  # everything is the root, label 1
    for child in tree.children_labels(1):
        np.testing.assert_array_equal(tree.merge(tree.split(top, 1), child), top)
    mid = level(pixel_leaf, [1, 1, 2, 1, 1, 2, 2, 2, 2])
    for region in (2, 3):
        for child in tree.children_labels(region):
            np.testing.assert_array_equal(merge(split(mid, region, tree), child, tree), mid)


def test_merge_takes_the_whole_sibling_subtree(tree: LabelTree, pixel_leaf: np.ndarray) -> None:
    # Node 2 shown as 6 | 8 | 9 (node 6 split further); merging 6 (node 5) gives node 2 back.
    fine = level(pixel_leaf, [1, 1, 2, 3, 4, 5, 6, 7, 8])
    out = tree.merge(fine, 6)
    expected = level(pixel_leaf, [1, 1, 2, 3, 4, 2, 2, 2, 2])
    np.testing.assert_array_equal(out, expected)
    # The other branch (labels 4, 5) is untouched.
    np.testing.assert_array_equal(out[:, :4], fine[:, :4])


def test_leaf_root_and_unknown_labels_fail_clearly(tree: LabelTree, pixel_leaf: np.ndarray) -> None:
    fine = level(pixel_leaf, [1, 1, 2, 3, 4, 5, 6, 7, 8])
    with pytest.raises(DiffCutError, match="region 4 is a leaf"):
        tree.split(fine, 4)
    with pytest.raises(DiffCutError, match="root"):
        tree.merge(level(pixel_leaf, [0] * 9), 1)
    with pytest.raises(DiffCutError, match="not in the image"):
        tree.split(fine, 2)  # node 1 is a valid tree region, but not shown
    with pytest.raises(ValueError, match="label 0 is not a region"):
        tree.split(fine, 0)
    with pytest.raises(ValueError, match="label 99 is not a region"):
        tree.merge(fine, 99)
    with pytest.raises(ValueError, match="shape"):
        tree.split(fine[:2], 3)
    with pytest.raises(ValueError, match="integer"):
        tree.split(fine.astype(float), 3)


def test_paint_edits_survive_a_split(tree: LabelTree, pixel_leaf: np.ndarray) -> None:
    labels = level(pixel_leaf, [1, 1, 2, 1, 1, 2, 2, 2, 2])  # 2 | 3
    labels[0, 0] = 77  # paint on the other region (2)
    labels[1, 5] = 77  # paint inside the region being split (3)
    labels[3, 4] = 0  # erased inside the region
    labels[3, 1] = 3  # region 3's label painted outside its tree area
    out = tree.split(labels, 3)
    assert out[0, 0] == 77 and out[1, 5] == 77 and out[3, 4] == 0
    assert out[3, 1] == 3  # the tree has no child for it: kept
    untouched = np.ones_like(labels, bool)
    untouched[:, 4:] = False
    untouched[3, 1] = False
    np.testing.assert_array_equal(out[untouched], labels[untouched])
    assert set(np.unique(out[:, 4:])) == {0, 6, 7, 77}
    # Merging back restores everything, paint included.
    np.testing.assert_array_equal(tree.merge(out, 6), labels)


def test_merge_of_a_label_painted_only_outside_its_region_is_refused(
    tree: LabelTree, pixel_leaf: np.ndarray
) -> None:
    labels = level(pixel_leaf, [1, 1, 2, 1, 1, 2, 2, 2, 2])  # 2 | 3
    labels[0, 7] = 4  # label 4 (node 3, under node 1) painted only onto region 3
    with pytest.raises(DiffCutError, match="no pixel of label 4 lies in its tree region"):
        tree.merge_edit(labels, 4)


def test_merge_keeps_paint_outside_the_parent_subtree(
    tree: LabelTree, pixel_leaf: np.ndarray
) -> None:
    labels = level(pixel_leaf, [1, 1, 2, 3, 4, 2, 2, 2, 2])  # 4 | 5 | 3
    labels[0, 7] = 4  # label 4 (under node 1) painted onto region 3
    out = tree.merge(labels, 4)
    assert out[0, 7] == 4  # not under node 1 in the tree: left alone
    assert set(np.unique(out[:, :4])) == {2}


def test_levels_follow_from_splits_on_a_real_result(seg: Segmentation) -> None:
    tree = LabelTree.from_segmentation(seg)
    levels = seg.levels
    assert len(levels) >= 2
    for coarse, fine in zip(levels[:-1], levels[1:], strict=True):
        labels = coarse.copy()
        for region in np.unique(coarse):
            if not np.array_equal(np.unique(fine[coarse == region]), [region]):
                labels = tree.split(labels, int(region))
        np.testing.assert_array_equal(labels, fine)
        # ... and merging every child back gives the coarse level.
        for region in np.unique(coarse):
            kids = [k for k in tree.children_labels(int(region)) if np.any(labels == k)]
            if kids:
                labels = tree.merge(labels, kids[0])
        np.testing.assert_array_equal(labels, coarse)


def test_split_then_merge_on_a_real_result(seg: Segmentation) -> None:
    tree = LabelTree.from_segmentation(seg)
    labels = seg.levels[0]
    for region in np.unique(labels):
        kids = tree.children_labels(int(region))
        assert kids, "the pixels backbone splits both halves of this image"
        after = tree.split(labels, int(region))
        assert set(np.unique(after)) == (set(np.unique(labels)) - {region}) | set(kids)
        np.testing.assert_array_equal(tree.merge(after, kids[-1]), labels)


def test_describe_and_lookups(tree: LabelTree) -> None:
    assert tree.children_labels(3) == (6, 7)
    assert tree.parent_label(7) == 3 and tree.parent_label(1) is None
    assert tree.level(8) == 3
    assert "splits into 8, 9" in tree.describe(7)
    assert "tree leaf" in tree.describe(4)
    assert "not in the tree" in tree.describe(500)
    assert "background" in tree.describe(0)


def test_bad_trees_are_refused(pixel_leaf: np.ndarray) -> None:
    with pytest.raises(ValueError, match="one root"):
        LabelTree(np.array([-1, -1, 0]), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="cycle"):
        LabelTree(np.array([-1, 2, 1]), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="pixel_leaf"):
        LabelTree(PARENT, pixel_leaf + 20)


def test_history_undo_redo(tree: LabelTree, pixel_leaf: np.ndarray) -> None:
    start = level(pixel_leaf, [0] * 9)
    history = EditHistory()
    assert not history.can_undo and not history.can_redo
    a = history.apply(start, tree.split_edit(start, 1))
    b = history.apply(a, tree.split_edit(a, 3))
    assert history.peek_undo() == "split 3 into 6, 7"
    np.testing.assert_array_equal(history.undo(b), a)
    np.testing.assert_array_equal(history.undo(a), start)
    assert not history.can_undo and history.can_redo
    with pytest.raises(DiffCutError, match="nothing to undo"):
        history.undo(start)
    np.testing.assert_array_equal(history.redo(start), a)
    np.testing.assert_array_equal(history.redo(a), b)
    with pytest.raises(DiffCutError, match="nothing to redo"):
        history.redo(b)
    # A new edit clears the redo stack.
    history.undo(b)
    history.record(tree.split_edit(a, 2))
    assert not history.can_redo


def test_undo_keeps_paint_made_after_the_edit(tree: LabelTree, pixel_leaf: np.ndarray) -> None:
    start = level(pixel_leaf, [0] * 9)
    history = EditHistory()
    after = history.apply(start, tree.split_edit(start, 1))
    after[0, 0] = 50  # painted after the split, inside the split region
    undone = history.undo(after)
    assert undone[0, 0] == 50
    expected = start.copy()
    expected[0, 0] = 50
    np.testing.assert_array_equal(undone, expected)


def test_history_is_bounded(tree: LabelTree, pixel_leaf: np.ndarray) -> None:
    labels = level(pixel_leaf, [0] * 9)
    history = EditHistory(max_steps=2)
    for _ in range(3):
        labels = history.apply(labels, tree.split_edit(labels, 1))
        labels = history.apply(labels, tree.merge_edit(labels, 2))
    assert len(history._undo) == 2
    with pytest.raises(ValueError, match="max_steps"):
        EditHistory(max_steps=0)
    # Memory bound: big records push the oldest out; the last one is always kept.
    first = tree.split_edit(labels, 1)
    small = EditHistory(max_bytes=first.nbytes + 1)
    labels = small.apply(labels, first)
    labels = small.apply(labels, tree.merge_edit(labels, 2))
    assert len(small._undo) == 1 and small.peek_undo() == "merge 2 into 1"
    with pytest.raises(ValueError, match="max_bytes"):
        EditHistory(max_bytes=0)


def test_edit_unravel_and_inverse() -> None:
    edit = Edit(np.array([1, 5]), np.array([1, 1], np.uint32), np.array([2, 3], np.uint32), "x")
    labels = np.ones((2, 3), np.uint32)
    rows, cols = edit.unravel(labels.shape)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 2]
    np.testing.assert_array_equal(edit.inverse().apply(edit.apply(labels)), labels)


def test_labels_too_narrow_for_children_are_widened() -> None:
    parent = np.concatenate([[-1], np.zeros(300, np.int64)])  # root with 300 children
    pixel_leaf = np.arange(1, 301).reshape(15, 20)
    tree = LabelTree(parent, pixel_leaf)
    out = tree.split(np.ones((15, 20), np.uint8), 1)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, pixel_leaf + 1)
    np.testing.assert_array_equal(tree.merge(out, 301), np.ones((15, 20)))


def test_docstring_examples() -> None:
    import doctest

    from napari_diffcut.results import editing, export

    for module in (editing, export):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0
