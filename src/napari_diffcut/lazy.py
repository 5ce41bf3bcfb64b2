"""Images that do not fit in memory: numpy, dask, zarr and napari multiscale inputs.

An :class:`ImageSource` wraps any array-like with ``shape``, ``dtype`` and
``__getitem__`` (numpy, dask, zarr, tifffile/zarr stores, memory maps) and reads
it one plane, one tile or one strided sample at a time, so that a dask or zarr
stack is never loaded whole. It also resolves the channel axis (see
:func:`napari_diffcut.core.image.resolve_channel_axis`) and reads only the
channels that are mapped to RGB.

Results that are larger than the memory budget stay lazy:
:class:`LazySegmentation` computes level-0 labels block by block (dask) from
the small per-region attention maps (method.md 7, soft upsampling), and
:func:`create_label_store` makes a zarr array to which tiled and stacked runs
write incrementally.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.hierarchy import Hierarchy
from napari_diffcut.core.image import (
    NO_CHANNEL_AXIS,
    apply_limits,
    channel_limits,
    grey_or_rgb,
    latent_grid,
    pick_channels,
    resolve_channel_axis,
    to_rgb,
)
from napari_diffcut.core.upsample import region_maps
from napari_diffcut.engine import Segmentation

#: Pixels per channel read for the percentile limits of a large plane.
SAMPLE_PIXELS = 1 << 20
#: Side of the dask blocks of lazy label images.
LAZY_CHUNK = 2048
#: Rows x columns x channels of float32 read at once when shrinking a plane.
STRIP_ELEMENTS = 1 << 24


def is_multiscale(image: Any) -> bool:
    """True for a napari-style multiscale list: >= 2 arrays, strictly shrinking, >= 2-D each.

    A list of equally sized planes is not multiscale (it is read as a stack).
    """
    if not isinstance(image, list | tuple) or len(image) < 2:
        return False
    if not all(hasattr(a, "shape") and len(a.shape) >= 2 for a in image):
        return False
    ndims = {len(a.shape) for a in image}
    sizes = [math.prod(a.shape) for a in image]
    return len(ndims) == 1 and all(a > b for a, b in zip(sizes, sizes[1:], strict=False))


def is_lazy(array: Any) -> bool:
    """True for arrays that are not numpy arrays in memory (dask, zarr, stores...)."""
    return not isinstance(array, np.ndarray)


def _to_numpy(block: Any) -> NDArray[Any]:
    """Materialise one read (dask arrays compute, everything else converts)."""
    if hasattr(block, "compute") and not isinstance(block, np.ndarray):
        block = block.compute()
    return np.asarray(block)


class ImageSource:
    """Read an (..., Y, X) image with an optional channel axis piece by piece.

    Parameters
    ----------
    array : array-like
        numpy, dask, zarr or anything with ``shape``, ``dtype`` and
        ``__getitem__`` taking slices and ints.
    channel_axis : int, "none" or None
        See :func:`~napari_diffcut.core.image.resolve_channel_axis`.
    channels : sequence of int, optional
        Channels mapped to R, G, B (default: the first up to 3).

    Attributes
    ----------
    stack_shape : tuple of int
        Shape of the axes before (Y, X), channel axis excluded (() for 2-D).
    plane_shape : (Y, X)
    channel_axis : int or None
        Channel axis in ``array``'s axes.
    picked : list of int or None
        Channels read (None when there is no channel axis).
    """

    def __init__(
        self,
        array: Any,
        channel_axis: int | str | None = None,
        channels: Sequence[int] | None = None,
    ) -> None:
        if not hasattr(array, "shape") or not hasattr(array, "__getitem__"):
            array = np.asarray(array)
        shape = tuple(int(n) for n in array.shape)
        self.array = array
        self.channel_axis = resolve_channel_axis(shape, channel_axis, channels)
        spatial = [i for i in range(len(shape)) if i != self.channel_axis]
        if len(spatial) < 2:
            raise ValueError(f"image must have a (Y, X) plane, got shape {shape}")
        self._y_axis, self._x_axis = spatial[-2], spatial[-1]
        self._stack_axes = spatial[:-2]
        self.stack_shape = tuple(shape[i] for i in self._stack_axes)
        self.plane_shape = (shape[self._y_axis], shape[self._x_axis])
        if min(self.plane_shape) < 2:
            raise ValueError(
                "image must be (Y, X) or (Y, X, C) with Y, X >= 2 (or a stack of such "
                f"planes), got shape {shape}"
            )
        if self.channel_axis is None:
            if channels is not None:
                raise ValueError(
                    f"channels={list(channels)} given but the image of shape {shape} has "
                    "no channel axis; pass channel_axis"
                )
            self.picked: list[int] | None = None
        else:
            self.picked = pick_channels(shape[self.channel_axis], channels)
        self.shape = shape
        self.dtype = np.dtype(array.dtype)

    @property
    def n_planes(self) -> int:
        """Number of (Y, X) planes."""
        return math.prod(self.stack_shape)

    @property
    def labels_shape(self) -> tuple[int, ...]:
        """Shape of the label image: the input's without the channel axis."""
        return (*self.stack_shape, *self.plane_shape)

    def plane_indices(self) -> Iterator[tuple[int, ...]]:
        """Stack indices in C order (a single () for a 2-D image)."""
        return iter(np.ndindex(*self.stack_shape)) if self.stack_shape else iter([()])

    def read(
        self,
        index: tuple[int, ...] = (),
        ys: slice = slice(None),
        xs: slice = slice(None),
    ) -> NDArray[Any]:
        """Read one region of one plane: (y, x) or (y, x, c) with the picked channels."""
        if self.picked is None:
            return _to_numpy(self.array[self._key(index, ys, xs, None)])
        first, last = self.picked[0], self.picked[-1]
        if self.picked == list(range(first, last + 1)):
            block = _to_numpy(self.array[self._key(index, ys, xs, slice(first, last + 1))])
            # The channel axis sits before Y, between Y and X, or after X.
            pos = sum(1 for a in (self._y_axis, self._x_axis) if a < self.channel_axis)
            return np.moveaxis(block, pos, -1)
        bands = [_to_numpy(self.array[self._key(index, ys, xs, c)]) for c in self.picked]
        return np.stack(bands, axis=-1)

    def _key(
        self, index: tuple[int, ...], ys: slice, xs: slice, channel: slice | int | None
    ) -> tuple[Any, ...]:
        if len(index) != len(self._stack_axes):
            raise ValueError(f"plane index {index} does not match stack shape {self.stack_shape}")
        key: list[Any] = [slice(None)] * len(self.shape)
        for axis, i in zip(self._stack_axes, index, strict=True):
            key[axis] = int(i)
        key[self._y_axis], key[self._x_axis] = ys, xs
        if self.channel_axis is not None:
            key[self.channel_axis] = channel
        return tuple(key)

    def sample(self, index: tuple[int, ...] = (), max_pixels: int = SAMPLE_PIXELS) -> NDArray[Any]:
        """A strided sample of one plane with at most about ``max_pixels`` pixels."""
        step = max(1, math.ceil(math.sqrt(math.prod(self.plane_shape) / max_pixels)))
        return self.read(index, slice(None, None, step), slice(None, None, step))

    def limits(
        self,
        index: tuple[int, ...] = (),
        normalize: tuple[float, float] | None = (1.0, 99.8),
        contrast_limits: Any = None,
    ) -> NDArray[np.float64]:
        """Per-channel display limits of a plane: napari's or sample percentiles."""
        n = 1 if self.picked is None else len(self.picked)
        if contrast_limits is not None:
            lim = np.asarray(contrast_limits, np.float64)
            return np.repeat(lim[None], n, 0) if lim.shape == (2,) else lim
        return channel_limits(self.sample(index), normalize)

    def read_rgb(
        self,
        index: tuple[int, ...],
        ys: slice,
        xs: slice,
        limits: NDArray[np.float64],
    ) -> NDArray[np.float32]:
        """One region as RGB float32 in [0, 1] with given per-channel limits."""
        raw = self.read(index, ys, xs)
        if raw.dtype == bool:
            raw = raw.astype(np.uint8) * 255
        if raw.ndim == 2:
            raw = raw[..., None]
        return grey_or_rgb(apply_limits(raw, limits))

    def shrunk_rgb(
        self,
        index: tuple[int, ...],
        target: tuple[int, int],
        limits: NDArray[np.float64],
    ) -> NDArray[np.float32]:
        """RGB of one plane, block-averaged while it is read, strip by strip.

        The block factor is ``plane // target`` per axis, the first step of
        :func:`~napari_diffcut.core.image.resize`, so the result is what
        ``resize`` would compute after its integer block averaging; memory
        stays at one strip of rows however large the plane is.
        """
        big_h, big_w = self.plane_shape
        fy, fx = max(1, big_h // target[0]), max(1, big_w // target[1])
        hh, ww = (big_h // fy) * fy, (big_w // fx) * fx
        rows = max(fy, (STRIP_ELEMENTS // max(1, ww * 3)) // fy * fy)
        out = np.empty((hh // fy, ww // fx, 3), np.float32)
        for y0 in range(0, hh, rows):
            y1 = min(hh, y0 + rows)
            strip = self.read_rgb(index, slice(y0, y1), slice(0, ww), limits)
            out[y0 // fy : y1 // fy] = strip.reshape(
                (y1 - y0) // fy, fy, ww // fx, fx, 3
            ).mean(axis=(1, 3))
        return out

    def plane_rgb(
        self,
        index: tuple[int, ...],
        normalize: tuple[float, float] | None,
        contrast_limits: Any,
    ) -> NDArray[np.float32]:
        """A whole plane as RGB in [0, 1], exactly as :func:`to_rgb` computes it."""
        raw = self.read(index)
        return to_rgb(raw, normalize=normalize, contrast_limits=contrast_limits)


def choose_level(levels: Sequence[Any], working_side: int, channel_axis: int | None) -> int:
    """Index of the multiscale level whose plane area is closest to the working size.

    ``channel_axis`` is the resolved channel axis of the levels (None: none).
    Closeness is measured on a log scale (a level twice too large and one
    twice too small are equally far). Only levels with the same stack axes as
    level 0 qualify (pyramids that also shrink Z are read at level 0).
    """
    axis: int | str = NO_CHANNEL_AXIS if channel_axis is None else channel_axis
    base = ImageSource(levels[0], axis)
    target = math.log(float(working_side) ** 2)
    best, best_d = 0, float("inf")
    for i, level in enumerate(levels):
        src = ImageSource(level, axis)
        if src.stack_shape != base.stack_shape:
            continue
        d = abs(math.log(float(math.prod(src.plane_shape))) - target)
        if d < best_d - 1e-9:
            best, best_d = i, d
    return best


def working_target(plane_shape: tuple[int, int], latent_side: int) -> tuple[int, int]:
    """Working size in pixels for a plane (latent grid x 8, aspect kept)."""
    gh, gw = latent_grid(plane_shape, latent_side)
    return gh * 8, gw * 8


def leaf_window(
    maps: NDArray[np.float32],
    uniq: NDArray[np.int64],
    out_shape: tuple[int, int],
    rows: tuple[int, int],
    cols: tuple[int, int],
    max_elements: int = 1 << 22,
) -> NDArray[np.int32]:
    """Deepest tree node of the pixels in one window of a soft-upsampled image.

    Same sampling as :func:`napari_diffcut.core.upsample.soft_upsample`
    (bilinear, align_corners=False) evaluated only at the window's pixels, so
    blocks computed separately tile the full result exactly. The window is
    processed in row blocks of at most ``max_elements`` leaves x pixels.
    """
    k, h, w = maps.shape
    out = np.empty((rows[1] - rows[0], cols[1] - cols[0]), np.int32)
    if k == 1:
        out[:] = uniq[0]
        return out
    x0, x1, wx = _taps(cols, out_shape[1], w)
    step = max(1, max_elements // max(1, k * out.shape[1]))
    for r0 in range(rows[0], rows[1], step):
        r1 = min(rows[1], r0 + step)
        y0, y1, wy = _taps((r0, r1), out_shape[0], h)
        a = wy[None, :, None]
        my = (1 - a) * maps[:, y0, :] + a * maps[:, y1, :]
        vals = (1 - wx) * my[:, :, x0] + wx * my[:, :, x1]
        out[r0 - rows[0] : r1 - rows[0]] = uniq[np.argmax(vals, axis=0)]
    return out


def _taps(
    span: tuple[int, int], n_out: int, n_in: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """Bilinear taps of output pixels ``span`` (align_corners=False)."""
    pos = np.clip((np.arange(span[0], span[1]) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def leaf_maps(
    walk: NDArray[np.float32], leaf_of_patch: NDArray[np.int64], grid: tuple[int, int]
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Per-leaf mean walk maps (k, h, w) and the leaf ids (k,): all a lazy upsampling keeps."""
    uniq, compact = np.unique(leaf_of_patch, return_inverse=True)
    maps = region_maps(walk, compact.ravel(), uniq.size).reshape(uniq.size, *grid)
    return maps, uniq


def lazy_pixel_leaf(
    maps: NDArray[np.float32],
    uniq: NDArray[np.int64],
    out_shape: tuple[int, int],
    chunk: int = LAZY_CHUNK,
) -> Any:
    """A dask array (H, W) int32 of deepest tree nodes, computed block by block."""
    import dask.array as da

    def block(_: NDArray[Any], block_info: dict[Any, Any] | None = None) -> NDArray[np.int32]:
        (r0, r1), (c0, c1) = block_info[None]["array-location"]  # type: ignore[index]
        return leaf_window(maps, uniq, out_shape, (r0, r1), (c0, c1))

    shell = da.empty(out_shape, chunks=(chunk, chunk), dtype=np.int8)
    return shell.map_blocks(block, dtype=np.int32, meta=np.empty((0, 0), np.int32))


class LazySegmentation(Segmentation):
    """A :class:`Segmentation` whose pixel maps are dask arrays (labels beyond memory).

    Returned for 2-D images whose label image would exceed the memory budget
    (``Settings.memory_budget``), and for multiscale inputs segmented on a
    coarser level with level-0 labels beyond the budget. The tree, threshold,
    ``cut`` and ``levels`` work as for :class:`Segmentation`; every label image
    is a dask array computed block by block from per-leaf attention maps, so
    nothing of image size is held. ``np.asarray(seg.labels)`` or
    ``seg.labels.to_zarr(path)`` materialise it.
    """

    def __init__(
        self, hierarchy: Hierarchy, pixel_leaf: Any, settings: dict[str, Any]
    ) -> None:
        self.hierarchy = hierarchy
        self.pixel_leaf = pixel_leaf
        self.settings = settings

    def _lookup(self, lut: NDArray[np.uint32]) -> Any:
        return self.pixel_leaf.map_blocks(lambda b: lut[b], dtype=np.uint32)

    @property
    def labels(self) -> Any:
        """(H, W) uint32 dask array at the chosen threshold."""
        return self._lookup(self.hierarchy.node_lut())

    @property
    def levels(self) -> list[Any]:
        """(H, W) uint32 dask arrays per level, coarsest first."""
        return [self._lookup(lut) for lut in self.hierarchy.level_luts()]

    def cut(self, threshold: float | str) -> Any:
        """Dask labels for another threshold (no model, no eigen solve)."""
        return self._lookup(self.hierarchy.node_lut(threshold))

    def levels_at(self, threshold: float | str) -> list[Any]:
        """Dask levels for another threshold, coarsest first."""
        return [self._lookup(lut) for lut in self.hierarchy.level_luts(threshold)]

    def __repr__(self) -> str:
        lut = self.hierarchy.node_lut()
        n = len(np.unique(lut[list(self.hierarchy.iter_leaves())]))
        return (
            f"LazySegmentation(shape={self.shape}, segments={n}, levels="
            f"{self.hierarchy.n_levels()}, threshold={self.threshold:.3g})"
        )


def create_label_store(
    shape: tuple[int, ...], out: Any = None, chunks: tuple[int, ...] | None = None
) -> tuple[Any, str | None]:
    """A writable uint32 label array of ``shape``: the caller's, or a new zarr array.

    Parameters
    ----------
    shape : tuple of int
        Label image shape.
    out : None, str, Path or array-like
        An array-like with ``shape`` and ``__setitem__`` (zarr array, numpy
        memmap) is used as is; a path becomes a new zarr array there (an
        existing one is replaced); None creates one in a new temporary folder.
    chunks : tuple of int, optional
        zarr chunk shape (default: 1 plane deep, up to 1024 x 1024).

    Returns
    -------
    (array, path)
        ``path`` is the zarr folder (None for a caller's array).
    """
    if out is not None and not isinstance(out, str | Path):
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"out must have the label shape {shape}, got {tuple(out.shape)}")
        return out, None
    import zarr

    path = Path(out) if out is not None else Path(
        tempfile.mkdtemp(prefix="napari-diffcut-")
    ) / "labels.zarr"
    if chunks is None:
        chunks = (*([1] * (len(shape) - 2)), min(shape[-2], 1024), min(shape[-1], 1024))
    arr = zarr.open_array(
        str(path), mode="w", shape=shape, chunks=chunks, dtype="uint32", fill_value=0
    )
    return arr, str(path)


def open_image(
    path: str | Path, memory_budget: int | None = None
) -> tuple[Any, str | None]:
    """Open an image file for segmentation; returns (array, axes).

    TIFF files (multi-page stacks, OME/ImageJ hyperstacks) larger than
    ``memory_budget`` MiB are opened lazily as a zarr view of their first
    series, so planes and tiles are read on demand; smaller TIFFs and other
    formats are read whole (:func:`napari_diffcut.io.read_image`). ``axes`` is
    tifffile's axes string of a TIFF (e.g. "ZCYX"; None for other formats), from
    which the command line takes the default channel axis.

    Raises
    ------
    DiffCutError
        When the file does not exist or cannot be read as an image.
    """
    from napari_diffcut.core.errors import DiffCutError
    from napari_diffcut.io import TIFF_SUFFIXES, read_image

    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in TIFF_SUFFIXES:
        return read_image(p), None
    try:
        import tifffile

        with tifffile.TiffFile(p) as tif:
            series = tif.series[0]
            axes, nbytes = str(series.axes), int(series.size) * series.dtype.itemsize
        if memory_budget is None or nbytes <= int(memory_budget) * (1 << 20):
            return read_image(p), axes
        import zarr

        return zarr.open(tifffile.imread(p, aszarr=True, series=0, level=0), mode="r"), axes
    except DiffCutError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a user-file problem
        raise DiffCutError(f"could not read {p} as an image: {type(exc).__name__}: {exc}") from exc
