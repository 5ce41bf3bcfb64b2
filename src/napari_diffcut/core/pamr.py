"""Pixel-adaptive mask refinement (PAMR, Araslanov & Roth, CVPR 2020): the kernel.

The affinities between a pixel and its dilated neighbours, the band of pixels
near leaf boundaries that are refined, and one sparse label-propagation step.
:mod:`napari_diffcut.core.refine` runs it on the tree's leaves, coarse to fine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    logits: NDArray[np.float32] | None = None
    for channel in guide:
        centre = np.take(channel, centre_index)
        values = np.take(channel, neighbour_index)  # (n, P)
        mean = (values.sum(axis=1) + n_dilations * centre) / n_pos
        values -= mean[:, None]
        var = np.einsum("ij,ij->i", values, values) + n_dilations * (centre - mean) ** 2
        # Araslanov & Roth: |I_i - I_j| over 0.1 of the local standard deviation
        # (unbiased, torch's default), averaged over channels.
        scale = 1.0 / (1e-8 + 0.1 * np.sqrt(var / (n_pos - 1)))
        values -= (centre - mean)[:, None]  # now I_j - I_i
        np.abs(values, out=values)
        if logits is None:  # the first channel: 0 - |.| scale, in place
            values *= -scale[:, None]
            logits = values
        else:
            values *= scale[:, None]
            logits -= values
    assert logits is not None
    if guide.shape[0] > 1:
        logits /= guide.shape[0]
    logits -= _row_max(logits)[:, None]
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def _row_max(a: NDArray[np.float32]) -> NDArray[np.float32]:
    """``a.max(axis=1)`` of a narrow (n, P) array, a column at a time.

    A maximum does not depend on the order, and numpy's reduction over short
    rows is about twice as slow as P element-wise maxima.
    """
    out = a[:, 0].copy()
    for k in range(1, a.shape[1]):
        np.maximum(out, a[:, k], out=out)
    return out


def compact_leaves(pixel_leaf: NDArray[np.integer]) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    """The distinct leaves, ascending, and every pixel's index among them.

    ``np.unique(pixel_leaf, return_inverse=True)``, by a presence table when
    the ids are small non-negative integers (tree node ids), which avoids
    sorting every pixel.

    Examples
    --------
    >>> leaves, compact = compact_leaves(np.array([[7, 3], [3, 9]]))
    >>> leaves.tolist(), compact.tolist()
    ([3, 7, 9], [[1, 0], [0, 2]])
    """
    lab = np.asarray(pixel_leaf)
    if lab.size == 0:
        return np.zeros(0, np.int64), np.zeros(lab.shape, np.int32)
    low, high = int(lab.min()), int(lab.max())
    if low < 0 or high > 4 * lab.size + 65536:  # sparse ids: sorting is cheaper
        leaves, inverse = np.unique(lab, return_inverse=True)
        return leaves.astype(np.int64), inverse.reshape(lab.shape).astype(np.int32)
    present = np.zeros(high + 1, bool)
    present[lab.ravel()] = True
    rank = np.cumsum(present, dtype=np.int32)
    rank -= 1
    return np.flatnonzero(present).astype(np.int64), rank[lab]


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
    leaves, colour, _ = colour_pixels(pixel_leaf, distance)
    return leaves, colour


def colour_pixels(
    pixel_leaf: NDArray[np.integer], distance: int
) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.int32]]:
    """:func:`colour_leaves` plus every pixel's index into ``leaves`` (shape of ``pixel_leaf``)."""
    leaves, compact = compact_leaves(pixel_leaf)
    k = leaves.size
    block = max(1, int(distance))
    by, bx = -(-compact.shape[0] // block), -(-compact.shape[1] // block)
    rows = np.arange(compact.shape[0]) // block
    cols = np.arange(compact.shape[1]) // block
    blocks = (rows[:, None] * bx + cols[None, :]).astype(np.int64)
    present = np.zeros(by * bx * k, bool)
    present[(blocks * k + compact).ravel()] = True
    present = present.reshape(by, bx, k)
    near = ndimage.maximum_filter(present, size=(3, 3, 1), mode="constant")
    # Leaf pairs that share a block neighbourhood, as a sparse product: a dense
    # (K x blocks) @ (blocks x K) float matmul cost tens of ms in BLAS here.
    at_block = sparse.csr_matrix(present.reshape(-1, k), dtype=np.int32)
    near_block = sparse.csr_matrix(near.reshape(-1, k), dtype=np.int32)
    conflict = (at_block.T @ near_block).toarray() > 0
    np.fill_diagonal(conflict, False)
    colour = np.full(k, -1, np.int32)
    for leaf in np.argsort(-conflict.sum(axis=1), kind="stable"):
        used = colour[conflict[leaf]]
        free = np.ones(k + 1, bool)
        free[used[used >= 0]] = False
        colour[leaf] = int(np.argmax(free))
    return leaves, colour, compact


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
    shifts = [(dy, dx) for dy in range(3) for dx in range(3)]
    for _ in range(int(passes)):
        padded = np.pad(lab, 1, mode="edge")
        # Mixed windows by 8 shifted comparisons; the 9 window values are then
        # gathered for those pixels only (about a tenth of the image), not stacked
        # for every pixel.
        mixed = np.zeros(lab.shape, bool)
        for dy, dx in shifts:
            if (dy, dx) != (1, 1):
                mixed |= padded[dy : dy + rows, dx : dx + cols] != lab
        at = np.flatnonzero(mixed)
        if not at.size:
            break
        y, x = np.divmod(at, cols)
        corner = y * (cols + 2) + x
        steps = np.array([dy * (cols + 2) + dx for dy, dx in shifts])
        values = np.sort(padded.ravel()[corner[:, None] + steps[None, :]], axis=1)  # (n, 9)
        own = lab.ravel()[at]
        counts = np.zeros(values.shape, np.int8)  # occurrences of each window value
        for k in range(values.shape[1]):  # 9 flat passes beat one (n, 9, 9) reduction
            counts += values == values[:, k : k + 1]
        top = counts.argmax(axis=1)  # first of the most frequent: the smallest label
        best = values[np.arange(values.shape[0]), top]
        own_count = (values == own[:, None]).sum(axis=1)
        lab.ravel()[at] = np.where(own_count >= counts.max(axis=1), own, best)
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


def candidate_pairs(
    neighbour_colour: NDArray[np.integer], own_colour: NDArray[np.integer], n_colours: int
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """(band pixel, colour) of every candidate: the colours seen at the pixel and its kernel.

    Leaves within reach of one pixel have distinct colours (:func:`colour_leaves`),
    so a candidate is a colour, found by marking a (colour, pixel) table
    instead of sorting every pixel's kernel labels. Colour-major, pixels
    ascending (what :func:`propagate_labels` expects).

    Examples
    --------
    >>> pixel, colour = candidate_pairs(np.array([[2, 0, 2], [1, 1, 1]]), np.array([0, 1]), 3)
    >>> pixel.tolist(), colour.tolist()
    ([0, 1, 0], [0, 1, 2])
    """
    n = own_colour.size
    seen = np.zeros(n * n_colours, bool)
    seen[np.asarray(own_colour, np.intp) * n + np.arange(n)] = True
    for a in range(0, n, 8192):  # blocks: the (rows, P) flat indices stay in cache
        at = np.asarray(neighbour_colour[a : a + 8192], np.intp) * n  # intp: no conversion
        at += np.arange(a, a + at.shape[0])[:, None]
        seen[at.ravel()] = True
    pair_colour, pair_pixel = np.divmod(np.flatnonzero(seen), n)
    return pair_pixel, pair_colour


def propagate_labels(
    pix: NDArray[np.integer],
    weight: NDArray[np.float32],
    key: NDArray[np.intp],
    kept: NDArray[np.integer],
    pair_pixel: NDArray[np.integer],
    pair_colour: NDArray[np.integer],
    n_colours: int,
    pixel_colour: NDArray[np.integer],
    in_band: NDArray[np.bool_],
    iterations: int,
) -> NDArray[np.float32]:
    """PAMR iterations on the (band pixel, candidate) pairs; the final masks per pair.

    Pair (i, c) receives ``a(i, j) m_j(c)`` from every kernel position j: the
    value of pair (j, c) when j is a band pixel with candidate c, 1 when j is a
    seed (outside the band) of leaf c, else 0. ``weight`` (n, P) is the kernel
    renormalised after pruning, ``key`` (n, P) the kernel positions with
    ``n_pixels`` where pruned, ``kept`` the positions left per pixel
    (``napari_diffcut.core.refine``). The pairs come grouped by
    colour (:func:`candidate_pairs`), and a pair only reads pairs of its own
    colour: per colour, a table over the pixels (one extra pixel for pruned
    kernel positions) holds the state index of each (one extra state entry is
    fixed at 1, the next stands for 0), so the CSR matrix is built by lookups,
    without matching. Pruned positions and entries of value 0 are left out; a
    row keeps its kernel order, so every sum is the one PAMR's loop adds up.
    The rows (states) are reordered by length within each chunk, which only
    speeds up the products; the masks come back in the order of the pairs.
    """
    n_pairs = pair_pixel.size
    one, zero = n_pairs, n_pairs + 1
    n_pixels = in_band.size
    # nnz is at most the kept positions of every pair's pixel (PAMR's own count).
    bound = int(np.take(kept, pair_pixel).sum())
    index = np.int32 if max(zero, n_pixels, bound) < 2**31 - 1 else np.int64
    seeds = np.flatnonzero(~in_band)
    seed_colour = np.asarray(pixel_colour)[seeds]
    seeds = seeds[np.argsort(seed_colour, kind="stable")]  # grouped by colour
    seed_start = np.zeros(n_colours + 1, np.int64)
    np.cumsum(np.bincount(seed_colour, minlength=n_colours), out=seed_start[1:])
    pair_start = np.searchsorted(pair_colour, np.arange(n_colours + 1))
    band_pixel = np.asarray(pix)[pair_pixel]
    table = np.full(n_pixels + 1, zero, index)  # 4-byte entries: faster lookups
    rows_per_chunk = max(1, _CHUNK_ENTRIES // max(1, key.shape[1]))
    row_length = np.zeros(n_pairs, np.int64)
    rank = np.empty(n_pairs + 1, index)  # pair -> its row (state) in the matrix
    data = np.empty(bound + 1, np.float32)
    indices = np.empty(bound + 1, index)
    nnz = 0
    rank[one] = one
    for c in range(n_colours):
        # One colour's table: a pixel-sized lookup that stays in cache, unlike
        # a (pixel, colour) table.
        first_entry = nnz
        own_seeds = seeds[seed_start[c] : seed_start[c + 1]]
        at = band_pixel[pair_start[c] : pair_start[c + 1]]
        table[own_seeds] = one
        table[at] = np.arange(pair_start[c], pair_start[c + 1], dtype=index)
        for a in range(int(pair_start[c]), int(pair_start[c + 1]), rows_per_chunk):
            b = min(int(pair_start[c + 1]), a + rows_per_chunk)
            pixel = pair_pixel[a:b]
            # np.take, np.flatnonzero, not fancy or boolean indexing: several
            # times faster on these (pairs, P) blocks, whose masks defeat
            # branch prediction.
            cols = np.take(table, np.take(key, pixel, axis=0))
            length = row_count(cols != zero)
            # Rows of equal length together: csr_matvec's inner loop then ends
            # where the branch predictor expects it, which makes every
            # iteration 1.5-2x faster. Rows (states) may come in any order.
            sort = np.argsort(length.astype(np.uint16), kind="stable")
            cols = np.take(cols, sort, axis=0)
            rank[a + sort] = np.arange(a, b, dtype=index)
            row_length[a:b] = length[sort]
            hit = np.flatnonzero(cols != zero)
            end = nnz + hit.size
            np.take(cols, hit, out=indices[nnz:end])
            np.take(np.take(weight, pixel[sort], axis=0), hit, out=data[nnz:end])
            nnz = end
        table[own_seeds] = zero
        table[at] = zero
        # The colour's entries, renumbered as sorted (its pairs' ranks are all known
        # now), in place while they are in cache (np.take reads a converted or,
        # with mode "raise", buffers the indices, so out may alias them).
        done = indices[first_entry:nnz]
        np.take(rank, done, out=done)
    del table
    # A last row keeps the "1" state at 1 (1.0 * 1.0), so the matrix is square
    # and each iteration is a product alone, without copying the state back.
    indices[nnz], data[nnz] = one, 1.0
    nnz += 1
    indptr = np.zeros(n_pairs + 2, index)
    np.cumsum(row_length, out=indptr[1:-1])
    indptr[-1] = nnz
    matrix = sparse.csr_matrix(
        (data[:nnz], indices[:nnz], indptr),
        shape=(n_pairs + 1, n_pairs + 1),
        copy=False,
    )
    del data, indices
    state = np.zeros(n_pairs + 1, np.float32)
    state[one] = 1.0
    own = table_is_own(pair_pixel, pair_colour, np.asarray(pixel_colour)[pix])
    state[rank[:n_pairs]] = own
    for _ in range(iterations):
        state = matrix @ state
    return np.take(state, rank[:n_pairs])


#: Lookups per chunk of :func:`propagate_labels` (0.1-1 MB per temporary, in cache).
_CHUNK_ENTRIES = 1 << 17


def row_count(mask: NDArray[np.bool_]) -> NDArray[np.int64]:
    """``np.count_nonzero(mask, axis=1)`` of a C-ordered (n, 8 k) mask.

    By bit counts of 8 bytes at a time where numpy has them (2.0+): a count
    over short rows is among the slowest steps of building the matrix.
    """
    bit_count = getattr(np, "bitwise_count", None)
    if bit_count is None or mask.shape[1] % 8 or not mask.flags.c_contiguous:
        return np.count_nonzero(mask, axis=1).astype(np.int64)
    words = bit_count(mask.view(np.uint64))  # (n, k) counts of 8 flags each
    out = words[:, 0].astype(np.int64)
    for j in range(1, words.shape[1]):  # k flat additions beat a reduction over short rows
        out += words[:, j]
    return out


def table_is_own(
    pair_pixel: NDArray[np.integer],
    pair_colour: NDArray[np.integer],
    own_colour: NDArray[np.integer],
) -> NDArray[np.bool_]:
    """One-hot initial masks: the pair of each band pixel's own leaf.

    A pixel's candidates have distinct colours, so its own leaf is the pair of
    its own leaf's colour.
    """
    return pair_colour == own_colour[pair_pixel]


def winning_leaves(
    values: NDArray[np.float32],
    pair_pixel: NDArray[np.integer],
    pair_colour: NDArray[np.integer],
    own_colour: NDArray[np.integer],
    own: NDArray[np.integer],
    pair_leaf: Callable[[NDArray[np.intp], NDArray[np.intp]], NDArray[np.integer]],
) -> NDArray[np.int64]:
    """Per band pixel the candidate with the largest mask (ties: its own leaf, then the smallest).

    Pairs in any order. ``pair_leaf(pixels, colours)`` gives the leaf of some
    pairs; it is asked only where the own leaf loses (a boundary moves).

    Examples
    --------
    >>> values = np.array([0.2, 0.5, 0.8, 0.5], np.float32)  # pixel 0: colours 0, 1; pixel 1: 0, 1
    >>> winning_leaves(values, np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]),
    ...                np.array([0, 1]), np.array([10, 11]), lambda p, c: 20 + c).tolist()
    [21, 11]
    """
    n = own.size
    pixel = np.asarray(pair_pixel)
    own_pair = table_is_own(pixel, pair_colour, own_colour)  # one pair per pixel
    own_value = np.empty(n, np.float32)
    own_value[pixel[own_pair]] = values[own_pair]
    best = np.full(n, -np.inf, np.float32)
    np.maximum.at(best, pixel, values)
    lost = own_value < best
    out = np.asarray(own, np.int64).copy()
    if lost.any():
        win = np.flatnonzero(lost[pixel] & (values == best[pixel]))
        winner = np.full(n, np.iinfo(np.int64).max, np.int64)
        leaf = np.asarray(pair_leaf(pixel[win], np.asarray(pair_colour)[win]), np.int64)
        np.minimum.at(winner, pixel[win], leaf)
        out[lost] = winner[lost]
    return out
