"""The per-plane pipeline: diffuse -> walk -> cut -> pixel labels (method.md 1).

:func:`segment_rgb` is the 2-D core that everything else builds on: tiles,
stacks and lazy inputs call it once per tile or plane. Each stage yields
:class:`~napari_diffcut.pipeline.settings.Progress` events.
"""

from __future__ import annotations

import platform
from collections.abc import Generator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.budget import require_graph_fits
from napari_diffcut.core.hierarchy import iter_ncut_tree
from napari_diffcut.core.image import latent_grid, resize, to_rgb
from napari_diffcut.core.upsample import soft_upsample
from napari_diffcut.core.walk import build_affinity
from napari_diffcut.pipeline.accel_plane import choose_post, post_torch
from napari_diffcut.pipeline.diffuse import diffuse_stage
from napari_diffcut.pipeline.engine import ModelCache
from napari_diffcut.pipeline.segmentation import (
    Segmentation,
    finish_labels,
    hierarchy_stage,
    lazy_result,
    leaf_maps,
    upsample_chunk,
)
from napari_diffcut.pipeline.settings import (
    PIXELS_NATIVE_LATENT,
    PIXELS_PATCH,
    Progress,
    Settings,
)


def prepare_image(
    image: NDArray[Any],
    settings: Settings,
    contrast_limits: tuple[float, float] | None = None,
) -> NDArray[np.float32]:
    """Validate a 2-D (Y, X) or (Y, X, C) image and return RGB float32 in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] > 4 and settings.channels is None:
        raise ValueError(
            f"image of shape {arr.shape} has {arr.shape[-1]} channels last; pass "
            "channels=[i, j, k] to pick up to 3, or segment a stack plane by plane"
        )
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 2:
        raise ValueError(
            f"image must be (Y, X) or (Y, X, C) with Y, X >= 2, got shape {arr.shape}"
        )
    return to_rgb(
        arr, channels=settings.channels, normalize=settings.normalize,
        contrast_limits=contrast_limits,
    )


def latent_side(s: Settings, engine: ModelCache) -> Generator[Progress, None, int]:
    """Native latent side of the run (loads the diffusion model when needed)."""
    if s.working_size is not None:
        return s.working_size // PIXELS_PATCH
    if s.backbone == "pixels":
        return PIXELS_NATIVE_LATENT
    yield Progress("load", 0, 1, f"loading {s.model}")
    return int(engine.model_for(s).native_latent)


def budget_bytes(s: Settings) -> int:
    return int(s.memory_budget) * (1 << 20)


def segment_rgb(
    rgb: NDArray[np.float32],
    s: Settings,
    *,
    engine: ModelCache,
    record: dict[str, Any],
    out_shape: tuple[int, ...] | None = None,
    lazy: bool | None = None,
) -> Generator[Progress, None, Segmentation]:
    """Diffuse, walk, cut and upsample an RGB float image in [0, 1] (the 2-D core).

    ``rgb`` may already be shrunk towards the working size; ``out_shape``
    (default: ``rgb``'s) is the size of the label image and sets the latent
    grid's aspect. Labels beyond the memory budget stay lazy
    (:class:`~napari_diffcut.pipeline.segmentation.LazySegmentation`) unless ``lazy`` is False
    (tiles); ``lazy=True`` forces it.
    """
    out_hw = (int((out_shape or rgb.shape)[0]), int((out_shape or rgb.shape)[1]))
    post = choose_post(s, record)  # None: numpy core; else torch on that device (accel_plane)
    if s.backbone == "pixels":
        from napari_diffcut.core.pixels import pixel_graph

        latent = s.working_size // PIXELS_PATCH if s.working_size else PIXELS_NATIVE_LATENT
        grid = latent_grid(out_hw, latent)
        require_graph_fits(grid, (grid[0] * PIXELS_PATCH, grid[1] * PIXELS_PATCH))
        yield Progress("walk", 0, 1, f"pixels backbone on a {grid[0]}x{grid[1]} grid")
        work = resize(rgb, (grid[0] * PIXELS_PATCH, grid[1] * PIXELS_PATCH))
        record["working_size"] = [grid[0] * PIXELS_PATCH, grid[1] * PIXELS_PATCH]
        built = pixel_graph(work, grid)
        transition = built.transition
    else:
        built = None
        grid, transition = yield from diffuse_stage(
            rgb, s, engine, record, image_shape=out_hw, post_device=post
        )
    record["grid"] = list(grid)
    # The pixels kernel is symmetric: its walk graph and exact stationary
    # distribution come with it (core.pixels), no eigen solve.
    exact = built.affinity if built is not None and s.power == 1 and s.graph == "walk" else None
    if post is not None:
        return (yield from post_torch(transition, grid, rgb, s, post, record=record,
                                      out_hw=out_hw, lazy=lazy, budget=budget_bytes(s),
                                      affinity=exact))
    yield Progress("walk", 1, 1, f"power {s.power}, {s.graph} graph")
    if exact is not None:
        affinity, walk = exact, transition
    else:
        affinity, walk = build_affinity(
            transition, power=s.power, graph=s.graph, dtype=np.float32
        )
    del built, exact
    del transition
    tree = yield from cut_stage(affinity, s, grid)
    del affinity
    hierarchy = yield from hierarchy_stage(tree, grid, s, record, out_hw)
    if lazy is None:
        lazy = out_hw[0] * out_hw[1] * 8 > budget_bytes(s)
    if lazy:
        maps, uniq = leaf_maps(walk, tree.leaf_of_patch, grid)
        del walk
        return (yield from lazy_result(hierarchy, maps, uniq, out_hw, record))
    chunk = upsample_chunk(budget_bytes(s))
    pixel_leaf = soft_upsample(walk, tree.leaf_of_patch, grid, out_hw, max_elements=chunk)
    return (yield from finish_labels(hierarchy, pixel_leaf, rgb, s, record))


def relay(
    gen: Generator[Progress, None, Any], prefix: str
) -> Generator[Progress, None, Any]:
    """Re-yield ``gen``'s events with ``prefix`` on their messages; return its value.

    Closing the relay closes ``gen`` (so a cancelled stack or tiled run stops
    its current plane or tile, UNet thread included).
    """
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            yield Progress(event.stage, event.step, event.total, prefix + event.message)
    finally:
        gen.close()


def cut_stage(
    affinity: NDArray[np.float64], s: Settings, grid: tuple[int, int] | None = None
) -> Generator[Progress, None, Any]:
    """NCut tree with one progress event per split.

    With the patch ``grid``, each node also gets its cost under the graph's own
    locality null (core.null), which ``threshold="auto"`` compares against.
    """
    yield Progress("cut", 0, 1, "NCut tree")  # marks the tree's start (benchmarks/run.py)
    gen = iter_ncut_tree(
        affinity, min_size=s.min_size, max_depth=s.max_depth, seed=s.seed, grid_shape=grid
    )
    while True:
        try:
            done, bound = next(gen)
        except StopIteration as stop:
            return stop.value
        yield Progress("cut", done, max(done, bound), f"NCut split {done}")


def base_record(s: Settings, image: Any, out_shape: tuple[int, ...]) -> dict[str, Any]:
    """JSON-serialisable record of everything needed to reproduce the run."""
    from napari_diffcut.core.version import __version__

    rec = s.as_dict()
    if s.backbone == "pixels":
        # No model is loaded by the weight-free backbone: the record must not name one.
        rec.update(model=None, revision=None, allow_pickle=None)
    rec.update(
        napari_diffcut_version=__version__,
        image_shape=list(image.shape),
        image_dtype=str(image.dtype),
        output_shape=list(out_shape),
        python=platform.python_version(),
        numpy=np.__version__,
    )
    if hasattr(image, "picked"):  # an ImageSource: how its axes were read
        rec.update(channel_axis_used=image.channel_axis, channels_used=image.picked)
    if s.backbone == "diffusion":
        import diffusers
        import torch

        rec.update(torch=torch.__version__, diffusers=diffusers.__version__)
    return rec
