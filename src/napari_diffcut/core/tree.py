"""Growing the NCut tree: recursive two-way Normalized Cuts, breadth first (method.md 5-6).

:func:`iter_ncut_tree` grows the whole tree once down to ``min_size`` and
``max_depth`` and stores every node's split cost, and (given the patch grid)
the cost of the same node in a content-free graph with the graph's own
locality (:mod:`napari_diffcut.core.null`), which the automatic threshold
compares against. :class:`~napari_diffcut.core.hierarchy.Hierarchy` cuts the
grown tree at any threshold without another eigen solve.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.ncut import (
    bipartition,
    fiedler_vector,
    restrict,
    restricted_degree,
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
#: predicts (an effect size, not a significance level: content-free splits
#: have ratios 0.95-1.13 at 32 x 32 and 64 x 64, so anything below about 0.9
#: is already more than locality, but weak).
#:
#: Calibration (issue 11; benchmarks/quality.py --limit 0, pixels backbone,
#: every node's ratio recorded; median fg/bg mIoU, automatic cut / best level
#: of the same tree): factor 0.3 and 0.4 keep DSB2018 at 0.805/0.805 but lose
#: the StarDist image (0.419/0.726: its first split peels off the few very
#: bright nuclei, ratio 0.08, and the dim nuclei leave the background at 0.47)
#: and EM (0.390/0.524); 0.6 and 0.7 lose DSB2018 (0.735 and 0.707/0.805,
#: dim and bright nuclei split at 0.2-0.5 and halves of the background at
#: 0.6-0.9). 0.5 is the one factor within 0.05 of the best level on all three
#: sets (0.783/0.805, 0.726/0.726, 0.516/0.524). None of the other rules
#: tried (the ratio relative to the parent's, a looser factor at the root,
#: Otsu on the tree's log ratios, a node-local null kernel, gains weighted by
#: the node's stationary mass) keeps the StarDist split (0.47) and refuses
#: the DSB2018 sub-splits (0.2-0.46), both at depth 1: they are the same three
#: populations (background, dim and bright nuclei) met in the other order.
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

    @classmethod
    def from_lists(
        cls,
        parent: list[int],
        cost: list[float],
        size: list[int],
        depth: list[int],
        leaf_of_patch: NDArray[np.int64],
        null_cost: list[float] | None = None,
    ) -> TreeArrays:
        """The arrays of a tree grown node by node into lists (numpy and torch growers)."""
        return cls(
            parent=np.asarray(parent, np.int64),
            cost=np.asarray(cost, np.float64),
            size=np.asarray(size, np.int64),
            depth=np.asarray(depth, np.int64),
            leaf_of_patch=leaf_of_patch,
            null_cost=None if null_cost is None else np.asarray(null_cost, np.float64),
        )

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
    row_sums = affinity.sum(axis=1, dtype=np.float64)
    while queue:
        node = queue.popleft()
        idx = members.pop(node)
        if len(idx) < 2 * min_size or depth[node] >= max_depth:
            continue
        with one_thread():
            split = _split_node(affinity, row_sums, idx, min_size, seed)
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
    return TreeArrays.from_lists(
        parent, cost, size, depth, leaf_of_patch, null_cost if null is not None else None
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
    best = _split_node(dense, null.dense_row_sums, idx, min_size, seed)
    return float(np.nanmin([same, np.inf if best is None else best[1]]))


#: A node with at least this fraction of the graph's nodes is cut on the whole
#: W through an index (core/ncut.py docstring) instead of a gathered copy: the
#: copy of a near-complete node costs about as much as its ~20 Lanczos
#: products, while working on the whole W costs only ``(N/n)^2 - 1`` more per
#: product (at most 23 % from 0.9 on).
SHARE_MIN_FRACTION = 0.9


def _split_node(
    affinity: NDArray[np.floating],
    row_sums: NDArray[np.float64],
    idx: NDArray[np.int64],
    min_size: int,
    seed: int,
) -> tuple[NDArray[np.bool_], float] | None:
    """Bipartition W restricted to ``idx`` (sorted), on a copy or through the index."""
    n = affinity.shape[0]
    if len(idx) == n:
        return _split_subgraph(affinity, min_size, seed, degree=row_sums)
    if len(idx) >= SHARE_MIN_FRACTION * n:
        degree = restricted_degree(affinity, idx, row_sums)
        return _split_subgraph(affinity, min_size, seed, degree=degree, index=idx)
    return _split_subgraph(restrict(affinity, idx), min_size, seed)


def _split_subgraph(
    sub: NDArray[np.floating],
    min_size: int,
    seed: int,
    *,
    degree: NDArray[np.float64] | None = None,
    index: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.bool_], float] | None:
    """Bipartition a sub-graph; isolated (zero-degree) nodes join side B.

    ``index``: the sub-graph is ``sub[index][:, index]``, not built
    (core/ncut.py docstring); ``degree`` (its row sums) is then required.
    """
    if degree is None:
        degree = sub.sum(axis=1, dtype=np.float64)
    alive = degree > 1e-300
    if alive.sum() < 2 * min_size:
        return None
    if alive.all():
        # bipartition() without summing the degrees a second time.
        z, _ = fiedler_vector(sub, degree, seed=seed, index=index)
        mask, c = sweep_cut(sub, degree, z, min_size, index=index)
    else:
        if index is not None:
            sub = restrict(sub, index)
        part = bipartition(restrict(sub, np.flatnonzero(alive)), min_size=min_size, seed=seed)
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
