"""Batch throughput: in process, and on a local Dask cluster of 1 and 2 workers.

Usage::

    python benchmarks/bench_batch.py                    # pixels backbone and tiny model
    python benchmarks/bench_batch.py --images 16 --backbones pixels
    python benchmarks/bench_batch.py --model /tmp/sd15-random --backbones model

Each configuration segments the same folder of generated images into a fresh
output folder with :func:`napari_diffcut.batch.runner.run_batch`. "wall" includes
cluster start-up and the model loads (once per worker); "marginal" is the
throughput once running, from two runs: ``(N - 1) / (wall(N) - wall(1))``.
With ``--repeats R`` each wall time is the best of R runs (other load on a
shared machine only ever makes a run slower). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from napari_diffcut.batch.runner import run_batch
from napari_diffcut.pipeline.settings import Settings

CONFIGS = (("in process", None), ("1 worker", 1), ("2 workers", 2))


def _threads(workers: int | None) -> str:
    """Math-library threads of each worker (see napari_diffcut.batch.dask.thread_env)."""
    if workers is None:
        return " (library default threads)"
    from napari_diffcut.batch.dask import thread_env

    n = int(thread_env(workers)["OMP_NUM_THREADS"])
    return f" ({n} thread{'s' if n > 1 else ''} each)"


def make_images(folder: Path, n: int, size: int) -> None:
    """``n`` RGB PNGs: a bright disc at a different place on a dark background."""
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = np.full((size, size, 3), (30, 40, 60), np.uint8)
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2] = (220, 180, 160)
        noise = rng.normal(0, 6, img.shape)
        iio.imwrite(folder / f"img{i:03d}.png", np.clip(img + noise, 0, 255).astype(np.uint8))


def timed_run(images: Path, work: Path, settings: Settings, workers: int | None) -> float:
    """Wall time of one batch into a fresh output folder (checks that nothing failed)."""
    out = work / f"out-{time.perf_counter_ns()}"
    start = time.perf_counter()
    summary = run_batch(images, out, settings, workers=workers)
    wall = time.perf_counter() - start
    if summary.failed or summary.skipped:
        raise RuntimeError(f"benchmark run did not process everything: {summary}")
    shutil.rmtree(out)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per run (default 8)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument(
        "--backbones",
        default="pixels,tiny",
        help="comma list of pixels, tiny (random tiny SD), model (--model)",
    )
    parser.add_argument("--model", default=None, help="diffusers folder for the 'model' backbone")
    parser.add_argument("--repeats", type=int, default=1, help="best of R runs (default 1)")
    args = parser.parse_args()

    reps = range(max(1, args.repeats))
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        many, one = work / "many", work / "one"
        make_images(many, args.images, args.size)
        make_images(one, 1, args.size)
        runs: dict[str, Settings] = {}
        for name in args.backbones.split(","):
            if name == "pixels":
                runs["pixels (64x64 patches)"] = Settings(backbone="pixels")
            elif name == "tiny":
                from napari_diffcut.testing import make_random_model

                tiny = make_random_model(work / "tiny", "tiny")
                runs["tiny random SD (32x32)"] = Settings(model=str(tiny), device="cpu")
            elif name == "model":
                if not args.model:
                    parser.error("--backbones model needs --model FOLDER")
                runs[f"model {Path(args.model).name}"] = Settings(model=args.model)
            else:
                parser.error(f"unknown backbone {name!r}; use pixels, tiny or model")

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(
            f"# bench_batch: {args.images} images of {args.size}x{args.size}, {date.today()}, "
            f"{platform.processor() or platform.machine()}, {cores} cores, "
            f"python {platform.python_version()}, best of {len(reps)}\n"
        )
        print(
            f"| backbone | run | wall, {args.images} images (s) | images/s | "
            "marginal images/s | speed-up vs 1 worker (marginal) |"
        )
        print("|---|---|---:|---:|---:|---:|")
        for label, settings in runs.items():
            marginal_one_worker = None
            for run_name, workers in CONFIGS:
                wall_n = min(timed_run(many, work, settings, workers) for _ in reps)
                wall_1 = min(timed_run(one, work, settings, workers) for _ in reps)
                marginal = (args.images - 1) / max(wall_n - wall_1, 1e-9)
                if workers == 1:
                    marginal_one_worker = marginal
                speedup = (
                    f"{marginal / marginal_one_worker:.2f}x"
                    if marginal_one_worker and workers
                    else ""
                )
                print(
                    f"| {label} | {run_name}{_threads(workers)} | {wall_n:.1f} | "
                    f"{args.images / wall_n:.2f} | {marginal:.2f} | {speedup} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
