"""Instance layers for counting: objects of a result as their own Labels layer.

``"<image> diffcut instances"`` holds the connected objects of the main result
layer of ``<image>`` outside its background (the largest segment;
:func:`napari_diffcut.core.instances.count_instances`): ids 1..count, with a
feature table of ``index`` (the instance id napari matches rows by),
``segment`` (the segment it came from), ``area`` and ``centroid_y/x``
(pixels). It is counted from the main layer as shown, so painting on the
result and counting again counts what you painted.

The layer is derived, not a result: it carries its own metadata entry
(:data:`INSTANCES_KEY`, with the count and the minimum size), the result
machinery (re-runs, re-cuts, the hierarchy editor) never treats it as a
result layer, and a re-cut recounts it in place unless you painted on it
(then it is kept and a new one is added beside it).

Pure functions build the layer-data tuple; :func:`apply_instances` needs a
viewer (napari is imported inside it).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.instances import (
    DEFAULT_MIN_SIZE,
    INSTANCE_COLUMNS,
    Instances,
    count_instances,
)
from napari_diffcut.plugin.geometry import Geometry, axes_geometry
from napari_diffcut.plugin.layers import LayerDataTuple, diffcut_meta, update_layer
from napari_diffcut.plugin.plan import suffixed

#: Key of an instance layer's entry in its ``metadata``.
INSTANCES_KEY = "napari_diffcut_instances"


def instances_layer_name(source: str) -> str:
    """Name of the instance layer of image layer ``source``."""
    return f"{source} diffcut instances"


def instance_features(found: Instances) -> dict[str, NDArray[Any]]:
    """Feature table of an instance layer: one row per instance, ``index`` first."""
    table = found.table
    columns: dict[str, NDArray[Any]] = {
        "index": np.array([row["label"] for row in table], np.int64)
    }
    for name in INSTANCE_COLUMNS[1:]:
        dtype = np.float64 if name.startswith("centroid") else np.int64
        columns[name] = np.array([row[name] for row in table], dtype)
    return columns


def instances_layer_data(
    found: Instances, source: str, geometry: Geometry | None = None
) -> LayerDataTuple:
    """The (data, kwargs, "labels") tuple of the instance layer of ``source``."""
    meta = {INSTANCES_KEY: {"source": source, **found.record(), "labels": found.labels}}
    kwargs = {
        "name": instances_layer_name(source),
        "features": instance_features(found),
        "metadata": meta,
        **(geometry or Geometry()).as_kwargs(),
    }
    return (found.labels, kwargs, "labels")


def instances_meta(layer: Any) -> dict[str, Any] | None:
    """The instance entry of a layer's metadata, or None for any other layer."""
    meta = getattr(layer, "metadata", None)
    entry = meta.get(INSTANCES_KEY) if isinstance(meta, dict) else None
    return entry if isinstance(entry, dict) else None


def is_instances_of(layer: Any, source: str) -> bool:
    """Whether ``layer`` is an instance layer counted from ``source``'s result."""
    entry = instances_meta(layer)
    return entry is not None and entry.get("source") == source


def instances_edited(layer: Any) -> bool:
    """Whether the user painted on an instance layer (its data differs from the count)."""
    entry = instances_meta(layer)
    written = None if entry is None else entry.get("labels")
    data = np.asarray(layer.data)
    return written is None or data.shape != written.shape or not np.array_equal(data, written)


def count_main_layer(main: Any, min_size: int) -> Instances:
    """Instances of a main result layer's labels, as shown.

    Raises
    ------
    ValueError
        The layer is not 2-D (a whole-stack result): count a plane's result.
    """
    labels = np.asarray(main.data)
    if labels.ndim != 2:
        raise ValueError(
            f"instances count objects in a 2-D result; {main.name!r} has shape {labels.shape} "
            "(run on the displayed plane to count it)"
        )
    return count_instances(labels, int(min_size))


def apply_instances(viewer: Any, main: Any, min_size: int | None = None) -> Any:
    """Add or recount the instance layer of a main result layer; returns it.

    ``main`` is the main result layer (``find_result(viewer, image)[1]``).
    ``min_size`` None: the one the existing instance layer was counted with
    (16 pixels for a new one). An instance layer you painted on is kept; the
    new count goes to a new layer beside it.

    Raises
    ------
    ValueError
        The result is not 2-D (see :func:`count_main_layer`).
    """
    source = str((diffcut_meta(main.metadata) or {}).get("source", main.name))
    existing = [lay for lay in viewer.layers if is_instances_of(lay, source)]
    editable = [lay for lay in existing if not instances_edited(lay)]
    if min_size is None:
        entry = instances_meta(existing[-1]) if existing else None
        min_size = int(entry["min_size"]) if entry else DEFAULT_MIN_SIZE
    found = count_main_layer(main, min_size)
    data, kwargs, _ = instances_layer_data(found, source, axes_geometry(main))
    if editable:
        update_layer(editable[0], data, kwargs)
        return editable[0]
    base = kwargs.pop("name")
    n = next(n for n in itertools.count() if suffixed(base, n) not in viewer.layers)
    return viewer.add_labels(data, name=suffixed(base, n), **kwargs)


def recount_instances(viewer: Any, main: Any) -> Any:
    """Recount the instance layer of ``main``'s image after a re-cut, if it has one."""
    source = str((diffcut_meta(main.metadata) or {}).get("source", main.name))
    if not any(is_instances_of(lay, source) for lay in viewer.layers):
        return None
    try:
        return apply_instances(viewer, main)
    except ValueError:  # a stack result: nothing 2-D to count
        return None


def instances_summary(layer: Any) -> str:
    """A few words on an instance layer: the count and the minimum size."""
    entry = instances_meta(layer) or {}
    return f"{entry.get('count', 0)} instances (>= {entry.get('min_size', '?')} px)"


__all__ = [
    "INSTANCES_KEY",
    "apply_instances",
    "count_main_layer",
    "instance_features",
    "instances_edited",
    "instances_layer_data",
    "instances_layer_name",
    "instances_meta",
    "instances_summary",
    "is_instances_of",
    "recount_instances",
]
