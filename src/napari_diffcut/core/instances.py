"""Instance labels for counting: each connected piece of a chosen segment gets its own id.

A segment of the tree is a *class* of pixels (all nuclei of one brightness can
be one segment). Microscopists count objects, so :func:`instance_labels` splits
the chosen segments into connected components (4- or 8-connected), drops the
pieces smaller than ``min_size`` pixels, and numbers the rest 1..n in raster
order of their first pixel (top row first, then left to right), which makes the
ids reproducible. :data:`INSTANCE_COLUMNS` are the columns of the per-instance
table (one row per instance); the count is its length.

Pieces never merge across segments: two touching pixels of different segments
belong to different instances even when both segments are chosen.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from scipy.sparse import csgraph

#: Default smallest instance, in pixels (fragments of a boundary are smaller).
DEFAULT_MIN_SIZE = 16
#: Columns of the per-instance table: instance id (its value in the instance
#: image), the segment it came from, its area in pixels and its centroid (mean
#: row and column, pixels, the layer's scale not applied).
INSTANCE_COLUMNS = ("label", "segment", "area", "centroid_y", "centroid_x")


def instance_labels(
    labels: NDArray[np.integer],
    min_size: int = DEFAULT_MIN_SIZE,
    *,
    segments: Iterable[int] | None = None,
    connectivity: int = 1,
) -> tuple[NDArray[np.uint32], list[dict[str, Any]]]:
    """Connected components of the chosen segments, each its own id (module docstring).

    Parameters
    ----------
    labels : (M, N) ndarray of int
        Segment labels (0 is no segment and never an instance).
    min_size : int
        Pieces with fewer pixels are dropped (0 in the instance image).
    segments : iterable of int, optional
        Segment labels to split into instances; default: every non-zero label.
    connectivity : {1, 2}
        1: pixels touching by an edge are connected (4-connectivity); 2: also
        by a corner (8-connectivity).

    Returns
    -------
    instances : (M, N) ndarray of uint32
        Instance id per pixel, 1..n in raster order of first pixels; 0 elsewhere.
    table : list of dict
        One row per instance, keys :data:`INSTANCE_COLUMNS`; ``len(table)`` is
        the count.

    Raises
    ------
    ValueError
        If ``labels`` is not 2-D integer, ``min_size`` < 1 or ``connectivity``
        not 1 or 2.

    Examples
    --------
    >>> seg = np.array([[5, 5, 0, 5],
    ...                 [0, 0, 0, 5],
    ...                 [7, 7, 0, 0]])
    >>> inst, table = instance_labels(seg, min_size=2)
    >>> inst.tolist()
    [[1, 1, 0, 2], [0, 0, 0, 2], [3, 3, 0, 0]]
    >>> [(row["label"], row["segment"], row["area"]) for row in table]
    [(1, 5, 2), (2, 5, 2), (3, 7, 2)]
    >>> len(instance_labels(seg, min_size=2, segments=[5])[1])
    2
    """
    lab = np.asarray(labels)
    if lab.ndim != 2 or not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise ValueError(f"labels must be a 2-D integer array, got {lab.dtype} {lab.shape}")
    if isinstance(min_size, bool) or not isinstance(min_size, int | np.integer) or min_size < 1:
        raise ValueError(f"min_size must be an integer >= 1 (pixels), got {min_size!r}")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (edges) or 2 (edges and corners), got "
                         f"{connectivity!r}")
    lab = lab.astype(np.int64, copy=False)
    chosen = lab != 0
    if segments is not None:
        chosen &= np.isin(lab, np.fromiter((int(s) for s in segments), np.int64))
    component = _components(lab, chosen, connectivity)  # -1 off the chosen segments
    instances = np.zeros(lab.shape, np.uint32)
    flat = component.ravel()
    on = np.flatnonzero(flat >= 0)
    if on.size == 0:
        return instances, []
    n_comp = int(flat[on].max()) + 1
    area = np.bincount(flat[on], minlength=n_comp)
    keep = area >= min_size
    # Raster order of first pixels: components are met in order along ``on``.
    first = np.full(n_comp, on.size, np.int64)
    np.minimum.at(first, flat[on], np.arange(on.size))
    order = np.argsort(first, kind="stable")
    order = order[keep[order]]
    new_id = np.zeros(n_comp, np.uint32)
    new_id[order] = np.arange(1, order.size + 1, dtype=np.uint32)
    instances.ravel()[on] = new_id[flat[on]]
    return instances, _table(instances, lab, order.size)


def _components(
    lab: NDArray[np.int64], chosen: NDArray[np.bool_], connectivity: int
) -> NDArray[np.int64]:
    """Component index per pixel of equal-label, chosen neighbours; -1 elsewhere."""
    index = np.full(lab.shape, -1, np.int64)
    n = int(chosen.sum())
    index[chosen] = np.arange(n)
    shifts = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 2 else [])
    heads, tails = [], []
    rows, cols = lab.shape
    for dy, dx in shifts:
        a = (slice(0, rows - dy), slice(max(0, -dx), cols - max(0, dx)))
        b = (slice(dy, rows), slice(max(0, dx), cols - max(0, -dx)))
        link = chosen[a] & chosen[b] & (lab[a] == lab[b])
        heads.append(index[a][link])
        tails.append(index[b][link])
    head, tail = np.concatenate(heads), np.concatenate(tails)
    graph = sparse.coo_matrix((np.ones(head.size, np.int8), (head, tail)), shape=(n, n))
    _, comp = csgraph.connected_components(graph, directed=False)
    out = np.full(lab.shape, -1, np.int64)
    out[chosen] = comp
    return out


def _table(
    instances: NDArray[np.uint32], lab: NDArray[np.int64], n: int
) -> list[dict[str, Any]]:
    """Rows of :data:`INSTANCE_COLUMNS` for instance ids 1..n."""
    flat = instances.ravel().astype(np.int64)
    rows_idx, cols_idx = np.indices(instances.shape)
    area = np.bincount(flat, minlength=n + 1)
    sum_y = np.bincount(flat, weights=rows_idx.ravel(), minlength=n + 1)
    sum_x = np.bincount(flat, weights=cols_idx.ravel(), minlength=n + 1)
    segment = np.zeros(n + 1, np.int64)
    segment[flat] = lab.ravel()  # every pixel of an instance has its segment's label
    return [
        {
            "label": i,
            "segment": int(segment[i]),
            "area": int(area[i]),
            "centroid_y": float(sum_y[i] / area[i]),
            "centroid_x": float(sum_x[i] / area[i]),
        }
        for i in range(1, n + 1)
    ]
