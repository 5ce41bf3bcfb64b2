"""Label files of the command line: TIFF or zarr, in memory or written tile by tile.

Also the small helpers the ``segment`` command needs around one image: the
channel axis a TIFF's axes string implies, the ``--levels`` precondition, the
size its outputs may take, and the one-line summary of a result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from napari_diffcut.pipeline.options import UserError

#: Tile side of label TIFFs written from lazy labels.
TIFF_TILE = 512
#: Room kept for the record JSON when the outputs' size is estimated.
RECORD_BYTES = 1 << 16


def write_label_output(path: Path, labels: Any, *, atomic: bool = True) -> Path:
    """Write labels (numpy, dask or zarr; 2-D or a stack) as TIFF or zarr.

    In-memory labels go through :func:`napari_diffcut.files.io.write_labels`;
    lazy ones are written tile by tile (bounded memory) to a BigTIFF, or to a
    zarr folder when ``path`` ends in ``.zarr`` (nothing to do when the run
    already wrote there). ``atomic=False`` inside a run's staging folder,
    which is itself renamed into place.
    """
    import numpy as np

    from napari_diffcut.files.io import write_labels

    if path.suffix.lower() == ".zarr":
        return _write_zarr(path, labels)
    if isinstance(labels, np.ndarray):
        return write_labels(path, labels, atomic=atomic)
    return _write_tiled_tiff(path, labels, atomic=atomic)


def _blocks(shape: tuple[int, ...], side: int) -> Iterator[tuple[Any, slice, slice]]:
    """(plane index, row slice, column slice) of every tile, in TIFF order."""
    import numpy as np

    for index in np.ndindex(*shape[:-2]):
        for y0 in range(0, shape[-2], side):
            for x0 in range(0, shape[-1], side):
                ys = slice(y0, min(shape[-2], y0 + side))
                yield index, ys, slice(x0, min(shape[-1], x0 + side))


def _write_tiled_tiff(path: Path, labels: Any, *, atomic: bool) -> Path:
    """Tile-by-tile BigTIFF from lazy labels (renamed into place when ``atomic``)."""
    import contextlib

    import numpy as np
    import tifffile

    from napari_diffcut.files.io import TIFF_SOFTWARE, atomic_path

    shape = tuple(int(n) for n in labels.shape)

    def tiles() -> Iterator[Any]:
        for index, ys, xs in _blocks(shape, TIFF_TILE):
            tile = np.zeros((TIFF_TILE, TIFF_TILE), np.uint32)
            block = np.asarray(labels[(*index, ys, xs)])
            tile[: block.shape[0], : block.shape[1]] = block
            yield tile

    target = atomic_path(path) if atomic else contextlib.nullcontext(path)
    with target as tmp:
        tifffile.imwrite(
            tmp,
            data=tiles(),
            shape=shape,
            dtype=np.uint32,
            tile=(TIFF_TILE, TIFF_TILE),
            compression="zlib",
            bigtiff=True,
            software=TIFF_SOFTWARE,  # how --overwrite knows the file as ours
        )
    return path


def _write_zarr(path: Path, labels: Any) -> Path:
    """Copy labels into a zarr folder block by block (no-op if they live there)."""
    import numpy as np

    from napari_diffcut.large.sources import create_label_store

    store = getattr(getattr(labels, "store", None), "root", None)
    if store is not None and Path(str(store)).resolve() == path.resolve():
        return path
    shape = tuple(int(n) for n in labels.shape)
    dest, _ = create_label_store(shape, str(path))
    for index, ys, xs in _blocks(shape, 1024):
        dest[(*index, ys, xs)] = np.asarray(labels[(*index, ys, xs)])
    return path


def output_bytes(image: Any, *, levels: bool, max_depth: int) -> int:
    """Upper bound of the bytes one image's outputs take (uncompressed uint32 labels).

    The channel axis is not known yet, so a last axis of at most 4 is taken
    as channels (as the engine infers it); the levels stack holds at most
    ``max_depth`` levels.
    """
    first = image[0] if isinstance(image, list | tuple) else image
    shape = tuple(int(n) for n in first.shape)
    if len(shape) >= 3 and shape[-1] <= 4:
        shape = shape[:-1]
    planes = 1 + (max_depth if levels else 0)
    return 4 * math.prod(shape) * planes + RECORD_BYTES


def plane_source(image: Any, settings: Any) -> Any:
    """The :class:`~napari_diffcut.large.sources.ImageSource` of a run's input (level 0)."""
    from napari_diffcut.large.sources import ImageSource, is_multiscale

    first = image[0] if is_multiscale(image) else image
    try:
        return ImageSource(first, settings.channel_axis, settings.channels)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_levels_possible(image: Any, settings: Any) -> None:
    """``--levels`` needs one tree: a 2-D image in downscale mode."""
    from napari_diffcut.large.sources import is_tiled

    source = plane_source(image, settings)
    if source.stack_shape or is_tiled(source, settings):
        what = f"stack axes {source.stack_shape}" if source.stack_shape else "tiles"
        raise UserError(
            f"--levels needs a 2-D image in downscale mode (one tree); this run has {what}"
        )


#: Bytes per pixel that counting instances holds at once (labels, component
#: indices and the neighbour links, int64 each).
INSTANCE_BYTES_PER_PIXEL = 40


def check_instances_possible(image: Any, settings: Any) -> None:
    """``--instances`` needs a 2-D image whose label image fits the memory budget."""
    source = plane_source(image, settings)
    if source.stack_shape:
        raise UserError(
            f"--instances counts objects in a 2-D image; this image has stack axes "
            f"{source.stack_shape} (segment its planes as separate images)"
        )
    need = INSTANCE_BYTES_PER_PIXEL * math.prod(source.plane_shape)
    if need > int(settings.memory_budget) << 20:
        raise UserError(
            f"--instances on a {source.plane_shape} image needs about {need >> 20} MiB; raise "
            f"--memory-budget (now {settings.memory_budget}) or segment a smaller image"
        )


def count_output_instances(seg: Any, min_size: int) -> Any:
    """Instances of a run's labels (any 2-D result type; the background left out)."""
    import numpy as np

    from napari_diffcut.core.instances import count_instances

    return count_instances(np.asarray(seg.labels), int(min_size))


def channel_axis_from_axes(settings: Any, axes: str) -> Any:
    """Default ``channel_axis`` from a TIFF's axes string ('C', or 'S' samples)."""
    for letter in ("C", "S"):
        if letter in axes and len(axes) >= 3:
            axis = axes.index(letter)
            if letter == "S" and axis == len(axes) - 1:
                return settings  # RGB samples last: inferred anyway
            return dataclasses.replace(settings, channel_axis=axis)
    return settings


def summary(seg: Any) -> str:
    """A few words on any result type: segments, and levels and threshold of a tree."""
    import numpy as np

    if hasattr(seg, "n_labels"):
        return f"{seg.n_labels} segments stitched from {len(seg.tiles)} tiles"
    if hasattr(seg, "stack_shape"):
        return f"{int(np.prod(seg.stack_shape))} planes segmented, labels {seg.shape}"
    labels = seg.labels
    if isinstance(labels, np.ndarray):
        n = int(np.unique(labels).size)
    else:  # lazy labels: count the segments the tree's leaves fall into
        lut = seg.hierarchy.node_lut()
        n = int(np.unique(lut[list(seg.hierarchy.iter_leaves())]).size)
    return f"{n} segments, {len(seg.levels)} levels, threshold {seg.threshold:.3g}"
