"""Stacks: Z, T and other leading axes, segmented plane by plane.

Every (Y, X) plane of a (..., Y, X[, C]) image is read on its own (one plane
in memory at a time for dask or zarr input), segmented like a 2-D image
(downscale or tiled mode) and written to the stack's label image. The
generator yields a "plane" event before each plane, so a widget shows
progress per plane and Cancel (closing the generator) stops within the
current plane.

With ``consistent_stack=True`` a region keeps its label through the stack:
each plane's segments are matched to the segments of its neighbouring plane
by overlap (intersection over union) with an optimal one-to-one assignment
(Hungarian algorithm); a matched segment takes its neighbour's label, an
unmatched one a new label. With several leading axes (T, Z) the neighbour of
plane (t, z) is (t, z - 1), and that of (t, 0) is (t - 1, 0).

Labels: without ``consistent_stack`` each plane keeps the 2-D convention
(label = tree node id + 1 of that plane's tree), so equal values in two
planes mean nothing; with it, labels are stack-wide ids 1..K and
:attr:`StackSegmentation.plane_luts` maps each plane's node labels to them.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.large.sources import is_tiled, iter_segment_plane
from napari_diffcut.pipeline.engine import ModelCache
from napari_diffcut.pipeline.plane import base_record, relay
from napari_diffcut.pipeline.settings import Progress, Settings

#: A segment continues its neighbour's label when their IoU is at least this.
MIN_STACK_IOU = 0.3
#: Above this many (previous x current) segment pairs, greedy mutual-best
#: matching replaces the dense Hungarian assignment (memory).
MAX_DENSE_PAIRS = 4_000_000


def predecessor(index: tuple[int, ...]) -> tuple[int, ...] | None:
    """Neighbouring plane a plane is matched to: the innermost non-zero axis minus 1.

    Examples
    --------
    >>> predecessor((2, 3)), predecessor((2, 0)), predecessor((0, 0))
    ((2, 2), (1, 0), None)
    """
    for axis in range(len(index) - 1, -1, -1):
        if index[axis] > 0:
            return (*index[:axis], index[axis] - 1, *index[axis + 1 :])
    return None


def _last_user(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """Flat (C-order) index of the last plane whose predecessor is ``index``."""
    users = []
    for axis in range(len(index)):
        if all(i == 0 for i in index[axis + 1 :]) and index[axis] + 1 < shape[axis]:
            users.append((*index[:axis], index[axis] + 1, *index[axis + 1 :]))
    return max((int(np.ravel_multi_index(u, shape)) for u in users), default=-1)


def match_planes(
    previous: NDArray[np.integer],
    current: NDArray[np.integer],
    next_id: int,
    min_iou: float = MIN_STACK_IOU,
) -> tuple[dict[int, int], int]:
    """Give the segments of ``current`` stack-wide labels from ``previous``.

    Parameters
    ----------
    previous : ndarray (Y, X)
        Stack-wide labels of the neighbouring plane.
    current : ndarray (Y, X)
        This plane's own labels.
    next_id : int
        First unused stack-wide label.
    min_iou : float
        Pairs below this IoU are not matched.

    Returns
    -------
    (lut, next_id)
        ``lut`` maps each label of ``current`` to its stack-wide label.

    Examples
    --------
    >>> prev = np.array([[5, 5, 6, 6]]); cur = np.array([[1, 1, 1, 2]])
    >>> match_planes(prev, cur, 7)
    ({1: 5, 2: 6}, 7)
    """
    from scipy.optimize import linear_sum_assignment

    from napari_diffcut.large.tiling import contingency, mutual_matches

    ia, ib, inter, size_p, size_c = contingency(previous, current)
    iou = inter / (size_p + size_c - inter)
    pu, pi = np.unique(ia, return_inverse=True)
    cu, ci = np.unique(ib, return_inverse=True)
    lut: dict[int, int] = {}
    if pu.size * cu.size <= MAX_DENSE_PAIRS:
        dense = np.zeros((pu.size, cu.size), np.float64)
        dense[pi, ci] = iou
        rows, cols = linear_sum_assignment(-dense)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if dense[r, c] >= min_iou:
                lut[int(cu[c])] = int(pu[r])
    else:
        for p, c in mutual_matches(previous, current, min_iou):
            lut[int(c)] = int(p)
    for c in cu.tolist():
        if c not in lut:
            lut[int(c)] = next_id
            next_id += 1
    return lut, next_id


def _apply(lut: dict[int, int], labels: NDArray[np.integer]) -> NDArray[np.uint32]:
    keys = np.fromiter(lut.keys(), np.int64, len(lut))
    vals = np.fromiter(lut.values(), np.int64, len(lut))
    order = np.argsort(keys)
    keys, vals = keys[order], vals[order]
    return vals[np.searchsorted(keys, labels)].astype(np.uint32)


class StackSegmentation:
    """Result of :func:`napari_diffcut.segment` for a stack (..., Y, X).

    Attributes
    ----------
    labels : ndarray or zarr array, shape (..., Y, X), uint32
        Labels of every plane (the image's shape without the channel axis).
        A zarr array when the stack's labels exceed the memory budget or
        ``out`` was given.
    planes : list or None
        Per-plane results in C order (:class:`~napari_diffcut.pipeline.segmentation.Segmentation`,
        or :class:`~napari_diffcut.large.tiling.TiledSegmentation` in tiled mode);
        None when the stack was too large to keep them (labels streamed).
    plane_luts : list of dict or None
        With ``consistent_stack``: per plane, its own label -> stack-wide label.
    settings : dict
        JSON-serialisable record of the run (stack shape, consistency, store).
    store : str or None
        zarr folder holding the labels, if any.
    """

    def __init__(
        self,
        labels: Any,
        planes: list[Any] | None,
        plane_luts: list[dict[int, int]] | None,
        settings: dict[str, Any],
        store: str | None = None,
    ) -> None:
        self.labels = labels
        self.planes = planes
        self.plane_luts = plane_luts
        self.settings = settings
        self.store = store

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the label stack (..., Y, X)."""
        return tuple(int(n) for n in self.labels.shape)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Shape of the leading (stack) axes."""
        return self.shape[:-2]

    @property
    def consistent(self) -> bool:
        """Whether labels are stack-wide (``consistent_stack``)."""
        return self.plane_luts is not None

    def plane(self, index: tuple[int, ...]) -> Any:
        """The per-plane result at a stack index."""
        if self.planes is None:
            raise DiffCutError("per-plane results were not kept (stack beyond the memory budget)")
        return self.planes[int(np.ravel_multi_index(index, self.stack_shape))]

    def cut(self, threshold: float | str) -> NDArray[np.uint32]:
        """Labels of the whole stack at another threshold (no model run).

        Each plane is re-cut on its tree; with ``consistent_stack`` the planes
        are matched again. Needs the per-plane trees (downscale mode, stack
        within the memory budget).
        """
        if self.planes is None or not all(hasattr(p, "cut") for p in self.planes):
            raise DiffCutError(
                "cut needs per-plane trees: not available for tiled planes or for "
                "stacks beyond the memory budget; run again with another threshold"
            )
        out = np.empty(self.shape, np.uint32)
        kept: dict[tuple[int, ...], NDArray[np.uint32]] = {}
        next_id = 1
        for flat, index in enumerate(np.ndindex(*self.stack_shape)):
            local = self.planes[flat].cut(threshold)
            if self.consistent:
                lut, next_id = _lut_for(index, local, kept, next_id)
                local = _apply(lut, local)
                kept[index] = local
            out[index] = local
        return out

    def __repr__(self) -> str:
        return (
            f"StackSegmentation(shape={self.shape}, consistent={self.consistent}, "
            f"store={self.store!r})"
        )


def _lut_for(
    index: tuple[int, ...],
    local: NDArray[np.integer],
    kept: dict[tuple[int, ...], NDArray[np.uint32]],
    next_id: int,
) -> tuple[dict[int, int], int]:
    """Stack-wide labels for a plane: matched to its predecessor, or fresh ids."""
    pred = predecessor(index)
    if pred is None:
        uniq = np.unique(local).tolist()
        return {int(c): next_id + i for i, c in enumerate(uniq)}, next_id + len(uniq)
    return match_planes(kept[pred], local, next_id)


def iter_segment_stack(
    source: Any,
    s: Settings,
    *,
    engine: ModelCache,
    contrast_limits: Any = None,
    out: Any = None,
    plane_shape: tuple[int, int] | None = None,
    info: dict[str, Any] | None = None,
) -> Generator[Progress, None, StackSegmentation]:
    """Segment every plane of a stacked :class:`~napari_diffcut.large.sources.ImageSource`.

    ``plane_shape`` is the label plane size (level 0 of a multiscale input
    read at a coarser level); default: the source's.
    """
    from napari_diffcut.large.sources import create_label_store
    from napari_diffcut.large.tiling import iter_segment_tiled

    plane_shape = tuple(plane_shape or source.plane_shape)
    shape = (*source.stack_shape, *plane_shape)
    n = source.n_planes
    label_bytes = math.prod(shape) * 4
    budget = int(s.memory_budget) * (1 << 20)
    store_path = None
    if out is not None or label_bytes > budget:
        labels, store_path = create_label_store(shape, out)
    else:
        labels = np.zeros(shape, np.uint32)
    # Per-plane results hold a pixel map as large as the labels: keep them
    # only when both fit the budget.
    keep = label_bytes * 2 <= budget
    planes: list[Any] | None = [] if keep else None
    luts: list[dict[int, int]] | None = [] if s.consistent_stack else None
    kept: dict[tuple[int, ...], NDArray[np.uint32]] = {}
    release: dict[tuple[int, ...], int] = {}
    next_id = 1
    for flat, index in enumerate(source.plane_indices()):
        yield Progress("plane", flat, n, f"plane {flat + 1} of {n} (index {index})")
        prefix = f"plane {flat + 1}/{n}: "
        if is_tiled(source, s):
            result = yield from relay(iter_segment_tiled(
                source, index, s, engine=engine, contrast_limits=contrast_limits,
            ), prefix)
        else:
            result = yield from relay(iter_segment_plane(
                source, index, s, engine=engine, contrast_limits=contrast_limits,
                out_shape=plane_shape, info=info,
            ), prefix)
        local = np.asarray(result.labels)
        if luts is not None:
            lut, next_id = _lut_for(index, local, kept, next_id)
            luts.append(lut)
            local = _apply(lut, local)
            kept[index] = local
            release[index] = _last_user(index, source.stack_shape)
            for old in [k for k, last in release.items() if last <= flat]:
                kept.pop(old, None)
                release.pop(old)
        labels[index] = local
        del local
        if planes is not None:
            planes.append(result)
        del result
    yield Progress("plane", n, n, f"{n} planes segmented")
    record = base_record(s, source, shape)
    record.update(
        stack_shape=list(source.stack_shape), planes=n, consistent_stack=s.consistent_stack,
        labels_store=store_path, planes_kept=keep, **(info or {}),
    )
    if s.consistent_stack:
        record["stack_labels"] = next_id - 1
        record["min_stack_iou"] = MIN_STACK_IOU
    return StackSegmentation(labels, planes, luts, record, store_path)
