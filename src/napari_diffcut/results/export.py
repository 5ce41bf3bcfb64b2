"""Export chosen labels for downstream tools: a uint32 TIFF and a per-label CSV.

The table has one row per label present in the image (0, the background, is
left out), sorted by label:

``label``
    the label value (tree node id + 1 for regions of the tree);
``area``
    number of pixels;
``centroid_y``, ``centroid_x``
    mean row and column of the pixels, in pixels (the layer's scale is not
    applied);
``level``
    depth of the node in the tree: 0 for the root, ``d`` for a node that first
    appears in ``Segmentation.levels[d - 1]``;
``parent``
    label of the parent node (empty for the root);
``ncut_cost``
    NCut cost of the node's own split into its children (method.md 5), empty
    for a tree leaf.

Labels that are not tree nodes (painted by hand with a new value) get empty
tree columns. Without a segmentation, only label, area and centroid are filled.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.files.io import atomic_write_bytes, write_labels

if TYPE_CHECKING:  # pragma: no cover
    from napari_diffcut.pipeline.segmentation import Segmentation

#: Column order of the CSV table.
COLUMNS = ("label", "area", "centroid_y", "centroid_x", "level", "parent", "ncut_cost")


def label_table(
    labels: NDArray[np.integer], segmentation: Segmentation | None = None
) -> list[dict[str, Any]]:
    """Per-label measurements and tree facts (see the module docstring).

    Parameters
    ----------
    labels : array of int, shape (H, W)
        The chosen labels (e.g. a level, or the edited main layer).
    segmentation : Segmentation, optional
        Gives the tree columns (level, parent, ncut_cost).

    Returns
    -------
    list of dict
        One dict per label with the keys of :data:`COLUMNS`; a missing value
        is ``None``. ``pandas.DataFrame(rows)`` turns it into a table.

    Examples
    --------
    >>> label_table(np.array([[0, 2, 2], [0, 0, 5]]))[0]
    {'label': 2, 'area': 2, 'centroid_y': 0.0, 'centroid_x': 1.5, 'level': None, \
'parent': None, 'ncut_cost': None}
    """
    lab = _check_labels(labels)
    values, inverse, counts = np.unique(
        lab.ravel(), return_inverse=True, return_counts=True
    )
    rows_idx, cols_idx = np.indices(lab.shape)
    sum_y = np.bincount(inverse, weights=rows_idx.ravel(), minlength=values.size)
    sum_x = np.bincount(inverse, weights=cols_idx.ravel(), minlength=values.size)
    tree = _tree_columns(segmentation, lab.shape)
    rows = []
    for value, count, sy, sx in zip(
        values.tolist(), counts.tolist(), sum_y, sum_x, strict=True
    ):
        if value == 0:
            continue
        row: dict[str, Any] = {
            "label": int(value),
            "area": int(count),
            "centroid_y": float(sy / count),
            "centroid_x": float(sx / count),
        }
        row.update(tree(int(value)))
        rows.append(row)
    return rows


def table_csv(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    """CSV text of :func:`label_table` rows (empty cells for missing values).

    ``columns`` gives other tables their own columns, e.g. the per-instance
    table (:func:`instance_table_csv`).
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    return buf.getvalue()


def instance_table_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of a per-instance table (:data:`~napari_diffcut.core.instances.INSTANCE_COLUMNS`).

    One row per instance: its id, the segment it came from, its area in
    pixels and centroid; the row count is the instance count.

    Examples
    --------
    >>> print(instance_table_csv([{"label": 1, "segment": 3, "area": 20,
    ...                            "centroid_y": 2.5, "centroid_x": 4.0}]), end="")
    label,segment,area,centroid_y,centroid_x
    1,3,20,2.5,4.0
    """
    from napari_diffcut.core.instances import INSTANCE_COLUMNS

    return table_csv(rows, INSTANCE_COLUMNS)


def write_table(
    path: str | os.PathLike[str],
    labels: NDArray[np.integer],
    segmentation: Segmentation | None = None,
) -> Path:
    """Write the per-label CSV table of ``labels`` to ``path`` (atomically)."""
    p = Path(path)
    atomic_write_bytes(p, table_csv(label_table(labels, segmentation)).encode("utf-8"))
    return p


def write_labels_tiff(
    path: str | os.PathLike[str], labels: NDArray[np.integer]
) -> Path:
    """Write ``labels`` as a zlib-compressed uint32 TIFF (atomically)."""
    return write_labels(path, _check_labels(labels).astype(np.uint32, copy=False))


def export_labels(
    folder: str | os.PathLike[str],
    labels: NDArray[np.integer],
    segmentation: Segmentation | None = None,
    *,
    name: str = "labels",
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write ``<name>.tif`` (uint32 labels) and ``<name>.csv`` (table) into ``folder``.

    Parameters
    ----------
    folder : str or path-like
        Output folder (created when missing).
    labels : array of int, shape (H, W)
        The chosen labels.
    segmentation : Segmentation, optional
        Fills the tree columns of the table.
    name : str
        File stem; characters that are unsafe in file names become "_".
    overwrite : bool
        Replace existing files of the same names.

    Returns
    -------
    (Path, Path)
        The TIFF and the CSV written.

    Raises
    ------
    DiffCutError
        A file exists and ``overwrite`` is False.
    """
    _check_labels(labels)
    stem = safe_stem(name)
    out = Path(folder)
    tif, table = out / f"{stem}.tif", out / f"{stem}.csv"
    existing = [str(p) for p in (tif, table) if p.exists()]
    if existing and not overwrite:
        raise DiffCutError(
            f"{', '.join(existing)} exist(s); pass overwrite=True to replace"
        )
    out.mkdir(parents=True, exist_ok=True)
    return write_labels_tiff(tif, labels), write_table(table, labels, segmentation)


def safe_stem(name: str) -> str:
    """A file stem from a layer name: letters, digits, ``-``, ``_`` and ``.`` kept."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip(
        "._"
    )
    return stem or "labels"


def free_stem(folder: str | os.PathLike[str], name: str) -> str:
    """``safe_stem(name)``, suffixed ``-1``, ``-2``... until no export file exists."""
    base = safe_stem(name)
    stem, i = base, 0
    while any((Path(folder) / f"{stem}{ext}").exists() for ext in (".tif", ".csv")):
        i += 1
        stem = f"{base}-{i}"
    return stem


def _check_labels(labels: Any) -> NDArray[np.integer]:
    lab = np.asarray(labels)
    if lab.ndim != 2 or lab.dtype.kind not in "ui":
        raise ValueError(
            f"labels must be a 2-D integer array, got {lab.dtype} of shape {lab.shape}"
        )
    if lab.size and lab.dtype.kind == "i" and int(lab.min()) < 0:
        raise ValueError(f"labels must be >= 0, got minimum {lab.min()}")
    return lab


def _tree_columns(segmentation: Segmentation | None, shape: tuple[int, ...]) -> Any:
    """A function label -> {level, parent, ncut_cost} for the segmentation's tree."""
    empty = {"level": None, "parent": None, "ncut_cost": None}
    if segmentation is None:
        return lambda _label: dict(empty)
    if tuple(segmentation.shape) != tuple(shape):
        raise ValueError(
            f"labels of shape {tuple(shape)} do not match the segmentation's "
            f"{tuple(segmentation.shape)}"
        )
    arrays = segmentation.hierarchy.arrays
    parent, depth, cost = arrays.parent, arrays.depth, arrays.cost
    has_children = np.zeros(arrays.n_nodes, bool)
    has_children[parent[parent >= 0]] = True

    def columns(label: int) -> dict[str, Any]:
        node = label - 1
        if not 0 <= node < arrays.n_nodes:
            return dict(empty)
        c = float(cost[node])
        return {
            "level": int(depth[node]),
            "parent": int(parent[node]) + 1 if parent[node] >= 0 else None,
            "ncut_cost": c if has_children[node] and math.isfinite(c) else None,
        }

    return columns


def _cell(value: Any) -> str:
    """CSV cell: empty for None, shortest round-trip repr for floats."""
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)
