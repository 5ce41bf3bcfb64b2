"""The torch path on CUDA gives the CPU torch path's results (needs a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from napari_diffcut.accel.tree import build_tree_torch
from napari_diffcut.accel.upsample import soft_upsample_torch
from napari_diffcut.accel.walk import build_affinity_torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_matches_cpu(planted: tuple) -> None:
    grid, _, p = planted
    trees, labels = [], []
    for dev in ("cpu", "cuda"):
        w, walk = build_affinity_torch(torch.from_numpy(p).to(dev))
        tree = build_tree_torch(w, min_size=8, max_depth=5, grid_shape=grid)
        trees.append(tree)
        labels.append(soft_upsample_torch(walk, tree.leaf_of_patch, grid, (128, 128)).cpu())
    a, b = trees
    assert adjusted_rand_score(a.leaf_of_patch, b.leaf_of_patch) >= 0.99
    if a.n_nodes == b.n_nodes:
        np.testing.assert_allclose(b.cost, a.cost, atol=1e-4, equal_nan=True)
    assert (labels[0] == labels[1]).float().mean() >= 0.99
