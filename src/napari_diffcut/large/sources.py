"""Images that do not fit in memory: numpy, dask, zarr and napari multiscale inputs.

An :class:`ImageSource` wraps any array-like with ``shape``, ``dtype`` and
``__getitem__`` (numpy, dask, zarr, tifffile/zarr stores, memory maps) and reads
it one plane, one tile or one strided sample at a time, so that a dask or zarr
stack is never loaded whole. It also resolves the channel axis (see
:func:`napari_diffcut.core.image.resolve_channel_axis`) and reads only the
channels that are mapped to RGB.

:func:`iter_segment_plane` runs the per-plane pipeline on one plane of a
source (downscale mode), and :func:`create_label_store` makes a zarr array to
which tiled and stacked runs
write incrementally.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.image import (
    NO_CHANNEL_AXIS,
    apply_limits,
    channel_limits,
    grey_or_rgb,
    intensity_rule,
    latent_grid,
    pick_channels,
    resolve_channel_axis,
    to_rgb,
)
from napari_diffcut.files.leftovers import temp_store_prefix
from napari_diffcut.pipeline.engine import ModelCache
from napari_diffcut.pipeline.plane import base_record, budget_bytes, latent_side, segment_rgb
from napari_diffcut.pipeline.segmentation import Segmentation
from napari_diffcut.pipeline.settings import Progress, Settings

#: Pixels per channel read for the percentile limits of a large plane.
SAMPLE_PIXELS = 1 << 20


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
        # The intensity rule each plane got when it was mapped (for its record).
        self._rules: dict[tuple[int, ...], str] = {}
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
        sample = self.sample(index)
        self._rules[tuple(index)] = intensity_rule(sample, normalize)
        return channel_limits(sample, normalize)

    def intensity(
        self,
        index: tuple[int, ...] = (),
        normalize: tuple[float, float] | None = (1.0, 99.8),
        contrast_limits: Any = None,
    ) -> str:
        """How a plane's intensities map to [0, 1], for the run record.

        "contrast_limits" (a window was given), else the rule of
        :func:`~napari_diffcut.core.image.intensity_rule` on the plane's sample:
        "uint8" (bright 8-bit, divided by 255), "percentiles" (16-bit, float
        and dim 8-bit) or "minmax".
        """
        if contrast_limits is not None:
            return "contrast_limits"
        known = self._rules.get(tuple(index))  # from the read that mapped the plane
        return known if known is not None else intensity_rule(self.sample(index), normalize)

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
        if contrast_limits is None:
            self._rules[tuple(index)] = intensity_rule(raw, normalize)
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
        # The pid in the name lets a later run recognise and remove the
        # store of a run that was killed (napari_diffcut.files.outputs).
        tempfile.mkdtemp(prefix=temp_store_prefix())
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
    formats are read whole (:func:`napari_diffcut.files.io.read_image`). ``axes`` is
    tifffile's axes string of a TIFF (e.g. "ZCYX"; None for other formats), from
    which the command line takes the default channel axis.

    Raises
    ------
    DiffCutError
        When the file does not exist or cannot be read as an image.
    """
    from napari_diffcut.core.errors import DiffCutError
    from napari_diffcut.files.io import TIFF_SUFFIXES, read_image

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


def is_tiled(source: Any, s: Settings) -> bool:
    """Tiled mode: a tile size is set and the plane is larger than one tile."""
    return s.tile_size is not None and max(source.plane_shape) > s.tile_size


def iter_segment_plane(
    source: Any,
    index: tuple[int, ...],
    s: Settings,
    *,
    engine: ModelCache,
    contrast_limits: Any = None,
    out_shape: tuple[int, int] | None = None,
    info: dict[str, Any] | None = None,
) -> Generator[Progress, None, Segmentation]:
    """Segment one (Y, X) plane of an :class:`ImageSource` (downscale mode).

    A plane whose float RGB fits the memory budget is read whole (one read
    per plane for dask and zarr) and converted with exact percentiles, as any
    2-D image. Larger planes are read in strips and block-averaged on the fly
    down to about the working size, with percentiles from a strided sample,
    so memory stays bounded. Labels come back at ``out_shape`` (default: the plane's size;
    level 0 for a multiscale input read at a coarser level).
    """
    from napari_diffcut.large.sources import working_target

    plane = source.plane_shape
    full = tuple(out_shape or plane)
    if plane[0] * plane[1] * 12 <= budget_bytes(s):
        # Read whole (one access per plane for dask/zarr); exact percentiles.
        rgb = source.plane_rgb(index, s.normalize, contrast_limits)
    else:
        latent = yield from latent_side(s, engine)
        limits = source.limits(index, s.normalize, contrast_limits)
        rgb = source.shrunk_rgb(index, working_target(plane, latent), limits)
    record = base_record(s, source, full)
    record["intensity"] = source.intensity(index, s.normalize, contrast_limits)
    if index:
        record["plane_index"] = list(index)
    record.update(info or {})
    return (yield from segment_rgb(rgb, s, engine=engine, record=record, out_shape=full))
