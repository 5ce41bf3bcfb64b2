"""Time and peak memory of tiled mode against image size.

Each configuration runs in a fresh Python process (so that the peak resident
memory of one run is not hidden by an earlier one) on a synthetic uint8 grey
image with discs, in tiled mode, labels written to zarr once they exceed
``--memory-budget`` MiB. Reported per run: tiles, wall time, time per tile,
tracemalloc peak (numpy and Python allocations; torch's are not traced), the
resident set size before the run (interpreter, libraries, model, the input
image) and the process's maximum resident set size.

Usage::

    python benchmarks/bench_tiling.py                                   # pixels, 1k-8k
    python benchmarks/bench_tiling.py --backbone diffusion --model /tmp/sd15-random \\
        --sizes 1000 --tile-size 512 --working-size 512
    python benchmarks/bench_tiling.py --json out.json

Prints a markdown table and writes JSON (default: benchmarks/results/bench_tiling.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np


def make_image(size: int, seed: int = 0) -> np.ndarray:
    """Grey uint8 field of discs (cells) on a noisy background, ~200 px apart.

    Drawn disc by disc in bounding boxes, so that making an 8k image needs
    no image-sized temporaries (they would inflate the peak RSS).
    """
    rng = np.random.default_rng(seed)
    img = rng.integers(30, 42, (size, size), dtype=np.uint8)
    for cy in range(100, size, 200):
        for cx in range(100 + (cy // 200 % 2) * 100, size, 200):
            r = int(rng.integers(40, 80))
            y0, x0 = max(0, cy - r), max(0, cx - r)
            yy, xx = np.ogrid[y0 : min(size, cy + r), x0 : min(size, cx + r)]
            box = img[y0 : min(size, cy + r), x0 : min(size, cx + r)]
            box[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 170 + int(rng.integers(0, 60))
    return img


def rss_mib() -> float:
    """Current resident set size in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_one(args: argparse.Namespace) -> dict[str, object]:
    """One configuration in this process; returns its measurements."""
    import napari_diffcut
    from napari_diffcut import DiffCutEngine

    image = make_image(args.size)
    settings = {
        "backbone": args.backbone, "tile_size": args.tile_size, "working_size": args.working_size,
        "memory_budget": args.memory_budget, "min_size": args.min_size, "device": "cpu",
    }
    if args.backbone == "diffusion":
        settings["model"] = args.model
    engine = DiffCutEngine()
    if args.backbone == "diffusion":  # load outside the timed run
        napari_diffcut.segment(image[:64, :64], engine=engine, **settings)
    rss_before = rss_mib()
    tracemalloc.start()
    start = time.perf_counter()
    seg = napari_diffcut.segment(image, engine=engine, **settings)
    wall = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tiles = seg.settings.get("tiles", 1)
    return {
        "size": args.size, "backbone": args.backbone, "tile_size": args.tile_size,
        "working_size": seg.settings.get("working_size"), "tiles": tiles,
        "time_s": round(wall, 2), "time_per_tile_s": round(wall / tiles, 3),
        "traced_peak_mib": round(peak / 2**20, 1),
        "rss_before_mib": round(rss_before, 1),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "image_mib": round(image.nbytes / 2**20, 1),
        "labels_mib": round(args.size * args.size * 4 / 2**20, 1),
        "labels_in": "zarr" if getattr(seg, "store", None) else "memory",
        "segments": getattr(seg, "n_labels", None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,2000,4000,8000")
    parser.add_argument("--backbone", choices=("pixels", "diffusion"), default="pixels")
    parser.add_argument("--model", default="/tmp/sd15-random")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--working-size", type=int, default=128)
    parser.add_argument("--min-size", type=int, default=4)
    parser.add_argument("--memory-budget", type=int, default=16)
    default_json = Path(__file__).parent / "results" / "bench_tiling.json"
    parser.add_argument("--json", default=str(default_json))
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.size is not None:
        print(json.dumps(run_one(args)))
        return 0
    from bench_common import load_average, machine

    rows = []
    load_before = load_average()
    for size in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--size", str(size), "--backbone", args.backbone,
               "--model", args.model, "--tile-size", str(args.tile_size),
               "--working-size", str(args.working_size), "--min-size", str(args.min_size),
               "--memory-budget", str(args.memory_budget)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"done {size}", file=sys.stderr)
    header = ("size", "tiles", "time_s", "time_per_tile_s", "traced_peak_mib", "rss_before_mib",
              "max_rss_mib", "image_mib", "labels_mib", "labels_in")
    print(f"backbone={args.backbone} tile_size={args.tile_size} working_size={args.working_size}"
          f" memory_budget={args.memory_budget} MiB; {platform.processor() or platform.machine()}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    context = {"machine": machine(), "load_before": load_before, "load_after": load_average(),
               "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(f"load average {context['load_before']:.1f} -> {context['load_after']:.1f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"args": vars(args), "context": context, "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
