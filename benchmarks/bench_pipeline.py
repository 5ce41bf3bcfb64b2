"""End-to-end run with a diffusion model: stage times, post_fraction, recut, peak memory.

Meant to run in its own process (``benchmarks/run.py`` starts it), so that
the peak resident memory is that of one end-to-end run: load the model, one
small warm-up run (128 x 128: thread pools, lazy imports, kernel set-up), then
the measured run(s) on a 512 x 512 image at power 1 with the default settings
(fast mode, walk graph, automatic threshold). Stage times come from the
engine's own progress events:

- model = VAE encode + UNet with capture: from the "encode" event to the last
  "diffuse" event;
- post = everything after the model: aggregation, walk and graph, NCut tree,
  pixel labels: from the last "diffuse" event to the returned Segmentation.

``peak_rss_gib`` is read right after the measured runs. The same process then
times :func:`bench_capture.unet_forward_times` on the already loaded model
(reported by run.py as ``capture_overhead``).

Run alone: ``python benchmarks/bench_pipeline.py --model /tmp/sd15-random``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
from bench_common import Timing, load_average, peak_rss_gib, weights_gib


def bench_image(path: str | None, size: int = 512) -> np.ndarray:
    """The image of the run: ``path``, else scikit-image's bundled astronaut (512 x 512 RGB)."""
    if path:
        from napari_diffcut.files.io import read_image

        return np.asarray(read_image(path))
    from skimage import data

    img = data.astronaut()
    return img[:size, :size]


def timed_run(image: np.ndarray, engine: Any, **settings: Any) -> tuple[dict[str, float], Any]:
    """One ``iter_segment`` run with a timestamp per progress event; stage times in seconds."""
    from napari_diffcut.large.dispatch import iter_segment

    marks: list[tuple[str, str, float]] = []
    gen = iter_segment(image, engine=engine, **settings)
    start = time.perf_counter()
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            seg = stop.value
            break
        marks.append((event.stage, event.message, time.perf_counter()))
    end = time.perf_counter()

    def first(stage: str) -> float:
        return next(t for s, _, t in marks if s == stage)

    def last(stage: str) -> float:
        return [t for s, _, t in marks if s == stage][-1]

    t_model0, t_model1 = first("encode"), last("diffuse")
    stages = {
        "load_and_prepare_s": t_model0 - start,
        "model_s": t_model1 - t_model0,
        "encode_s": first("diffuse") - t_model0,
        "unet_s": t_model1 - first("diffuse"),
        "aggregate_s": first("walk") - t_model1,
        "walk_graph_tree_s": first("upsample") - first("walk"),
        "upsample_s": end - first("upsample"),
        "post_s": end - t_model1,
        "total_s": end - start,
    }
    stages["post_fraction"] = stages["post_s"] / stages["model_s"]
    return stages, seg


def recut_times(seg: Any, n: int = 25) -> dict[str, Any]:
    """Milliseconds of ``Segmentation.cut`` for ``n`` thresholds spread over the tree's costs."""
    costs = seg.hierarchy.arrays.cost
    costs = np.sort(costs[np.isfinite(costs)])
    taus = np.quantile(costs, np.linspace(0, 1, n)) if costs.size else np.full(n, 0.5)
    timing = Timing()
    for tau in np.clip(taus, 1e-6, 1.0):
        t0 = time.perf_counter()
        seg.cut(float(tau))
        timing.samples.append(1000 * (time.perf_counter() - t0))
    return {**timing.as_dict(), "shape": list(seg.shape), "tree_nodes": len(costs)}


def run(
    model_dir: str, *, quick: bool, device: str = "cpu", image_path: str | None = None
) -> dict[str, Any]:
    """The whole model-side benchmark; returns the JSON record."""
    import torch
    from bench_capture import unet_forward_times

    from napari_diffcut.large.dispatch import DiffCutEngine
    from napari_diffcut.pipeline.settings import Settings

    # fp32 on CPU (the targets' setting); the engine's default (fp16) on CUDA.
    dtype = "float32" if device == "cpu" else "auto"
    settings = {"model": model_dir, "device": device, "dtype": dtype, "power": 1}
    image = bench_image(image_path)
    engine = DiffCutEngine()
    t0 = time.perf_counter()
    engine.model_for(Settings(**settings))
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_gib()
    load_before = load_average()
    warm, _ = timed_run(image[::4, ::4], engine, **settings)  # 128 x 128 warm-up
    runs = []
    seg = None
    for _ in range(1 if quick else 2):
        stages, seg = timed_run(image, engine, **settings)
        runs.append(stages)
    peak = peak_rss_gib()
    pick = min(runs, key=lambda r: r["total_s"]) if len(runs) > 1 else runs[0]
    record: dict[str, Any] = {
        "device": device,
        "dtype": dtype,
        "image_shape": list(image.shape),
        "model_load_s": load_s,
        "warmup_total_s": warm["total_s"],
        "stages": pick,
        "stage_runs": runs,
        "post_fraction": statistics.median(r["post_fraction"] for r in runs),
        "recut": recut_times(seg),
        "segments": int(np.unique(seg.labels).size),
        "peak_rss_gib": peak,
        "rss_after_load_gib": rss_after_load,
        "weights_gib": weights_gib(model_dir),
        "torch_threads": torch.get_num_threads(),
        "load_avg_e2e": [load_before, load_average()],
    }
    record["recut_ms"] = record["recut"]["median"]
    model = engine.model_for(Settings(**settings))
    record["capture"] = unet_forward_times(model, 3 if quick else 5)
    record["capture_overhead"] = record["capture"]["capture_overhead"]
    return record


def main() -> None:
    """Command line: write the record as JSON to ``--out`` (or print it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/sd15-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    record = run(args.model, quick=args.quick, device=args.device, image_path=args.image)
    text = json.dumps(record, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
