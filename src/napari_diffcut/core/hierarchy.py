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

from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import check_int, check_threshold
from napari_diffcut.core.ncut import (
    bipartition,
    fiedler_vector,
    single_thread_blas,
    sweep_cut,
)
from napari_diffcut.core.null import NullModel, null_model

#: A split whose NCut is at least this is never accepted: a structureless walk
#: gives NCut = 1 for every split (method.md 3.1), so children are not grown.
STRUCTURELESS_COST = 1.0

#: The automatic cut keeps a split iff its NCut is below this fraction of its
#: null cost (module docstring). In the random-walk reading (Meila & Shi 2001)
#: NCut is the escape probability of the stationary walk, so 1/2 means: a
#: walker is at least twice as likely to stay on its side as locality alone
#: predicts. Measured ratios (benchmarks/quality.py, README "Automatic
#: threshold"): content-free splits 0.7-1.3, real boundaries 0.02-0.4; the
#: real-image scores are the same for any value in 0.4-0.6.
NULL_RATIO = 0.5


@dataclass(frozen=True)
class Node:
    """One node of the NCut tree (a region at some depth).

    Attributes
    ----------
    id : int
        Node id (breadth-first, root 0). Its label is ``id + 1``.
    parent : int
        Parent id, -1 for the root.
    children : tuple of int
        The two children ids, or () for a tree leaf.
    cost : float
        NCut cost of splitting this node into its children (nan for a leaf).
    size : int
        Number of patches (graph nodes) in the region.
    depth : int
        0 for the root.
    """

    id: int
    parent: int
    children: tuple[int, ...]
    cost: float
    size: int
    depth: int

    @property
    def label(self) -> int:
        """Label value of this node in label images."""
        return self.id + 1

    def as_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return {
            "id": self.id,
            "parent": self.parent,
            "children": list(self.children),
            "cost": None if np.isnan(self.cost) else float(self.cost),
            "size": self.size,
            "depth": self.depth,
        }


@dataclass
class TreeArrays:
    """Flat arrays describing a grown NCut tree (input of :class:`Hierarchy`).

    ``null_cost`` (optional) is each split's NCut under the content-free null
    graph (:mod:`napari_diffcut.core.null`), nan for leaves; None when the tree
    was grown without a grid (then "auto" uses :func:`auto_threshold`).
    """

    parent: NDArray[np.int64]
    cost: NDArray[np.float64]
    size: NDArray[np.int64]
    depth: NDArray[np.int64]
    leaf_of_patch: NDArray[np.int64]
    null_cost: NDArray[np.float64] | None = None

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return int(self.parent.shape[0])

    def children(self) -> list[list[int]]:
        """Children lists per node, in id order."""
        kids: list[list[int]] = [[] for _ in range(self.n_nodes)]
        for i, p in enumerate(self.parent.tolist()):
            if p >= 0:
                kids[p].append(i)
        return kids


def otsu_threshold(values: NDArray[np.float64]) -> float:
    """Otsu's two-class threshold of a 1-D sample (midpoint of the best gap).

    Examples
    --------
    >>> otsu_threshold(np.array([0.1, 0.12, 0.8, 0.9]))
    0.46
    """
    v = np.sort(np.asarray(values, np.float64))
    if v.size < 2 or v[0] == v[-1]:
        return float("nan")
    best, best_t = -1.0, float("nan")
    n = v.size
    csum = np.cumsum(v)
    for i in range(1, n):
        if v[i] == v[i - 1]:
            continue
        w0, w1 = i / n, (n - i) / n
        m0 = csum[i - 1] / i
        m1 = (csum[-1] - csum[i - 1]) / (n - i)
        between = w0 * w1 * (m0 - m1) ** 2
        if between > best:
            best, best_t = between, 0.5 * (v[i - 1] + v[i])
    return float(best_t)


def auto_threshold(costs: NDArray[np.float64]) -> float:
    """Fallback global NCut threshold for trees without null costs (method.md 6, rule 1).

    Over-segments spatially local graphs (method.md 6, "Measured on real
    images"); the tree's default automatic rule is the per-node null-ratio test
    (module docstring), this is used only where no null cost was recorded.

    Otsu's two-class split of the logarithms of the tree's split costs,
    together with the reference cost 1 of a structureless walk (method.md 3.1).
    Costs of real boundaries and of splits through homogeneous regions differ
    by orders of magnitude (0.01 vs 0.5), hence the log scale. The reference
    makes a tree whose splits are all strong keep them all. With no finite
    cost below 1, 0.5 (the DiffCut constant) is returned.
    """
    finite = np.asarray(costs, np.float64)
    finite = finite[np.isfinite(finite) & (finite < STRUCTURELESS_COST)]
    finite = np.maximum(finite, 1e-3)  # all costs below 1e-3 are equally "perfect"
    if finite.size == 0:
        return 0.5
    log_tau = otsu_threshold(np.log(np.append(finite, STRUCTURELESS_COST)))
    return float(np.exp(log_tau)) if np.isfinite(log_tau) else 0.5


def iter_ncut_tree(
    affinity: NDArray[np.floating],
    *,
    min_size: int = 16,
    max_depth: int = 8,
    seed: int = 0,
    grid_shape: tuple[int, int] | None = None,
) -> Generator[tuple[int, int], None, TreeArrays]:
    """Grow the full recursive NCut tree, yielding after each split.

    With ``grid_shape`` (the ``(h, w)`` patch grid of the nodes, row-major),
    each split that the automatic cut reaches (root, and children of splits
    it accepts) also records its null cost (module docstring; nan elsewhere),
    which the automatic cut of :class:`Hierarchy` uses. Cost: the kernel (one
    pass over W), the dense null graph, and one extra split per reached node.

    Breadth-first (method.md 6, reference recursion): each node's graph is W
    restricted to its patches with degrees recomputed inside (edges to the
    outside dropped, Shi & Malik). A node becomes a leaf when it has fewer than
    ``2 * min_size`` patches, reaches ``max_depth``, or its best split costs at
    least 1 (no structure).

    The graph is used in float32 (a float64 ``affinity`` is converted once;
    pass float32 to save the copy), each split on one BLAS thread
    (core/ncut.py docstring; benchmarks/NOTES.md).

    Yields
    ------
    (splits_done, splits_upper_bound) : tuple of int
        After every eigen solve; closing the generator stops the recursion.

    Returns
    -------
    TreeArrays
    """
    # float32 halves the memory traffic of every product with W; sums, the
    # Lanczos recurrence and the costs stay float64 (core/ncut.py docstring).
    affinity = np.ascontiguousarray(affinity, dtype=np.float32)
    n = affinity.shape[0]
    parent: list[int] = [-1]
    cost: list[float] = [float("nan")]
    size: list[int] = [n]
    depth: list[int] = [0]
    members: dict[int, NDArray[np.int64]] = {0: np.arange(n)}
    leaf_of_patch = np.zeros(n, np.int64)
    queue: deque[int] = deque([0])
    bound = max(1, min(2**max_depth - 1, n // max(min_size, 1)))
    done = 0
    null = None if grid_shape is None else null_model(affinity, grid_shape)
    null_cost: list[float] = [float("nan")]
    auto_ok: dict[int, bool] = {}
    one_thread = single_thread_blas()  # robust to busy cores (core/ncut.py docstring)
    while queue:
        node = queue.popleft()
        idx = members.pop(node)
        if len(idx) < 2 * min_size or depth[node] >= max_depth:
            continue
        with one_thread():
            sub = affinity if len(idx) == n else affinity[np.ix_(idx, idx)]
            split = _split_subgraph(sub, min_size, seed)
        done += 1
        yield done, bound
        if split is None:
            continue
        mask, c = split
        cost[node] = c
        if c >= STRUCTURELESS_COST:
            continue
        if null is not None and (parent[node] < 0 or auto_ok.get(parent[node], False)):
            # Only nodes the automatic cut can reach need the null (a few solves).
            with one_thread():
                null_cost[node] = _null_cost(null, n, idx, mask, min_size, seed)
            auto_ok[node] = c < NULL_RATIO * null_cost[node]
        for side in (idx[mask], idx[~mask]):
            child = len(parent)
            parent.append(node)
            cost.append(float("nan"))
            null_cost.append(float("nan"))
            size.append(len(side))
            depth.append(depth[node] + 1)
            members[child] = side
            leaf_of_patch[side] = child
            queue.append(child)
    return TreeArrays(
        parent=np.asarray(parent, np.int64),
        cost=np.asarray(cost, np.float64),
        size=np.asarray(size, np.int64),
        depth=np.asarray(depth, np.int64),
        leaf_of_patch=leaf_of_patch,
        null_cost=None if null is None else np.asarray(null_cost, np.float64),
    )


def _null_cost(
    null: NullModel,
    n: int,
    idx: NDArray[np.int64],
    mask: NDArray[np.bool_],
    min_size: int,
    seed: int,
) -> float:
    """What the node ``idx`` costs to split in the content-free null graph.

    The cheapest split the NCut solver finds on the null graph restricted to the
    node (the same eigen solve and sweep as the real split), or the null cost
    of the real split itself when that is cheaper (the sweep is a heuristic,
    so both are upper bounds of the null's minimum).
    """
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[idx[mask]] = True
    b[idx[~mask]] = True
    same = null.ncut(a, b)
    dense = null.dense
    sub = dense if len(idx) == n else dense[np.ix_(idx, idx)]
    best = _split_subgraph(sub, min_size, seed)
    return float(np.nanmin([same, np.inf if best is None else best[1]]))


def _split_subgraph(
    sub: NDArray[np.float64], min_size: int, seed: int
) -> tuple[NDArray[np.bool_], float] | None:
    """Bipartition a sub-graph; isolated (zero-degree) nodes join side B."""
    degree = sub.sum(axis=1, dtype=np.float64)
    alive = degree > 1e-300
    if alive.sum() < 2 * min_size:
        return None
    if alive.all():
        # bipartition() without summing the degrees a second time.
        z, _ = fiedler_vector(sub, degree, seed=seed)
        mask, c = sweep_cut(sub, degree, z, min_size)
    else:
        part = bipartition(sub[np.ix_(alive, alive)], min_size=min_size, seed=seed)
        mask = np.zeros(sub.shape[0], bool)
        mask[np.flatnonzero(alive)[part.mask]] = True
        c = part.cost
    if not np.isfinite(c):
        return None
    return mask, c


def _drain(gen: Generator[object, None, TreeArrays]) -> TreeArrays:
    """Run a generator to completion and return its value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def build_tree(
    affinity: NDArray[np.float64],
    *,
    min_size: int = 16,
    max_depth: int = 8,
    seed: int = 0,
    grid_shape: tuple[int, int] | None = None,
) -> TreeArrays:
    """Grow the NCut tree in one call (see :func:`iter_ncut_tree`)."""
    return _drain(
        iter_ncut_tree(
            affinity, min_size=min_size, max_depth=max_depth, seed=seed, grid_shape=grid_shape
        )
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
