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
entry per pair and kernel position. Output at a pixel depends only on the
image and labels within :func:`refine_halo` pixels, so large images are
refined in row strips with that halo, with the same result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage, sparse

#: PAMR iterations and dilations of DiffCut's evaluation (method.md 7, option 4).
DEFAULT_ITERATIONS = 10
DEFAULT_DILATIONS = (1, 2, 4, 8)
#: Half-width in pixels of the band around leaf boundaries that is refined: one
#: 8-pixel patch, the resolution of the labels before refinement.
DEFAULT_BAND = 8
#: Images with more pixels are refined in row strips of about this many pixels
#: (plus the halo), which bounds the memory (about 0.5 kB per band pixel).
STRIP_PIXELS = 1 << 20
#: Kernel weights below this are dropped (they carry about 0.1 % of the mass of
#: a row; a third of the entries, measured on DSB 2018 nuclei images).
PRUNE_WEIGHT = 1e-3
#: Channels closer than this everywhere are one channel (grey shown as RGB).
_SAME_CHANNEL = 1e-6


def kernel_offsets(dilations: Sequence[int]) -> NDArray[np.int64]:
    """(row, column) offsets of the 8 neighbours at each dilation, PAMR's order.

    Examples
    --------
    >>> kernel_offsets([1])[:3].tolist()
    [[-1, -1], [-1, 0], [-1, 1]]
    >>> kernel_offsets([1, 2]).shape
    (16, 2)
    """
    ring = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return np.array([(d * dy, d * dx) for d in dilations for dy, dx in ring], np.int64)


def refine_halo(
    iterations: int = DEFAULT_ITERATIONS,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
    band: int = DEFAULT_BAND,
) -> int:
    """Pixels of context that make a refined window exact (strips, dask blocks).

    Whatever differs at the edge of a window (band, kernel, candidates) lies
    within ``max(max(dilations), band)`` pixels of it and travels at most one
    largest dilation per iteration.

    Examples
    --------
    >>> refine_halo()
    89
    """
    reach = max(int(d) for d in dilations)
    return int(iterations) * reach + max(reach, int(band)) + 1


def leaf_boundary_band(pixel_leaf: NDArray[np.integer], band: int) -> NDArray[np.bool_]:
    """Pixels within ``band`` pixels (chessboard distance) of a change of leaf.

    A pixel is on a boundary when a 4-neighbour has another leaf (both sides of
    an edge are marked); the mask is that set dilated by a (2 band + 1) square,
    two separable running maxima.

    Examples
    --------
    >>> labels = np.zeros((1, 8), int); labels[0, 4:] = 1
    >>> leaf_boundary_band(labels, 1).astype(int).tolist()
    [[0, 0, 1, 1, 1, 1, 0, 0]]
    """
    lab = np.asarray(pixel_leaf)
    edge = np.zeros(lab.shape, np.uint8)
    down = lab[1:] != lab[:-1]
    right = lab[:, 1:] != lab[:, :-1]
    edge[1:] |= down
    edge[:-1] |= down
    edge[:, 1:] |= right
    edge[:, :-1] |= right
    if band > 0:
        size = 2 * band + 1
        edge = ndimage.maximum_filter1d(edge, size, axis=0, mode="constant")
        edge = ndimage.maximum_filter1d(edge, size, axis=1, mode="constant")
    return edge.astype(bool)


def pamr_affinity(
    guide: NDArray[np.float32],
    centre_index: NDArray[np.integer],
    neighbour_index: NDArray[np.integer],
    n_dilations: int,
) -> NDArray[np.float32]:
    """PAMR kernel ``a(i, .)`` (module docstring) at some pixels.

    Parameters
    ----------
    guide : ndarray of float32, shape (C, M)
        Flattened image channels.
    centre_index : ndarray of int, shape (n,)
        Pixels to compute (flat indices).
    neighbour_index : ndarray of int, shape (n, P)
        Flat index of each kernel position of each pixel (``P = 8 * n_dilations``;
        positions outside the image repeat the border, PAMR's replicate padding).
    n_dilations : int
        Number of dilations; the centre counts once per dilation in sigma, as
        in PAMR's LocalStDev (one 3 x 3 kernel per dilation).

    Returns
    -------
    ndarray of float32, shape (n, P)
        Rows sum to 1.
    """
    n, p = neighbour_index.shape
    n_pos = p + n_dilations
    logits = np.zeros((n, p), np.float32)
    for channel in guide:
        centre = channel[centre_index]
        values = channel[neighbour_index]  # (n, P)
        mean = (values.sum(axis=1) + n_dilations * centre) / n_pos
        values -= mean[:, None]
        var = np.einsum("ij,ij->i", values, values) + n_dilations * (centre - mean) ** 2
        # Araslanov & Roth: |I_i - I_j| over 0.1 of the local standard deviation
        # (unbiased, torch's default), averaged over channels.
        scale = 1.0 / (1e-8 + 0.1 * np.sqrt(var / (n_pos - 1)))
        values -= (centre - mean)[:, None]  # now I_j - I_i
        np.abs(values, out=values)
        values *= scale[:, None]
        logits -= values
    logits /= guide.shape[0]
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def colour_leaves(
    pixel_leaf: NDArray[np.integer], distance: int
) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    """Colours such that leaves with pixels within ``distance`` differ in colour.

    Conservative: leaves are in conflict when they meet in a 3 x 3 group of
    ``distance``-sized blocks (any two pixels within chessboard ``distance``
    lie in neighbouring blocks). Greedy colouring, most conflicts first
    (Welsh & Powell 1967).

    Returns
    -------
    leaves : ndarray of int64, shape (K,)
        The distinct leaves, ascending.
    colour : ndarray of int32, shape (K,)
        Colour of each leaf, 0 .. C-1.

    Examples
    --------
    >>> labels = np.repeat(np.arange(4), 10)[None].repeat(3, 0)  # 4 stripes, 10 wide
    >>> colour_leaves(labels, 12)[1].tolist()  # only stripes 0 and 3 are > 12 px apart
    [2, 0, 1, 2]
    """
    leaves, compact = np.unique(np.asarray(pixel_leaf), return_inverse=True)
    compact = compact.reshape(np.shape(pixel_leaf))
    k = leaves.size
    block = max(1, int(distance))
    by, bx = -(-compact.shape[0] // block), -(-compact.shape[1] // block)
    rows = np.arange(compact.shape[0])[:, None] // block
    cols = np.arange(compact.shape[1])[None, :] // block
    present = np.zeros((by, bx, k), np.float32)
    present[rows, cols, compact] = 1.0
    near = ndimage.maximum_filter(present, size=(3, 3, 1), mode="constant")
    conflict = present.reshape(-1, k).T @ near.reshape(-1, k) > 0
    np.fill_diagonal(conflict, False)
    colour = np.full(k, -1, np.int32)
    for leaf in np.argsort(-conflict.sum(axis=1), kind="stable"):
        used = colour[conflict[leaf]]
        free = np.ones(k + 1, bool)
        free[used[used >= 0]] = False
        colour[leaf] = int(np.argmax(free))
    return leaves, colour


def refine_leaf_labels(
    image: NDArray[np.floating],
    pixel_leaf: NDArray[np.integer],
    *,
    iterations: int = DEFAULT_ITERATIONS,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
    band: int = DEFAULT_BAND,
    strip_pixels: int = STRIP_PIXELS,
) -> NDArray[np.int32]:
    """Move leaf boundaries onto image edges with PAMR (module docstring).

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
    iterations : int
        PAMR iterations (0 returns the labels unchanged).
    dilations : sequence of int
        Dilations of the 3 x 3 kernel; the largest is how far a boundary can move.
    band : int
        Pixels farther than this from a leaf boundary keep their leaf.
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
        If the shapes disagree, or ``iterations``, ``band`` or ``dilations``
        are not non-negative / positive integers.

    Examples
    --------
    >>> img = np.zeros((32, 32)); img[:, 13:] = 1.0  # the edge is at column 13
    >>> blocky = np.zeros((32, 32), int); blocky[:, 16:] = 1  # patch grid: column 16
    >>> refined = refine_leaf_labels(img, blocky)
    >>> int(np.argmax(refined[0]))
    13
    """
    lab = np.asarray(pixel_leaf)
    img = np.asarray(image)
    if lab.ndim != 2 or img.ndim not in (2, 3) or img.shape[:2] != lab.shape:
        raise ValueError(
            f"image (M, N[, C]) and pixel_leaf (M, N) must share (M, N), got image "
            f"{img.shape} and pixel_leaf {lab.shape}"
        )
    dil = tuple(int(d) for d in dilations)
    if not dil or min(dil) < 1:
        raise ValueError(f"dilations must be positive integers, got {list(dilations)!r}")
    for name, value in (("iterations", iterations), ("band", band), ("strip_pixels", strip_pixels)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    guide = _distinct_channels(img)
    lab = lab.astype(np.int64, copy=False)
    height, width = lab.shape
    rows = max(1, int(strip_pixels) // max(1, width))
    if height <= rows:
        return _refine_window(guide, lab, int(iterations), dil, int(band))
    halo = refine_halo(int(iterations), dil, int(band))
    out = np.empty(lab.shape, np.int32)
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        a, b = max(0, r0 - halo), min(height, r1 + halo)
        window = _refine_window(guide[:, a:b], lab[a:b], int(iterations), dil, int(band))
        out[r0:r1] = window[r0 - a : r1 - a]
    return out


def _distinct_channels(image: NDArray[np.floating]) -> NDArray[np.float32]:
    """(C, M, N) float32 channels of a (M, N[, C]) image, repeated channels dropped.

    A grey image shown as RGB gives the same PAMR kernel with one channel (the
    kernel averages identical channel terms), at a third of the cost.
    """
    img = np.asarray(image, np.float32)
    chans = [img] if img.ndim == 2 else [img[..., c] for c in range(img.shape[-1])]
    kept: list[NDArray[np.float32]] = []
    for c in chans:
        if not any(np.abs(c - k).max() <= _SAME_CHANNEL for k in kept):
            kept.append(np.nan_to_num(c, nan=0.0))
    return np.stack(kept)


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
    height, width = lab.shape
    flat_lab = out.ravel()
    # Kernel positions as flat indices; outside the image they repeat the border
    # pixel (PAMR pads image and masks with "replicate").
    reach = max(dilations)
    index = np.int32 if lab.size < 2**31 - 2 else np.int64
    source = np.pad(np.arange(lab.size, dtype=index).reshape(height, width), reach, mode="edge")
    steps = kernel_offsets(dilations) @ np.array([width + 2 * reach, 1])
    pix = np.flatnonzero(in_band).astype(index)
    yy, xx = np.divmod(pix, width)
    padded = (yy + reach) * (width + 2 * reach) + xx + reach
    neighbours = source.ravel()[padded[:, None] + steps[None, :]]  # (n, P)
    del source, padded, yy, xx
    affinity = pamr_affinity(guide.reshape(guide.shape[0], -1), pix, neighbours, len(dilations))
    # Candidates: the distinct leaves at the pixel and its kernel positions.
    seen = np.sort(np.concatenate([flat_lab[pix][:, None], flat_lab[neighbours]], axis=1), 1)
    first = np.ones(seen.shape, bool)
    first[:, 1:] = seen[:, 1:] != seen[:, :-1]
    pair_pixel, slot = np.nonzero(first)  # (band pixel, leaf) pairs, pixel-major
    pair_leaf = seen[pair_pixel, slot]
    del seen, first, slot
    leaves, colour = colour_leaves(lab, 3 * reach)
    pair_colour = colour[np.searchsorted(leaves, pair_leaf)]
    values = _iterate(
        pix, neighbours, affinity, pair_pixel, pair_colour, int(colour.max()) + 1,
        colour[np.searchsorted(leaves, flat_lab)], in_band, iterations,
    )
    out.ravel()[pix] = _winners(values, pair_pixel, pair_leaf, flat_lab[pix])
    return out


def _iterate(
    pix: NDArray[np.integer],
    neighbours: NDArray[np.integer],
    affinity: NDArray[np.float32],
    pair_pixel: NDArray[np.int64],
    pair_colour: NDArray[np.int32],
    n_colours: int,
    pixel_colour: NDArray[np.int32],
    in_band: NDArray[np.bool_],
    iterations: int,
) -> NDArray[np.float32]:
    """PAMR iterations on the (band pixel, candidate) pairs; the final masks per pair.

    Pair (i, c) receives ``a(i, j) m_j(c)`` from every kernel position j: the
    value of pair (j, c) when j is a band pixel with candidate c, 1 when j is a
    seed (outside the band) of leaf c, else 0. A table over (pixel, colour)
    holds the state index of each (one extra state entry is fixed at 1), so
    the CSR matrix is built by lookups, without sorting or matching. Kernel
    weights below :data:`PRUNE_WEIGHT` and entries of value 0 are left out.
    """
    n_pairs = pair_pixel.size
    one, zero = n_pairs, n_pairs + 1
    small = zero < 2**31 - 1 and n_colours * in_band.size < 2**31 - 1
    index = np.int32 if small else np.int64
    table = np.full((in_band.size, n_colours), zero, index)
    seeds = np.flatnonzero(~in_band)
    table[seeds, pixel_colour[seeds]] = one
    table[pix[pair_pixel], pair_colour] = np.arange(n_pairs, dtype=index)
    # Kernel entries that matter, per band pixel (CSR over pixels).
    keep = affinity >= PRUNE_WEIGHT
    counts = keep.sum(axis=1)
    nz_cols = neighbours[keep].astype(index, copy=False)
    nz_cols *= n_colours
    nz_weight = affinity[keep]
    pixel_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(index)
    # Each pair repeats its pixel's entries, looked up in its colour's column.
    lengths = counts[pair_pixel]
    pair_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(index)
    at = np.arange(int(lengths.sum()), dtype=index)
    at += np.repeat(pixel_start[pair_pixel] - pair_start, lengths)
    cols = nz_cols[at]
    cols += np.repeat(pair_colour.astype(index), lengths)
    cols = table.ravel()[cols]
    weight = nz_weight[at]
    del table, nz_cols, nz_weight, at
    live = cols != zero
    row_length = np.add.reduceat(live, pair_start) if n_pairs else lengths
    indptr = np.concatenate([[0], np.cumsum(row_length)]).astype(index)
    matrix = sparse.csr_matrix(
        (weight[live], cols[live], indptr), shape=(n_pairs, n_pairs + 1)
    )
    del cols, weight, live
    state = np.zeros(n_pairs + 1, np.float32)
    state[one] = 1.0
    state[:n_pairs] = table_is_own(pair_pixel, pair_colour, pixel_colour[pix])
    for _ in range(iterations):
        state[:n_pairs] = matrix @ state
    return state[:n_pairs]


def table_is_own(
    pair_pixel: NDArray[np.int64], pair_colour: NDArray[np.int32], own_colour: NDArray[np.int32]
) -> NDArray[np.bool_]:
    """One-hot initial masks: the pair of each band pixel's own leaf.

    A pixel's candidates have distinct colours, so its own leaf is the pair of
    its own leaf's colour.
    """
    return pair_colour == own_colour[pair_pixel]


def _winners(
    values: NDArray[np.float32],
    pair_pixel: NDArray[np.int64],
    pair_leaf: NDArray[np.int64],
    own: NDArray[np.int64],
) -> NDArray[np.int64]:
    """Per band pixel the candidate with the largest mask (ties: its own leaf)."""
    starts = np.flatnonzero(np.r_[True, pair_pixel[1:] != pair_pixel[:-1]])
    best = np.maximum.reduceat(values, starts)
    is_best = values == best[pair_pixel]
    own_best = np.zeros(own.size, bool)
    own_best[pair_pixel[is_best & (pair_leaf == own[pair_pixel])]] = True
    first = np.full(own.size, -1, np.int64)
    hits = np.flatnonzero(is_best)
    first[pair_pixel[hits[::-1]]] = hits[::-1]  # reversed: the first hit is written last
    return np.where(own_best, own, pair_leaf[first])
