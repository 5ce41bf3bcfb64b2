"""Split and merge regions along the NCut tree, with undo (numpy only).

A label image made by napari-diffcut names tree nodes: label ``L`` is node
``L - 1`` (module docstring of :mod:`napari_diffcut.core.hierarchy`). Every
pixel also knows its deepest tree node (``pixel_leaf``, from the soft
upsampling of method.md 7). That is enough to move one region up or down the
tree without running the model:

- **split** ``L``: the pixels of ``L`` become its children's labels; each pixel
  goes to the child whose subtree holds its ``pixel_leaf``.
- **merge** ``L``: ``L``, its sibling(s) and everything below them become the
  parent's label.

Paint edits are respected. An edit only touches pixels that (a) lie in the
region's part of the tree (their ``pixel_leaf`` is in the subtree) **and**
(b) still carry a label of that subtree. So:

- pixels the user painted with another label, or erased to 0, inside the
  region keep the user's value (the user's paint wins);
- pixels the user painted with the region's label *outside* its tree area keep
  that label after a split (the tree has no child to give them) and are not
  pulled into a merge of another branch;
- regions elsewhere in the image are never touched.

Split then merge (of either child) gives back the original labels whenever the
region holds no painted descendant labels. Edits are small :class:`Edit`
records (changed pixels, old and new values) kept in an :class:`EditHistory`
for undo and redo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import DiffCutError

if TYPE_CHECKING:  # pragma: no cover
    from napari_diffcut.pipeline.segmentation import Segmentation


@dataclass(frozen=True)
class Edit:
    """One change of a label image: flat pixel indices with old and new values.

    Attributes
    ----------
    indices : ndarray of int64
        Flat (C-order) indices of the changed pixels.
    old, new : ndarray
        Values before and after, one per index.
    description : str
        Human-readable summary ("split 5 into 10, 11").
    """

    indices: NDArray[np.int64]
    old: NDArray[Any]
    new: NDArray[Any]
    description: str = ""

    @property
    def n_pixels(self) -> int:
        """Number of pixels the edit changes."""
        return int(self.indices.size)

    @property
    def nbytes(self) -> int:
        """Memory held by the record."""
        return int(self.indices.nbytes + self.old.nbytes + self.new.nbytes)

    def apply(self, labels: NDArray[Any]) -> NDArray[Any]:
        """A copy of ``labels`` with the edit applied."""
        labels = np.asarray(labels)
        # A label the input dtype cannot hold widens the copy (see _values_dtype).
        out = np.array(labels, dtype=np.result_type(labels.dtype, self.new.dtype))
        out.reshape(-1)[self.indices] = self.new
        return out

    def inverse(self) -> Edit:
        """The edit that undoes this one."""
        return Edit(self.indices, self.new, self.old, f"undo {self.description}")

    def where_current(self, labels: NDArray[Any]) -> Edit:
        """This edit restricted to pixels that still hold its ``old`` values.

        Used by undo and redo: pixels the user repainted since are left alone.
        """
        keep = np.asarray(labels).reshape(-1)[self.indices] == self.old
        return Edit(self.indices[keep], self.old[keep], self.new[keep], self.description)

    def unravel(self, shape: Sequence[int]) -> tuple[NDArray[np.intp], ...]:
        """The indices as a tuple of index arrays (for ``Labels.data_setitem``)."""
        return np.unravel_index(self.indices, tuple(shape))


class LabelTree:
    """The NCut tree plus the pixel map, with the lookups split and merge need.

    Parameters
    ----------
    parent : array of int, shape (n,)
        Parent node id per node, -1 for the root.
    pixel_leaf : array of int, shape (H, W)
        Deepest tree node of every pixel (``Segmentation.pixel_leaf``).
    cost : array of float, shape (n,), optional
        NCut cost of each node's split (only used for descriptions).

    Raises
    ------
    ValueError
        ``parent`` is not a tree with one root, or ``pixel_leaf`` names
        nodes outside ``0..n-1``.

    Examples
    --------
    >>> parent = np.array([-1, 0, 0])          # root 0 with children 1, 2
    >>> pixel_leaf = np.array([[1, 1, 2, 2]])
    >>> tree = LabelTree(parent, pixel_leaf)
    >>> tree.split(np.array([[1, 1, 1, 1]], np.uint32), 1)
    array([[2, 2, 3, 3]], dtype=uint32)
    >>> tree.merge(np.array([[2, 2, 3, 3]], np.uint32), 3)
    array([[1, 1, 1, 1]], dtype=uint32)
    """

    def __init__(
        self,
        parent: NDArray[np.integer],
        pixel_leaf: NDArray[np.integer],
        cost: NDArray[np.floating] | None = None,
    ) -> None:
        self.parent = np.asarray(parent, np.int64)
        # Kept as given (int32 from the engine): no per-pixel copy for big images.
        self.pixel_leaf = np.asarray(pixel_leaf)
        if self.pixel_leaf.dtype.kind not in "ui":
            raise ValueError(f"pixel_leaf must be integer node ids, got {self.pixel_leaf.dtype}")
        n = self.n_nodes
        self.cost = np.full(n, np.nan) if cost is None else np.asarray(cost, np.float64)
        if self.parent.ndim != 1 or n < 1 or self.cost.shape != (n,):
            raise ValueError(
                f"parent must be a 1-D array with one entry per node, got shape {self.parent.shape}"
            )
        if self.pixel_leaf.size and (self.pixel_leaf.min() < 0 or self.pixel_leaf.max() >= n):
            raise ValueError(f"pixel_leaf must hold node ids in 0..{n - 1}")
        self.depth = _depths(self.parent)
        self._children = _children(self.parent)
        self._ancestor = _ancestor_table(self.parent, self.depth)

    @classmethod
    def from_segmentation(cls, seg: Segmentation) -> LabelTree:
        """The tree and pixel map of a :class:`Segmentation`."""
        arrays = seg.hierarchy.arrays
        return cls(arrays.parent, seg.pixel_leaf, arrays.cost)

    @property
    def n_nodes(self) -> int:
        """Number of tree nodes (labels ``1..n_nodes`` name them)."""
        return int(self.parent.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the label images this tree edits."""
        return tuple(int(s) for s in self.pixel_leaf.shape)

    # -- tree lookups (labels in, labels out) -----------------------------------
    def node(self, label: int) -> int:
        """The node id of ``label``; ``ValueError`` for a label not in the tree."""
        if isinstance(label, bool) or not isinstance(label, int | np.integer):
            raise ValueError(f"label must be an integer, got {label!r}")
        if not 1 <= int(label) <= self.n_nodes:
            raise ValueError(
                f"label {label} is not a region of the tree "
                f"(labels are 1..{self.n_nodes}; "
                "0 is background and larger values were painted by hand)"
            )
        return int(label) - 1

    def children_labels(self, label: int) -> tuple[int, ...]:
        """Labels of the children of ``label`` (empty for a tree leaf)."""
        return tuple(c + 1 for c in self._children[self.node(label)])

    def parent_label(self, label: int) -> int | None:
        """Label of the parent of ``label`` (None for the root)."""
        p = int(self.parent[self.node(label)])
        return p + 1 if p >= 0 else None

    def level(self, label: int) -> int:
        """Depth of ``label``'s node: 0 for the root, d if first in ``levels[d-1]``."""
        return int(self.depth[self.node(label)])

    def describe(self, label: int) -> str:
        """One line about a region for status bars."""
        if label == 0:
            return "background (label 0)"
        try:
            node = self.node(label)
        except ValueError:
            return f"label {label}: painted by hand, not in the tree"
        kids = self.children_labels(label)
        parent = self.parent_label(label)
        parts = [f"region {label}: level {self.level(label)}"]
        parts.append(f"parent {parent}" if parent else "root")
        if kids:
            parts.append(f"splits into {', '.join(map(str, kids))} (NCut {self.cost[node]:.3g})")
        else:
            parts.append("tree leaf")
        return ", ".join(parts)

    # -- editing -----------------------------------------------------------------
    def split_edit(self, labels: NDArray[np.integer], label: int) -> Edit:
        """The :class:`Edit` that replaces region ``label`` by its children.

        Raises
        ------
        ValueError
            ``labels`` has the wrong shape or ``label`` is not a tree region.
        DiffCutError
            ``label`` is a tree leaf, is not in ``labels``, or lies only
            outside its tree region (painted by hand).
        """
        lab = self._check_labels(labels)
        node = self.node(label)
        kids = self._children[node]
        if not kids:
            raise DiffCutError(
                f"region {label} is a leaf of the tree: it has no children to split into"
            )
        flat = lab.reshape(-1)
        leaf = self.pixel_leaf.reshape(-1)
        idx = np.flatnonzero(flat == label)
        if idx.size == 0:
            raise DiffCutError(f"label {label} is not in the image: nothing to split")
        # The child of `node` above each pixel's leaf (levels nest, method.md 6).
        child = self._ancestor[self.depth[node] + 1, leaf[idx]]
        ok = self.parent[child] == node  # False for painted pixels outside the subtree
        idx, child = idx[ok], child[ok]
        if idx.size == 0:
            raise DiffCutError(
                f"no pixel of label {label} lies in its tree region (all painted by hand?)"
            )
        new = (child + 1).astype(_values_dtype(flat.dtype, self.n_nodes))
        kid_labels = ", ".join(str(c + 1) for c in kids)
        return Edit(idx, flat[idx].copy(), new, f"split {label} into {kid_labels}")

    def merge_edit(self, labels: NDArray[np.integer], label: int) -> Edit:
        """The :class:`Edit` that replaces ``label`` and its sibling(s) by their parent.

        Only pixels whose ``pixel_leaf`` is under the parent **and** that carry a
        label of the parent's subtree change (see the module docstring).

        Raises
        ------
        ValueError
            ``labels`` has the wrong shape or ``label`` is not a tree region.
        DiffCutError
            ``label`` is the root, is not in ``labels``, or lies only outside
            its tree region (painted by hand).
        """
        lab = self._check_labels(labels)
        node = self.node(label)
        parent = int(self.parent[node])
        if parent < 0:
            raise DiffCutError(
                f"region {label} is the root of the tree: there is no parent to merge into"
            )
        flat = lab.reshape(-1)
        if not np.any(flat == label):
            raise DiffCutError(f"label {label} is not in the image: nothing to merge")
        in_tree = self._in_subtree(self.pixel_leaf.reshape(-1), parent)
        in_labels = self._labels_in_subtree(flat, parent)
        idx = np.flatnonzero(in_tree & in_labels & (flat != parent + 1))
        if idx.size == 0:  # then every pixel of `label` lies outside its tree area
            raise DiffCutError(
                f"no pixel of label {label} lies in its tree region (all painted by hand?)"
            )
        new = np.full(idx.size, parent + 1, _values_dtype(flat.dtype, parent + 1))
        return Edit(idx, flat[idx].copy(), new, f"merge {label} into {parent + 1}")

    def split(self, labels: NDArray[np.integer], label: int) -> NDArray[Any]:
        """New labels: ``label`` replaced by its children (:meth:`split_edit`)."""
        return self.split_edit(labels, label).apply(labels)

    def merge(self, labels: NDArray[np.integer], label: int) -> NDArray[Any]:
        """New labels: ``label`` and siblings become the parent (:meth:`merge_edit`)."""
        return self.merge_edit(labels, label).apply(labels)

    # -- helpers -------------------------------------------------------------------
    def _check_labels(self, labels: NDArray[np.integer]) -> NDArray[np.integer]:
        lab = np.asarray(labels)
        if lab.shape != self.shape or lab.dtype.kind not in "ui":
            raise ValueError(
                f"labels must be an integer array of shape {self.shape} "
                "(the pixel map's), "
                f"got {lab.dtype} of shape {lab.shape}"
            )
        return lab

    def _in_subtree(self, nodes: NDArray[np.int64], root: int) -> NDArray[np.bool_]:
        """Whether each node id lies in the subtree of ``root`` (itself included)."""
        return self._ancestor[self.depth[root], nodes] == root

    def _labels_in_subtree(self, values: NDArray[np.integer], root: int) -> NDArray[np.bool_]:
        """Whether each label value names a node of ``root``'s subtree."""
        v = values.astype(np.int64) - 1
        valid = (v >= 0) & (v < self.n_nodes)
        return valid & self._in_subtree(np.where(valid, v, 0), root)


class EditHistory:
    """Undo and redo stacks of :class:`Edit` records for one label image.

    The history does not hold the image: ``undo`` and ``redo`` take the
    current labels, so that paint strokes made between edits stay. Undo only
    restores pixels that still carry the value the edit gave them.

    Parameters
    ----------
    max_steps : int
        Oldest edits are dropped beyond this many.
    max_bytes : int
        Oldest edits are also dropped while the records hold more memory
        than this (a split of a large region records every pixel); the last
        edit is always kept.

    Examples
    --------
    >>> tree = LabelTree(np.array([-1, 0, 0]), np.array([[1, 2]]))
    >>> history = EditHistory()
    >>> start = np.array([[1, 1]], np.uint32)
    >>> labels = history.apply(start, tree.split_edit(start, 1))
    >>> labels
    array([[2, 3]], dtype=uint32)
    >>> history.undo(labels)
    array([[1, 1]], dtype=uint32)
    """

    def __init__(self, max_steps: int = 100, max_bytes: int = 512 * 2**20) -> None:
        for name, value in (("max_steps", max_steps), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.max_steps = max_steps
        self.max_bytes = max_bytes
        self._undo: list[Edit] = []
        self._redo: list[Edit] = []

    @property
    def can_undo(self) -> bool:
        """Whether there is an edit to undo."""
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        """Whether there is an undone edit to redo."""
        return bool(self._redo)

    def peek_undo(self) -> str | None:
        """Description of the edit ``undo`` would revert."""
        return self._undo[-1].description if self._undo else None

    def record(self, edit: Edit) -> None:
        """Remember an edit that was just applied (clears the redo stack)."""
        if edit.n_pixels == 0:
            return
        self._undo.append(edit)
        del self._undo[: -self.max_steps]
        while len(self._undo) > 1 and sum(e.nbytes for e in self._undo) > self.max_bytes:
            del self._undo[0]
        self._redo.clear()

    def apply(self, labels: NDArray[Any], edit: Edit) -> NDArray[Any]:
        """Apply ``edit`` to a copy of ``labels``, record it and return the copy."""
        out = edit.apply(labels)
        self.record(edit)
        return out

    def undo_edit(self, labels: NDArray[Any]) -> Edit:
        """Pop the last edit and return the change that reverts it on ``labels``.

        Raises
        ------
        DiffCutError
            Nothing to undo.
        """
        if not self._undo:
            raise DiffCutError("nothing to undo")
        edit = self._undo.pop()
        self._redo.append(edit)
        return edit.inverse().where_current(labels)

    def redo_edit(self, labels: NDArray[Any]) -> Edit:
        """Pop the last undone edit and return the change that re-applies it.

        Raises
        ------
        DiffCutError
            Nothing to redo.
        """
        if not self._redo:
            raise DiffCutError("nothing to redo")
        edit = self._redo.pop()
        self._undo.append(edit)
        return edit.where_current(labels)

    def undo(self, labels: NDArray[Any]) -> NDArray[Any]:
        """``labels`` with the last edit reverted (a copy)."""
        return self.undo_edit(labels).apply(labels)

    def redo(self, labels: NDArray[Any]) -> NDArray[Any]:
        """``labels`` with the last undone edit applied again (a copy)."""
        return self.redo_edit(labels).apply(labels)

    def clear(self) -> None:
        """Forget every edit."""
        self._undo.clear()
        self._redo.clear()


def split(labels: NDArray[np.integer], label: int, tree: LabelTree) -> NDArray[Any]:
    """Replace region ``label`` by its children (:meth:`LabelTree.split_edit`)."""
    return tree.split(labels, label)


def merge(labels: NDArray[np.integer], label: int, tree: LabelTree) -> NDArray[Any]:
    """Replace ``label`` and siblings by the parent (:meth:`LabelTree.merge_edit`)."""
    return tree.merge(labels, label)


def _values_dtype(dtype: np.dtype[Any], top: int) -> np.dtype[Any]:
    """``dtype`` if it holds labels up to ``top``, else uint32 (the label convention)."""
    return dtype if top <= np.iinfo(dtype).max else np.dtype(np.uint32)


def _depths(parent: NDArray[np.int64]) -> NDArray[np.int64]:
    """Depth of every node; ``ValueError`` unless ``parent`` is one rooted tree."""
    n = parent.shape[0]
    if np.any((parent < -1) | (parent >= n)) or int(np.sum(parent < 0)) != 1:
        raise ValueError("parent must describe one tree: exactly one root (-1), ids in 0..n-1")
    depth = np.full(n, -1, np.int64)
    depth[parent < 0] = 0
    # Repeated relaxation converges in (tree height) rounds; a cycle never does.
    for _ in range(n):
        pending = depth < 0
        if not pending.any():
            return depth
        ready = pending & (depth[np.maximum(parent, 0)] >= 0)
        if not ready.any():
            break
        depth[ready] = depth[parent[ready]] + 1
    if np.any(depth < 0):
        raise ValueError("parent contains a cycle or nodes not connected to the root")
    return depth


def _children(parent: NDArray[np.int64]) -> list[list[int]]:
    """Children ids per node, in id order."""
    kids: list[list[int]] = [[] for _ in range(parent.shape[0])]
    for i, p in enumerate(parent.tolist()):
        if p >= 0:
            kids[p].append(i)
    return kids


def _ancestor_table(parent: NDArray[np.int64], depth: NDArray[np.int64]) -> NDArray[np.int64]:
    """``table[d, i]``: ancestor of node i at depth d (i itself when depth[i] <= d).

    Subtree tests become one lookup: node i is under node r iff
    ``table[depth[r], i] == r``.
    """
    n = parent.shape[0]
    height = int(depth.max()) + 1
    table = np.tile(np.arange(n, dtype=np.int64), (height + 1, 1))
    for i in np.argsort(depth, kind="stable"):  # parents before children
        d = int(depth[i])
        if d > 0:
            table[:d, i] = table[:d, parent[i]]
    return table
