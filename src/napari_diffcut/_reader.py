"""napari reader for saved results (``*.diffcut.zarr``; npe2 ``readers`` contribution).

``get_reader(path)`` returns ``None`` for anything that is not a napari-diffcut
store (checked cheaply from the group's JSON header, nothing decoded), and a
function otherwise. That function never raises into napari: a damaged store
is reported as an error notification and opens nothing.

The layers are the ones the plugin makes after a run (built by
:func:`napari_diffcut._layers.result_layer_data`): the main layer
``"<source> diffcut"`` with the saved (possibly edited) labels, then the levels
``"<source> diffcut level N"`` (hidden, coarsest first), each with
``metadata["napari_diffcut"]`` holding the live ``Segmentation``, so split and
merge work on a reopened result.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_diffcut._layers import (
    LAYER_KEY,
    Geometry,
    label_features,
    result_layer_data,
)
from napari_diffcut.errors import DiffCutError
from napari_diffcut.store import SUFFIX, SavedResult, is_result_store, read_result

LayerData = tuple[Any, ...]
PathOrPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """Reader function for a napari-diffcut store, or None for any other path.

    Never raises (npe2 reader contract).
    """
    try:
        single = _single_path(path)
        if single is None or not is_result_store(single):
            return None
    except Exception:  # noqa: BLE001 - a reader probe must never raise into napari
        return None
    return read_layers


def read_layers(path: PathOrPaths) -> list[LayerData]:
    """Layer data of a saved result; ``[(None,)]`` (napari's "nothing") on failure.

    A store that cannot be opened is reported as a napari error notification
    naming the file and the problem, instead of raising into napari.
    """
    single = _single_path(path)
    try:
        if single is None:
            raise DiffCutError(f"expected one {SUFFIX} folder, got {path!r}")
        result = read_result(single)
        return saved_layer_data(result, default_source=_source_from_path(single))
    except Exception as exc:  # noqa: BLE001 - shown to the user, never a crash of napari
        _notify_error(exc if isinstance(exc, DiffCutError) else DiffCutError(str(exc)))
        return [(None,)]


def saved_layer_data(
    result: SavedResult, *, default_source: str = "image"
) -> list[LayerData]:
    """The plugin's layers for a saved result (:func:`_layers.result_layer_data`).

    The main layer gets the saved labels (user edits included) and a feature
    table computed from them; the levels are recomputed from the tree.

    Parameters
    ----------
    result : SavedResult
        From :func:`napari_diffcut.store.read_result`.
    default_source : str
        Source image name used when the store does not record one.

    Returns
    -------
    list of (data, kwargs, "labels")
        Main layer first, then one hidden layer per level (as after a run).
    """
    seg = result.segmentation
    placement = result.layer
    source = str(placement.get("source") or default_source)
    layers = result_layer_data(
        seg, source, geometry=_geometry(placement), plane=placement.get("plane")
    )
    out: list[LayerData] = []
    for data, kwargs, kind in layers:
        meta = kwargs["metadata"][LAYER_KEY]
        meta["version"] = result.version  # the version that wrote the result
        if meta["role"] == "main":
            data = result.labels.copy()
            kwargs["features"] = _features(seg, data)
        out.append((data, kwargs, kind))
    return out


def _geometry(placement: dict[str, Any]) -> Geometry:
    """Layer geometry recorded in the store (napari defaults where missing)."""

    def pair(key: str, cast: type) -> Any:
        values = placement.get(key)
        if not isinstance(values, list) or len(values) != 2:
            return None
        return (cast(values[0]), cast(values[1]))

    return Geometry(
        scale=pair("scale", float) or (1.0, 1.0),
        translate=pair("translate", float) or (0.0, 0.0),
        units=pair("units", str),
        axis_labels=pair("axis_labels", str),
    )


def _features(seg: Any, labels: Any) -> dict[str, Any]:
    """Feature table of edited labels; labels painted outside the tree get no row."""
    n_nodes = seg.hierarchy.arrays.n_nodes
    return label_features(seg, np.where(labels <= n_nodes, labels, 0))


def _single_path(path: PathOrPaths) -> Path | None:
    """The one path napari passed (a list of one is accepted)."""
    if isinstance(path, str | os.PathLike):
        return Path(os.fspath(path))
    items = list(path)
    if len(items) == 1 and isinstance(items[0], str | os.PathLike):
        return Path(os.fspath(items[0]))
    return None


def _source_from_path(path: Path) -> str:
    """``cells`` for ``.../cells.diffcut.zarr`` (the source image's likely name)."""
    name = path.name.rstrip("/")
    for suffix in (SUFFIX, ".zarr"):
        if name.endswith(suffix):
            return name[: -len(suffix)] or "image"
    return name or "image"


def _notify_error(exc: DiffCutError) -> None:
    """Show an error notification (napari's notification manager; logs without Qt)."""
    from napari.utils.notifications import show_error

    show_error(str(exc))
