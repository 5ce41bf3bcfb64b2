"""The ``*.diffcut.zarr`` format: write a segmentation with its whole tree, read it back.

The store is a Zarr v3 group that holds plain numeric arrays and JSON
attributes only: no pickles and no object arrays, so opening a result that
someone else wrote cannot run code. Before any chunk is decoded, the JSON
metadata of every array is checked against a short list of numeric data types
and byte codecs (:data:`SAFE_CODECS`); a foreign or damaged store gets a
:class:`~napari_diffcut.core.errors.DiffCutError` that names the file and the
problem.

Layout (``format_version`` 1)::

    result.diffcut.zarr/
      zarr.json            group; attributes["napari_diffcut"] = header (below)
      labels               (H, W) uint32   the saved layer's labels, user edits included
      pixel_leaf           (H, W) int32    deepest tree node of every pixel
      levels               (L, H, W) uint32 every level, coarsest first (for other
                                          tools; recomputed from the tree on load)
      tree/parent          (n,) int64      parent node id, -1 for the root
      tree/cost            (n,) float64    NCut cost of each node's split (nan: none)
      tree/size            (n,) int64      patches per node
      tree/depth           (n,) int64      0 for the root
      tree/leaf_of_patch   (h*w,) int64    deepest node of every patch

Header keys: ``format`` ("napari-diffcut.result"), ``format_version``,
``version`` (package version that saved), ``settings`` (the run record),
``threshold`` (the threshold setting: "auto" or a number), ``grid_shape``,
``shape``, ``n_levels`` and a ``layer`` dict (source name, scale, translate,
units, axis labels, plane of an nD source, and the role and level of the layer
whose labels were saved; any may be missing) so that napari reopens the layers
where they were.

Label values are tree node ids + 1 (see :mod:`napari_diffcut.core.hierarchy`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import DiffCutError, check_threshold
from napari_diffcut.files import store_check
from napari_diffcut.files.store_check import (
    ARRAYS,
    DECODED,
    check_array_meta,
    check_decoding,
    check_shapes,
    check_sizes,
    check_tree,
    read_header,
    read_json,
    shape_pair,
)

if TYPE_CHECKING:  # pragma: no cover
    from napari_diffcut.core.hierarchy import Hierarchy
    from napari_diffcut.pipeline.segmentation import Segmentation

#: Value of the header's "format" key; marks a store as ours.
FORMAT = "napari-diffcut.result"
#: Newest layout this version writes and reads.
FORMAT_VERSION = 1
#: File name suffix of saved results (also the napari reader's pattern).
SUFFIX = ".diffcut.zarr"
#: Group attribute that holds the header.
ATTR = "napari_diffcut"
#: Zarr v3 codecs accepted on load (see :mod:`napari_diffcut.files.store_check`).
SAFE_CODECS = store_check.SAFE_CODECS


@dataclass
class StoredParts:
    """Everything :func:`read_parts` found in a store, before it is a Segmentation.

    Attributes
    ----------
    hierarchy : Hierarchy
        The NCut tree on the patch grid, with the saved threshold setting.
    pixel_leaf : ndarray of int32, shape (H, W)
        Deepest tree node of every pixel.
    settings : dict
        The run record.
    labels : ndarray of uint32, shape (H, W)
        The saved labels, user edits (paint, split, merge) included.
    version : str
        napari-diffcut version that wrote the store.
    layer : dict
        napari placement: "source", "scale", "translate", "units",
        "axis_labels", "plane", "role" ("main" or "level") and "level" of the
        layer saved (each optional).
    """

    hierarchy: Hierarchy
    pixel_leaf: NDArray[np.int32]
    settings: dict[str, Any]
    labels: NDArray[np.uint32]
    version: str
    layer: dict[str, Any] = field(default_factory=dict)


def result_path(path: str | os.PathLike[str]) -> Path:
    """The store path for ``path``: ``.diffcut.zarr`` is appended unless present.

    A trailing ``.zarr`` is replaced, so ``"a.zarr"`` becomes ``"a.diffcut.zarr"``
    (the napari reader opens ``*.diffcut.zarr``).
    """
    p = Path(os.fspath(path))
    name = p.name
    if name.endswith(SUFFIX):
        return p
    if not name or name in (".", ".."):
        raise ValueError(
            f"path must name a result store such as 'cells{SUFFIX}', got {str(path)!r}"
        )
    if Path(name).suffix.lower() in (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy", ".json"):
        raise ValueError(
            f"save writes a result store (a folder) named like 'cells{SUFFIX}', not a "
            f"{Path(name).suffix} file, got {str(path)!r}; for a label TIFF use "
            "napari_diffcut.results.export.write_labels_tiff(path, seg.labels)"
        )
    if name.endswith(".zarr"):
        name = name[: -len(".zarr")]
    return p.with_name(name + SUFFIX)


def is_result_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory whose group header marks it as a saved result.

    Cheap (reads one small JSON file) and never raises: used by the napari
    reader to tell our stores from foreign ones.
    """
    try:
        header = read_json(Path(os.fspath(path)) / "zarr.json")
        return header.get("attributes", {}).get(ATTR, {}).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, TypeError, RecursionError, DiffCutError):
        return False


def save(
    seg: Segmentation,
    path: str | os.PathLike[str],
    *,
    labels: NDArray[np.integer] | None = None,
    threshold: float | str | None = None,
    layer: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Save a segmentation with its tree, levels and settings as ``*.diffcut.zarr``.

    Parameters
    ----------
    seg : Segmentation
        The result to save.
    path : str or path-like
        Store path; ``.diffcut.zarr`` is appended when missing (:func:`result_path`).
    labels : array of int, shape (H, W), optional
        The current, possibly user-edited labels (non-negative). Default:
        ``seg.labels``.
    threshold : "auto" or float, optional
        Threshold setting to record. Default: the segmentation's own setting.
    layer : dict, optional
        napari placement to record: "source", "scale", "translate", "units",
        "axis_labels", "plane", and "role" ("main" or "level") with "level"
        saying which result layer ``labels`` come from (all optional).
    overwrite : bool
        Replace an existing napari-diffcut result at ``path``. Other existing
        files or folders are never replaced, whatever this flag says.

    Returns
    -------
    Path
        The store written.

    Raises
    ------
    ValueError
        Bad ``labels``, ``threshold`` or non-JSON settings.
    DiffCutError
        ``path`` exists and may not be replaced, or writing failed.

    Notes
    -----
    The store is written beside its target and renamed into place, so an
    interrupted save never leaves a half-written result under ``path``.
    """
    target = result_path(path)
    edited = _check_labels(seg.labels if labels is None else labels, seg.shape)
    header = _header(seg, threshold, layer)
    _check_target(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise DiffCutError(
            f"could not save the result to {target}: {exc.strerror or exc}"
        ) from None
    try:
        _write_group(tmp, seg, edited, header)
        _replace_dir(tmp, target)
    except OSError as exc:
        raise DiffCutError(f"could not save the result to {target}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_parts(path: str | os.PathLike[str]) -> StoredParts:
    """Read and validate a saved result: tree, pixel map, settings, saved labels.

    Raises
    ------
    DiffCutError
        ``path`` is missing, foreign, damaged or from a newer format.
    """
    p = Path(os.fspath(path))
    try:
        return _read(p)
    except DiffCutError as exc:
        raise DiffCutError(f"cannot open {p} as a napari-diffcut result: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign file is a file problem
        raise DiffCutError(
            f"cannot open {p} as a napari-diffcut result (damaged store?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


# -- writing -------------------------------------------------------------------


def _check_labels(labels: Any, shape: tuple[int, int]) -> NDArray[np.uint32]:
    """Edited labels as uint32 of the segmentation's shape (values >= 0)."""
    arr = np.asarray(labels)
    if arr.shape != shape or arr.dtype.kind not in "ui":
        raise ValueError(
            f"labels must be an integer array of shape {shape} (the segmentation's), "
            f"got {arr.dtype} of shape {arr.shape}"
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.uint32).max):
        raise ValueError(f"labels must lie in [0, 2**32 - 1], got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint32, copy=False)


def _header(
    seg: Segmentation, threshold: float | str | None, layer: dict[str, Any] | None
) -> dict[str, Any]:
    """JSON header of the store (validated to be strict JSON)."""
    from napari_diffcut.core.version import __version__

    setting = seg.hierarchy.threshold_setting if threshold is None else check_threshold(threshold)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": __version__,
        "settings": seg.settings,
        "threshold": setting,
        "grid_shape": list(seg.hierarchy.grid_shape),
        "shape": list(seg.shape),
        "n_levels": seg.hierarchy.n_levels(),
        "layer": _layer_placement(layer or {}),
    }
    null = seg.hierarchy.arrays.null_cost
    if null is not None:
        # The automatic threshold's per-node null costs (core.null); NaN (no null
        # computed for that node) is null in strict JSON.
        header["null_cost"] = [float(v) if math.isfinite(v) else None for v in null]
    try:
        # Strict JSON (no NaN, no objects): what a foreign JSON reader accepts.
        return json.loads(json.dumps(header, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"seg.settings must be JSON-serialisable (numbers, strings, lists, dicts; "
            f"no NaN) to be saved: {exc}"
        ) from exc


def _layer_placement(layer: dict[str, Any]) -> dict[str, Any]:
    """The JSON part of a napari layer's placement worth restoring."""
    out: dict[str, Any] = {}
    if layer.get("source") is not None:
        out["source"] = str(layer["source"])
    for key in ("scale", "translate"):
        if layer.get(key) is not None:
            values = [float(v) for v in np.asarray(layer[key], np.float64).ravel()]
            if all(math.isfinite(v) for v in values):
                out[key] = values
    for key in ("axis_labels", "units"):
        if layer.get(key) is not None:
            out[key] = [str(a) for a in layer[key]]
    if layer.get("plane") is not None:
        out["plane"] = [None if v is None else int(v) for v in layer["plane"]]
    if layer.get("role") in ("main", "level"):
        out["role"] = layer["role"]
    if layer.get("role") == "level" and layer.get("level") is not None:
        out["level"] = int(layer["level"])
    return out


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse to replace anything that is not one of our stores."""
    if not target.exists() and not target.is_symlink():
        return
    if not is_result_store(target) or target.is_symlink():
        raise DiffCutError(
            f"{target} exists and is not a napari-diffcut result; choose another path "
            "(existing files and folders are never replaced)"
        )
    if not overwrite:
        raise DiffCutError(f"{target} exists; pass overwrite=True to replace it")


def _write_group(
    root: Path, seg: Segmentation, labels: NDArray[np.uint32], header: dict[str, Any]
) -> None:
    """Write every array and the header into a fresh group at ``root``."""
    import zarr

    group = zarr.open_group(str(root), mode="w", zarr_format=3)
    tree = seg.hierarchy.arrays
    arrays: dict[str, NDArray[Any]] = {
        "labels": labels,
        "pixel_leaf": np.asarray(seg.pixel_leaf, np.int32),
        "levels": np.stack(seg.levels).astype(np.uint32),
        "tree/parent": np.asarray(tree.parent, np.int64),
        "tree/cost": np.asarray(tree.cost, np.float64),
        "tree/size": np.asarray(tree.size, np.int64),
        "tree/depth": np.asarray(tree.depth, np.int64),
        "tree/leaf_of_patch": np.asarray(tree.leaf_of_patch, np.int64),
    }
    sub = group.create_group("tree")
    for name, data in arrays.items():
        where, key = (sub, name.split("/")[1]) if name.startswith("tree/") else (group, name)
        where.create_array(
            key,
            data=data,
            chunks=_chunks(data.shape),
            compressors=zarr.codecs.ZstdCodec(level=3),
        )
    group.attrs[ATTR] = header


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """At most 1024 x 1024 pixels per chunk; one level per chunk."""
    if len(shape) == 3:
        return (1, *(max(1, min(s, 1024)) for s in shape[1:]))
    return tuple(max(1, min(s, 1024)) for s in shape)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an old store only after success."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- reading -------------------------------------------------------------------


def _read(root: Path) -> StoredParts:
    """Read and validate a store (raises DiffCutError or any decoder error)."""
    import zarr

    from napari_diffcut.core.hierarchy import Hierarchy, TreeArrays

    header = read_header(root, ATTR, FORMAT, FORMAT_VERSION)
    grid, shape = shape_pair(header["grid_shape"]), shape_pair(header["shape"])
    check_sizes(shape, grid)
    metas = {name: check_array_meta(root, name) for name in ARRAYS}
    check_shapes({name: meta[0] for name, meta in metas.items()}, shape, grid)
    check_decoding(root, metas)
    # use_consolidated=False: zarr would otherwise take every array's metadata
    # from a copy in the group's zarr.json, bypassing the checks just made.
    group = zarr.open_group(str(root), mode="r", zarr_format=3, use_consolidated=False)
    # "levels" is for other tools only: it is recomputed from the tree, never decoded.
    data = {name: np.array(group[name][...]) for name in DECODED}
    tree = TreeArrays(
        parent=data["tree/parent"].astype(np.int64),
        cost=data["tree/cost"].astype(np.float64),
        size=data["tree/size"].astype(np.int64),
        depth=data["tree/depth"].astype(np.int64),
        leaf_of_patch=data["tree/leaf_of_patch"].astype(np.int64),
        null_cost=_null_costs(header.get("null_cost"), data["tree/parent"].size),
    )
    check_tree(tree, grid)
    pixel_leaf = data["pixel_leaf"].astype(np.int32)
    labels = data["labels"].astype(np.uint32)
    if pixel_leaf.shape != shape or labels.shape != shape:
        raise DiffCutError(
            f"pixel_leaf {pixel_leaf.shape} and labels {labels.shape} must both be {shape}"
        )
    if pixel_leaf.size and (pixel_leaf.min() < 0 or pixel_leaf.max() >= tree.n_nodes):
        raise DiffCutError(f"pixel_leaf refers to nodes outside 0..{tree.n_nodes - 1}")
    try:
        threshold = check_threshold(header.get("threshold", "auto"))
    except ValueError as exc:
        raise DiffCutError(str(exc)) from None
    layer = header.get("layer") if isinstance(header.get("layer"), dict) else {}
    return StoredParts(
        Hierarchy(tree, grid, threshold), pixel_leaf, header["settings"], labels,
        str(header.get("version", "unknown")), layer,
    )


def _null_costs(values: Any, n_nodes: int) -> NDArray[np.float64] | None:
    """The header's per-node null costs (None: a store from before the null rule)."""
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != n_nodes:
        raise DiffCutError(f"null_cost must list one value per tree node ({n_nodes})")
    if not all(v is None or isinstance(v, int | float) for v in values):
        raise DiffCutError("null_cost must hold numbers or null")
    return np.array([np.nan if v is None else float(v) for v in values], np.float64)
