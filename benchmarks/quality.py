"""Segmentation quality on the real images with ground truth in ../shared/data (issue 11, part 6).

Usage::

    python benchmarks/quality.py --limit 4                # a few minutes on 2 cores
    python benchmarks/quality.py --limit 0 --no-skimage   # every image, no skimage

Per data set (images with pixel ground truth only; the BCCD blood set has boxes
only and is skipped), the per-image Hungarian mIoU (method.md 9.2; nuclei and
EM: 2 classes, foreground/background and cell interior/membrane), medians over
images, for:

- ``auto``: the weight-free "pixels" backbone at the automatic threshold
  (the per-node null-ratio rule of :mod:`napari_diffcut.core.hierarchy`);
- ``best level``: the best depth level of the same tree (an oracle, per image);
- ``one``: a single segment;
- ``refine``: ``auto`` with the tree's leaves refined onto image edges by
  ``napari_diffcut.core.refine.refine_leaf_labels`` (n/a where it is missing);
- ``skimage``: scikit-image's classic NCut (SLIC 400, compactness 30, RAG of
  mean colour, ``cut_normalized``; the gallery example's settings);
- ``kmeans``: k-means on pixel colour, told the true number of classes;
- ``segments``: segments at the automatic cut;
- ``s_ours``: seconds per image of ours (graph, tree, upsampling; ``auto`` is
  refinement off, ``refine`` on, which adds ``s_refine``), ``s_skimage``,
  ``s_kmeans``; ``--stages`` adds ``s_pixels``, ``s_tree``, ``s_upsample``.

It drives the core directly (the stages of the pipeline's ``segment_rgb``, with
the pixels backbone's closed-form graph, :func:`napari_diffcut.core.pixels.pixel_graph`).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
LATENT = 64  # PIXELS_NATIVE_LATENT of the pipeline settings
PATCH = 8  # PIXELS_PATCH


def _png(path: str) -> NDArray[Any]:
    from PIL import Image

    return np.asarray(Image.open(path))


def iter_sets(root: Path) -> Iterator[tuple[str, list[tuple[str, str]], Callable[..., Any]]]:
    """(name, [(image path, label path)], loader) of each set with pixel ground truth."""
    dsb = sorted(glob.glob(str(root / "microscopy_dsb2018_bbbc038" / "images" / "*.png")))
    yield "nuclei DSB2018 (fg/bg)", [(p, p.replace("/images/", "/labels/")) for p in dsb], _fg
    star = root / "microscopy_stardist_wheel_dsb2018_sample"
    if star.exists():
        yield "nuclei StarDist sample (fg/bg)", [(str(star / "img2d.tif"),
                                                 str(star / "mask2d.tif"))], _fg
    em = sorted(glob.glob(str(root / "microscopy_isbi2012_em_membranes" / "images" / "*.png")))
    yield "EM ISBI2012 (interior/membrane)", [(p, p.replace("/images/", "/labels/"))
                                              for p in em], _interior


def _read(path: str) -> NDArray[Any]:
    if path.endswith((".tif", ".tiff")):
        import tifffile

        return np.asarray(tifffile.imread(path))
    return _png(path)


def _fg(image_path: str, label_path: str) -> tuple[NDArray[Any], NDArray[np.int64]]:
    img = _read(image_path)
    img = img[..., :3] if img.ndim == 3 else img
    return img, (_read(label_path) > 0).astype(np.int64)


def _interior(image_path: str, label_path: str) -> tuple[NDArray[Any], NDArray[np.int64]]:
    return _read(image_path), (_read(label_path) > 127).astype(np.int64)


def miou(truth: NDArray[np.int64], pred: NDArray[Any], n_class: int) -> float:
    """Per-image Hungarian mIoU (napari_diffcut.evaluation.metrics)."""
    from napari_diffcut.evaluation.metrics import confusion_histogram, hungarian_counts, scores

    counts, _ = hungarian_counts(confusion_histogram(truth, pred, n_class))
    return float(scores(counts).miou)


def ours(rgb: NDArray[np.float32]) -> tuple[Any, NDArray[np.int64], dict[str, float]]:
    """Pixels backbone -> tree (with null costs) -> soft upsampling.

    Returns (hierarchy, leaf map, seconds per stage: ``pixels`` (graph and
    transition, :func:`napari_diffcut.core.pixels.pixel_graph`, whose walk is
    reversible so no stationary solve is needed), ``tree``, ``upsample`` and
    ``total``).
    """
    from napari_diffcut.core.hierarchy import Hierarchy, build_tree
    from napari_diffcut.core.image import latent_grid, resize
    from napari_diffcut.core.pixels import pixel_graph
    from napari_diffcut.core.upsample import soft_upsample

    times: dict[str, float] = {}
    start = time.perf_counter()
    grid = latent_grid(rgb.shape[:2], LATENT)
    graph = pixel_graph(resize(rgb, (grid[0] * PATCH, grid[1] * PATCH)), grid)
    times["pixels"] = time.perf_counter() - start
    tree = build_tree(graph.affinity, grid_shape=grid)
    times["tree"] = time.perf_counter() - start - times["pixels"]
    pixel_leaf = soft_upsample(graph.transition, tree.leaf_of_patch, grid, rgb.shape[:2])
    times["total"] = time.perf_counter() - start
    times["upsample"] = times["total"] - times["pixels"] - times["tree"]
    return Hierarchy(tree, grid), pixel_leaf, times


def refine_available() -> bool:
    """True once ``napari_diffcut.core.refine`` (issue 11, part 2) exists."""
    return importlib.util.find_spec("napari_diffcut.core.refine") is not None


def refined_leaves(rgb: NDArray[np.float32], pixel_leaf: NDArray[np.int64]) -> NDArray[Any] | None:
    """Leaf map after the pixel-edge refinement, or None while core/refine.py is missing.

    Uses ``napari_diffcut.core.refine.refine_leaf_labels(image, pixel_leaf)``
    (issue 11, part 2): it refines the tree's leaves once, so every cut is
    still ``lut[refined]``.
    """
    if not refine_available():
        return None
    from napari_diffcut.core import refine

    fn = getattr(refine, "refine_leaf_labels", None)
    return None if fn is None else np.asarray(fn(rgb, pixel_leaf))


def skimage_ncut(rgb: NDArray[np.float32]) -> NDArray[Any]:
    """scikit-image classic NCut: SLIC superpixels, mean-colour RAG, recursive cut."""
    from skimage import graph, segmentation

    img = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    superpixels = segmentation.slic(img, compactness=30, n_segments=400, start_label=1)
    rag = graph.rag_mean_color(img, superpixels, mode="similarity")
    return graph.cut_normalized(superpixels, rag, rng=0)


def kmeans(rgb: NDArray[np.float32], k: int) -> NDArray[Any]:
    """k-means on pixel colour with the true number of classes."""
    from sklearn.cluster import KMeans

    x = rgb.reshape(-1, rgb.shape[-1])
    return KMeans(k, n_init=3, random_state=0).fit_predict(x).reshape(rgb.shape[:2])


def level_scores(hierarchy: Any, pixel_leaf: NDArray[np.int64], truth: NDArray[np.int64],
                 n_class: int) -> list[float]:
    """Score of every depth level of the full tree (level 0 = one segment)."""
    n_nodes = hierarchy.arrays.n_nodes
    depth = int(hierarchy.arrays.depth.max())
    out = [miou(truth, np.ones_like(pixel_leaf), n_class)]
    for d in range(1, depth + 1):
        out.append(miou(truth, hierarchy.node_lut(1.0, max_level=d)[pixel_leaf], n_class))
    assert n_nodes >= 1
    return out


def score_image(img: NDArray[Any], truth: NDArray[np.int64], use_skimage: bool) -> dict[str, Any]:
    """All columns for one image."""
    from napari_diffcut.core.image import to_rgb

    rgb = to_rgb(img)
    hierarchy, pixel_leaf, times = ours(rgb)
    auto = hierarchy.node_lut("auto")[pixel_leaf]
    levels = level_scores(hierarchy, pixel_leaf, truth, 2)
    row: dict[str, Any] = {
        "auto": miou(truth, auto, 2), "best": max(levels), "one": levels[0],
        "segments": int(np.unique(auto).size), "s_ours": times["total"],
        "s_pixels": times["pixels"], "s_tree": times["tree"], "s_upsample": times["upsample"],
    }
    start = time.perf_counter()
    ref = refined_leaves(rgb, pixel_leaf)
    row["s_refine"] = time.perf_counter() - start if ref is not None else float("nan")
    lut = hierarchy.node_lut("auto")
    row["refine"] = float("nan") if ref is None else miou(truth, lut[ref], 2)
    if use_skimage:
        start = time.perf_counter()
        try:
            row["skimage"] = miou(truth, skimage_ncut(rgb), 2)
        except Exception:  # noqa: BLE001 - cut_normalized can fail (ARPACK error 3)
            row["skimage"] = float("nan")
        row["s_skimage"] = time.perf_counter() - start
    else:
        row["skimage"] = row["s_skimage"] = float("nan")
    start = time.perf_counter()
    row["kmeans"] = miou(truth, kmeans(rgb, 2), 2)
    row["s_kmeans"] = time.perf_counter() - start
    return row


COLUMNS = ("auto", "best", "one", "refine", "skimage", "kmeans", "segments",
           "s_ours", "s_refine", "s_skimage", "s_kmeans")
#: Per-stage seconds of ``s_ours``, printed with ``--stages``.
STAGES = ("s_pixels", "s_tree", "s_upsample")


def main(argv: list[str] | None = None) -> int:
    """Print the quality table (medians over images)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=4, help="images per set (0 = all)")
    parser.add_argument("--no-skimage", action="store_true", help="skip the slow skimage column")
    parser.add_argument("--stages", action="store_true",
                        help="also print the seconds of each stage of s_ours")
    args = parser.parse_args(argv)
    columns = COLUMNS + (STAGES if args.stages else ())
    header = "| set | n | " + " | ".join(columns) + " |"
    print(header)
    print("|" + "---|" * (len(columns) + 2))
    for name, pairs, loader in iter_sets(args.data):
        pairs = pairs[: args.limit] if args.limit else pairs
        rows = [score_image(*loader(i, t), not args.no_skimage) for i, t in pairs]
        med = {c: float(np.nanmedian([r[c] for r in rows])) if any(
            np.isfinite(r[c]) for r in rows) else float("nan") for c in columns}
        cells = ["n/a" if not np.isfinite(med[c]) else
                 (f"{med[c]:.0f}" if c == "segments" else
                  f"{med[c]:.2f}" if c.startswith("s_") else f"{med[c]:.3f}") for c in columns]
        print(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
