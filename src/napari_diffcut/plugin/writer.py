"""napari writer: save a DiffCut result layer as ``*.diffcut.zarr`` (npe2 ``writers``).

The layer's ``metadata["napari_diffcut"]["segmentation"]`` gives the tree,
levels and settings; the layer's current ``data`` is saved as the labels, so
paint, split and merge edits survive a save and reopen, and its role (main
layer or level N) is recorded so the reader puts them back in that layer.
Plain label TIFFs stay available through napari's own writer for layers of
any kind.

:func:`write_table_csv` (extension ``.csv``) saves a Labels layer's table:
for an instance layer (:mod:`~napari_diffcut.plugin.instances`) one row per
object (label, segment, area, centroid), for a result layer the per-label
table of :mod:`napari_diffcut.results.export` (with the tree columns), for any
other Labels layer label, area and centroid. It is computed from the layer's
current data, so painted edits are in it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_diffcut.core.errors import DiffCutError, check_threshold
from napari_diffcut.files.store import save
from napari_diffcut.plugin.layers import diffcut_meta


def write_labels_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save one DiffCut Labels layer with its tree (single-layer npe2 writer).

    Parameters
    ----------
    path : str
        Target; ``.diffcut.zarr`` is appended when missing.
    data : array of int, shape (H, W)
        The layer's current labels (user edits included).
    meta : dict
        The layer's attributes (napari passes ``layer.as_layer_data_tuple()[1]``).

    Returns
    -------
    list of str
        The store written.

    Raises
    ------
    DiffCutError
        The layer holds no napari-diffcut segmentation, its data does not match
        the segmentation, or ``path`` names something else that exists.
    """
    from napari_diffcut.pipeline.segmentation import Segmentation

    info = diffcut_meta(meta.get("metadata")) or {}
    seg = info.get("segmentation")
    name = meta.get("name", "the layer")
    if not isinstance(seg, Segmentation):
        raise DiffCutError(
            f"layer {name!r} carries no napari-diffcut segmentation (the tree), so it "
            "cannot be saved as .diffcut.zarr; save it as a .tif label image instead"
        )
    labels = np.asarray(data)
    if labels.shape != seg.shape or labels.dtype.kind not in "ui":
        raise DiffCutError(
            f"layer {name!r} data is {labels.dtype} of shape {labels.shape}; the "
            f"segmentation needs integer labels of shape {seg.shape}"
        )
    placement = {
        "source": info.get("source"),
        "scale": meta.get("scale"),
        "translate": meta.get("translate"),
        "units": meta.get("units"),
        "axis_labels": meta.get("axis_labels"),
        "plane": info.get("plane"),
        # Which layer these labels are, so the reader puts them back there.
        "role": info.get("role"),
        "level": info.get("level"),
    }
    # The setting ("auto" or a number) is in settings["threshold"]; "threshold"
    # holds the number in force (napari_diffcut.plugin.layers.layer_metadata).
    settings = info.get("settings") if isinstance(info.get("settings"), dict) else {}
    threshold = _threshold(settings.get("threshold"))
    if threshold is None:
        threshold = _threshold(info.get("threshold"))
    try:
        written = save(
            seg,
            path,
            labels=labels,
            threshold=threshold,
            layer=placement,
            overwrite=True,
        )
    except ValueError as exc:
        raise DiffCutError(f"cannot save layer {name!r}: {exc}") from exc
    return [str(written)]


def write_table_csv(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save a Labels layer's per-label table as CSV (single-layer npe2 writer).

    Parameters
    ----------
    path : str
        Target; ``.csv`` is appended when missing.
    data : array of int, shape (H, W)
        The layer's current labels.
    meta : dict
        The layer's attributes (``metadata``, ``features``, ``name``).

    Returns
    -------
    list of str
        The CSV written.

    Raises
    ------
    DiffCutError
        The data is not a 2-D integer label image.
    """
    from pathlib import Path

    from napari_diffcut.files.io import atomic_write_bytes
    from napari_diffcut.pipeline.segmentation import Segmentation
    from napari_diffcut.plugin.instances import INSTANCES_KEY
    from napari_diffcut.results.export import instance_table_csv, label_table, table_csv

    labels = np.asarray(data)
    name = meta.get("name", "the layer")
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise DiffCutError(
            f"layer {name!r} data is {labels.dtype} of shape {labels.shape}; a table needs a "
            "2-D integer label image"
        )
    target = Path(path if str(path).lower().endswith(".csv") else f"{path}.csv")
    metadata = meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {}
    if INSTANCES_KEY in metadata:
        rows = label_table(labels)
        segment = _feature_column(meta.get("features"), "segment")
        for row in rows:
            row["segment"] = segment.get(row["label"])
        text = instance_table_csv(rows)
    else:
        seg = (diffcut_meta(metadata) or {}).get("segmentation")
        fits = isinstance(seg, Segmentation) and tuple(seg.shape) == labels.shape
        text = table_csv(label_table(labels, seg if fits else None))
    atomic_write_bytes(target, text.encode("utf-8"))
    return [str(target)]


def _feature_column(features: Any, column: str) -> dict[int, Any]:
    """``index -> value`` of one column of a layer's features (empty when missing)."""
    try:
        index = [int(v) for v in features["index"]]
        values = [None if v is None else int(v) for v in features[column]]
    except (KeyError, TypeError, ValueError):
        return {}
    return dict(zip(index, values, strict=False))


def _threshold(value: Any) -> float | str | None:
    """The layer's threshold setting if valid, else None (keep the tree's)."""
    if value is None:
        return None
    try:
        return check_threshold(value)
    except ValueError:
        return None
