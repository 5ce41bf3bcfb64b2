"""napari reader for saved results (``*.diffcut.zarr``; npe2 ``readers`` contribution).

``get_reader(path)`` returns ``None`` for anything that is not a napari-diffcut
store (checked cheaply from the group's JSON header, nothing decoded), and a
function otherwise. That function never raises into napari: a damaged store
is reported as an error notification and opens nothing.

The layers are the ones the plugin makes after a run, built by the same
function (:func:`napari_diffcut.plugin.layers.result_layer_data`): the main layer
``"<source> diffcut"`` and the levels ``"<source> diffcut level N"``, each
with ``metadata["napari_diffcut"]`` holding the live ``Segmentation``, so the
threshold, split and merge work on a reopened result. The saved (possibly
edited) labels go back into the layer they were saved from (the main layer
or a level), which is the visible one; the other layers are recomputed from
the tree. They are added in the order a run adds them (the main layer on top).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.files.store import SUFFIX, is_result_store
from napari_diffcut.plugin.geometry import Geometry
from napari_diffcut.plugin.layers import result_layer_data
from napari_diffcut.results.store import SavedResult, read_result

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

    The levels come first and the main layer last, so that napari stacks and
    selects them as after a run. A store that cannot be opened is reported
    as a napari error notification naming the file and the problem, instead
    of raising into napari.
    """
    try:
        single = _single_path(path)
        if single is None:
            raise DiffCutError(f"expected one {SUFFIX} folder, got {path!r}")
        result = read_result(single)
        layers = saved_layer_data(result, default_source=_source_from_path(single))
    except Exception as exc:  # noqa: BLE001 - shown to the user, never a crash of napari
        _notify_error(exc if isinstance(exc, DiffCutError) else DiffCutError(str(exc)))
        return [(None,)]
    return layers[1:] + layers[:1]


def saved_layer_data(result: SavedResult, *, default_source: str = "image") -> list[LayerData]:
    """The plugin's layers for a saved result (:func:`_layers.result_layer_data`).

    Parameters
    ----------
    result : SavedResult
        From :func:`napari_diffcut.results.store.read_result`.
    default_source : str
        Source image name used when the store does not record one.

    Returns
    -------
    list of (data, kwargs, "labels")
        Main layer first, then one layer per level, as after a run, except
        that the saved labels (user edits included) fill the layer they were
        saved from, which is the visible one.
    """
    seg = result.segmentation
    placement = result.layer
    return result_layer_data(
        seg,
        str(placement.get("source") or default_source),
        geometry=Geometry.from_placement(placement),
        plane=placement.get("plane"),
        labels=result.labels,
        labels_level=_saved_level(placement, seg),
        version=result.version,
    )


def _saved_level(placement: dict[str, Any], seg: Any) -> int | None:
    """The level whose layer was saved (None: the main layer, or unknown)."""
    level = placement.get("level")
    if placement.get("role") != "level" or isinstance(level, bool) or not isinstance(level, int):
        return None
    return level if 1 <= level <= seg.hierarchy.n_levels() else None


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
