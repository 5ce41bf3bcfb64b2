"""The NCut tree against a dense DiffCut-style baseline and two library peers.

Input: a 4096-node attention-like graph on a 64 x 64 patch grid, the same
construction as ``napari_diffcut.testing.planted_transition``: softmax rows of
spatial locality (``-d^2 / 50``) + planted regions (``+3`` inside a region) +
Gaussian noise (std 1), regions = 7 Voronoi cells of seeded random points.
Not a block matrix: every row is dense, local and noisy. The random-walk graph
W (method.md 3.1) is built once; every method gets the same W.

- ours: :func:`napari_diffcut.core.hierarchy.build_tree` (deflated Lanczos in
  float32 products, exact sweep), cut at the automatic threshold;
- dense: the DiffCut recipe inside the same recursion (min_size 16, depth 8,
  stop at NCut >= 1): ``torch.linalg.eigh`` of the whole normalised Laplacian
  at every split (float32 on CUDA as DiffCut runs it, float64 on CPU where
  it is faster here) and the best of 100 thresholds
  in ``0.99 [min z, max z]``; cut with the same automatic threshold rule;
- scikit-learn ``SpectralClustering(affinity="precomputed")`` on W, told the
  true number of regions (an advantage no other method gets);
- scikit-image ``graph.cut_normalized`` on a region adjacency graph of the
  patch grid (one node per patch, 8-neighbour edges weighted by W scaled to a
  maximum of 1; skimage's RAG holds no dense graph). Its ``thresh`` decides
  everything: the full run sweeps {0.001 (the default), 0.003, 0.01, 0.03,
  0.1}; --quick runs 0.003 only, the best of that sweep on this graph (ARI
  0.99; the default finds no split at all). Tuning it on the answer is an
  advantage no other method gets.

Accuracy is the adjusted Rand index (ARI) against the planted regions.
Run alone: ``python benchmarks/bench_ncut.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import deque
from typing import Any

import numpy as np
from bench_common import load_average, repeat, time_call

from napari_diffcut.testing import planted_transition

GRID = (64, 64)
N_REGIONS = 7
MIN_SIZE = 16
MAX_DEPTH = 8


def planted_regions(
    grid: tuple[int, int] = GRID, n_regions: int = N_REGIONS, seed: int = 1
) -> np.ndarray:
    """Voronoi cells of ``n_regions`` seeded random points: irregular, unequal regions."""
    h, w = grid
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, [h, w], (n_regions, 2))
    yy, xx = np.mgrid[:h, :w]
    d2 = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    return d2.argmin(-1)


def ari(truth: np.ndarray, labels: np.ndarray) -> float:
    """Adjusted Rand index of two flat labelings."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.ravel(truth), np.ravel(labels)))


# -- the DiffCut-style dense baseline ------------------------------------------------
def dense_split(w: Any, min_size: int, n_thresholds: int = 100) -> tuple[np.ndarray, float] | None:
    """DiffCut's split: dense eigh of the normalised Laplacian, best of 100 thresholds."""
    import torch

    n = w.shape[0]
    d = w.sum(1)
    if bool((d <= 0).any()):
        return None
    inv_sqrt = d.rsqrt()
    lap = torch.eye(n, dtype=w.dtype, device=w.device) - inv_sqrt[:, None] * w * inv_sqrt[None, :]
    _, vecs = torch.linalg.eigh(lap)
    z = inv_sqrt * vecs[:, 1]
    if z[torch.argmax(z.abs())] < 0:
        z = -z
    ts = torch.linspace(0.99 * float(z.min()), 0.99 * float(z.max()), n_thresholds, device=w.device)
    x = (z[:, None] > ts[None, :]).to(w.dtype)  # n x T indicators
    vol = d @ x
    assoc = ((w @ x) * x).sum(0)
    cut = vol - assoc
    ncut = cut / vol + cut / (d.sum() - vol)
    sizes = x.sum(0)
    ncut[(sizes < min_size) | (n - sizes < min_size)] = math.inf
    j = int(torch.argmin(ncut))
    if not math.isfinite(float(ncut[j])):
        return None
    return (x[:, j] > 0).cpu().numpy(), max(float(ncut[j]), 0.0)


def dense_tree(
    affinity: np.ndarray,
    *,
    min_size: int = MIN_SIZE,
    max_depth: int = MAX_DEPTH,
    device: str = "cpu",
) -> Any:
    """The same breadth-first recursion as ours, with :func:`dense_split` at every node."""
    import torch

    from napari_diffcut.core.hierarchy import STRUCTURELESS_COST, TreeArrays

    # float64 on CPU: MKL's float32 eigh is 2x slower than float64 on this CPU
    # (24-33 s vs 11 s at 4096 nodes), so float64 is the baseline's best case
    # here; float32 on CUDA, as DiffCut runs it.
    dtype = torch.float64 if device == "cpu" else torch.float32
    w_all = torch.from_numpy(np.asarray(affinity, np.float64)).to(device, dtype)
    n = w_all.shape[0]
    parent, cost, size, depth = [-1], [float("nan")], [n], [0]
    members = {0: np.arange(n)}
    leaf_of_patch = np.zeros(n, np.int64)
    queue = deque([0])
    while queue:
        node = queue.popleft()
        idx = members.pop(node)
        if len(idx) < 2 * min_size or depth[node] >= max_depth:
            continue
        t_idx = torch.from_numpy(idx).to(device)
        split = dense_split(w_all[t_idx][:, t_idx], min_size)
        if split is None:
            continue
        mask, c = split
        cost[node] = c
        if c >= STRUCTURELESS_COST:
            continue
        for side in (idx[mask], idx[~mask]):
            child = len(parent)
            parent.append(node)
            cost.append(float("nan"))
            size.append(len(side))
            depth.append(depth[node] + 1)
            members[child] = side
            leaf_of_patch[side] = child
            queue.append(child)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return TreeArrays(
        parent=np.asarray(parent, np.int64),
        cost=np.asarray(cost, np.float64),
        size=np.asarray(size, np.int64),
        depth=np.asarray(depth, np.int64),
        leaf_of_patch=leaf_of_patch,
    )


# -- scikit-image ---------------------------------------------------------------------
def grid_rag(affinity: np.ndarray, grid: tuple[int, int]) -> Any:
    """skimage RAG: one node per patch, 8-neighbour edges weighted by W / max off-diagonal W."""
    from skimage import graph as skgraph

    h, w = grid
    labels = np.arange(h * w).reshape(h, w)
    scale = float((affinity - np.diag(np.diag(affinity))).max())
    rag = skgraph.RAG()
    rag.add_nodes_from((int(i), {"labels": [int(i)]}) for i in range(h * w))
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = labels[: h - dy, max(0, -dx) : w - max(0, dx)]
        b = labels[dy:, max(0, dx) : w + min(0, dx)]
        rag.add_edges_from(
            (int(i), int(j), {"weight": float(affinity[i, j]) / scale})
            for i, j in zip(a.ravel(), b.ravel(), strict=True)
        )
    return rag, labels


def skimage_cut(affinity: np.ndarray, grid: tuple[int, int], thresh: float) -> np.ndarray:
    """``skimage.graph.cut_normalized`` on :func:`grid_rag` (RAG build included)."""
    from skimage import graph as skgraph

    rag, labels = grid_rag(affinity, grid)
    return skgraph.cut_normalized(labels, rag, thresh=thresh, num_cuts=10, max_edge=1.0, rng=0)


def sklearn_cut(affinity: np.ndarray, n_clusters: int) -> np.ndarray:
    """``SpectralClustering(affinity="precomputed")`` with the true number of regions."""
    from sklearn.cluster import SpectralClustering

    model = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=0)
    return model.fit(np.asarray(affinity, np.float64)).labels_


# -- the benchmark ------------------------------------------------------------------------
def run(*, quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Build the graph, time and score every method; return the JSON record."""
    from napari_diffcut.core.hierarchy import Hierarchy, build_tree
    from napari_diffcut.core.walk import build_affinity

    repeats = 3 if quick else 7
    regions = planted_regions()
    transition = planted_transition(GRID, regions)
    load_before = load_average()

    graph_t, (affinity, _) = repeat(lambda: build_affinity(transition, dtype=np.float32), repeats)
    ours_t, tree = repeat(
        lambda: build_tree(affinity, min_size=MIN_SIZE, max_depth=MAX_DEPTH), repeats
    )
    ours = Hierarchy(tree, GRID)

    dense_t, dtree = repeat(lambda: dense_tree(affinity, device=device), 1 if quick else 3)
    dense = Hierarchy(dtree, GRID)

    result: dict[str, Any] = {
        "graph": {
            "nodes": int(affinity.shape[0]),
            "regions": N_REGIONS,
            "construction": "softmax(-d^2/50 + 3 [same region] + N(0,1)), 7 Voronoi regions",
        },
        "graph_s": graph_t.as_dict(),
        "ncut_tree_s": ours_t.median,
        "ncut_tree": {
            **ours_t.as_dict(),
            "nodes": tree.n_nodes,
            "segments": int(np.unique(ours.labels).size),
            "auto_threshold": ours.auto_threshold,
            "ari": ari(regions, ours.labels),
        },
        "dense_tree": {
            **dense_t.as_dict(),
            "device": device,
            "nodes": dtree.n_nodes,
            "segments": int(np.unique(dense.labels).size),
            "auto_threshold": dense.auto_threshold,
            "ari": ari(regions, dense.labels),
        },
    }
    result["ncut_speedup_vs_dense"] = dense_t.median / ours_t.median
    result["ari_ours"] = result["ncut_tree"]["ari"]
    result["ari_dense"] = result["dense_tree"]["ari"]

    sk_t, sk_labels = time_call(lambda: sklearn_cut(affinity, N_REGIONS))
    result["sklearn_spectral"] = {
        "s": sk_t,
        "ari": ari(regions, sk_labels),
        "n_clusters_given": N_REGIONS,
    }
    skimage_runs = []
    for thresh in (0.003,) if quick else (0.001, 0.003, 0.01, 0.03, 0.1):
        s, labels = time_call(lambda thresh=thresh: skimage_cut(affinity, GRID, thresh))
        skimage_runs.append(
            {
                "thresh": thresh,
                "s": s,
                "ari": ari(regions, labels),
                "segments": int(np.unique(labels).size),
            }
        )
    result["skimage_cut_normalized"] = skimage_runs
    result["load_avg"] = [load_before, load_average()]
    return result


def main() -> None:
    """Command line: print the record as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="device of the dense baseline (cpu, cuda)")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, device=args.device), indent=1))


if __name__ == "__main__":
    main()
