"""Pixel labels that follow the image: PAMR on the leaves of the tree (method.md 7, option 4).

The soft upsampling (:mod:`napari_diffcut.core.upsample`) puts every pixel in
a leaf of the NCut tree, but its boundaries live on the 8-pixel patch grid.
:func:`refine_leaf_labels` moves them onto the image's own edges once per run,
on the *leaf* labels: every threshold and level is still a lookup from leaf to
ancestor, so levels nest exactly and a re-cut costs no refinement and no
eigen solve.

Method: pixel-adaptive mask refinement, PAMR (Araslanov & Roth, "Single-Stage
Semantic Segmentation from Image Labels", CVPR 2020, Sec. 3.3), the
refinement DiffCut applies to its masks. Every pixel ``i`` is linked to its 8
neighbours ``j`` at each dilation ``d`` (a 3 x 3 kernel with holes) by

    k(i, j) = -mean_c |I_ic - I_jc| / (1e-8 + 0.1 sigma_ic),
    a(i, .) = softmax_j k(i, j),

``sigma_ic`` the standard deviation of channel ``c`` over the 9 x len(dilations)
kernel positions (visinf/1-stage-wseg, models/mods/pamr.py), and label masks
are iterated as ``m_i <- sum_j a(i, j) m_j`` (replicate padding at the border).

A tree has 100-200 leaves, and dense PAMR over that many masks of 512 x 512
would cost seconds, so the masks are kept sparse, at a cost independent of
the number of leaves:

- **Band.** A pixel farther than ``band`` pixels from any leaf boundary keeps
  its leaf and is a fixed one-hot seed. Deep inside a leaf this is exact (its
  neighbourhood holds one label only); near the boundary it makes the
  iteration a truncated random walker with those seeds as boundary conditions
  (Grady, "Random Walks for Image Segmentation", TPAMI 2006). The band is
  where the patch grid is uncertain: about one patch.
- **Candidates.** A band pixel can only take a leaf seen at its own kernel
  positions in the initial labels, so a boundary moves by at most the
  largest dilation, and the mask of a pixel is a few numbers, one per
  candidate, instead of one per leaf.
- **Colours.** Leaves whose pixels come closer than three largest dilations
  get different colours (greedy graph colouring). No pixel then sees two
  candidates of one colour, within its own or a kernel neighbour's set, so
  "the mask of leaf c at pixel j" is one table lookup at (colour of c, j).

Each iteration is one sparse product on the (pixel, candidate) pairs, with one
entry per pair and kernel position (kernel weights below
:data:`PRUNE_WEIGHT` left out).

Coarse to fine (:data:`DEFAULT_PASSES`): DiffCut runs PAMR at a quarter of its
output size; here a long pass at half size carries the image's evidence
across nuclei-sized regions cheaply (a short PAMR only blurs a wrong
boundary in place; run to convergence it becomes a random walker and erases
leaves that lie entirely in the band), then a short full-size pass puts the
boundaries on the pixel, and a 3 x 3 majority filter removes the spurs PAMR
leaves in flat, noisy background (DiffCut: a 3 x 3 median).

Output at a pixel depends only on the image and labels within
:func:`refine_halo` pixels, so large images are refined in row strips with
that halo, with the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.pamr import (
    PRUNE_WEIGHT,
    candidate_pairs,
    colour_pixels,
    distinct_channels,
    kernel_offsets,
    leaf_boundary_band,
    mode_filter_labels,
    pamr_affinity,
    propagate_labels,
    row_count,
    winning_leaves,
)


@dataclass(frozen=True)
class RefinePass:
    """One PAMR pass of :func:`refine_leaf_labels`.

    Attributes
    ----------
    scale : int
        The pass runs on the image and labels shrunk by this factor (area
        average; labels: one pixel per block), and its labels are repeated
        back to full size.
    iterations : int
        PAMR iterations.
    dilations : tuple of int
        Dilations of the 3 x 3 kernel, in pixels of the pass.
    band : int
        Pixels (of the pass) farther than this from a leaf boundary keep their leaf.
    """

    scale: int = 1
    iterations: int = 10
    dilations: tuple[int, ...] = (1, 2, 4)
    band: int = 2

    def __post_init__(self) -> None:
        dil = tuple(int(d) for d in self.dilations)
        if not dil or min(dil) < 1:
            raise ValueError(f"dilations must be positive integers, got {self.dilations!r}")
        object.__setattr__(self, "dilations", dil)
        for name in ("scale", "iterations", "band"):
            value = getattr(self, name)
            low = 1 if name == "scale" else 0
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def halo(self) -> int:
        """Full-size pixels of context that make a refined window of this pass exact.

        Whatever differs at the edge of a window (band, kernel, candidates) lies
        within ``max(max(dilations), band)`` pixels of it and travels at most
        one largest dilation per iteration; one more pixel for the shrinking.
        """
        reach = max(self.dilations)
        return self.scale * (self.iterations * reach + max(reach, self.band) + 2)


#: Coarse to fine. DiffCut runs PAMR (10 iterations, dilations 1, 2, 4, 8) at a
#: quarter of its 512 px output; here a long pass at half size moves boundaries
#: across whole nuclei-sized regions cheaply, then a short full-size pass puts
#: them on the pixel. Chosen on the 12 DSB 2018 images (oracle leaf-merge
#: foreground IoU 0.69 -> 0.88, boundary F at 2 px 0.57 -> 0.90;
#: benchmarks/bench_refine.py).
DEFAULT_PASSES = (
    RefinePass(scale=2, iterations=30, dilations=(1, 2, 4, 8), band=2),
    RefinePass(scale=1, iterations=10, dilations=(1, 2, 4), band=2),
)
#: Passes of the 3 x 3 majority filter after PAMR (DiffCut: a 3 x 3 median).
DEFAULT_MODE_FILTER = 1
#: Images with more pixels are refined in row strips of about this many pixels
#: (plus the halo), which bounds the memory (about 0.5 kB per band pixel).
STRIP_PIXELS = 1 << 20


def refine_halo(
    passes: Sequence[RefinePass] = DEFAULT_PASSES, mode_filter: int = 1
) -> int:
    """Pixels of context that make a refined window exact (strips, dask blocks).

    The passes' halos plus one pixel per majority-filter pass, rounded up to a
    multiple of every pass's scale, so that windows starting at multiples of
    it shrink on the same grid as the whole image.

    Examples
    --------
    >>> refine_halo([RefinePass(scale=1, iterations=10, dilations=(1, 2, 4), band=2)])
    47
    """
    step = _grid_step(passes)
    total = sum(p.halo() for p in passes) + int(mode_filter)
    return -(-total // step) * step


def _image_and_labels(
    image: Any, labels: Any, name: str
) -> tuple[NDArray[Any], NDArray[Any]]:
    """``image`` (M, N[, C]) and the labels ``name`` (M, N) as arrays, shapes checked."""
    lab = np.asarray(labels)
    img = np.asarray(image)
    if lab.ndim != 2 or img.ndim not in (2, 3) or img.shape[:2] != lab.shape:
        raise ValueError(
            f"image (M, N[, C]) and {name} (M, N) must share (M, N), got image "
            f"{img.shape} and {name} {lab.shape}"
        )
    return img, lab


def _grid_step(passes: Sequence[RefinePass]) -> int:
    """Least common multiple of the scales (where windows may start)."""
    return int(np.lcm.reduce([int(p.scale) for p in passes])) if passes else 1


def refine_leaf_labels(
    image: NDArray[np.floating],
    pixel_leaf: NDArray[np.integer],
    *,
    passes: Sequence[RefinePass] = DEFAULT_PASSES,
    mode_filter: int = DEFAULT_MODE_FILTER,
    strip_pixels: int = STRIP_PIXELS,
) -> NDArray[np.int32]:
    """Move leaf boundaries onto image edges with PAMR, coarse to fine (module docstring).

    Run once per segmentation on the deepest tree node of every pixel; every
    flat cut and level is then ``lut[refined]`` as before, so levels nest
    exactly and a re-cut is a lookup.

    Parameters
    ----------
    image : (M, N[, C]) ndarray of float
        The image at the size of ``pixel_leaf`` (RGB in [0, 1] from
        :func:`~napari_diffcut.core.image.to_rgb`; any scale works, the kernel
        is normalised by the local standard deviation).
    pixel_leaf : (M, N) ndarray of int
        Leaf (tree node id) of every pixel, e.g. from
        :func:`~napari_diffcut.core.upsample.soft_upsample`.
    passes : sequence of RefinePass
        PAMR passes, run in order (default :data:`DEFAULT_PASSES`); a pass
        whose shrunk image would be smaller than 2 x 2 is skipped, and no
        passes return the labels unchanged.
    mode_filter : int
        Passes of the 3 x 3 majority filter after PAMR
        (:func:`mode_filter_labels`; 0: none).
    strip_pixels : int
        Larger images are refined in row strips of about this many pixels plus
        :func:`refine_halo` rows on each side (same result, bounded memory).

    Returns
    -------
    (M, N) ndarray of int32
        Refined leaf per pixel; every value is a leaf of ``pixel_leaf``.

    Raises
    ------
    ValueError
        If the shapes disagree or ``strip_pixels`` is not a positive integer.

    Examples
    --------
    >>> img = np.zeros((32, 32)); img[:, 13:] = 1.0  # the edge is at column 13
    >>> blocky = np.zeros((32, 32), int); blocky[:, 16:] = 1  # patch grid: column 16
    >>> refined = refine_leaf_labels(img, blocky)
    >>> int(np.argmax(refined[0]))
    13
    """
    img, lab = _image_and_labels(image, pixel_leaf, "pixel_leaf")
    for name, value, low in (("strip_pixels", strip_pixels, 1), ("mode_filter", mode_filter, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    passes = tuple(passes)
    guide = distinct_channels(img)
    lab = lab.astype(np.int64, copy=False)
    height, width = lab.shape
    step = _grid_step(passes)
    rows = max(step, int(strip_pixels) // max(1, width) // step * step)
    if height <= rows:
        return mode_filter_labels(_refine_passes(guide, lab, passes), int(mode_filter))
    halo = refine_halo(passes, int(mode_filter))
    out = np.empty(lab.shape, np.int32)
    for r0 in range(0, height, rows):  # r0 and the window start are multiples of step
        r1 = min(height, r0 + rows)
        a, b = max(0, r0 - halo), min(height, r1 + halo)
        window = _refine_passes(guide[:, a:b], lab[a:b], passes)
        out[r0:r1] = mode_filter_labels(window, int(mode_filter))[r0 - a : r1 - a]
    return out


def pamr_labels(
    image: NDArray[np.floating],
    labels: NDArray[np.integer],
    *,
    iterations: int = 10,
    dilations: Sequence[int] = (1, 2, 4),
    band: int = 2,
) -> NDArray[np.int32]:
    """One PAMR pass at the image's own size (module docstring).

    Parameters
    ----------
    image : (M, N[, C]) ndarray of float
        Guide image.
    labels : (M, N) ndarray of int
        Initial labels (any integers).
    iterations, dilations, band
        As in :class:`RefinePass`.

    Returns
    -------
    (M, N) ndarray of int32

    Examples
    --------
    >>> img = np.zeros((1, 12)); img[0, 5:] = 1.0
    >>> labels = np.zeros((1, 12), int); labels[0, 7:] = 1
    >>> pamr_labels(img, labels).tolist()
    [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]]
    """
    one = RefinePass(scale=1, iterations=iterations, dilations=tuple(dilations), band=band)
    img, lab = _image_and_labels(image, labels, "labels")
    return _refine_window(
        distinct_channels(img), lab.astype(np.int64), one.iterations, one.dilations, one.band
    )


def _refine_passes(
    guide: NDArray[np.float32], lab: NDArray[np.int64], passes: Sequence[RefinePass]
) -> NDArray[np.int32]:
    """All passes on one window: shrink, refine, repeat back, next pass."""
    out = np.array(lab, np.int32, order="C")
    for p in passes:
        s = int(p.scale)
        if s == 1:
            out = _refine_window(guide, out, p.iterations, p.dilations, p.band)
            continue
        small_guide, small_lab = _shrink(guide, out, s)
        if min(small_lab.shape) < 2:
            continue
        small = _refine_window(small_guide, small_lab, p.iterations, p.dilations, p.band)
        grown = np.repeat(np.repeat(small, s, axis=0), s, axis=1)[: lab.shape[0], : lab.shape[1]]
        # A block takes its refined leaf where the pass changed it; elsewhere the
        # finer labels stay (the shrink kept one pixel of each block).
        changed = np.repeat(np.repeat(small != small_lab, s, axis=0), s, axis=1)
        changed = changed[: lab.shape[0], : lab.shape[1]]
        out = np.where(changed, grown, out).astype(np.int32)
    return out


def _shrink(
    guide: NDArray[np.float32], lab: NDArray[np.integer], s: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Guide averaged over s x s blocks and the labels at each block's centre pixel.

    The last blocks repeat the edge when the size is not a multiple of s.
    """
    c, m, n = guide.shape
    bm, bn = -(-m // s), -(-n // s)
    g = np.pad(guide, ((0, 0), (0, bm * s - m), (0, bn * s - n)), mode="edge")
    small_guide = g.reshape(c, bm, s, bn, s).mean(axis=(2, 4), dtype=np.float32)
    padded = np.pad(lab, ((0, bm * s - m), (0, bn * s - n)), mode="edge")
    return small_guide, padded[s // 2 :: s, s // 2 :: s].astype(np.int64)


def _refine_window(
    guide: NDArray[np.float32],
    lab: NDArray[np.int64],
    iterations: int,
    dilations: tuple[int, ...],
    band: int,
) -> NDArray[np.int32]:
    """:func:`refine_leaf_labels` on one window (the whole image or a strip)."""
    out = np.array(lab, np.int32, order="C")  # C order: written through a flat view
    in_band = leaf_boundary_band(lab, band).ravel()
    if iterations == 0 or not in_band.any():
        return out
    width = lab.shape[1]
    flat_lab = out.ravel()
    reach = max(dilations)
    offsets = kernel_offsets(dilations)
    pix = np.flatnonzero(in_band)
    leaves, colour, compact = colour_pixels(lab, 3 * reach)
    n_colours = int(colour.max()) + 1
    # The smallest integer type: (n, P) colours are the largest array kept beside the kernel.
    pixel_colour = colour.astype(np.min_scalar_type(n_colours - 1))[compact.ravel()]
    own_colour = pixel_colour[pix]
    weight, key, kept, neighbour_colour = _band_kernel(
        guide.reshape(guide.shape[0], -1), pix, lab.shape, offsets, len(dilations), pixel_colour
    )
    # Candidates: the distinct leaves at the pixel and its kernel positions, as
    # colours (distinct within reach).
    pair_pixel, pair_colour = candidate_pairs(neighbour_colour, own_colour, n_colours)
    values = propagate_labels(
        pix, weight, key, kept, pair_pixel, pair_colour, n_colours, pixel_colour,
        in_band, iterations,
    )
    del weight, key
    own = flat_lab[pix]

    def pair_leaf(pixel: NDArray[np.intp], colour: NDArray[np.intp]) -> NDArray[np.int32]:
        # The leaf of a colour near a band pixel: at its first kernel position of that colour.
        same = np.take(neighbour_colour, pixel, axis=0) == colour.astype(own_colour.dtype)[:, None]
        first = np.argmax(same, axis=1)
        y, x = np.divmod(pix[pixel], width)
        at = _clamped(y, x, offsets[first, 0], offsets[first, 1], lab.shape)
        return np.where(colour == own_colour[pixel], own[pixel], flat_lab[at])

    out.ravel()[pix] = winning_leaves(
        values, pair_pixel, pair_colour, own_colour, own, pair_leaf
    )
    return out


#: Band pixels per block of :func:`_band_kernel`.
_KERNEL_ROWS = 8192


def _band_kernel(
    guide: NDArray[np.float32],
    pix: NDArray[np.intp],
    shape: tuple[int, int],
    offsets: NDArray[np.int64],
    n_dilations: int,
    pixel_colour: NDArray[np.integer],
) -> tuple[NDArray[np.float32], NDArray[np.intp], NDArray[np.int64], NDArray[np.integer]]:
    """The pruned PAMR kernel of the band pixels ``pix``, as :func:`propagate_labels` takes it.

    Blocks of pixels, each from its kernel positions to its weights while its
    (block, P) temporaries stay in cache; the positions themselves are not kept.

    Returns
    -------
    weight : (n, P) float32
        :func:`pamr_affinity` without the weights below :data:`PRUNE_WEIGHT`,
        renormalised (pruned positions hold a value that is never read).
    key : (n, P) intp
        Flat index of each kernel position, ``M * N`` where pruned.
    kept : (n,) int64
        Positions kept per pixel.
    neighbour_colour : (n, P)
        ``pixel_colour`` at each kernel position.
    """
    n, p = pix.size, offsets.shape[0]
    n_pixels = shape[0] * shape[1]
    weight = np.empty((n, p), np.float32)
    key = np.empty((n, p), np.intp)
    kept = np.empty(n, np.int64)
    neighbour_colour = np.empty((n, p), pixel_colour.dtype)
    steps = offsets @ np.array([shape[1], 1])
    reach = int(np.abs(offsets).max())
    for a in range(0, n, _KERNEL_ROWS):
        centre = pix[a : a + _KERNEL_ROWS]
        # Kernel positions; outside the image they repeat the border pixel (PAMR
        # pads image and masks with "replicate"): a fixed step away from the
        # border, clamped coordinates near it. intp: np.take converts any other
        # index type first, at more than the lookup's cost.
        at = centre[:, None] + steps[None, :]
        y, x = np.divmod(centre, shape[1])
        near = np.flatnonzero(
            (y < reach) | (y >= shape[0] - reach) | (x < reach) | (x >= shape[1] - reach)
        )
        if near.size:
            at[near] = _clamped(
                y[near, None], x[near, None], offsets[:, 0], offsets[:, 1], shape
            )
        affinity = pamr_affinity(guide, centre, at, n_dilations)
        keep = affinity >= PRUNE_WEIGHT
        # Renormalised: the pruned kernel stays a softmax (rows sum to 1).
        norm = np.einsum("ij,ij->i", affinity, keep)[:, None]
        np.divide(affinity, norm, out=weight[a : a + _KERNEL_ROWS])
        # Arithmetic, as masked writes with such irregular masks are several times slower.
        block = key[a : a + _KERNEL_ROWS]
        np.subtract(at, n_pixels, out=block)
        block *= keep
        block += n_pixels
        kept[a : a + _KERNEL_ROWS] = row_count(keep)
        np.take(pixel_colour, at, out=neighbour_colour[a : a + _KERNEL_ROWS])
    return weight, key, kept, neighbour_colour


def _clamped(
    y: NDArray[np.integer],
    x: NDArray[np.integer],
    dy: NDArray[np.integer],
    dx: NDArray[np.integer],
    shape: tuple[int, int],
) -> NDArray[np.intp]:
    """Flat index of (y + dy, x + dx), clamped into the image (replicate padding)."""
    row = np.clip(y + dy, 0, shape[0] - 1)
    row *= shape[1]
    row += np.clip(x + dx, 0, shape[1] - 1)
    return row
