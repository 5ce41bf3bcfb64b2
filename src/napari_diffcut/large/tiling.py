"""Tiled mode for large 2-D images: overlapping tiles, segmented alone, stitched.

Stable Diffusion sees about 512 px; a 4000 x 4000 smear field or a 10k x 10k
slide shrunk to that loses every cell. In tiled mode the image is cut into
``tile_size`` x ``tile_size`` tiles that overlap by ``tile_overlap`` pixels
(default ``tile_size // 8``: 8 patches of a 64-patch grid). Each tile is
segmented on its own at the working size (diffuse, walk, cut, upsample), then
segment ids are made consistent across tiles:

1. In the overlap of two neighbouring tiles (left and top neighbour of every
   tile), the segments of both tiles are matched by intersection over union
   *within the overlap*. A pair is joined when each is the other's best
   match and the IoU is at least :data:`MIN_OVERLAP_IOU`. Mutual best
   matching keeps a segment that one tile split and the other did not from
   gluing unrelated regions together.
2. Joined segments are merged with a union-find over (tile, segment) ids, so
   an object crossing several tile borders ends up with one label.
3. Each tile writes only its *core* (its area up to the middle of each
   overlap) to the output, with provisional ids; a final pass replaces them
   by the union-find roots, numbered 1..K.

Attention prototypes of two tiles live on different patch grids (each tile's
walk is over its own patches), so the matching uses the pixels both tiles
see, not attention features.

Memory: one tile (input, RGB, the model's buffers), the label strips of the
previous tile row that later tiles overlap (width x overlap), and the label
image itself unless it exceeds ``memory_budget``, in which case it is written
to a zarr array tile by tile. Time is linear in the number of tiles: each
tile is segmented once and the stitch passes are linear in pixels.

Tiled results have one flat cut per tile (each tile's own automatic or fixed
threshold); there is no global tree, so there is no instant ``cut`` and
``levels`` holds the stitched labels only.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.pipeline.engine import ModelCache
from napari_diffcut.pipeline.plane import base_record, relay, segment_rgb
from napari_diffcut.pipeline.settings import Progress, Settings

#: Two tiles' segments are joined when each is the other's best match in the
#: overlap and their IoU there is at least this.
MIN_OVERLAP_IOU = 0.5
#: Keys of a tile's record that describe the model run, copied to the whole run's record.
MODEL_KEYS = ("device_used", "dtype_used", "attention_grids")
#: Elements per block of the relabelling pass (bounded memory).
RELABEL_BLOCK = 1 << 22


@dataclass(frozen=True)
class Tile:
    """One tile of a plane.

    Attributes
    ----------
    row, col : int
        Position in the tile grid.
    ys, xs : (start, stop)
        Pixels the tile covers.
    core_ys, core_xs : (start, stop)
        Pixels it writes to the output (up to the middle of each overlap).
    """

    row: int
    col: int
    ys: tuple[int, int]
    xs: tuple[int, int]
    core_ys: tuple[int, int]
    core_xs: tuple[int, int]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start positions of tiles along one axis: evenly spread, last tile flush.

    ``n = ceil((length - overlap) / (tile - overlap))`` tiles, so neighbours
    overlap by at least ``overlap`` pixels.

    Examples
    --------
    >>> tile_starts(1000, 400, 50)
    [0, 300, 600]
    >>> tile_starts(300, 400, 50)
    [0]
    """
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [int(round(v)) for v in np.linspace(0, length - tile, n)]


def _cuts(starts: list[int], tile: int, length: int) -> list[int]:
    """Core boundaries: 0, the middle of each overlap, length."""
    ends = [min(length, s + tile) for s in starts]
    middles = [(starts[i + 1] + ends[i]) // 2 for i in range(len(starts) - 1)]
    return [0, *middles, length]


def plan_tiles(shape: tuple[int, int], tile_size: int, overlap: int) -> list[Tile]:
    """Tiles of a (Y, X) plane in raster order (rows, then columns)."""
    if not 0 <= overlap <= tile_size // 2:
        raise ValueError(
            f"tile_overlap must be in [0, tile_size // 2 = {tile_size // 2}], got {overlap}"
        )
    ys, xs = tile_starts(shape[0], tile_size, overlap), tile_starts(shape[1], tile_size, overlap)
    cy, cx = _cuts(ys, tile_size, shape[0]), _cuts(xs, tile_size, shape[1])
    return [
        Tile(
            row=r, col=c,
            ys=(y0, min(shape[0], y0 + tile_size)), xs=(x0, min(shape[1], x0 + tile_size)),
            core_ys=(cy[r], cy[r + 1]), core_xs=(cx[c], cx[c + 1]),
        )
        for r, y0 in enumerate(ys)
        for c, x0 in enumerate(xs)
    ]


class UnionFind:
    """Disjoint sets over ids 0..n-1 that grow on demand (path halving)."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> None:
        """Append ``n`` new singleton ids."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))

    def find(self, i: int) -> int:
        """Root of ``i``."""
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return i

    def union(self, a: int, b: int) -> None:
        """Join the sets of ``a`` and ``b`` (the smaller root wins, so ids stay raster-ordered)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> NDArray[np.int64]:
        """Root of every id."""
        return np.asarray([self.find(i) for i in range(len(self.parent))], np.int64)


def contingency(
    a: NDArray[np.integer], b: NDArray[np.integer]
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64],
           NDArray[np.int64]]:
    """Overlapping label pairs of two label images of the same pixels.

    Returns ``(ia, ib, inter, size_a, size_b)``: for every pair (ia, ib) that
    shares pixels, the shared pixel count and each label's total pixel count.
    Counting is by ``bincount`` over the id ranges (labels of one tile or one
    plane span a small range), with ``unique`` as fallback for wide ranges.
    """
    a = np.asarray(a, np.int64).ravel()
    b = np.asarray(b, np.int64).ravel()
    a0, b0 = int(a.min()), int(b.min())
    na, nb = int(a.max()) - a0 + 1, int(b.max()) - b0 + 1
    if na * nb <= 1 << 26:
        inter = np.bincount((a - a0) * nb + (b - b0), minlength=na * nb)
        pairs = np.flatnonzero(inter)
        ia, ib, inter = pairs // nb + a0, pairs % nb + b0, inter[pairs]
        size_a = np.bincount(a - a0, minlength=na)[ia - a0]
        size_b = np.bincount(b - b0, minlength=nb)[ib - b0]
        return ia, ib, inter, size_a, size_b
    ua, ainv = np.unique(a, return_inverse=True)
    ub, binv = np.unique(b, return_inverse=True)
    pairs, inter = np.unique(ainv * ub.size + binv, return_counts=True)
    pa, pb = pairs // ub.size, pairs % ub.size
    return (ua[pa], ub[pb], inter, np.bincount(ainv)[pa], np.bincount(binv)[pb])


def mutual_matches(
    a: NDArray[np.integer], b: NDArray[np.integer], min_iou: float = MIN_OVERLAP_IOU
) -> list[tuple[int, int]]:
    """Pairs (id in ``a``, id in ``b``) that are each other's best IoU match.

    ``a`` and ``b`` are two label images of the same pixels (an overlap seen
    by two tiles); IoU is computed within these pixels.

    Examples
    --------
    >>> a = np.array([[1, 1, 1, 2, 2]]); b = np.array([[7, 7, 7, 7, 9]])
    >>> mutual_matches(a, b)  # (2, 9): IoU 1/2; (2, 7) would be 1/5
    [(1, 7), (2, 9)]
    >>> mutual_matches(a, b, min_iou=0.6)
    [(1, 7)]
    """
    if np.size(a) == 0:
        return []
    ia, ib, inter, size_a, size_b = contingency(a, b)
    iou = inter / (size_a + size_b - inter)
    best_a: dict[int, tuple[float, int]] = {}
    best_b: dict[int, tuple[float, int]] = {}
    for x, y, v in zip(ia.tolist(), ib.tolist(), iou.tolist(), strict=True):
        if v > best_a.get(x, (-1.0, 0))[0]:
            best_a[x] = (v, y)
        if v > best_b.get(y, (-1.0, 0))[0]:
            best_b[y] = (v, x)
    return [
        (x, y) for x, (v, y) in best_a.items() if v >= min_iou and best_b[y][1] == x
    ]


def compact_labels(
    labels: NDArray[np.integer], first: int
) -> tuple[NDArray[np.uint32], int]:
    """Renumber the labels present to ``first, first + 1, ...`` (raster of values).

    Returns the renumbered image and the number of labels.
    """
    flat = np.asarray(labels, np.int64)
    lo = int(flat.min())
    counts = np.bincount((flat - lo).ravel())
    present = np.flatnonzero(counts)
    lut = np.zeros(counts.size, np.uint32)
    lut[present] = np.arange(first, first + present.size, dtype=np.uint32)
    return lut[flat - lo], int(present.size)


class Stitcher:
    """Assemble tile labels into one plane with ids consistent across tiles.

    Parameters
    ----------
    shape : (Y, X)
        Plane shape.
    tiles : list of Tile
        The plan (raster order), from :func:`plan_tiles`.
    out : array-like
        (Y, X) uint32 destination with ``__setitem__`` (numpy or zarr).
    min_iou : float
        See :func:`mutual_matches`.
    """

    def __init__(
        self, shape: tuple[int, int], tiles: list[Tile], out: Any,
        min_iou: float = MIN_OVERLAP_IOU,
    ) -> None:
        self.shape = shape
        self.out = out
        self.min_iou = min_iou
        self.sets = UnionFind()
        self.sets.add(1)  # id 0 is never a segment
        self._next = {(t.row, t.col): t for t in tiles}
        self._right: NDArray[np.uint32] | None = None  # previous tile's right strip
        self._below: dict[int, NDArray[np.uint32]] = {}  # bottom strips of the last row
        self.joins = 0

    def add(self, tile: Tile, labels: NDArray[np.integer]) -> int:
        """Add one tile's labels (any positive ids); returns its number of segments."""
        first = len(self.sets.parent)
        prov, k = compact_labels(labels, first)
        self.sets.add(k)
        left = self._next.get((tile.row, tile.col - 1))
        if left is not None and self._right is not None:
            width = left.xs[1] - tile.xs[0]
            self._join(self._right, prov[:, :width])
        up = self._below.pop(tile.col, None)
        if up is not None:
            above = self._next[(tile.row - 1, tile.col)]
            height = above.ys[1] - tile.ys[0]
            self._join(up, prov[:height])
        right = self._next.get((tile.row, tile.col + 1))
        self._right = None if right is None else prov[:, right.xs[0] - tile.xs[0]:].copy()
        below = self._next.get((tile.row + 1, tile.col))
        if below is not None:
            self._below[tile.col] = prov[below.ys[0] - tile.ys[0]:].copy()
        (cy0, cy1), (cx0, cx1) = tile.core_ys, tile.core_xs
        y0, x0 = tile.ys[0], tile.xs[0]
        self.out[cy0:cy1, cx0:cx1] = prov[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        return k

    def _join(self, a: NDArray[np.uint32], b: NDArray[np.uint32]) -> None:
        for x, y in mutual_matches(a, b, self.min_iou):
            self.sets.union(x, y)
            self.joins += 1

    def finish(self) -> int:
        """Replace provisional ids by final labels 1..K; returns K."""
        roots = self.sets.roots()
        uniq, final = np.unique(roots[1:], return_inverse=True)
        lut = np.zeros(roots.size, np.uint32)
        lut[1:] = final.astype(np.uint32) + 1
        relabel(self.out, lut)
        return int(uniq.size)


def relabel(out: Any, lut: NDArray[np.uint32], block: int = RELABEL_BLOCK) -> None:
    """``out[...] = lut[out]`` block by block (numpy or zarr, bounded memory).

    zarr arrays are visited in whole chunks, so each chunk is read and
    written once.
    """
    h, w = out.shape[-2:]
    chunks = getattr(out, "chunks", None)
    if chunks is not None:
        ch, cw = int(chunks[-2]), int(chunks[-1])
        bw = cw * max(1, min(math.ceil(w / cw), block // (ch * cw)))
        bh = ch * max(1, block // (ch * bw))
    else:
        bw, bh = w, max(1, block // w)
    for y0 in range(0, h, bh):
        for x0 in range(0, w, bw):
            key = (slice(y0, min(h, y0 + bh)), slice(x0, min(w, x0 + bw)))
            out[key] = lut[np.asarray(out[key])]


class TiledSegmentation:
    """Result of a tiled run: stitched labels of a large 2-D image.

    Attributes
    ----------
    labels : ndarray or zarr array, shape (Y, X), uint32
        One label per object across tile borders; 1..K (0 only where no tile
        wrote, which does not happen). A zarr array when the labels exceed the
        memory budget or ``out`` was given.
    tiles : list of dict
        Per tile: ``ys``, ``xs``, ``core_ys``, ``core_xs``, ``segments``,
        ``threshold`` (the tile's threshold in force).
    settings : dict
        JSON-serialisable record of the run (tiling details included).
    store : str or None
        zarr folder holding the labels, if any.
    """

    def __init__(
        self, labels: Any, tiles: list[dict[str, Any]], settings: dict[str, Any],
        store: str | None = None,
    ) -> None:
        self.labels = labels
        self.tiles = tiles
        self.settings = settings
        self.store = store

    @property
    def shape(self) -> tuple[int, int]:
        """(Y, X) of the label image."""
        return (int(self.labels.shape[0]), int(self.labels.shape[1]))

    @property
    def levels(self) -> list[Any]:
        """Only the stitched labels: tiles have no common tree to give levels."""
        return [self.labels]

    @property
    def threshold(self) -> float:
        """Median of the tiles' thresholds in force."""
        return float(np.median([t["threshold"] for t in self.tiles]))

    @property
    def n_labels(self) -> int:
        """Number of stitched segments."""
        return int(self.settings["stitched_labels"])

    def __repr__(self) -> str:
        return (
            f"TiledSegmentation(shape={self.shape}, tiles={len(self.tiles)}, "
            f"segments={self.n_labels}, store={self.store!r})"
        )


def tile_overlap(s: Settings) -> int:
    """Overlap in force: the setting, or ``tile_size // 8``."""
    assert s.tile_size is not None
    return s.tile_overlap if s.tile_overlap is not None else s.tile_size // 8


def iter_segment_tiled(
    source: Any,
    index: tuple[int, ...],
    s: Settings,
    *,
    engine: ModelCache,
    contrast_limits: Any = None,
    out: Any = None,
) -> Generator[Progress, None, TiledSegmentation]:
    """Segment one large plane of an :class:`ImageSource` tile by tile.

    Yields a "tile" event before each tile (closing the generator stops the
    run within the current tile) and "stitch" events around the final pass.
    Intensities are mapped with one set of per-channel limits for the whole
    plane (napari's contrast limits, or percentiles of a strided sample), so
    that tiles agree on what is bright.
    """
    from napari_diffcut.large.sources import create_label_store

    if s.tile_size is None:
        raise ValueError("iter_segment_tiled needs settings with a tile_size")
    shape = source.plane_shape
    overlap = tile_overlap(s)
    tiles = plan_tiles(shape, s.tile_size, overlap)
    limits = source.limits(index, s.normalize, contrast_limits)
    store_path = None
    if out is not None or shape[0] * shape[1] * 4 > int(s.memory_budget) * (1 << 20):
        labels, store_path = create_label_store(shape, out)
    else:
        labels = np.zeros(shape, np.uint32)
    stitcher = Stitcher(shape, tiles, labels)
    done: list[dict[str, Any]] = []
    model_info: dict[str, Any] = {}
    n = len(tiles)
    for i, tile in enumerate(tiles):
        yield Progress("tile", i, n, f"tile {i + 1} of {n} at y={tile.ys}, x={tile.xs}")
        rgb = source.read_rgb(index, slice(*tile.ys), slice(*tile.xs), limits)
        seg = yield from relay(
            segment_rgb(rgb, s, engine=engine, record={}, lazy=False), f"tile {i + 1}/{n}: "
        )
        del rgb
        segments = stitcher.add(tile, seg.labels)
        if i == 0:  # what the model reported (device, dtype, attention grids)
            model_info = {k: v for k, v in seg.settings.items() if k in MODEL_KEYS}
        done.append({
            "ys": list(tile.ys), "xs": list(tile.xs), "core_ys": list(tile.core_ys),
            "core_xs": list(tile.core_xs), "segments": segments,
            "threshold": float(seg.threshold), "grid": seg.settings.get("grid"),
            "working_size": seg.settings.get("working_size"),
        })
        del seg
    yield Progress("tile", n, n, f"{n} tiles segmented")
    yield Progress("stitch", 0, 1, f"joining {stitcher.joins} segment pairs across tiles")
    k = stitcher.finish()
    yield Progress("stitch", 1, 1, f"{k} segments")
    record = base_record(s, source, shape)
    record["intensity"] = source.intensity(index, s.normalize, contrast_limits)
    record.update(model_info)
    record.update(
        mode_large="tiled", tile_overlap=overlap, tiles=len(tiles),
        tile_grid=[tiles[-1].row + 1, tiles[-1].col + 1], stitched_labels=k,
        tile_joins=stitcher.joins, min_overlap_iou=MIN_OVERLAP_IOU, labels_store=store_path,
        working_size=done[0]["working_size"],
    )
    if index:
        record["plane_index"] = list(index)
    return TiledSegmentation(labels, done, record, store_path)
