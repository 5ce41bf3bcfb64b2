"""The post-model stages of one plane in torch, on the model's device (issue 14, point 3).

:func:`~napari_diffcut.pipeline.plane.segment_rgb` runs the numpy core after
the model unless :func:`choose_post` picks torch (``Settings.post``: "auto"
does iff the model runs on CUDA, where the numpy stages would take 0.5-1 s
after a UNet pass of tens of milliseconds). Then the captured attention stays
on the device as tensors and :func:`post_torch` runs aggregation (in
:func:`~napari_diffcut.pipeline.diffuse.diffuse_stage`), walk and graph, the
NCut tree with the locality-null costs of the automatic threshold (one
batched solve per depth, :mod:`napari_diffcut.accel.tree`) and the soft
pixel labels there; only the tree's arrays and the label image come to the
host. The edge refinement (numpy PAMR, :mod:`napari_diffcut.core.refine`)
runs on those labels, as on the numpy path.

The results are the numpy path's (tests/pipeline/test_accel_plane.py: same
partitions, costs to 1e-4). The events are the numpy path's stages, with one
"cut" event per tree depth; on CUDA the device is synchronised before each
stage's first event, so that event times (benchmarks/run.py) are stage times.
torch is imported only when the torch path runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.hierarchy import TreeArrays
from napari_diffcut.pipeline.segmentation import (
    Segmentation,
    finish_labels,
    hierarchy_stage,
    lazy_result,
    upsample_chunk,
)
from napari_diffcut.pipeline.settings import Progress, Settings

if TYPE_CHECKING:
    import torch


def choose_post(s: Settings, record: dict[str, Any]) -> torch.device | None:
    """The torch device of the post-model stages, or None for the numpy core.

    ``s.post``: "numpy" is None; "auto" is the model's device when that is
    CUDA, else None (so the pixels backbone, which loads no model, stays on
    numpy); "torch" is the model's CUDA device, else the CPU (MPS lacks the
    float64 the stationary distribution and the sweep sums need). Writes the
    choice to ``record["post_device"]``: "numpy" or "torch:<device>".
    """
    if s.post == "numpy" or (s.post == "auto" and s.backbone == "pixels"):
        record["post_device"] = "numpy"
        return None
    import torch

    dev = torch.device("cpu")
    if s.backbone == "diffusion":
        from napari_diffcut.attention.devices import resolve_device
        from napari_diffcut.core.errors import DiffCutError

        # A device that cannot be had is left for the model load to name.
        with contextlib.suppress(ValueError, DiffCutError):
            dev = resolve_device(s.device)
    if dev.type != "cuda":
        if s.post == "auto":
            record["post_device"] = "numpy"
            return None
        dev = torch.device("cpu")
    record["post_device"] = f"torch:{dev}"
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously; no-op elsewhere)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def post_torch(
    transition: Any,
    grid: tuple[int, int],
    rgb: NDArray[np.float32],
    s: Settings,
    device: torch.device,
    *,
    record: dict[str, Any],
    out_hw: tuple[int, int],
    lazy: bool | None,
    budget: int,
    affinity: NDArray[np.float32] | None = None,
) -> Generator[Progress, None, Segmentation]:
    """Walk, graph, NCut tree and pixel labels in torch; the tail of ``segment_rgb``.

    Parameters
    ----------
    transition : torch.Tensor or ndarray, shape (N, N)
        Row-stochastic P (a tensor from the diffusion backbone, an ndarray from
        the pixels backbone); moved to ``device``.
    grid : (h, w)
        Patch grid, ``h * w == N``.
    rgb : ndarray (Y, X, 3) float32
        The image, the guide of the edge refinement.
    s : Settings
        The run's settings.
    device : torch.device
        Where to compute (from :func:`choose_post`).
    record : dict
        The run's record (``post_device``, ``auto_threshold``, ``tree_nodes``,
        ``lazy_labels``, ``refined`` are written).
    out_hw : (H, W)
        Size of the label image.
    lazy : bool or None
        As in ``segment_rgb``: None decides from ``budget``.
    budget : int
        Memory budget in bytes.
    affinity : ndarray (N, N), optional
        The walk graph of ``transition`` when the backbone built it exactly
        (the pixels backbone at power 1, ``core.pixels.pixel_graph``): used as
        it is, as the numpy path does.

    Returns
    -------
    Segmentation
        A :class:`~napari_diffcut.pipeline.segmentation.LazySegmentation`
        when the labels stay lazy.
    """
    import torch

    from napari_diffcut.accel.walk import as_tensor, build_affinity_torch

    p = as_tensor(transition, device=device)
    del transition
    record["post_device"] = f"torch:{p.device}"
    synchronize(p.device)  # the aggregation ends here: the next event times the walk
    yield Progress("walk", 1, 1, f"power {s.power}, {s.graph} graph (torch, {p.device})")
    if affinity is not None:
        graph, walk = as_tensor(affinity, device=p.device), p
    else:
        graph, walk = build_affinity_torch(p, power=s.power, graph=s.graph, dtype=torch.float32)
    del p, affinity
    tree = yield from tree_stage(graph, s, grid)
    del graph
    hierarchy = yield from hierarchy_stage(tree, grid, s, record, out_hw)
    if lazy is None:
        lazy = out_hw[0] * out_hw[1] * 8 > budget
    if lazy:
        from napari_diffcut.accel.upsample import region_maps_torch

        # Only the per-leaf maps (leaves x grid) come to the host; blocks are built there.
        uniq, compact = np.unique(tree.leaf_of_patch, return_inverse=True)
        regions = torch.from_numpy(compact.ravel().astype(np.int64)).to(walk.device)
        maps = region_maps_torch(walk, regions, uniq.size).reshape(uniq.size, *grid)
        del walk
        return (yield from lazy_result(hierarchy, maps.cpu().numpy(), uniq, out_hw, record))
    from napari_diffcut.accel.upsample import soft_upsample_torch

    chunk = upsample_chunk(budget)
    labels = soft_upsample_torch(walk, tree.leaf_of_patch, grid, out_hw, max_elements=chunk)
    pixel_leaf = labels.cpu().numpy()
    del walk, labels
    # The refinement stays numpy PAMR (core.refine), on the labels now on the host.
    return (yield from finish_labels(hierarchy, pixel_leaf, rgb, s, record))


def tree_stage(
    affinity: torch.Tensor, s: Settings, grid: tuple[int, int]
) -> Generator[Progress, None, TreeArrays]:
    """The NCut tree in torch with one progress event per depth (and one before it starts).

    With the patch ``grid`` every reached node also gets its locality-null
    cost (:func:`~napari_diffcut.accel.tree.iter_ncut_tree_torch`), which
    ``threshold="auto"`` compares against, as ``plane.cut_stage`` does.
    Closing the generator stops the recursion after the current depth.
    """
    from napari_diffcut.accel.tree import iter_ncut_tree_torch

    synchronize(affinity.device)  # the graph ends here: the next event times the tree
    yield Progress("cut", 0, 1, "NCut tree, one batched solve per depth")
    gen = iter_ncut_tree_torch(
        affinity, min_size=s.min_size, max_depth=s.max_depth, seed=s.seed, grid_shape=grid
    )
    depth = 0
    try:
        while True:
            try:
                done, bound = next(gen)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            depth += 1
            yield Progress("cut", done, max(done, bound), f"NCut depth {depth}: {done} splits")
    finally:
        gen.close()
