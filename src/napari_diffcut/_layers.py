"""Result layers as napari layer-data tuples: pure functions, no Qt, no napari import.

Shared by the dock widget, :func:`napari_diffcut.segment_layer` and the reader,
so that all three produce exactly the same layers:

* ``"<image> diffcut"``: the segmentation at the chosen NCut threshold (shown);
* ``"<image> diffcut level d"``, d = 1, 2, ...: hierarchy level d (hidden).

Every layer carries ``features`` (one row per label: index, level, parent,
area, ncut_cost) and ``metadata["napari_diffcut"]`` (see
:func:`layer_metadata`), including the live :class:`~napari_diffcut.engine.Segmentation`
so that the threshold can be changed, the tree edited and the result saved
from the layer alone.

Layers are never overwritten when the user changed them: what we wrote is a
pure function of the metadata (segmentation, threshold, role, level), so
:func:`is_edited` recomputes it and compares. :func:`plan_layer_updates`
decides, without touching a viewer, which layers to update, add or remove.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.errors import check_threshold

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
    """World placement of a 2-D result: the source's (Y, X) plane axes.

    Attributes
    ----------
    scale, translate : tuple of float
        Per plane axis, copied from the source layer.
    units, axis_labels : tuple of str, optional
        Per plane axis, copied from the source layer (None: napari's default).
    """

    scale: tuple[float, float] = (1.0, 1.0)
    translate: tuple[float, float] = (0.0, 0.0)
    units: tuple[str, str] | None = None
    axis_labels: tuple[str, str] | None = None

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
    picked = [a % n for a in (axes if axes is not None else (n - 2, n - 1))]
    if len(picked) != 2:
        raise ValueError(f"axes must name two layer axes, got {axes!r}")

    def two(values: Any, cast: type) -> Any:
        if values is None:
            return None
        seq = list(values)
        if len(seq) != n:
            return None
        return (cast(seq[picked[0]]), cast(seq[picked[1]]))

    return Geometry(
        scale=two(layer.scale, float),
        translate=two(layer.translate, float),
        units=two(getattr(layer, "units", None), str),
        axis_labels=two(getattr(layer, "axis_labels", None), str),
    )


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
    index, area = index[present], area[present]
    arrays = seg.hierarchy.arrays
    node = index.astype(np.int64) - 1
    # Labels painted by hand may name no tree node: their tree columns are -1 / NaN.
    known = node < arrays.n_nodes
    safe = np.where(known, node, 0)
    return {
        "index": index.astype(np.int64),
        "level": np.where(known, arrays.depth[safe], -1).astype(np.int64),
        "parent": np.where(known, arrays.parent[safe] + 1, -1).astype(np.int64),
        "area": area.astype(np.int64),
        "ncut_cost": np.where(known, arrays.cost[safe], np.nan).astype(np.float64),
    }


def resolve_threshold(seg: Any, threshold: float | str | None) -> tuple[float | str, float]:
    """(setting, numeric value) for ``threshold``; None means the segmentation's own."""
    setting = seg.hierarchy.threshold_setting if threshold is None else check_threshold(threshold)
    return setting, float(seg.hierarchy.resolve(setting))


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
        in force),
        ``plane`` (for a plane of an nD layer: the index of every non-plane
        axis, None for the two plane axes; None for a 2-D layer) and
        ``segmentation`` (the live Segmentation object).
    """
    from napari_diffcut import __version__

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
    """Layer-data tuples of a segmentation: main layer first, then levels 1..n.

    Parameters
    ----------
    seg : Segmentation
        The result (labels are tree node ids + 1).
    source : str
        Name of the image layer it was computed from.
    threshold : "auto", float in (0, 1] or None
        NCut threshold to cut at; None uses the segmentation's own setting.
    geometry : Geometry, optional
        Scale, translate, units and axis labels to copy from the source.
    plane : list, optional
        Non-plane indices when the source has more than two dimensions.
    labels : array of int, shape (H, W), optional
        Labels to show instead of the computed ones in the layer of
        ``labels_level`` (a reopened result with the user's edits), used as
        they are (not copied). That layer is the visible one and the others
        are hidden.
    labels_level : int, optional
        Level (1 = coarsest) whose layer gets ``labels``; None: the main layer.
    version : str, optional
        Package version for the metadata (default: this one).

    Returns
    -------
    list of (data, kwargs, "labels")
        The main layer (visible unless ``labels_level`` is given) and one
        hidden layer per level.

    Raises
    ------
    ValueError
        ``labels_level`` is not a level at this threshold, or ``labels`` has
        another shape than the segmentation.
    """
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

    def one(role: str, level: int | None, name: str) -> LayerDataTuple:
        data = labels if labels is not None and level == shown else cut_data(seg, tau, level)
        kwargs = {
            "name": name,
            "visible": level == shown,
            "features": label_features(seg, data),
            "metadata": layer_metadata(
                seg,
                role=role,
                level=level,
                source=source,
                threshold=tau,
                setting=setting,
                plane=plane,
                version=version,
            ),
            **geo,
        }
        return (data, kwargs, "labels")

    out = [one("main", None, main_layer_name(source))]
    out += [one("level", d, level_layer_name(source, d)) for d in range(1, n_levels + 1)]
    return out


def diffcut_meta(metadata: Any) -> dict[str, Any] | None:
    """Our metadata entry of a layer's metadata, or None."""
    if not isinstance(metadata, dict):
        return None
    meta = metadata.get(LAYER_KEY)
    return meta if isinstance(meta, dict) else None


def expected_data(metadata: Any) -> NDArray[np.uint32] | None:
    """The labels we wrote into a layer, recomputed from its metadata (or None)."""
    meta = diffcut_meta(metadata)
    if meta is None or meta.get("segmentation") is None or meta.get("role") not in ROLES:
        return None
    seg = meta["segmentation"]
    try:
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
    edited, so it is never overwritten.
    """
    expected = expected_data(metadata)
    if expected is None:
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
        The two axes kept whole (the displayed ones).

    Returns
    -------
    index : tuple
        ``slice(None)`` on plane axes, the rounded, clipped position elsewhere.
    plane : list
        The same as JSON-friendly metadata (None on plane axes).
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
    layer_ndim: int, viewer_ndim: int, displayed: Sequence[int]
) -> tuple[int, int]:
    """Layer axes of the displayed 2-D plane; they must be the layer's last two axes.

    napari aligns a layer's axes with the viewer's *last* axes. A 2-D result
    lands on the viewer's last two axes, so it is placed correctly only when
    the displayed plane is the source's last two axes (in either order: a
    swapped Y/X view shows the result swapped the same way). Other transposed
    views are refused with a message saying how to fix them.
    """
    offset = viewer_ndim - layer_ndim
    layer_axes = [a - offset for a in displayed if a - offset >= 0]
    if len(layer_axes) < 2:
        raise ValueError(
            f"the displayed axes {tuple(displayed)} show fewer than two axes of this layer"
        )
    axes = (layer_axes[-2], layer_axes[-1])
    if sorted(axes) != [layer_ndim - 2, layer_ndim - 1]:
        raise ValueError(
            f"the displayed plane shows layer axes {axes}; DiffCut segments the "
            "last two "
            f"axes ({layer_ndim - 2}, {layer_ndim - 1}) = (Y, X). Reset the axis order "
            "(viewer.dims.order, or the 'transpose' button) and try again"
        )
    return (layer_ndim - 2, layer_ndim - 1)
