"""One NCut split in torch against the numpy path; the batched sweep is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from napari_diffcut.accel.ncut import bipartition_torch, gather_blocks, sweep_cuts
from napari_diffcut.accel.tree import split_nodes
from napari_diffcut.core.ncut import bipartition, ncut_cost
from napari_diffcut.core.walk import walk_affinity


def test_bipartition_matches_numpy(planted: tuple) -> None:
    _, _, p = planted
    w = walk_affinity(p, dtype=np.float32)
    ref = bipartition(w, min_size=16)
    out = bipartition_torch(torch.from_numpy(w), min_size=16)
    assert adjusted_rand_score(ref.mask, out.mask) >= 0.99
    assert out.cost == pytest.approx(ref.cost, abs=1e-4)
    assert out.eigenvalue == pytest.approx(ref.eigenvalue, abs=1e-5)
    assert out.eigenvalue <= out.cost + 1e-9  # relaxation bound (method.md 5)
    assert out.fiedler[np.argmax(np.abs(out.fiedler))] > 0  # sign rule
    assert out.cost == pytest.approx(ncut_cost(w.astype(np.float64), out.mask), rel=1e-5)


def test_sweep_is_exact_minimum_per_block(rng: np.random.Generator) -> None:
    x = rng.random((40, 40)).astype(np.float32)
    w = x + x.T
    members = [np.arange(0, 25), np.arange(25, 40), np.arange(40)]
    batch = gather_blocks(torch.from_numpy(w), members)
    z = torch.zeros(batch.valid.shape, dtype=torch.float64)
    for b, m in enumerate(members):
        z[b, : len(m)] = torch.from_numpy(rng.normal(size=len(m)))
    masks, costs = sweep_cuts(batch, z, min_size=3)
    for b, m in enumerate(members):
        sub = w[np.ix_(m, m)].astype(np.float64)
        order = np.argsort(-z[b, : len(m)].numpy())
        best = min(
            ncut_cost(sub, np.isin(np.arange(len(m)), order[:j])) for j in range(3, len(m) - 2)
        )
        assert float(costs[b]) == pytest.approx(best, rel=1e-6)
        assert not masks[b, len(m) :].any()
        assert 3 <= int(masks[b].sum()) <= len(m) - 3


def test_no_valid_position_gives_inf() -> None:
    w = torch.ones((5, 5))
    batch = gather_blocks(w, [np.arange(5)])
    mask, cost = sweep_cuts(batch, torch.linspace(0, 1, 5, dtype=torch.float64)[None], 3)
    assert float(cost[0]) == float("inf") and not mask.any()


def test_isolated_nodes_join_side_b() -> None:
    # Two blocks plus two nodes with no edges: they are left out of the solve.
    w = np.zeros((22, 22), np.float32)
    w[:10, :10] = 1
    w[10:20, 10:20] = 1
    w[:20, :20] += 0.01
    np.fill_diagonal(w[20:, 20:], 0)
    (mask, cost), none = split_nodes(
        torch.from_numpy(w), [np.arange(22), np.arange(20, 22)], min_size=3
    )
    assert none is None  # no live nodes
    assert not mask[20:].any()
    assert len(set(mask[:10])) == 1 and len(set(mask[10:20])) == 1 and mask[0] != mask[10]
    assert cost == pytest.approx(ncut_cost(w[:20, :20].astype(np.float64), mask[:20]), rel=1e-6)
