"""Per-label tables of result layers (``layer.features``) and the kind of a result.

Pure functions, no Qt, no napari import. 2-D results get the tree columns
(index, level, parent, area, ncut_cost); stacks and tiled results get index,
area (and planes). Label images held in zarr or dask are counted block by
block, never read whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray


def result_kind(seg: Any) -> str:
    """ "tree" (2-D, one NCut tree), "stack" (plane by plane) or "tiled" (stitched tiles)."""
    from napari_diffcut.large.stacks import StackSegmentation
    from napari_diffcut.large.tiling import TiledSegmentation

    if isinstance(seg, StackSegmentation):
        return "stack"
    if isinstance(seg, TiledSegmentation):
        return "tiled"
    return "tree"


def recut_refusal(seg: Any) -> str:
    """Why ``seg`` cannot be re-cut at another threshold ("" when it can).

    A 2-D result re-cuts its tree; a stack re-cuts every plane's tree when
    they were kept (downscale mode, labels within the memory budget). Tiles
    have no common tree: each tile was cut on its own.
    """
    kind = result_kind(seg)
    if kind == "tiled":
        return (
            "tiled result: each tile was cut at its own threshold and there is no common "
            "tree to re-cut; run again with another threshold (or tile size 0 for one tree)"
        )
    if kind == "stack":
        planes = seg.planes
        if planes is None:
            return (
                "stack beyond the memory budget: the per-plane trees were not kept; "
                "run again with another threshold (or a larger memory budget)"
            )
        if not all(result_kind(p) == "tree" for p in planes):
            return "tiled planes have no common tree to re-cut; run again with another threshold"
    return ""


def label_features(seg: Any, labels: NDArray[np.integer]) -> dict[str, NDArray[Any]]:
    """One row per label present in ``labels``.

    Columns: ``index`` (the label value; napari matches rows to labels by it),
    ``level`` (the node's tree depth, 0 = whole image: the first level layer
    in which the segment appears), ``parent`` (label of the parent node, 0 for
    the root), ``area`` (pixels) and ``ncut_cost`` (NCut cost of splitting
    this node into its children, as ``Segmentation.tree[label - 1].cost``;
    NaN for a tree leaf). Labels are node ids + 1 (engine label convention).
    """
    index, area = np.unique(np.asarray(labels), return_counts=True)
    present = index > 0  # 0 is never a segment (label = node id + 1)
    return tree_features(seg, index[present], area[present])


def tree_features(
    seg: Any, index: NDArray[np.integer], area: NDArray[np.integer]
) -> dict[str, NDArray[Any]]:
    """The :func:`label_features` columns for labels ``index`` with pixel counts ``area``."""
    arrays = seg.hierarchy.arrays
    node = np.asarray(index, np.int64) - 1
    # Labels painted by hand may name no tree node: their tree columns are -1 / NaN.
    known = node < arrays.n_nodes
    safe = np.where(known, node, 0)
    return {
        "index": np.asarray(index, np.int64),
        "level": np.where(known, arrays.depth[safe], -1).astype(np.int64),
        "parent": np.where(known, arrays.parent[safe] + 1, -1).astype(np.int64),
        "area": np.asarray(area, np.int64),
        "ncut_cost": np.where(known, arrays.cost[safe], np.nan).astype(np.float64),
    }


#: Elements read at once when counting labels of an image held in zarr or dask.
COUNT_BLOCK = 1 << 22


def _blocks(labels: Any, block: int = COUNT_BLOCK) -> Any:
    """(plane index, numpy block) over a (..., Y, X) label image, in bounded pieces.

    Row strips of at most ``block`` elements, plane by plane, so a stack or a
    large plane in zarr or dask is never read whole.
    """
    shape = tuple(int(n) for n in labels.shape)
    h, w = shape[-2:]
    rows = max(1, block // max(1, w))
    for index in np.ndindex(*shape[:-2]):
        for y0 in range(0, h, rows):
            piece = labels[(*index, slice(y0, min(h, y0 + rows)), slice(None))]
            if hasattr(piece, "compute") and not isinstance(piece, np.ndarray):
                piece = piece.compute()
            yield index, np.asarray(piece)


def count_labels(
    labels: Any, per_plane: bool = False
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64] | None]:
    """(labels present, pixel count, planes each appears in) of a label image.

    Label 0 (background) is left out. Works block by block on numpy, zarr
    and dask arrays. ``planes`` is None unless ``per_plane``.
    """
    area = np.zeros(0, np.int64)
    planes = np.zeros(0, np.int64)
    seen = np.zeros(0, bool)
    last: tuple[int, ...] | None = None
    for index, block in _blocks(labels):
        counts = np.bincount(block.ravel().astype(np.int64, copy=False))
        if counts.size > area.size:
            area = np.pad(area, (0, counts.size - area.size))
            planes = np.pad(planes, (0, counts.size - planes.size))
            seen = np.pad(seen, (0, counts.size - seen.size))
        if per_plane and index != last:
            planes += seen
            seen[:] = False
            last = index
        area[: counts.size] += counts
        seen[: counts.size] |= counts > 0
    planes += seen
    index = np.flatnonzero(area)
    index = index[index > 0]
    return index, area[index], (planes[index] if per_plane else None)


def lazy_leaf_area(seg: Any) -> NDArray[np.int64]:
    """Pixels of every tree node's deepest region in a lazy result, block by block.

    With these, the area of any label at any threshold or level is a sum
    over leaves (see :func:`lazy_features`): one pass over the pixel map
    serves every layer of a result.
    """
    n = int(seg.hierarchy.arrays.n_nodes)
    area = np.zeros(n, np.int64)
    for _, block in _blocks(seg.pixel_leaf):
        area += np.bincount(block.ravel().astype(np.int64, copy=False), minlength=n)[:n]
    return area


def lazy_features(
    seg: Any, lut: NDArray[np.integer], leaf_area: NDArray[np.int64]
) -> dict[str, NDArray[Any]]:
    """Features of a lazy cut (``lut[pixel_leaf]``) from per-node areas, no pixel pass."""
    nodes = np.flatnonzero(leaf_area)
    area = np.bincount(np.asarray(lut)[nodes].astype(np.int64), weights=leaf_area[nodes])
    index = np.flatnonzero(area)
    index = index[index > 0]
    return tree_features(seg, index, area[index].astype(np.int64))


def flat_features(seg: Any, labels: Any) -> dict[str, NDArray[Any]]:
    """Features of a stack or tiled result: label, pixels (and planes, for a stack).

    Only where a label means one region: stitched tiles (one label per
    object), and stacks with ``consistent_stack`` (``planes`` = number of
    planes the region appears in). Without it each plane numbers its own
    tree (equal values in two planes mean nothing), so there is no table.
    """
    kind = result_kind(seg)
    if kind == "stack" and not seg.consistent:
        return {}
    index, area, planes = count_labels(labels, per_plane=kind == "stack")
    out = {"index": index.astype(np.int64), "area": area.astype(np.int64)}
    if planes is not None:
        out["planes"] = planes.astype(np.int64)
    return out
