"""Edge refinement of the leaf labels (core/refine.py, issue 11 part 2)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_diffcut.core import refine
from napari_diffcut.core.hierarchy import ncut_hierarchy
from napari_diffcut.core.pamr import (
    PRUNE_WEIGHT,
    colour_leaves,
    compact_leaves,
    kernel_offsets,
    pamr_affinity,
    winning_leaves,
)
from napari_diffcut.core.refine import (
    RefinePass,
    leaf_boundary_band,
    pamr_labels,
    refine_halo,
    refine_leaf_labels,
)
from napari_diffcut.core.upsample import soft_upsample
from napari_diffcut.core.walk import build_affinity
from napari_diffcut.testing import planted_transition

PATCH = 8


def _discs(shape: tuple[int, int], discs: list[tuple[float, float, float]]) -> np.ndarray:
    """Index of the disc (1..) containing each pixel centre, 0 outside."""
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    out = np.zeros(shape, np.int64)
    for i, (cy, cx, r) in enumerate(discs, 1):
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return out


def _noisy(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """Grey image: background 0.2, objects 0.7, Gaussian noise 0.03."""
    rng = np.random.default_rng(seed)
    img = np.where(truth > 0, 0.7, 0.2) + rng.normal(0, 0.03, truth.shape)
    return img.astype(np.float32)


def _patch_grid_labels(truth: np.ndarray) -> np.ndarray:
    """What the patch grid knows: each 8 x 8 block takes the label at its centre."""
    centres = truth[PATCH // 2 :: PATCH, PATCH // 2 :: PATCH]
    return np.kron(centres, np.ones((PATCH, PATCH), np.int64))[: truth.shape[0], : truth.shape[1]]


def _edge_distances(mask: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """|distance to the centre - r| of the mask's boundary pixels (4-neighbour outside)."""
    pad = np.pad(mask, 1)
    inner = pad[1:-1, 1:-1]
    outside_nb = ~pad[:-2, 1:-1] | ~pad[2:, 1:-1] | ~pad[1:-1, :-2] | ~pad[1:-1, 2:]
    yy, xx = np.nonzero(inner & outside_nb)
    return np.abs(np.hypot(yy + 0.5 - cy, xx + 0.5 - cx) - r)


def test_disc_boundary_within_2px_of_the_true_edge() -> None:
    disc = (61.3, 66.7, 23.0)
    truth = _discs((128, 128), [disc])
    img = _noisy(truth)
    blocky = _patch_grid_labels(truth) + 10  # leaf ids need not start at 0
    before = _edge_distances(blocky == 11, *disc)
    assert before.max() > 4  # the patch grid is off by more than the test allows
    refined = refine_leaf_labels(np.repeat(img[..., None], 3, 2), blocky)
    assert set(np.unique(refined)) == {10, 11}
    after = _edge_distances(refined == 11, *disc)
    assert after.max() <= 2.0
    assert (refined == truth + 10).mean() > 0.995


def test_small_nuclei_from_soft_upsampled_leaves() -> None:
    """Discs of 10-20 px from a real tree: refined edges within 2 px, blocks are not."""
    discs = [(30.5, 34.2, 8.0), (40.2, 90.7, 10.0), (92.4, 40.3, 6.5), (95.1, 96.6, 9.0)]
    truth = _discs((128, 128), discs)
    grid = (16, 16)
    regions = _patch_grid_labels(truth)[PATCH // 2 :: PATCH, PATCH // 2 :: PATCH]
    p = planted_transition(grid, regions, noise=0.3, seed=1)
    hierarchy = ncut_hierarchy(p, grid, min_size=2, max_depth=6)
    _, walk = build_affinity(p, power=1, graph="walk", dtype=np.float32)
    leaf = soft_upsample(walk, hierarchy.arrays.leaf_of_patch, grid, truth.shape)
    refined = refine_leaf_labels(_noisy(truth, 2), leaf)
    # Each disc is the leaf that holds most of it; its refined edge follows the image.
    for i, disc in enumerate(discs, 1):
        inside = refined[truth == i]
        own = np.bincount(inside).argmax()
        assert _edge_distances(refined == own, *disc).max() <= 2.0
        assert _edge_distances(leaf == own, *disc).max() > 2.0


def test_refined_levels_nest_and_a_recut_makes_no_eigen_solve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    truth = _discs((96, 96), [(30.0, 30.0, 14.0), (60.0, 66.0, 18.0), (20.0, 75.0, 9.0)])
    grid = (12, 12)
    regions = _patch_grid_labels(truth)[PATCH // 2 :: PATCH, PATCH // 2 :: PATCH]
    p = planted_transition(grid, regions, noise=0.5, seed=3)
    hierarchy = ncut_hierarchy(p, grid, min_size=2, max_depth=5)
    _, walk = build_affinity(p, power=1, graph="walk", dtype=np.float32)
    leaf = soft_upsample(walk, hierarchy.arrays.leaf_of_patch, grid, truth.shape)
    refined = refine_leaf_labels(_noisy(truth), leaf)  # once per run
    assert set(np.unique(refined)) <= set(hierarchy.iter_leaves())
    assert (refined != leaf).any()

    def no_solve(*args: object, **kwargs: object) -> None:
        raise AssertionError("a re-cut must not solve an eigenproblem")

    import scipy.linalg
    import scipy.sparse.linalg

    from napari_diffcut.core import ncut
    from napari_diffcut.core import tree as hierarchy_module

    for module, name in [(ncut, "eigsh"), (ncut, "fiedler_vector"), (ncut, "bipartition"),
                         (hierarchy_module, "fiedler_vector"),
                         (hierarchy_module, "bipartition"), (scipy.sparse.linalg, "eigsh"),
                         (scipy.linalg, "eigh"), (np.linalg, "eigh")]:
        monkeypatch.setattr(module, name, no_solve)
    monkeypatch.setattr(refine, "_refine_window", no_solve)  # nor a refinement
    for threshold in (0.1, 0.5, 0.9, "auto"):
        levels = [lut[refined] for lut in hierarchy.level_luts(threshold)]
        flat = hierarchy.node_lut(threshold)[refined]
        np.testing.assert_array_equal(levels[-1], flat)
        for coarse, fine in zip(levels[:-1], levels[1:], strict=True):
            # Nested: every fine segment lies inside exactly one coarse segment.
            pairs = np.unique(np.stack([fine.ravel(), coarse.ravel()]), axis=1)
            assert np.unique(pairs[0]).size == pairs.shape[1]


def test_strips_give_the_same_labels_as_one_window() -> None:
    truth = _discs((150, 70), [(40.0, 30.0, 15.0), (110.0, 40.0, 20.0), (75.0, 10.0, 8.0)])
    blocky = _patch_grid_labels(truth)
    img = _noisy(truth, 4)
    whole = refine_leaf_labels(img, blocky)
    stripped = refine_leaf_labels(img, blocky, strip_pixels=70 * 30)
    np.testing.assert_array_equal(stripped, whole)
    assert refine_halo() % 2 == 0  # windows start on the half-size grid
    # The halo is needed: strips without context disagree somewhere.
    monkeypatch_halo = refine.refine_halo
    try:
        refine.refine_halo = lambda *args: 0  # type: ignore[assignment]
        assert (refine_leaf_labels(img, blocky, strip_pixels=70 * 30) != whole).any()
    finally:
        refine.refine_halo = monkeypatch_halo


def test_grey_as_rgb_is_grey_and_no_pass_or_one_leaf_is_a_no_op() -> None:
    truth = _discs((64, 64), [(30.0, 28.0, 13.0)])
    img = _noisy(truth)
    blocky = _patch_grid_labels(truth)
    grey = refine_leaf_labels(img, blocky)
    np.testing.assert_array_equal(refine_leaf_labels(np.stack([img] * 3, -1), blocky), grey)
    assert grey.dtype == np.int32
    no_pass = refine_leaf_labels(img, blocky, passes=(), mode_filter=0)
    np.testing.assert_array_equal(no_pass, blocky)
    one = np.full((64, 64), 7)
    np.testing.assert_array_equal(refine_leaf_labels(img, one), one)
    zero_it = (RefinePass(scale=1, iterations=0),)
    np.testing.assert_array_equal(
        refine_leaf_labels(img, blocky, passes=zero_it, mode_filter=0), blocky
    )


def test_boundaries_move_at_most_one_dilation_per_pass() -> None:
    """Candidates come from the kernel: a leaf never appears far from where it was."""
    rng = np.random.default_rng(5)
    img = rng.random((64, 64)).astype(np.float32)
    labels = np.zeros((64, 64), np.int64)
    labels[:, 32:] = 1
    one = pamr_labels(img, labels, iterations=50, dilations=(1, 2), band=6)
    cols = np.nonzero(one != labels)[1]
    assert cols.size and cols.min() >= 32 - 2 and cols.max() < 32 + 2


def test_colours_separate_nearby_leaves() -> None:
    rng = np.random.default_rng(6)
    labels = np.kron(rng.integers(0, 30, (12, 12)), np.ones((5, 5), np.int64))
    leaves, colour = colour_leaves(labels, 12)
    assert leaves.tolist() == np.unique(labels).tolist()
    where = {v: np.argwhere(labels == v) for v in leaves}
    for i, a in enumerate(leaves):
        for j in range(i + 1, leaves.size):
            b = leaves[j]
            gap = np.abs(where[a][:, None, :] - where[b][None, :, :]).max(-1).min()
            if gap <= 12:
                assert colour[i] != colour[j], (a, b, gap)


def test_band_and_validation() -> None:
    labels = np.zeros((5, 9), int)
    labels[:, 5:] = 3
    band = leaf_boundary_band(labels, 2)
    assert band[:, 2:8].all() and not band[:, :2].any() and not band[:, 8:].any()
    img = np.zeros((5, 9))
    with pytest.raises(ValueError, match="must share"):
        refine_leaf_labels(np.zeros((5, 8)), labels)
    with pytest.raises(ValueError, match="dilations must be"):
        RefinePass(dilations=(0, 2))
    with pytest.raises(ValueError, match="iterations must be"):
        RefinePass(iterations=-1)
    with pytest.raises(ValueError, match="scale must be"):
        RefinePass(scale=0)
    with pytest.raises(ValueError, match="strip_pixels must be"):
        refine_leaf_labels(img, labels, strip_pixels=0)


def _dense_pamr(
    img: np.ndarray, labels: np.ndarray, iterations: int, dilations: tuple[int, ...], band: int
) -> np.ndarray:
    """PAMR on one (leaf, pixel) mask per leaf, the loop written out: what the sparse pairs compute.

    Same band, candidates, pruned kernel and summation order (kernel positions
    one after the other, in float32), so the labels must agree exactly.
    """
    h, w = labels.shape
    offsets = kernel_offsets(dilations)
    yy, xx = np.mgrid[:h, :w]
    ny = np.clip(yy[..., None] + offsets[:, 0], 0, h - 1)
    nx = np.clip(xx[..., None] + offsets[:, 1], 0, w - 1)
    nb = (ny * w + nx).reshape(h * w, -1)
    flat = labels.ravel()
    pix = np.flatnonzero(leaf_boundary_band(labels, band))
    affinity = pamr_affinity(img.reshape(1, -1).astype(np.float32), pix, nb[pix], len(dilations))
    keep = affinity >= PRUNE_WEIGHT
    weight = affinity / np.einsum("ij,ij->i", affinity, keep)[:, None]
    weight = np.where(keep, weight, np.float32(0))
    leaves = np.unique(flat)
    masks = (flat[None, :] == leaves[:, None]).astype(np.float32)  # (K, M), seeds stay one-hot
    seen = np.concatenate([pix[:, None], nb[pix]], axis=1)
    candidate = (flat[seen][None] == leaves[:, None, None]).any(axis=2)  # (K, band)
    for _ in range(iterations):
        new = np.zeros((leaves.size, pix.size), np.float32)
        for p in range(nb.shape[1]):
            new += weight[:, p] * masks[:, nb[pix, p]]
        masks[:, pix] = np.where(candidate, new, np.float32(0))
    band_masks = masks[:, pix]
    best = band_masks.max(axis=0)
    own = flat[pix]
    own_value = band_masks[np.searchsorted(leaves, own), np.arange(pix.size)]
    smallest_best = leaves[np.argmax(band_masks == best, axis=0)]
    out = flat.copy()
    out[pix] = np.where(own_value >= best, own, smallest_best)
    return out.reshape(h, w)


@pytest.mark.parametrize("dilations", [(1, 2, 4), (1, 2, 4, 8)])
def test_sparse_pairs_compute_what_dense_pamr_computes(dilations: tuple[int, ...]) -> None:
    """Colours, tables, chunks and the rows sorted by length change no bit of the result."""
    truth = _discs(
        (72, 80), [(20.0, 18.0, 9.0), (34.0, 50.0, 13.0), (58.0, 22.0, 7.0), (60.0, 64.0, 8.0)]
    )
    img = _noisy(truth, 7)
    labels = _patch_grid_labels(truth) * 3 + 5  # ids need not be consecutive
    labels[:8, :] = 2  # a fifth leaf along the top
    for iterations in (1, 7):
        want = _dense_pamr(img, labels, iterations, dilations, 2)
        got = pamr_labels(img, labels, iterations=iterations, dilations=dilations, band=2)
        np.testing.assert_array_equal(got, want)
        assert (got != labels).any()


def test_compact_leaves_is_unique_with_inverse() -> None:
    rng = np.random.default_rng(8)
    for labels in (rng.integers(0, 50, (9, 7)), rng.integers(-5, 5, (4, 6)),
                   rng.integers(0, 2**40, (5, 5))):
        leaves, compact = compact_leaves(labels)
        want, inverse = np.unique(labels, return_inverse=True)
        np.testing.assert_array_equal(leaves, want)
        np.testing.assert_array_equal(compact, inverse.reshape(labels.shape))


def test_winning_leaf_ties_go_to_the_own_leaf_then_the_smallest() -> None:
    # Pixel 0: its own colour 0 loses to colours 1 and 2, tied (leaves 9 and 4);
    # pixel 1: its own colour 1 ties with colour 0 and stays.
    values = np.array([0.1, 0.3, 0.45, 0.3, 0.45], np.float32)
    pixel = np.array([0, 1, 0, 1, 0])
    colour = np.array([0, 0, 1, 1, 2])
    leaf_of = {(0, 1): 9, (0, 2): 4, (1, 0): 3}
    won = winning_leaves(values, pixel, colour, np.array([0, 1]), np.array([7, 8]),
                         lambda p, c: np.array([leaf_of[k] for k in zip(p, c, strict=True)]))
    assert won.tolist() == [4, 8]
