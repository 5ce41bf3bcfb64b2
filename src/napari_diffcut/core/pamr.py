"""Pixel-adaptive mask refinement (PAMR, Araslanov & Roth, CVPR 2020): the kernel.

The affinities between a pixel and its dilated neighbours, the band of pixels
near leaf boundaries that are refined, and one sparse label-propagation step.
:mod:`napari_diffcut.core.refine` runs it on the tree's leaves, coarse to fine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage, sparse

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


def mode_filter_labels(labels: NDArray[np.integer], passes: int = 1) -> NDArray[np.int32]:
    """3 x 3 majority filter of a label image (edge padding), ``passes`` times.

    The label counterpart of the 3 x 3 median DiffCut applies after PAMR: it
    removes the one-pixel spurs and islands that PAMR leaves where two leaves
    meet in flat, noisy background. A pixel keeps its label when that label
    ties for the most frequent in its window (other ties: the smallest label).
    Only pixels whose window holds two labels or more are evaluated.

    Examples
    --------
    >>> spur = np.zeros((5, 5), int); spur[2, 2] = 4; spur[:, 4] = 4
    >>> mode_filter_labels(spur).tolist()[2]  # the island goes, the line stays
    [0, 0, 0, 0, 4]
    """
    lab = np.array(labels, np.int32, order="C")
    rows, cols = lab.shape
    for _ in range(int(passes)):
        padded = np.pad(lab, 1, mode="edge")
        window = np.stack(
            [padded[dy : dy + rows, dx : dx + cols] for dy in range(3) for dx in range(3)], -1
        )
        mixed = (window != lab[..., None]).any(axis=-1)
        if not mixed.any():
            break
        values = np.sort(window[mixed], axis=1)  # (n, 9)
        own = lab[mixed]
        counts = (values[:, :, None] == values[:, None, :]).sum(axis=2)
        top = counts.argmax(axis=1)  # first of the most frequent: the smallest label
        best = values[np.arange(values.shape[0]), top]
        own_count = (values == own[:, None]).sum(axis=1)
        lab[mixed] = np.where(own_count >= counts.max(axis=1), own, best)
    return lab


def distinct_channels(image: NDArray[np.floating]) -> NDArray[np.float32]:
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


def propagate_labels(
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
    # Renormalised: the pruned kernel stays a softmax (rows sum to 1).
    nz_weight = (affinity / np.einsum("ij,ij->i", affinity, keep)[:, None])[keep]
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


def winning_leaves(
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
