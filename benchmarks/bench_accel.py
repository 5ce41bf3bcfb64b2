"""Post-model stages: numpy core vs the torch path (CPU, and CUDA when present).

Input, per stage, on a 64 x 64 patch grid (4096 nodes), as after the UNet
pass of SD 1.5 at 512 x 512:

- aggregate: four per-resolution attention matrices (64, 32, 16, 8 grids),
  each ``planted_transition`` of the same 7 Voronoi regions, lifted and mixed
  (``core.walk.aggregate_attention`` vs ``accel.walk.aggregate_attention_torch``);
- walk: stationary distribution and the S1 graph W (``walk_affinity``);
- tree: the whole NCut tree, min_size 16, depth 8, with the null costs of the
  automatic cut (``build_tree(..., grid_shape=grid)``);
- labels: soft upsampling of the tree's leaves to 512 x 512 and argmax.

Each stage gets the same input on every path (the numpy path's output of the
stage before, moved to the device), so the times are per stage. Agreement
with numpy is printed beside the times: tree ARI of the leaves and max cost
difference, share of equal pixel labels. CUDA times synchronise the device
before stopping the clock. Without a GPU the cuda column reads "unmeasured".

Run: ``python benchmarks/bench_accel.py [--repeat 3] [--json OUT.json]``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from bench_common import load_average, machine, repeat
from bench_ncut import planted_regions

from napari_diffcut.accel.tree import build_tree_torch
from napari_diffcut.accel.upsample import soft_upsample_torch
from napari_diffcut.accel.walk import aggregate_attention_torch, walk_affinity_torch
from napari_diffcut.core.hierarchy import build_tree
from napari_diffcut.core.upsample import soft_upsample
from napari_diffcut.core.walk import aggregate_attention, walk_affinity
from napari_diffcut.testing import planted_transition

GRID = (64, 64)
OUT = (512, 512)
STAGES = ("aggregate", "walk", "tree", "labels")


def inputs() -> dict[str, Any]:
    """Per-resolution attention and the numpy path's output of every stage."""
    regions = planted_regions(GRID)
    per_res = {}
    for f in (1, 2, 4, 8):
        g = (GRID[0] // f, GRID[1] // f)
        per_res[g] = planted_transition(g, regions[::f, ::f], locality=50.0 / f**2, seed=f)
    p = aggregate_attention(per_res)
    w = walk_affinity(p, dtype=np.float32)
    tree = build_tree(w, grid_shape=GRID)
    return {"per_res": per_res, "p": p, "w": w, "tree": tree}


def numpy_stages(data: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """The numpy core's stage calls."""
    leaf = data["tree"].leaf_of_patch
    return {
        "aggregate": lambda: aggregate_attention(data["per_res"]),
        "walk": lambda: walk_affinity(data["p"], dtype=np.float32),
        "tree": lambda: build_tree(data["w"], grid_shape=GRID),
        "labels": lambda: soft_upsample(data["p"], leaf, GRID, OUT),
    }


def torch_stages(data: dict[str, Any], device: str) -> dict[str, Callable[[], Any]]:
    """The torch path's stage calls on ``device`` (inputs moved there beforehand)."""
    dev = torch.device(device)
    per_res = {g: torch.from_numpy(a).to(dev) for g, a in data["per_res"].items()}
    p = torch.from_numpy(data["p"]).to(dev)
    w = torch.from_numpy(data["w"]).to(dev)
    leaf = data["tree"].leaf_of_patch

    def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return out

        return run

    return {
        "aggregate": synced(lambda: aggregate_attention_torch(per_res)),
        "walk": synced(lambda: walk_affinity_torch(p)),
        "tree": synced(lambda: build_tree_torch(w, grid_shape=GRID)),
        "labels": synced(lambda: soft_upsample_torch(p, leaf, GRID, OUT)),
    }


def agreement(data: dict[str, Any], results: dict[str, Any]) -> dict[str, float]:
    """How far a path's results are from the numpy path's."""
    from sklearn.metrics import adjusted_rand_score

    ref_tree = data["tree"]
    tree = results["tree"]
    same_nodes = tree.n_nodes == ref_tree.n_nodes
    cost_diff = float(np.nanmax(np.abs(tree.cost - ref_tree.cost))) if same_nodes else float("nan")
    ref_labels = soft_upsample(data["p"], ref_tree.leaf_of_patch, GRID, OUT)
    labels = np.asarray(results["labels"].cpu())
    w = np.asarray(results["walk"].cpu())
    return {
        "aggregate_max_rel": float(
            np.abs(
                np.asarray(results["aggregate"].cpu()) - aggregate_attention(data["per_res"])
            ).max()
            / data["p"].max()
        ),
        "walk_max_rel": float(np.abs(w - data["w"]).max() / data["w"].max()),
        "tree_same_nodes": float(same_nodes),
        "tree_leaf_ari": float(adjusted_rand_score(ref_tree.leaf_of_patch, tree.leaf_of_patch)),
        "tree_cost_max_diff": cost_diff,
        "labels_equal": float((labels == ref_labels).mean()),
    }


def run(n_repeat: int) -> dict[str, Any]:
    """Time every stage on every path."""
    data = inputs()
    paths: dict[str, dict[str, Callable[[], Any]]] = {"numpy": numpy_stages(data)}
    paths["torch-cpu"] = torch_stages(data, "cpu")
    if torch.cuda.is_available():
        paths["torch-cuda"] = torch_stages(data, "cuda")
    out: dict[str, Any] = {"machine": machine(), "grid": GRID, "out": OUT, "paths": {}}
    for name, stages in paths.items():
        before = load_average()
        times, results = {}, {}
        for stage in STAGES:
            stages[stage]()  # warm-up (CUDA context, kernels, caches)
            timing, results[stage] = repeat(stages[stage], n_repeat)
            times[stage] = timing.as_dict()
        entry: dict[str, Any] = {"times": times, "load": [before, load_average()]}
        if name != "numpy":
            entry["agreement"] = agreement(data, results)
        out["paths"][name] = entry
    return out


def report(result: dict[str, Any]) -> str:
    """Markdown table: median (min) seconds per stage and path."""
    names = ["numpy", "torch-cpu", "torch-cuda"]
    lines = ["| stage | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for stage in (*STAGES, "total"):
        cells = []
        for name in names:
            entry = result["paths"].get(name)
            if entry is None:
                cells.append("unmeasured (no GPU)")
                continue
            t = entry["times"]
            if stage == "total":
                med = sum(t[s]["median"] for s in STAGES)
                low = sum(t[s]["min"] for s in STAGES)
            else:
                med, low = t[stage]["median"], t[stage]["min"]
            cells.append(f"{med:.3f} ({low:.3f})")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    for name in names[1:]:
        entry = result["paths"].get(name)
        if entry:
            agree = ", ".join(f"{k} {v:.3g}" for k, v in entry["agreement"].items())
            lines.append(f"\n{name} vs numpy: {agree}; load {entry['load']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the raw result here")
    args = parser.parse_args(argv)
    result = run(args.repeat)
    print(json.dumps(result["machine"]))
    print(report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
