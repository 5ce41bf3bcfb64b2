"""The post-model stages in torch, on the device of the tensors they are given.

A torch twin of :mod:`napari_diffcut.core` for runs whose model is on a GPU:
aggregation of the captured attention, the stationary distribution, the power
walk and the graph (:mod:`~napari_diffcut.accel.walk`, Krylov-Schur for pi in
:mod:`~napari_diffcut.accel.krylov`), the NCut tree with a
batched, restarted Lanczos solver for the Fiedler vectors of all nodes of one
depth at once (:mod:`~napari_diffcut.accel.lanczos`,
:mod:`~napari_diffcut.accel.ncut`, :mod:`~napari_diffcut.accel.tree`) and the
soft pixel labels (:mod:`~napari_diffcut.accel.upsample`).

Every function works on the device of its input tensor (CPU or CUDA) and
returns the same structures as the numpy core (a
:class:`~napari_diffcut.core.hierarchy.TreeArrays` of numpy arrays, so a
:class:`~napari_diffcut.core.hierarchy.Hierarchy` is built from it as usual).
The numpy core never imports this package; it imports torch at module level,
so load it lazily (inside the function that needs it).
"""

from __future__ import annotations

from napari_diffcut.accel.ncut import bipartition_torch
from napari_diffcut.accel.tree import build_tree_torch, iter_ncut_tree_torch, ncut_hierarchy_torch
from napari_diffcut.accel.upsample import region_maps_torch, soft_upsample_torch
from napari_diffcut.accel.walk import (
    aggregate_attention_torch,
    build_affinity_torch,
    power_walk_torch,
    similarity_affinity_torch,
    stationary_distribution_torch,
    walk_affinity_torch,
)

__all__ = [
    "aggregate_attention_torch",
    "bipartition_torch",
    "build_affinity_torch",
    "build_tree_torch",
    "iter_ncut_tree_torch",
    "ncut_hierarchy_torch",
    "power_walk_torch",
    "region_maps_torch",
    "similarity_affinity_torch",
    "soft_upsample_torch",
    "stationary_distribution_torch",
    "walk_affinity_torch",
]
