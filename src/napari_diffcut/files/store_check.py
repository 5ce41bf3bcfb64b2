"""Checks on a ``*.diffcut.zarr`` store before anything in it is decoded.

A store may come from anyone, so reading it must neither run code, nor hang,
nor exhaust memory. Before zarr decodes a chunk:

* every metadata file is a regular file (no FIFO, device or symlink) of at
  most 16 MiB, parsed as JSON with nesting errors caught;
* every array has a numeric data type and byte codecs only (:data:`SAFE_CODECS`);
* the header's image and grid sizes are below :data:`MAX_PIXELS` and
  :data:`MAX_PATCHES`, the arrays' shapes match the header, and the decoded
  size fits in the memory available;
* an array to decode has at most :data:`MAX_CHUNKS` chunks, and its folder
  holds only folders and regular files, none larger than a chunk can be.

Each failure is a :class:`~napari_diffcut.core.errors.DiffCutError` that says
what is wrong, raised in well under a second.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_diffcut.core.budget import available_bytes, format_bytes
from napari_diffcut.core.errors import DiffCutError

if TYPE_CHECKING:  # pragma: no cover
    from napari_diffcut.core.hierarchy import TreeArrays

#: Zarr v3 codecs accepted on load: byte order, compression, checksums only.
#: Anything else (e.g. ``numcodecs.pickle``, sharding) is refused before decoding.
SAFE_CODECS = frozenset({"bytes", "zstd", "gzip", "blosc", "crc32c", "transpose"})
#: Largest label image opened (16384 x 16384 pixels).
MAX_PIXELS = 2**28
#: Largest patch grid opened (1024 x 1024 patches).
MAX_PATCHES = 2**20
#: Most chunks of one decoded array (the writer makes ~256 at MAX_PIXELS).
MAX_CHUNKS = 4096
#: Largest metadata file.
MAX_JSON_BYTES = 16 * 2**20
#: Expected array, dtype kind and number of dimensions.
ARRAYS: dict[str, tuple[str, int]] = {
    "labels": ("u", 2),
    "pixel_leaf": ("i", 2),
    "levels": ("u", 3),
    "tree/parent": ("i", 1),
    "tree/cost": ("f", 1),
    "tree/size": ("i", 1),
    "tree/depth": ("i", 1),
    "tree/leaf_of_patch": ("i", 1),
}
#: Arrays decoded on load ("levels" is recomputed from the tree, never read).
DECODED = tuple(name for name in ARRAYS if name != "levels")
NUMERIC = frozenset(
    {
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
        "uint64", "float32", "float64",
    }
)


def read_json(path: Path) -> dict[str, Any]:
    """Parse a small JSON metadata file that must be a regular file (not a link or FIFO)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise DiffCutError(f"missing {path.name}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DiffCutError(f"{path.name} is not a regular file (a link, FIFO or device?)")
    if info.st_size > MAX_JSON_BYTES:
        raise DiffCutError(f"{path.name} is too large for metadata ({format_bytes(info.st_size)})")
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(MAX_JSON_BYTES + 1).decode("utf-8"))
    except RecursionError:
        raise DiffCutError(f"{path.name} is nested too deeply to be metadata") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise DiffCutError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DiffCutError(f"{path.name} is not a JSON object")
    return data


def read_header(root: Path, attr: str, fmt: str, newest: int) -> dict[str, Any]:
    """The validated header (group attribute ``attr``) of the store at ``root``."""
    if not root.is_dir():
        raise DiffCutError("no such folder" if not root.exists() else "not a folder")
    group_meta = read_json(root / "zarr.json")
    if group_meta.get("zarr_format") != 3 or group_meta.get("node_type") != "group":
        raise DiffCutError("not a Zarr v3 group")
    attributes = group_meta.get("attributes")
    header = attributes.get(attr) if isinstance(attributes, dict) else None
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise DiffCutError(f"no {attr!r} header (a Zarr store from another tool?)")
    version = header.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise DiffCutError(f"bad format_version {version!r}")
    if version > newest:
        raise DiffCutError(
            f"format_version {version} was written by a newer napari-diffcut "
            f"({header.get('version')}); this version reads up to {newest}: upgrade"
        )
    for key, kind in (("settings", dict), ("grid_shape", list), ("shape", list)):
        if not isinstance(header.get(key), kind):
            raise DiffCutError(f"header key {key!r} missing or not a {kind.__name__}")
    return header


def shape_pair(value: list[Any]) -> tuple[int, int]:
    """A (rows, cols) pair of positive ints from the header."""
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise DiffCutError(f"bad shape {value!r} in header; expected two positive integers")
    return (value[0], value[1])


def check_sizes(shape: tuple[int, int], grid: tuple[int, int]) -> None:
    """The header's sizes are sane, before any array is looked at."""
    pixels, patches = shape[0] * shape[1], grid[0] * grid[1]
    if pixels > MAX_PIXELS:
        raise DiffCutError(
            f"header declares {shape[0]} x {shape[1]} labels ({pixels} pixels); results "
            f"up to {MAX_PIXELS} pixels are opened"
        )
    if patches > MAX_PATCHES:
        raise DiffCutError(f"header declares a {grid[0]} x {grid[1]} patch grid; at most "
                           f"{MAX_PATCHES} patches are opened")


def check_array_meta(root: Path, name: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Check an array's JSON metadata before zarr decodes anything (no pickles).

    Returns
    -------
    (shape, chunk_shape, itemsize)
        So that the caller can check them against the header before any
        chunk is decoded (a forged shape must not exhaust memory).
    """
    _real_dirs(root, name)
    meta = read_json(root / name / "zarr.json")
    kind, ndim = ARRAYS[name]
    dtype = meta.get("data_type")
    if meta.get("node_type") != "array" or not isinstance(dtype, str) or dtype not in NUMERIC:
        raise DiffCutError(f"array {name!r} has data type {dtype!r}; expected a numeric type")
    shape = meta.get("shape")
    if np.dtype(dtype).kind != kind or not isinstance(shape, list) or len(shape) != ndim:
        raise DiffCutError(f"array {name!r} is {dtype} with shape {shape}")
    codecs = meta.get("codecs", [])
    names = [c.get("name") if isinstance(c, dict) else c for c in codecs] if isinstance(
        codecs, list) else [codecs]
    unsafe = [c for c in names if c not in SAFE_CODECS]
    if unsafe or meta.get("storage_transformers"):
        raise DiffCutError(
            f"array {name!r} uses codecs {unsafe or meta.get('storage_transformers')}; "
            f"only {sorted(SAFE_CODECS)} are opened (no pickles)"
        )
    if not all(isinstance(v, int) and v >= 0 for v in shape):
        raise DiffCutError(f"array {name!r} has a bad shape {shape!r}")
    grid = meta.get("chunk_grid")
    config = grid.get("configuration") if isinstance(grid, dict) else None
    chunks = config.get("chunk_shape") if isinstance(config, dict) else None
    if (
        not isinstance(chunks, list) or len(chunks) != ndim
        or not all(isinstance(v, int) and v >= 1 for v in chunks)
    ):
        raise DiffCutError(f"array {name!r} has a bad chunk shape {chunks!r}")
    return tuple(shape), tuple(chunks), np.dtype(dtype).itemsize


def check_shapes(
    shapes: dict[str, tuple[int, ...]], shape: tuple[int, int], grid: tuple[int, int]
) -> None:
    """Array shapes (from their JSON metadata) agree with the header."""
    n = shapes["tree/parent"][0]
    want: dict[str, tuple[int, ...]] = {
        "labels": shape,
        "pixel_leaf": shape,
        "tree/cost": (n,),
        "tree/size": (n,),
        "tree/depth": (n,),
        "tree/leaf_of_patch": (grid[0] * grid[1],),
    }
    bad = [f"{k} is {shapes[k]}, expected {v}" for k, v in want.items() if shapes[k] != v]
    if shapes["levels"][1:] != shape:
        bad.append(f"levels is {shapes['levels']}, expected (L, {shape[0]}, {shape[1]})")
    if n > 2 * grid[0] * grid[1]:
        bad.append(f"tree/parent has {n} nodes, more than a tree on {grid} patches can have")
    if bad:
        raise DiffCutError("array shapes do not match the header: " + "; ".join(bad))


def check_decoding(
    root: Path, metas: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]]
) -> None:
    """Bound what decoding will read and allocate: chunk count, files, memory."""
    total = 0
    for name in DECODED:
        shape, chunks, itemsize = metas[name]
        n_chunks = math.prod(math.ceil(s / c) for s, c in zip(shape, chunks, strict=True))
        if n_chunks > MAX_CHUNKS:
            raise DiffCutError(
                f"array {name!r} has {n_chunks} chunks of {list(chunks)}; at most "
                f"{MAX_CHUNKS} are read"
            )
        chunk_bytes = math.prod(min(s, c) for s, c in zip(shape, chunks, strict=True)) * itemsize
        _check_chunk_files(root / name, name, n_chunks, chunk_bytes)
        total += math.prod(shape) * itemsize
    free = available_bytes()
    if total > free:
        raise DiffCutError(
            f"decoding would take {format_bytes(total)}; {format_bytes(free)} of memory available"
        )


def check_tree(tree: TreeArrays, grid: tuple[int, int]) -> None:
    """The tree arrays describe one breadth-first tree on ``grid`` patches."""
    n = tree.n_nodes
    if n < 1 or any(a.shape != (n,) for a in (tree.cost, tree.size, tree.depth)):
        raise DiffCutError(f"tree arrays must all have the same length >= 1, got {n} parents")
    parent, depth = tree.parent, tree.depth
    ids = np.arange(n)
    # Breadth-first ids: the root is 0 and every parent precedes its child.
    if parent[0] != -1 or depth[0] != 0 or np.any(parent[1:] < 0) or np.any(parent[1:] >= ids[1:]):
        raise DiffCutError("tree/parent is not a breadth-first tree (root 0, parent < child)")
    if np.any(depth[1:] != depth[parent[1:]] + 1):
        raise DiffCutError("tree/depth does not match tree/parent")
    if tree.leaf_of_patch.size != grid[0] * grid[1]:
        raise DiffCutError(
            f"tree/leaf_of_patch has {tree.leaf_of_patch.size} patches, grid is {grid}"
        )
    if tree.leaf_of_patch.size and (tree.leaf_of_patch.min() < 0 or tree.leaf_of_patch.max() >= n):
        raise DiffCutError(f"tree/leaf_of_patch refers to nodes outside 0..{n - 1}")


def _real_dirs(root: Path, name: str) -> None:
    """Each folder from the store root down to the array is a real folder, not a link."""
    path = root
    for part in name.split("/"):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            raise DiffCutError(f"array {name!r} is missing") from None
        if not stat.S_ISDIR(mode):
            raise DiffCutError(f"array {name!r}: {path.name} is not a folder (a link?)")


def _check_chunk_files(folder: Path, name: str, n_chunks: int, chunk_bytes: int) -> None:
    """Only folders and regular files of at most a chunk's size (compression can add a little)."""
    limit = chunk_bytes + chunk_bytes // 16 + 4096
    seen = 0
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    stack.append(Path(entry.path))
                    continue
                seen += 1
                if not stat.S_ISREG(info.st_mode):
                    raise DiffCutError(
                        f"array {name!r}: {entry.name} is not a regular file (a link, FIFO "
                        "or device?); only regular files inside the store are read"
                    )
                if entry.name != "zarr.json" and info.st_size > limit:
                    raise DiffCutError(
                        f"array {name!r}: chunk {entry.name} has {info.st_size} bytes, more "
                        f"than a chunk of {chunk_bytes} bytes can take"
                    )
                if seen > n_chunks + 1:
                    raise DiffCutError(
                        f"array {name!r} holds more files than its {n_chunks} chunks"
                    )
