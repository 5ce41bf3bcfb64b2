"""The recursive NCut tree in torch, one batched solve per depth (method.md 6).

The torch twin of :func:`napari_diffcut.core.hierarchy.iter_ncut_tree`: the
same breadth-first tree with the same node ids, leaf rules and
:class:`~napari_diffcut.core.hierarchy.TreeArrays`, but all nodes of one
depth are split together. Their sub-graphs (W restricted to each node, degrees
recomputed inside, Shi & Malik 2000) are grouped by size into a few padded
batches (:func:`size_buckets`), each solved by one batched Lanczos run and one
batched sweep (:mod:`napari_diffcut.accel.ncut`).

Node ids equal the numpy path's: that path pops nodes first in, first out,
so it splits the nodes of one depth in id order and numbers the children of
each accepted split (side A, then side B) in that order; here the children of
a depth are numbered the same way after its batch returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator

import numpy as np
import torch
from numpy.typing import NDArray

from napari_diffcut.accel.ncut import BlockBatch, fiedler_vectors, gather_blocks, sweep_cuts
from napari_diffcut.accel.null import null_affinity_torch, offset_kernel_torch
from napari_diffcut.core.errors import check_int, check_threshold
from napari_diffcut.core.hierarchy import NULL_RATIO, STRUCTURELESS_COST, Hierarchy, TreeArrays
from napari_diffcut.core.null import NullModel

#: Degrees at or below this are isolated nodes (as in core.hierarchy._split_subgraph).
ISOLATED = 1e-300


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int = 1) -> Iterator[None]:
    """Run torch's CPU kernels on ``threads`` threads inside the block (no-op off the CPU).

    The tree makes thousands of short products. With busy cores a descheduled
    OpenMP helper thread stalls each of them (measured here: a whole tree 5x
    slower on 2 threads than on 1 on 2 busy cores), as with the numpy path's
    BLAS (core/ncut.py docstring). The setting is process-wide, so it is
    restored at the end of each depth, before the generator yields.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def size_buckets(sizes: list[int]) -> list[list[int]]:
    """Group positions of ``sizes`` so that a group's padded batch wastes at most 4x.

    Sizes in ``(2^(k-1), 2^k]`` share a group; a group is padded to its largest
    size, so its batch holds at most 4x the entries of its blocks. Groups come
    largest first, positions ascending inside.

    Examples
    --------
    >>> size_buckets([4096])
    [[0]]
    >>> size_buckets([40, 2000, 33, 1900, 100])
    [[1, 3], [4], [0, 2]]
    """
    keys = [int(np.ceil(np.log2(max(s, 1)))) for s in sizes]
    return [[i for i, k in enumerate(keys) if k == key] for key in sorted(set(keys), reverse=True)]


def split_nodes(
    affinity: torch.Tensor,
    members: list[NDArray[np.int64]],
    *,
    min_size: int,
    seed: int = 0,
    tol: float = 1e-8,
) -> list[tuple[NDArray[np.bool_], float] | None]:
    """Bipartition many disjoint sub-graphs of ``affinity`` together.

    Each result is what ``core.hierarchy._split_subgraph`` returns for the
    same sub-graph: ``(mask, cost)`` with mask True on side A, or None when
    fewer than ``2 * min_size`` nodes have a positive degree or no split
    position respects ``min_size``. Isolated (zero-degree) nodes are left out
    of the solve and join side B.

    Parameters
    ----------
    affinity : torch.Tensor, shape (N, N)
        Symmetric W (float32 in the tree).
    members : list of int ndarrays
        Ascending node indices of each sub-graph.
    min_size : int
        Minimum nodes per side.
    seed : int
        Seed of the start vectors.
    tol : float
        Lanczos tolerance.

    Returns
    -------
    list of (ndarray of bool, float) or None
        One per sub-graph, in the order of ``members``.
    """
    results: list[tuple[NDArray[np.bool_], float] | None] = [None] * len(members)
    for group in size_buckets([len(m) for m in members]):
        batch = gather_blocks(affinity, [members[i] for i in group])
        alive = (batch.degree > ISOLATED).cpu().numpy()
        keep: list[int] = []  # positions in ``group`` that are solved
        subsets: list[NDArray[np.int64]] = []  # alive positions inside each sub-graph
        for b, i in enumerate(group):
            live = np.flatnonzero(alive[b, : len(members[i])])
            if live.size >= 2 * min_size:
                keep.append(b)
                subsets.append(live)
        if not keep:
            continue
        if any(s.size < batch.sizes[b] for b, s in zip(keep, subsets, strict=True)):
            # Rare: isolated nodes. Re-gather the live nodes only (core: bipartition on them).
            live_members = [members[group[b]][s] for b, s in zip(keep, subsets, strict=True)]
            batch = gather_blocks(affinity, live_members)
        elif len(keep) < len(group):
            batch = _select(batch, keep)
        masks, costs = _solve(batch, min_size, seed, tol)
        for row, (b, live) in enumerate(zip(keep, subsets, strict=True)):
            if not np.isfinite(costs[row]):
                continue
            mask = np.zeros(len(members[group[b]]), bool)
            mask[live[masks[row, : live.size]]] = True
            results[group[b]] = (mask, float(costs[row]))
    return results


def _select(batch: BlockBatch, rows: list[int]) -> BlockBatch:
    """The given blocks of a batch."""
    idx = torch.as_tensor(rows, device=batch.blocks.device)
    return BlockBatch(
        batch.blocks[idx], batch.degree[idx], batch.valid[idx], [batch.sizes[r] for r in rows]
    )


def _solve(
    batch: BlockBatch, min_size: int, seed: int, tol: float
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Fiedler vectors and sweeps of one batch; masks and costs on the host."""
    z, _ = fiedler_vectors(batch, seed=seed, tol=tol)
    mask, cost = sweep_cuts(batch, z, min_size)
    return mask.cpu().numpy(), cost.cpu().numpy()


def iter_ncut_tree_torch(
    affinity: torch.Tensor | NDArray[np.floating],
    *,
    min_size: int = 16,
    max_depth: int = 8,
    seed: int = 0,
    grid_shape: tuple[int, int] | None = None,
    tol: float = 1e-8,
    device: torch.device | str | None = None,
) -> Generator[tuple[int, int], None, TreeArrays]:
    """Grow the full recursive NCut tree in torch, yielding after each depth.

    The same tree as :func:`napari_diffcut.core.hierarchy.iter_ncut_tree`
    (module docstring): a node becomes a leaf when it has fewer than
    ``2 * min_size`` patches, reaches ``max_depth``, or its best split costs at
    least 1. The graph is used in float32 on its device (or ``device``).

    With ``grid_shape``, the splits the automatic cut reaches also record
    their null cost, as the numpy path does (:mod:`napari_diffcut.core.null`):
    the null model's kernel and dense graph are built on the graph's device
    (:func:`device_null`), the FFT cut costs of the reached splits on the host
    from the small kernel, the extra split of each reached node on the null
    graph in the same batched solver, one batch per depth.

    Yields
    ------
    (splits_done, splits_upper_bound) : tuple of int
        After each depth's batch; closing the generator stops the recursion.

    Returns
    -------
    TreeArrays
        numpy arrays, as the numpy path returns.
    """
    w = torch.as_tensor(affinity, device=device).to(torch.float32).contiguous()
    n = w.shape[0]
    parent, cost, size, depth = [-1], [float("nan")], [n], [0]
    members: dict[int, NDArray[np.int64]] = {0: np.arange(n)}
    leaf_of_patch = np.zeros(n, np.int64)
    bound = max(1, min(2**max_depth - 1, n // max(min_size, 1)))
    null, null_w = (None, None) if grid_shape is None else device_null(w, grid_shape)
    null_cost = [float("nan")]
    auto_ok: dict[int, bool] = {}
    done = 0
    frontier = [0]
    for level in range(max_depth):
        nodes = [v for v in frontier if len(members[v]) >= 2 * min_size]
        if not nodes:
            break
        with cpu_threads(w.device):
            splits = split_nodes(
                w, [members[v] for v in nodes], min_size=min_size, seed=seed, tol=tol
            )
        done += len(nodes)
        yield done, bound
        if null is not None and null_w is not None:
            reached = [
                (v, sp)
                for v, sp in zip(nodes, splits, strict=True)
                if sp is not None
                and sp[1] < STRUCTURELESS_COST
                and (parent[v] < 0 or auto_ok.get(parent[v], False))
            ]
            with cpu_threads(w.device):
                nulls = _null_costs(null, null_w, members, reached, min_size, seed, tol)
            for (v, sp), c0 in zip(reached, nulls, strict=True):
                null_cost[v] = c0
                auto_ok[v] = sp[1] < NULL_RATIO * c0
        frontier = []
        for node, split in zip(nodes, splits, strict=True):
            idx = members.pop(node)
            if split is None:
                continue
            mask, c = split
            cost[node] = c
            if c >= STRUCTURELESS_COST:
                continue
            for side in (idx[mask], idx[~mask]):
                child = len(parent)
                parent.append(node)
                cost.append(float("nan"))
                null_cost.append(float("nan"))
                size.append(len(side))
                depth.append(level + 1)
                members[child] = side
                leaf_of_patch[side] = child
                frontier.append(child)
    return TreeArrays.from_lists(
        parent, cost, size, depth, leaf_of_patch, null_cost if null is not None else None
    )


def device_null(w: torch.Tensor, grid_shape: tuple[int, int]) -> tuple[NullModel, torch.Tensor]:
    """The locality null of ``w``: its host model (FFT cut costs) and dense W0 on w's device.

    Kernel and W0 are built where ``w`` is (:mod:`napari_diffcut.accel.null`);
    only the (2h - 1) x (2w - 1) kernel goes to the host.
    """
    kernel = offset_kernel_torch(w, grid_shape)
    return NullModel(kernel.cpu().numpy(), grid_shape), null_affinity_torch(kernel, grid_shape)


def _null_costs(
    null: NullModel,
    null_w: torch.Tensor,
    members: dict[int, NDArray[np.int64]],
    reached: list[tuple[int, tuple[NDArray[np.bool_], float]]],
    min_size: int,
    seed: int,
    tol: float,
) -> list[float]:
    """Null cost of each reached split (``core.hierarchy``'s rule), the null splits batched.

    The smaller of the real split's NCut under the null graph (FFT, host) and
    the best split the solver finds on the null graph restricted to the node.
    """
    if not reached:
        return []
    n = null_w.shape[0]
    best = split_nodes(
        null_w, [members[v] for v, _ in reached], min_size=min_size, seed=seed, tol=tol
    )
    out = []
    for (v, (mask, _)), b in zip(reached, best, strict=True):
        idx = members[v]
        a_side = np.zeros(n, bool)
        b_side = np.zeros(n, bool)
        a_side[idx[mask]] = True
        b_side[idx[~mask]] = True
        same = null.ncut(a_side, b_side)
        out.append(float(np.nanmin([same, np.inf if b is None else b[1]])))
    return out


def build_tree_torch(
    affinity: torch.Tensor | NDArray[np.floating],
    *,
    min_size: int = 16,
    max_depth: int = 8,
    seed: int = 0,
    grid_shape: tuple[int, int] | None = None,
    tol: float = 1e-8,
    device: torch.device | str | None = None,
) -> TreeArrays:
    """Grow the NCut tree in one call (see :func:`iter_ncut_tree_torch`).

    Examples
    --------
    >>> blocks = torch.kron(torch.eye(2), torch.ones(8, 8)) + 0.01
    >>> tree = build_tree_torch(blocks, min_size=2, max_depth=1)
    >>> tree.size.tolist(), round(float(tree.cost[0]), 4)
    ([16, 8, 8], 0.0196)
    """
    gen = iter_ncut_tree_torch(
        affinity,
        min_size=min_size,
        max_depth=max_depth,
        seed=seed,
        grid_shape=grid_shape,
        tol=tol,
        device=device,
    )
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def ncut_hierarchy_torch(
    transition: torch.Tensor | NDArray[np.floating],
    grid_shape: tuple[int, int],
    *,
    power: int = 1,
    graph: str = "walk",
    threshold: float | str = "auto",
    min_size: int = 16,
    max_depth: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Hierarchy:
    """Hierarchical segmentation of a patch grid in torch (see ``core.hierarchy.ncut_hierarchy``).

    Parameters
    ----------
    transition : torch.Tensor or ndarray, shape (N, N)
        Row-stochastic P; computed on its device (or ``device``).
    grid_shape : tuple of int
        ``(h, w)`` with ``h * w == N``.
    power, graph, threshold, min_size, max_depth, seed
        As in :func:`napari_diffcut.core.hierarchy.ncut_hierarchy`.
    device : torch device, optional
        Where to compute.

    Returns
    -------
    Hierarchy
    """
    from napari_diffcut.accel.walk import as_tensor, build_affinity_torch

    check_int("min_size", min_size, 1)
    check_int("max_depth", max_depth, 1)
    check_int("power", power, 1)
    check_threshold(threshold)
    p = as_tensor(transition, device=device)
    if p.ndim != 2 or len(grid_shape) != 2 or p.shape[0] != grid_shape[0] * grid_shape[1]:
        raise ValueError(
            f"grid_shape {tuple(grid_shape)} must multiply to N = {p.shape[0]} "
            f"(transition shape {tuple(p.shape)})"
        )
    affinity, _ = build_affinity_torch(p, power=power, graph=graph)
    grid = (int(grid_shape[0]), int(grid_shape[1]))
    tree = build_tree_torch(
        affinity, min_size=min_size, max_depth=max_depth, seed=seed, grid_shape=grid
    )
    return Hierarchy(tree, grid, threshold)
