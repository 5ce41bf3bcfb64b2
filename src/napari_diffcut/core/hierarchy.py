"""Recursive two-way NCut tree, automatic threshold and flat cuts (method.md 6).

The whole tree is grown once (down to ``min_size`` / ``max_depth``), keeping
each node's NCut cost, size, depth and parent. A flat segmentation for any
threshold ``tau`` is a top-down pruning of that tree: a node's split is
accepted iff the node is reached and its cost is below ``tau``. No eigen
solve is needed to re-cut.

The automatic threshold is per node (issue 11, part 1; :mod:`napari_diffcut.core.null`):
when the tree is grown with its ``grid_shape``, every split the automatic cut
can reach also records its *null cost*: what the same node set costs to cut
in the content-free graph with the graph's own spatial kernel (the cheapest
split the same solver finds there). ``cut("auto")`` accepts a reached split
iff ``cost < NULL_RATIO * null_cost``: the found boundary lets through less
than half of the crossing flow that locality alone allows for that node. A
straight cut through a uniform region costs what locality predicts (ratio
about 1) and is refused, however cheap its NCut is; a real boundary blocks
most of the flow. Trees without null costs (grown
without ``grid_shape``, or read from an older file) fall back to Otsu's rule
on the costs (:func:`auto_threshold`).

Label convention used everywhere in napari-diffcut: **a segment's label is its
tree node id + 1**. Node ids are assigned breadth-first (root = 0), so labels
are stable across thresholds and levels (a region that does not split keeps
its label), 0 is never a segment, and a label leads straight to its tree node
for split/merge editing.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import check_int, check_threshold
from napari_diffcut.core.tree import (
    NULL_RATIO,
    STRUCTURELESS_COST,
    Node,
    TreeArrays,
    auto_threshold,
    build_tree,
    iter_ncut_tree,
    otsu_threshold,
)


class Hierarchy:
    """A grown NCut tree on a patch grid, with flat cuts at any threshold.

    Parameters
    ----------
    tree : TreeArrays
        The grown tree.
    grid_shape : tuple of int
        ``(h, w)`` of the patch grid; ``h * w`` equals the number of patches.
    threshold : "auto" or float
        Default threshold used by :attr:`labels` and :attr:`levels`.

    Attributes
    ----------
    auto_threshold : float
        A numeric NCut threshold standing for the automatic cut (e.g. the start
        of a threshold slider). With null costs (the per-node rule) it is the
        smallest threshold whose cut keeps every split of ``cut("auto")``: just
        above the largest accepted cost, or the root's cost when the automatic
        cut keeps one segment (so ``cut(auto_threshold)`` is then one segment
        too). ``cut(auto_threshold)`` contains ``cut("auto")`` and may split
        further where the null test refused a cheap split. Without null costs
        it is Otsu's threshold (:func:`auto_threshold`), which ``cut("auto")`` applies.

    Notes
    -----
    ``labels``, ``levels`` and ``cut`` return label images on the patch grid;
    the value of a segment is its node id + 1 (see module docstring).
    """

    def __init__(
        self,
        tree: TreeArrays,
        grid_shape: tuple[int, int],
        threshold: float | str = "auto",
    ) -> None:
        if tree.leaf_of_patch.size != grid_shape[0] * grid_shape[1]:
            raise ValueError(
                f"grid_shape {grid_shape} does not match {tree.leaf_of_patch.size} patches"
            )
        self._tree = tree
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.threshold_setting = check_threshold(threshold)
        self._children = tree.children()
        self.auto_threshold = (
            auto_threshold(tree.cost) if tree.null_cost is None else self._equivalent_tau()
        )

    # -- tree ------------------------------------------------------------------
    @property
    def tree(self) -> list[Node]:
        """All nodes of the grown tree, in id (breadth-first) order."""
        t = self._tree
        return [
            Node(
                id=i,
                parent=int(t.parent[i]),
                children=tuple(self._children[i]),
                cost=float(t.cost[i]),
                size=int(t.size[i]),
                depth=int(t.depth[i]),
            )
            for i in range(t.n_nodes)
        ]

    @property
    def arrays(self) -> TreeArrays:
        """The flat tree arrays (parent, cost, size, depth, leaf_of_patch)."""
        return self._tree

    @property
    def threshold(self) -> float:
        """The threshold in force: :attr:`auto_threshold` when the setting is "auto"."""
        return self.resolve(self.threshold_setting)

    @property
    def null_ratio(self) -> NDArray[np.float64] | None:
        """Per node ``cost / null_cost`` (nan for leaves); None without null costs."""
        null = self._tree.null_cost
        if null is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(self._tree.cost / null, np.float64)

    def auto_accepts(self) -> NDArray[np.bool_]:
        """Per node: does the automatic rule accept its split (if the node is reached)?

        ``cost < NULL_RATIO * null_cost`` and ``cost < 1`` with null costs;
        ``cost < auto_threshold`` (Otsu) without.
        """
        t = self._tree
        has_kids = np.array([bool(k) for k in self._children], bool)
        if t.null_cost is None:
            return has_kids & (t.cost < self.auto_threshold)
        with np.errstate(invalid="ignore"):
            ok = (t.cost < NULL_RATIO * t.null_cost) & (t.cost < STRUCTURELESS_COST)
        return has_kids & ok

    def _equivalent_tau(self) -> float:
        """:attr:`auto_threshold` of the per-node rule (see the class docstring)."""
        t = self._tree
        kept = self._accepted(self.auto_accepts(), None)
        if kept.any():
            return float(min(1.0, np.nextafter(t.cost[kept].max(), np.inf)))
        root = float(t.cost[0]) if t.n_nodes else float("nan")
        return float(min(1.0, max(root, 1e-12))) if np.isfinite(root) else 1.0

    def _accepted(
        self, accepts: NDArray[np.bool_], max_level: int | None
    ) -> NDArray[np.bool_]:
        """Top-down pruning: a split is accepted iff its node is reached and it passes."""
        t = self._tree
        accepted = np.zeros(t.n_nodes, bool)
        # Breadth-first ids: a parent always precedes its children.
        for i in range(t.n_nodes):
            p = t.parent[i]
            accepted[i] = (
                (p < 0 or accepted[p])
                and accepts[i]
                and (max_level is None or t.depth[i] < max_level)
            )
        return accepted

    def resolve(self, threshold: float | str) -> float:
        """Turn ``"auto"`` or a number into the numeric threshold."""
        tau = check_threshold(threshold)
        return self.auto_threshold if tau == "auto" else float(tau)

    # -- cutting ---------------------------------------------------------------
    def segment_of_node(
        self, threshold: float | str | None = None, max_level: int | None = None
    ) -> NDArray[np.int64]:
        """For every node, the id of the segment (kept node) that contains it.

        A split of node n is accepted iff n is reached from the root through
        accepted splits, it passes the threshold and (when ``max_level`` is
        given) ``depth[n] < max_level``. A numeric threshold passes
        ``cost[n] < threshold``; ``"auto"`` applies :meth:`auto_accepts`
        (the per-node null-ratio rule).
        """
        setting = check_threshold(self.threshold_setting if threshold is None else threshold)
        t = self._tree
        if setting == "auto":
            accepts = self.auto_accepts()
        else:
            has_kids = np.array([bool(k) for k in self._children], bool)
            accepts = has_kids & (t.cost < float(setting))
        accepted = self._accepted(accepts, max_level)
        seg = np.arange(t.n_nodes)
        for i in range(t.n_nodes):
            p = t.parent[i]
            if p >= 0:
                seg[i] = i if accepted[p] else seg[p]
        return seg

    def node_lut(
        self, threshold: float | str | None = None, max_level: int | None = None
    ) -> NDArray[np.uint32]:
        """Lookup table node id -> label (segment id + 1)."""
        return (self.segment_of_node(threshold, max_level) + 1).astype(np.uint32)

    def cut(self, threshold: float | str) -> NDArray[np.uint32]:
        """Patch-grid labels for another threshold; no eigen solve."""
        lut = self.node_lut(threshold)
        return lut[self._tree.leaf_of_patch].reshape(self.grid_shape)

    @property
    def labels(self) -> NDArray[np.uint32]:
        """Patch-grid labels at the chosen threshold."""
        return self.cut(self.threshold_setting)

    def n_levels(self, threshold: float | str | None = None) -> int:
        """Number of hierarchy levels at a threshold (>= 1)."""
        seg = self.segment_of_node(threshold)
        t = self._tree
        kept = [i for i in range(t.n_nodes) if seg[i] == i and t.parent[i] >= 0]
        return max([int(t.depth[i]) for i in kept], default=1)

    def level_luts(self, threshold: float | str | None = None) -> list[NDArray[np.uint32]]:
        """Node -> label lookup tables of every level, coarsest first."""
        return [
            self.node_lut(threshold, max_level=d)
            for d in range(1, self.n_levels(threshold) + 1)
        ]

    @property
    def levels(self) -> list[NDArray[np.uint32]]:
        """Patch-grid labels per tree depth at the chosen threshold, coarsest first.

        Level d applies the accepted splits of depth < d; the last level equals
        :attr:`labels`, and every segment of level d+1 lies inside one segment
        of level d.
        """
        leaf = self._tree.leaf_of_patch
        return [lut[leaf].reshape(self.grid_shape) for lut in self.level_luts()]

    def iter_leaves(self) -> Iterator[int]:
        """Ids of the grown tree's leaves."""
        return (i for i, kids in enumerate(self._children) if not kids)


def ncut_hierarchy(
    transition: NDArray[np.floating],
    grid_shape: tuple[int, int],
    *,
    power: int = 1,
    graph: str = "walk",
    threshold: float | str = "auto",
    min_size: int = 16,
    max_depth: int = 8,
    seed: int = 0,
) -> Hierarchy:
    """Hierarchical segmentation of a patch grid from a transition matrix.

    Parameters
    ----------
    transition : ndarray, shape (N, N)
        Row-stochastic transition matrix P (e.g. aggregated self-attention).
    grid_shape : tuple of int
        ``(h, w)`` with ``h * w == N``.
    power : int
        Walk length k; P^k is used (method.md 3.2).
    graph : {"walk", "similarity"}
        Random-walk graph or attention-row similarity (method.md 3.1, 4).
    threshold : "auto" or float in (0, 1]
        NCut threshold of the default cut; "auto" is the per-node null-ratio
        rule (module docstring).
    min_size : int
        Minimum segment size in patches.
    max_depth : int
        Maximum tree depth.
    seed : int
        Seed of the Lanczos start vectors.

    Returns
    -------
    Hierarchy

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> blocks = np.kron(np.eye(2), np.ones((8, 8))) + 0.01 * rng.random((16, 16))
    >>> p = blocks / blocks.sum(1, keepdims=True)
    >>> h = ncut_hierarchy(p, (4, 4), min_size=2)
    >>> len(np.unique(h.labels))
    2
    """
    from napari_diffcut.core.walk import build_affinity

    check_int("min_size", min_size, 1)
    check_int("max_depth", max_depth, 1)
    check_int("power", power, 1)
    check_threshold(threshold)
    p = np.asarray(transition, np.float32)
    if p.ndim != 2 or len(grid_shape) != 2 or p.shape[0] != grid_shape[0] * grid_shape[1]:
        raise ValueError(
            f"grid_shape {tuple(grid_shape)} must multiply to N = {p.shape[0]} "
            f"(transition shape {p.shape})"
        )
    affinity, _ = build_affinity(p, power=power, graph=graph, dtype=np.float32)
    grid = (int(grid_shape[0]), int(grid_shape[1]))
    tree = build_tree(
        affinity, min_size=min_size, max_depth=max_depth, seed=seed, grid_shape=grid
    )
    return Hierarchy(tree, (int(grid_shape[0]), int(grid_shape[1])), threshold)


__all__ = [
    "NULL_RATIO",
    "STRUCTURELESS_COST",
    "Hierarchy",
    "Node",
    "TreeArrays",
    "auto_threshold",
    "build_tree",
    "iter_ncut_tree",
    "ncut_hierarchy",
    "otsu_threshold",
]
