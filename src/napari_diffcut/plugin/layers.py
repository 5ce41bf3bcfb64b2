"""Result layers as napari layer-data tuples: pure functions, no Qt, no napari import.

Shared by the dock widget, :func:`napari_diffcut.segment_layer` and the reader,
so that all three produce exactly the same layers:

* ``"<image> diffcut"``: the segmentation at the chosen NCut threshold (shown);
* ``"<image> diffcut level d"``, d = 1, 2, ...: hierarchy level d (hidden).

Level layers exist only where there is one tree: a 2-D result
(:class:`~napari_diffcut.pipeline.segmentation.Segmentation`, or its lazy form for labels
beyond the memory budget). A whole-stack result
(:class:`~napari_diffcut.large.stacks.StackSegmentation`) and a tiled result
(:class:`~napari_diffcut.large.tiling.TiledSegmentation`) give the main layer only,
with the shape of their labels (:func:`result_kind`).

Every layer carries ``features`` (one row per label: index, level, parent,
area, ncut_cost) and ``metadata["napari_diffcut"]`` (see
:func:`layer_metadata`), including the live :class:`Segmentation`
so that the threshold can be changed, the tree edited and the result saved
from the layer alone.

Layers are never overwritten when the user changed them: what we wrote is a
pure function of the metadata (segmentation, threshold, role, level), so
:func:`is_edited` recomputes it and compares. Results too large to compare
(lazy 2-D labels, stacks and tiles held in zarr) go to napari as dask arrays
whose graph name is recorded (``"data_token"``): napari paints a dask array by
rewriting its graph, so a changed name means an edit, and nothing of image
size is ever computed to find out. :func:`~napari_diffcut.plugin.plan.plan_layer_updates`
decides, without touching a viewer, which layers to update, add or remove.
Per-label tables are in :mod:`~napari_diffcut.plugin.features`, placement in
:mod:`~napari_diffcut.plugin.geometry`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import check_threshold
from napari_diffcut.plugin.features import (
    flat_features,
    label_features,
    lazy_features,
    lazy_leaf_area,
    recut_refusal,
    result_kind,
)
from napari_diffcut.plugin.geometry import Geometry

#: Key of our entry in a layer's ``metadata``.
LAYER_KEY = "napari_diffcut"
ROLES = ("main", "level")

LayerDataTuple = tuple[Any, dict[str, Any], str]


def main_layer_name(source: str) -> str:
    """Name of the main result layer of image layer ``source``."""
    return f"{source} diffcut"


def level_layer_name(source: str, level: int) -> str:
    """Name of the result layer of hierarchy level ``level`` (1 = coarsest)."""
    return f"{source} diffcut level {level}"


def same_setting(a: Any, b: Any) -> bool:
    """Whether two threshold settings ("auto" or a number) are the same."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _stack_threshold(seg: Any, setting: float | str) -> float:
    """Threshold in force in a stack: the number, or the median of the planes' automatic ones."""
    if not isinstance(setting, str):
        return float(setting)
    planes = seg.planes or []
    values = [float(p.hierarchy.resolve(setting)) for p in planes if result_kind(p) == "tree"]
    values += [float(p.threshold) for p in planes if result_kind(p) == "tiled"]
    return float(np.median(values)) if values else float("nan")


def resolve_threshold(seg: Any, threshold: float | str | None) -> tuple[float | str, float]:
    """(setting, numeric value) for ``threshold``; None means the segmentation's own.

    For a stack the value is the number, or for "auto" the median of the
    planes' automatic thresholds (NaN when the planes were not kept); for a
    tiled result it is the median of the tiles' thresholds in force.
    """
    kind = result_kind(seg)
    if kind == "tree":
        own = seg.hierarchy.threshold_setting
        setting = own if threshold is None else check_threshold(threshold)
        return setting, float(seg.hierarchy.resolve(setting))
    own = check_threshold(seg.settings.get("threshold", "auto"))
    setting = own if threshold is None else check_threshold(threshold)
    if kind == "tiled":
        return own, float(seg.threshold)
    return setting, _stack_threshold(seg, setting)


def level_count(seg: Any, threshold: float) -> int:
    """Number of hierarchy levels at ``threshold``."""
    return int(seg.hierarchy.n_levels(threshold))


def cut_data(seg: Any, threshold: float, level: int | None = None) -> Any:
    """Labels of the main cut (``level`` None) or of hierarchy level ``level`` (from 1).

    Level d keeps the accepted splits of depth < d (as ``Segmentation.levels_at``).
    A lookup on the pixel -> leaf map: numpy for a :class:`Segmentation`, dask
    (block by block) for a ``LazySegmentation``.
    """
    lut = seg.hierarchy.node_lut(threshold, max_level=level)
    leaf = seg.pixel_leaf
    if isinstance(leaf, np.ndarray):
        return lut[leaf]
    return leaf.map_blocks(lambda block: lut[block], dtype=np.uint32)


def flat_data(seg: Any, setting: float | str) -> Any:
    """Labels of a stack or tiled result at ``setting``, for a layer of its own.

    In-memory labels are copied (a layer painted on must not change the
    result it is compared with) or re-cut (a stack at another threshold);
    labels held in zarr become a dask array over the store, read chunk by
    chunk, which napari paints without touching the store.
    """
    if result_kind(seg) == "stack" and not same_setting(setting, seg.settings.get("threshold")):
        return seg.cut(setting)
    labels = seg.labels
    if not isinstance(labels, np.ndarray):
        return as_dask(labels)
    return np.array(labels, copy=True)


def as_dask(array: Any) -> Any:
    """A dask array over ``array`` (itself when it is one), in the array's own chunks."""
    import dask.array as da

    if isinstance(array, da.Array):
        return array
    chunks = getattr(array, "chunks", None)
    return da.from_array(array, chunks=chunks if chunks is not None else "auto", asarray=False)


def dask_token(data: Any) -> str | None:
    """The graph name of a dask array (None for anything else)."""
    name = getattr(data, "name", None)
    return name if hasattr(data, "dask") and isinstance(name, str) else None


def layer_metadata(
    seg: Any,
    *,
    role: str,
    level: int | None,
    source: str,
    threshold: float,
    setting: float | str | None = None,
    plane: list[int | None] | None = None,
    version: str | None = None,
    data_token: str | None = None,
) -> dict[str, Any]:
    """``metadata`` of a result layer.

    Returns
    -------
    dict
        ``{"napari_diffcut": {...}}`` with keys ``settings`` (JSON-serialisable
        run record, its ``threshold`` set to the threshold shown), ``version``
        (this package's, or ``version`` if given: the one that saved a
        reopened result), ``role`` ("main" or "level"), ``level`` (int, or
        None for main), ``source`` (source layer name), ``threshold`` (float
        in force; NaN where unknown: an automatic stack beyond the memory
        budget),
        ``plane`` (for a plane of an nD layer: the index of every non-plane
        axis, None for the plane and channel axes; None for a 2-D layer and
        a whole stack), ``kind`` (:func:`result_kind`), ``data_token`` (the
        dask graph name of the data written, or None for numpy data) and
        ``segmentation`` (the live result object: a Segmentation, a
        StackSegmentation or a TiledSegmentation).
    """
    from napari_diffcut.core.version import __version__

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    settings = dict(seg.settings)
    settings["threshold"] = setting if setting is not None else float(threshold)
    return {
        LAYER_KEY: {
            "settings": settings,
            "version": __version__ if version is None else str(version),
            "role": role,
            "level": level,
            "source": source,
            "threshold": float(threshold),
            "plane": None if plane is None else list(plane),
            "kind": result_kind(seg),
            "data_token": data_token,
            "segmentation": seg,
        }
    }


def result_layer_data(
    seg: Any,
    source: str,
    *,
    threshold: float | str | None = None,
    geometry: Geometry | None = None,
    plane: list[int | None] | None = None,
    labels: NDArray[np.integer] | None = None,
    labels_level: int | None = None,
    version: str | None = None,
) -> list[LayerDataTuple]:
    """Layer-data tuples of a result: main layer first, then levels 1..n.

    Parameters
    ----------
    seg : Segmentation, StackSegmentation or TiledSegmentation
        The result (2-D labels are tree node ids + 1). Stacks and tiled
        results give the main layer only (no common tree, so no levels).
    source : str
        Name of the image layer it was computed from.
    threshold : "auto", float in (0, 1] or None
        NCut threshold to cut at; None uses the result's own setting. A
        tiled result, and a stack whose trees were not kept, cannot be
        re-cut (see :func:`recut_refusal`).
    geometry : Geometry, optional
        Scale, translate, units and axis labels to copy from the source.
    plane : list, optional
        Non-plane indices when the source has more than two dimensions.
    labels : array of int, shape (H, W), optional
        Labels to show instead of the computed ones in the layer of
        ``labels_level`` (a reopened result with the user's edits), used as
        they are (not copied). That layer is the visible one and the others
        are hidden. 2-D results only.
    labels_level : int, optional
        Level (1 = coarsest) whose layer gets ``labels``; None: the main layer.
    version : str, optional
        Package version for the metadata (default: this one).

    Returns
    -------
    list of (data, kwargs, "labels")
        The main layer (visible unless ``labels_level`` is given) and one
        hidden layer per level. Data is numpy, or dask for labels beyond the
        memory budget (lazy 2-D labels, stacks and tiles held in zarr).

    Raises
    ------
    ValueError
        ``labels_level`` is not a level at this threshold, ``labels`` has
        another shape than the segmentation, or the result cannot be re-cut
        at ``threshold``.
    """
    if result_kind(seg) != "tree":
        if labels is not None:
            raise ValueError("labels can only be given for a 2-D result (one tree)")
        return [_flat_layer_data(seg, source, threshold, geometry, plane, version)]
    setting, tau = resolve_threshold(seg, threshold)
    geo = (geometry or Geometry()).as_kwargs()
    n_levels = level_count(seg, tau)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != tuple(seg.shape):
            raise ValueError(
                f"labels must have the segmentation's shape {tuple(seg.shape)}, got {labels.shape}"
            )
        if labels_level is not None and not 1 <= labels_level <= n_levels:
            raise ValueError(
                f"labels_level must be None (main layer) or a level in 1..{n_levels}, "
                f"got {labels_level!r}"
            )
    shown = labels_level if labels is not None else None
    lazy = not isinstance(seg.pixel_leaf, np.ndarray)
    # Lazy labels: per-node areas in one pass over the pixel map serve every layer.
    leaf_area = lazy_leaf_area(seg) if lazy else None

    def one(role: str, level: int | None, name: str) -> LayerDataTuple:
        data = labels if labels is not None and level == shown else cut_data(seg, tau, level)
        if leaf_area is not None and dask_token(data) is not None:
            features = lazy_features(seg, seg.hierarchy.node_lut(tau, max_level=level), leaf_area)
        else:
            features = label_features(seg, data)
        meta = layer_metadata(
            seg,
            role=role,
            level=level,
            source=source,
            threshold=tau,
            setting=setting,
            plane=plane,
            version=version,
            data_token=dask_token(data),
        )
        return _labels_tuple(data, name, level == shown, features, meta, geo)

    out = [one("main", None, main_layer_name(source))]
    out += [one("level", d, level_layer_name(source, d)) for d in range(1, n_levels + 1)]
    return out


def _flat_layer_data(
    seg: Any,
    source: str,
    threshold: float | str | None,
    geometry: Geometry | None,
    plane: list[int | None] | None,
    version: str | None,
) -> LayerDataTuple:
    """The one layer of a stack or tiled result (no levels: no common tree)."""
    setting, tau = resolve_threshold(seg, threshold)
    if threshold is not None:
        own = seg.settings.get("threshold")
        refusal = recut_refusal(seg)
        if refusal and not same_setting(check_threshold(threshold), own):
            raise ValueError(f"cannot cut at threshold {threshold!r}: {refusal}")
    data = flat_data(seg, setting)
    meta = layer_metadata(
        seg,
        role="main",
        level=None,
        source=source,
        threshold=tau,
        setting=setting,
        plane=plane,
        version=version,
        data_token=dask_token(data),
    )
    geo = (geometry or Geometry()).as_kwargs()
    return _labels_tuple(data, main_layer_name(source), True, flat_features(seg, data), meta, geo)


def _labels_tuple(
    data: Any,
    name: str,
    visible: bool,
    features: Any,
    metadata: dict[str, Any],
    geometry: dict[str, Any],
) -> LayerDataTuple:
    """The (data, kwargs, "labels") tuple napari adds as a Labels layer."""
    kwargs = {
        "name": name,
        "visible": visible,
        "features": features,
        "metadata": metadata,
        **geometry,
    }
    return (data, kwargs, "labels")


def update_layer(layer: Any, data: Any, kwargs: dict[str, Any]) -> None:
    """Write a result tuple into an existing Labels layer (keeps its visibility).

    Metadata first: listeners of the data event (the hierarchy editor) must
    see the new segmentation, not the one the old labels came from.
    """
    layer.metadata = kwargs["metadata"]
    layer.features = kwargs["features"]
    layer.data = data
    for key in ("scale", "translate", "units", "axis_labels"):
        # Only what changed: napari re-lays out the canvas on every placement set
        # (about 2/3 of a warm layer update, benchmarks/bench_gui.py).
        if key in kwargs and not _same_placement(getattr(layer, key, None), kwargs[key]):
            setattr(layer, key, kwargs[key])


def _same_placement(current: Any, wanted: Any) -> bool:
    """Whether a layer's scale/translate/units/axis labels already equal ``wanted``."""
    try:
        return list(map(str, current)) == list(map(str, wanted)) if wanted is not None else False
    except TypeError:
        return False


def diffcut_meta(metadata: Any) -> dict[str, Any] | None:
    """Our metadata entry of a layer's metadata, or None."""
    if not isinstance(metadata, dict):
        return None
    meta = metadata.get(LAYER_KEY)
    return meta if isinstance(meta, dict) else None


def expected_data(metadata: Any) -> Any:
    """The labels we wrote into a layer, recomputed from its metadata (or None).

    A dask array for lazy results (compare graph names, see :func:`is_edited`,
    rather than computing it).
    """
    meta = diffcut_meta(metadata)
    if meta is None or meta.get("segmentation") is None or meta.get("role") not in ROLES:
        return None
    seg = meta["segmentation"]
    try:
        if result_kind(seg) != "tree":
            setting = check_threshold(meta["settings"]["threshold"])
            if not same_setting(setting, seg.settings.get("threshold")):
                return seg.cut(setting)
            return seg.labels if isinstance(seg.labels, np.ndarray) else as_dask(seg.labels)
        # "auto" or a number (a reopened result may record the setting, not the value)
        tau = float(seg.hierarchy.resolve(meta["threshold"]))
        level = meta.get("level") if meta["role"] == "level" else None
        if level is not None and not 1 <= int(level) <= level_count(seg, tau):
            return None
        return cut_data(seg, tau, None if level is None else int(level))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def is_edited(data: Any, metadata: Any) -> bool:
    """Whether a layer's data differs from what we wrote (or cannot be checked).

    A layer we cannot verify (no segmentation in its metadata) counts as
    edited, so it is never overwritten. Data we wrote as a dask array is
    unedited while its graph name is the one recorded (napari paints a dask
    array by rewriting its graph); nothing is computed to check it.
    """
    meta = diffcut_meta(metadata)
    token = meta.get("data_token") if meta is not None else None
    if token is not None:
        return dask_token(data) != token
    expected = expected_data(metadata)
    if expected is None or not isinstance(expected, np.ndarray):
        return True
    arr = np.asarray(data)
    return arr.shape != expected.shape or not np.array_equal(arr, expected)


def is_result_of(metadata: Any, source: str, role: str | None = None) -> bool:
    """Whether layer metadata marks a DiffCut result of ``source`` (and ``role``)."""
    meta = diffcut_meta(metadata)
    return (
        meta is not None
        and meta.get("source") == source
        and (role is None or meta.get("role") == role)
    )
