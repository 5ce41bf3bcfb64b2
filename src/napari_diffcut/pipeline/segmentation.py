"""The result of one plane: a hierarchy of nested segments at pixel level.

:class:`Segmentation` holds the NCut tree and the deepest tree node of every
pixel, so every threshold and level is a lookup. :class:`LazySegmentation` is
the same for label images beyond the memory budget: its pixel maps are dask
arrays computed block by block from the small per-leaf attention maps
(method.md 7, soft upsampling).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.hierarchy import Hierarchy, Node
from napari_diffcut.core.instances import Instances
from napari_diffcut.core.upsample import region_maps
from napari_diffcut.pipeline.settings import Progress

#: Side of the dask blocks of lazy label images.
LAZY_CHUNK = 2048


class Segmentation:
    """Result of :func:`segment`: a hierarchy of nested segments at pixel level.

    Label values are tree node ids + 1 (see :mod:`napari_diffcut.core.hierarchy`),
    so a label names its node in :attr:`tree` and stays the same across
    thresholds and levels.

    Parameters
    ----------
    hierarchy : Hierarchy
        The NCut tree on the patch grid.
    pixel_leaf : ndarray of int32, shape (H, W)
        Deepest tree node of every pixel (from the soft upsampling).
    settings : dict
        JSON-serialisable record of the run.
    """

    def __init__(
        self, hierarchy: Hierarchy, pixel_leaf: NDArray[np.integer], settings: dict[str, Any]
    ) -> None:
        self.hierarchy = hierarchy
        self.pixel_leaf = np.asarray(pixel_leaf, np.int32)
        self.settings = settings

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the label images."""
        return (int(self.pixel_leaf.shape[0]), int(self.pixel_leaf.shape[1]))

    @property
    def threshold(self) -> float:
        """NCut threshold in force (the automatic one when the setting is "auto")."""
        return self.hierarchy.threshold

    @property
    def labels(self) -> NDArray[np.uint32]:
        """(H, W) uint32 labels at the chosen threshold; 0 is never a segment."""
        return self.hierarchy.node_lut()[self.pixel_leaf]

    @property
    def levels(self) -> list[NDArray[np.uint32]]:
        """(H, W) uint32 labels per hierarchy level, coarsest first (nested)."""
        return [lut[self.pixel_leaf] for lut in self.hierarchy.level_luts()]

    def cut(self, threshold: float | str) -> NDArray[np.uint32]:
        """Labels for another threshold, instantly (a lookup on the built tree)."""
        return self.hierarchy.node_lut(threshold)[self.pixel_leaf]

    def levels_at(self, threshold: float | str) -> list[NDArray[np.uint32]]:
        """Levels for another threshold, coarsest first."""
        return [lut[self.pixel_leaf] for lut in self.hierarchy.level_luts(threshold)]

    def instances(
        self,
        threshold: float | str | None = None,
        *,
        min_size: int = 16,
        background: int | str | None = "largest",
        connectivity: int = 1,
        by_segment: bool = False,
    ) -> Instances:
        """Instance labels for counting: each connected piece of a segment its own id.

        Parameters
        ----------
        threshold : "auto", float or None
            The cut to split (None: the threshold in force, as :attr:`labels`).
        min_size : int
            Smallest instance in pixels (smaller pieces are dropped).
        background : "largest", int or None
            The segment not split into instances (default: the largest one).
        connectivity : {1, 2}
            4- or 8-connected pieces.
        by_segment : bool
            False (default): touching pieces of different segments form one
            object; True: each segment's pieces are counted apart.

        Returns
        -------
        Instances
            ``.labels`` (uint32, 1..count), ``.table`` (label, segment, area,
            centroid_y, centroid_x per instance), ``.count``
            (:mod:`napari_diffcut.core.instances`).
        """
        from napari_diffcut.core.instances import count_instances

        labels = self.labels if threshold is None else self.cut(threshold)
        return count_instances(
            np.asarray(labels), min_size, background=background, connectivity=connectivity,
            by_segment=by_segment,
        )

    @property
    def tree(self) -> list[Node]:
        """Tree nodes (id, parent, children, cost, size, depth); label = id + 1."""
        return self.hierarchy.tree

    def save(self, path: str) -> Any:
        """Save labels, levels, tree and settings as ``*.diffcut.zarr``.

        See :mod:`napari_diffcut.results.store`.
        """
        from napari_diffcut.files.store import save

        return save(self, path)

    def __repr__(self) -> str:
        n = len(np.unique(self.labels))
        return (
            f"Segmentation(shape={self.shape}, segments={n}, levels="
            f"{self.hierarchy.n_levels()}, threshold={self.threshold:.3g})"
        )


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

    def instances(self, threshold: float | str | None = None, **options: Any) -> Instances:
        """Not for lazy labels: connected components need the whole label image at once."""
        raise ValueError(
            f"instances need the whole label image in memory; these {self.shape} labels are "
            "beyond memory_budget: raise memory_budget, or count on np.asarray(seg.labels) "
            "with napari_diffcut.core.instances.count_instances"
        )

    def __repr__(self) -> str:
        lut = self.hierarchy.node_lut()
        n = len(np.unique(lut[list(self.hierarchy.iter_leaves())]))
        return (
            f"LazySegmentation(shape={self.shape}, segments={n}, levels="
            f"{self.hierarchy.n_levels()}, threshold={self.threshold:.3g})"
        )


def upsample_chunk(budget: int) -> int:
    """Elements of the transient upsampling buffers (leaves x rows x width floats).

    They follow the memory budget (bytes), up to soft_upsample's own cap; the
    numpy and the torch path use the same rule, so both take the same memory.
    """
    return int(min(1 << 24, max(1 << 16, budget // 32)))


def hierarchy_stage(
    tree: Any, grid: tuple[int, int], s: Any, record: dict[str, Any], out_hw: tuple[int, int]
) -> Generator[Progress, None, Hierarchy]:
    """The tree as a :class:`Hierarchy` at the run's threshold, noted in the record."""
    hierarchy = Hierarchy(tree, grid, s.threshold)
    yield Progress("upsample", 0, 1, f"labels at {out_hw[0]}x{out_hw[1]}")
    record["auto_threshold"] = hierarchy.auto_threshold
    record["tree_nodes"] = tree.n_nodes
    return hierarchy


def lazy_result(
    hierarchy: Hierarchy,
    maps: NDArray[np.float32],
    uniq: NDArray[np.int64],
    out_hw: tuple[int, int],
    record: dict[str, Any],
) -> Generator[Progress, None, LazySegmentation]:
    """A :class:`LazySegmentation` from the per-leaf maps (labels beyond the budget)."""
    record["lazy_labels"] = True
    # PAMR needs the full-resolution image beside the labels; lazy labels are
    # beyond the memory budget by definition, so they keep the soft-upsampled edges.
    record["refined"] = False
    yield Progress("upsample", 1, 1, "done (labels computed lazily, block by block)")
    return LazySegmentation(hierarchy, lazy_pixel_leaf(maps, uniq, out_hw), record)


def finish_labels(
    hierarchy: Hierarchy,
    pixel_leaf: NDArray[np.integer],
    rgb: NDArray[np.float32],
    s: Any,
    record: dict[str, Any],
) -> Generator[Progress, None, Segmentation]:
    """Refine the leaves' edges when ``s.refine`` and wrap up the :class:`Segmentation`."""
    if s.refine:
        # PAMR on the leaves once (core.refine): every threshold and level stays a lookup.
        from napari_diffcut.core.image import resize
        from napari_diffcut.core.refine import refine_leaf_labels

        yield Progress("upsample", 1, 2, "refining edges against the image")
        out_hw = (int(pixel_leaf.shape[0]), int(pixel_leaf.shape[1]))
        guide = rgb if rgb.shape[:2] == out_hw else resize(rgb, out_hw)
        pixel_leaf = refine_leaf_labels(guide, pixel_leaf)
    record["refined"] = bool(s.refine)
    yield Progress("upsample", 1, 1, "done")
    return Segmentation(hierarchy, np.asarray(pixel_leaf).astype(np.int32), record)
