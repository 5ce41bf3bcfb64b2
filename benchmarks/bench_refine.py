"""Cost of the edge refinement (core/refine.py) against the cut itself, at 512 x 512.

Issue 11, part 2: refining the pixel labels must not cost more than the cut.
One image goes through the weight-free pixels backbone exactly as a run does
(``pixel_transition`` on a 64 x 64 patch grid, ``ncut_hierarchy``, then
``soft_upsample`` of the leaves to 512 x 512); then, interleaved in one loop
so that every stage sees the same machine load:

- ``cut``: :func:`napari_diffcut.core.hierarchy.ncut_hierarchy` (walk graph +
  whole NCut tree), the reference;
- ``soft_upsample``: leaves to pixels (what a run does anyway);
- ``refine (default)``: :func:`napari_diffcut.core.refine.refine_leaf_labels`
  with its default passes (half size, 30 iterations; full size, 10);
- ``refine (DiffCut eval)``: one full-size PAMR pass with DiffCut's evaluation
  setting (10 iterations, dilations 1, 2, 4, 8) and an 8 px band, for comparison;
- ``re-cut``: a flat cut at another threshold on the refined leaves (a lookup).

The default image is synthetic: 70 nuclei-like discs (radius 5 to 12 px,
varied brightness) on a smooth background with Gaussian noise, seed 0.
``--image PATH`` uses a file instead (read with imageio, resized to 512 x 512).

Run: ``python benchmarks/bench_refine.py [--repeats 5] [--image PATH]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from napari_diffcut.core.hierarchy import ncut_hierarchy
from napari_diffcut.core.image import resize, to_rgb
from napari_diffcut.core.pixels import pixel_transition
from napari_diffcut.core.refine import (
    DEFAULT_PASSES,
    RefinePass,
    leaf_boundary_band,
    refine_leaf_labels,
)
from napari_diffcut.core.upsample import soft_upsample
from napari_diffcut.core.walk import build_affinity

SIZE = 512
GRID = (64, 64)
DIFFCUT_EVAL = (RefinePass(scale=1, iterations=10, dilations=(1, 2, 4, 8), band=8),)


def synthetic_nuclei(size: int = SIZE, n: int = 70, seed: int = 0) -> np.ndarray:
    """Grey float image in [0, 1]: bright discs on a smooth, noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = 0.1 + 0.05 * np.sin(yy / size * 3.0) * np.cos(xx / size * 2.0)
    for _ in range(n):
        cy, cx = rng.uniform(12, size - 12, 2)
        r = rng.uniform(5, 12)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(0.4, 0.9)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def load_image(path: str | None) -> np.ndarray:
    """RGB float image at SIZE x SIZE (synthetic when ``path`` is None)."""
    if path is None:
        return np.repeat(synthetic_nuclei()[..., None], 3, axis=2)
    import imageio.v3 as iio

    raw = np.asarray(iio.imread(path))
    if raw.ndim == 3 and raw.shape[-1] == 4:
        raw = raw[..., :3]
    return resize(to_rgb(raw), (SIZE, SIZE))


def median_min(samples: list[float]) -> tuple[float, float]:
    """Median and minimum of timings, seconds."""
    return statistics.median(samples), min(samples)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the cost table; return it as a dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image", default=None, help="image file (default: synthetic nuclei)")
    args = parser.parse_args(argv)

    rgb = load_image(args.image)
    transition = pixel_transition(rgb, GRID)
    hierarchy = ncut_hierarchy(transition, GRID)
    _, walk = build_affinity(transition, power=1, graph="walk", dtype=np.float32)
    leaf_of_patch = hierarchy.arrays.leaf_of_patch
    pixel_leaf = soft_upsample(walk, leaf_of_patch, GRID, (SIZE, SIZE))
    refined = refine_leaf_labels(rgb, pixel_leaf)
    thresholds = [0.2, 0.4, 0.6, 0.8]

    stages: dict[str, Callable[[], Any]] = {
        "cut (ncut_hierarchy, 64 x 64)": lambda: ncut_hierarchy(transition, GRID),
        "soft_upsample to 512 x 512": lambda: soft_upsample(
            walk, leaf_of_patch, GRID, (SIZE, SIZE)
        ),
        "refine (default passes)": lambda: refine_leaf_labels(rgb, pixel_leaf),
        "refine (DiffCut eval, 1 pass)": lambda: refine_leaf_labels(
            rgb, pixel_leaf, passes=DIFFCUT_EVAL
        ),
        "re-cut on refined leaves": lambda: [
            hierarchy.node_lut(t)[refined] for t in thresholds
        ],
    }
    samples: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(max(1, args.repeats)):  # interleaved: every stage sees the same load
        for name, fn in stages.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)

    cut = median_min(samples["cut (ncut_hierarchy, 64 x 64)"])[0]
    n_leaves = len(np.unique(pixel_leaf))
    print(f"image: {args.image or 'synthetic nuclei'}, {SIZE} x {SIZE}, grid {GRID}, "
          f"{n_leaves} leaves, band (8 px) {leaf_boundary_band(pixel_leaf, 8).mean():.0%} "
          f"of pixels, {(refined != pixel_leaf).mean():.1%} of pixels changed leaf")
    passes = [(p.scale, p.iterations, p.dilations, p.band) for p in DEFAULT_PASSES]
    print(f"default passes (scale, iterations, dilations, band): {passes}")
    print(f"{'stage':34s} {'median s':>9s} {'min s':>8s} {'/ cut':>7s}")
    table: dict[str, Any] = {}
    for name, values in samples.items():
        med, low = median_min(values)
        table[name] = {"median": med, "min": low, "ratio_to_cut": med / cut}
        print(f"{name:34s} {med:9.3f} {low:8.3f} {med / cut:7.2f}")
    return table


if __name__ == "__main__":
    main()
