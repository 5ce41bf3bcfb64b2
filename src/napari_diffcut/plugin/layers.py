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
size is ever computed to find out. :func:`plan_layer_updates`
decides, without touching a viewer, which layers to update, add or remove.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import check_threshold

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


@dataclass(frozen=True)
class Geometry:
    """World placement of a result: the source axes it kept.

    A 2-D result keeps the source's (Y, X) plane axes; a whole-stack result
    keeps every axis but the channel axis.

    Attributes
    ----------
    scale, translate : tuple of float
        Per kept axis, copied from the source layer.
    units, axis_labels : tuple of str, optional
        Per kept axis, copied from the source layer (None: napari's default).
    """

    scale: tuple[float, ...] = (1.0, 1.0)
    translate: tuple[float, ...] = (0.0, 0.0)
    units: tuple[str, ...] | None = None
    axis_labels: tuple[str, ...] | None = None

    @classmethod
    def from_placement(cls, placement: dict[str, Any]) -> Geometry:
        """The geometry recorded in a saved result's JSON ``layer`` placement.

        Entries that are missing or not a pair fall back to napari's defaults.
        """

        def pair(key: str, cast: type) -> Any:
            values = placement.get(key)
            if not isinstance(values, list | tuple) or len(values) != 2:
                return None
            return (cast(values[0]), cast(values[1]))

        return cls(
            scale=pair("scale", float) or (1.0, 1.0),
            translate=pair("translate", float) or (0.0, 0.0),
            units=pair("units", str),
            axis_labels=pair("axis_labels", str),
        )

    def as_kwargs(self) -> dict[str, Any]:
        """Layer keyword arguments (units/axis_labels only when known)."""
        kw: dict[str, Any] = {"scale": self.scale, "translate": self.translate}
        if self.units is not None:
            kw["units"] = self.units
        if self.axis_labels is not None:
            kw["axis_labels"] = self.axis_labels
        return kw


def plane_geometry(layer: Any, axes: Sequence[int] | None = None) -> Geometry:
    """Geometry of a layer's plane axes (default: its last two axes).

    ``layer`` is anything with napari's ``scale``, ``translate`` and, when
    present, ``units`` and ``axis_labels`` (one entry per layer axis).
    """
    n = len(layer.scale)
    picked = list(axes) if axes is not None else [n - 2, n - 1]
    if len(picked) != 2:
        raise ValueError(f"axes must name two layer axes, got {axes!r}")
    return axes_geometry(layer, picked)


def axes_geometry(layer: Any, axes: Sequence[int] | None = None) -> Geometry:
    """Geometry of some of a layer's axes, in order (default: all of them).

    ``layer`` is anything with napari's ``scale``, ``translate`` and, when
    present, ``units`` and ``axis_labels`` (one entry per layer axis; an
    RGB layer's colour axis is not one).
    """
    n = len(layer.scale)
    picked = [int(a) % n for a in (range(n) if axes is None else axes)]
    if len(picked) < 2 or len(set(picked)) != len(picked):
        raise ValueError(f"axes must name at least two distinct layer axes, got {axes!r}")

    def some(values: Any, cast: type) -> Any:
        if values is None:
            return None
        seq = list(values)
        if len(seq) != n:
            return None
        return tuple(cast(seq[a]) for a in picked)

    return Geometry(
        scale=some(layer.scale, float),
        translate=some(layer.translate, float),
        units=some(getattr(layer, "units", None), str),
        axis_labels=some(getattr(layer, "axis_labels", None), str),
    )


#: Axis labels that name a channel axis (compared case-insensitively).
CHANNEL_AXIS_NAMES = frozenset({"c", "ch", "chan", "channel", "channels"})


def layer_channel_axis(
    data_ndim: int, rgb: bool, axis_labels: Sequence[str] | None = None
) -> int | None:
    """Default channel axis of an image layer, in the axes of its data (None: none).

    An RGB(A) layer's colour axis (the data's last axis, which is not a
    layer axis) comes first; otherwise the axis whose label is one of
    :data:`CHANNEL_AXIS_NAMES` ("c", "channel", ... as napari readers and
    ``add_image(axis_labels=...)`` write them). Anything else has no channel
    axis: every axis is one that napari shows, so the stack is what you see.

    Examples
    --------
    >>> layer_channel_axis(3, True), layer_channel_axis(3, False, ("c", "y", "x"))
    (2, 0)
    >>> layer_channel_axis(3, False, ("z", "y", "x")) is None
    True
    """
    if rgb:
        return data_ndim - 1
    for axis, label in enumerate(axis_labels or ()):
        if str(label).strip().lower() in CHANNEL_AXIS_NAMES:
            return axis
    return None


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


def _same_setting(a: Any, b: Any) -> bool:
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
    if result_kind(seg) == "stack" and not _same_setting(setting, seg.settings.get("threshold")):
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


def _dask_token(data: Any) -> str | None:
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
        if leaf_area is not None and _dask_token(data) is not None:
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
            data_token=_dask_token(data),
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
        if refusal and not _same_setting(check_threshold(threshold), own):
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
        data_token=_dask_token(data),
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
            if not _same_setting(setting, seg.settings.get("threshold")):
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
        return _dask_token(data) != token
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


@dataclass(frozen=True)
class ExistingLayer:
    """What the planner needs to know about a layer already in the viewer."""

    name: str
    data: Any = None
    metadata: Any = None
    is_labels: bool = True


@dataclass
class LayerPlan:
    """Result of :func:`plan_layer_updates`.

    Attributes
    ----------
    steps : list of (name, update, layer-data tuple)
        In the order of the wanted tuples; ``update`` is True to update the
        existing layer ``name`` in place, False to add a layer named ``name``.
    remove : list of str
        Our unedited level layers that the new result no longer has.
    protected : list of (name, new_name)
        Layers left untouched because they were edited (or are not ours),
        and where their replacement goes.
    """

    steps: list[tuple[str, bool, LayerDataTuple]] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    protected: list[tuple[str, str]] = field(default_factory=list)


def _suffix_number(name: str, base: str) -> int | None:
    """0 for ``base`` itself, n for napari's ``"base [n]"``, None otherwise."""
    if name == base:
        return 0
    m = re.fullmatch(re.escape(base) + r" \[(\d+)\]", name)
    return int(m.group(1)) if m else None


def _free_name(base: str, taken: set[str]) -> str:
    """``base``, or the first free ``"base [n]"`` (napari's own naming)."""
    if base not in taken:
        return base
    n = 1
    while f"{base} [{n}]" in taken:
        n += 1
    return f"{base} [{n}]"


def plan_layer_updates(
    existing: Sequence[ExistingLayer], wanted: Sequence[LayerDataTuple]
) -> LayerPlan:
    """Decide which layers to update, add or remove for new result tuples.

    For each wanted layer named ``base`` the candidates are the layers named
    ``base`` or ``base [n]``. The first candidate that is one of our results
    of the same source, role and level *and unedited* is updated in place;
    otherwise a new layer is added under the first free name. Edited layers,
    and layers of that name that are not ours, are never touched. Our
    unedited level layers of the same source beyond the new number of levels
    are removed.
    """
    taken = {e.name for e in existing}
    plan = LayerPlan()
    used: set[str] = set()
    levels_wanted: set[int] = set()
    source = None
    for data, kwargs, kind in wanted:
        meta = diffcut_meta(kwargs.get("metadata")) or {}
        source = meta.get("source")
        if meta.get("role") == "level":
            levels_wanted.add(int(meta["level"]))
        base = kwargs["name"]
        candidates = sorted(
            (n, e)
            for e in existing
            if (n := _suffix_number(e.name, base)) is not None and e.name not in used
        )
        target = next(
            (
                e
                for _, e in candidates
                if e.is_labels
                and _same_slot(e.metadata, meta)
                and not is_edited(e.data, e.metadata)
            ),
            None,
        )
        if target is not None:
            plan.steps.append((target.name, True, (data, kwargs, kind)))
            used.add(target.name)
            continue
        name = _free_name(base, taken | used)
        plan.steps.append((name, False, (data, kwargs, kind)))
        used.add(name)
        if base in taken:
            plan.protected.append((base, name))
    if source is not None:
        plan.remove = [
            e.name
            for e in existing
            if e.is_labels
            and e.name not in used
            and is_result_of(e.metadata, source, "level")
            and int(diffcut_meta(e.metadata).get("level") or 0) not in levels_wanted  # type: ignore[union-attr]
            and not is_edited(e.data, e.metadata)
        ]
    return plan


def _same_slot(metadata: Any, meta: dict[str, Any]) -> bool:
    """Whether an existing layer holds the same result slot (source, role, level)."""
    old = diffcut_meta(metadata)
    return (
        old is not None
        and old.get("source") == meta.get("source")
        and old.get("role") == meta.get("role")
        and old.get("level") == meta.get("level")
    )


def plane_selection(
    shape: Sequence[int], position: Sequence[float], plane_axes: Sequence[int]
) -> tuple[tuple[int | slice, ...], list[int | None]]:
    """Index that takes the 2-D plane through ``position`` of an nD array.

    Parameters
    ----------
    shape : sequence of int
        Shape of the layer's data over its (non-channel) axes.
    position : sequence of float
        Data coordinates of the current slice (napari ``world_to_data``).
    plane_axes : sequence of int
        The axes kept whole: the displayed (Y, X) plane, and a channel axis.

    Returns
    -------
    index : tuple
        ``slice(None)`` on kept axes, the rounded, clipped position elsewhere.
    plane : list
        The same as JSON-friendly metadata (None on kept axes).
    """
    if len(shape) != len(position):
        raise ValueError(f"position {list(position)} does not match shape {tuple(shape)}")
    index: list[int | slice] = []
    plane: list[int | None] = []
    for axis, (size, pos) in enumerate(zip(shape, position, strict=True)):
        if axis in plane_axes:
            index.append(slice(None))
            plane.append(None)
        else:
            i = int(min(max(round(float(pos)), 0), size - 1))
            index.append(i)
            plane.append(i)
    return tuple(index), plane


def displayed_plane_axes(
    layer_ndim: int,
    viewer_ndim: int,
    displayed: Sequence[int],
    plane_axes: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Layer axes of the displayed 2-D plane; they must be the (Y, X) plane axes.

    ``plane_axes`` are the layer's (Y, X) axes: its last two axes (default),
    or the last two that are not the channel axis. napari aligns a layer's
    axes with the viewer's *last* axes. A 2-D result lands on the viewer's
    last two axes, so it is placed correctly only when the displayed plane
    is the source's (Y, X) plane (in either order: a swapped Y/X view shows
    the result swapped the same way). Other transposed views are refused
    with a message saying how to fix them.
    """
    want = tuple(plane_axes) if plane_axes is not None else (layer_ndim - 2, layer_ndim - 1)
    offset = viewer_ndim - layer_ndim
    layer_axes = [a - offset for a in displayed if a - offset >= 0]
    if len(layer_axes) < 2:
        raise ValueError(
            f"the displayed axes {tuple(displayed)} show fewer than two axes of this layer"
        )
    axes = (layer_axes[-2], layer_axes[-1])
    if sorted(axes) != sorted(want):
        which = "last two" if plane_axes is None else "(Y, X)"
        raise ValueError(
            f"the displayed plane shows layer axes {axes}; DiffCut segments the "
            f"{which} axes {want} = (Y, X). Reset the axis order "
            "(viewer.dims.order, or the 'transpose' button) and try again"
        )
    return (int(want[0]), int(want[1]))


def lines_up(kept_axes: Sequence[int], layer_ndim: int) -> bool:
    """Whether a result keeping ``kept_axes`` of a layer lines up with it in napari.

    napari aligns layers by their last axes, so a result lines up when the
    axes it dropped (channel axis, the indices of a plane) all come first.

    Examples
    --------
    >>> lines_up((1, 2), 3), lines_up((0, 2, 3), 4), lines_up((1, 2, 3), 4)
    (True, False, True)
    """
    n = len(kept_axes)
    return list(kept_axes) == list(range(layer_ndim - n, layer_ndim))
