"""napari-diffcut benchmarks: speed and memory, stage by stage, against the peers.

Usage::

    python benchmarks/run.py [--quick] [--json OUT.json] [--model DIR] [--device cpu|cuda]
                             [--post auto|numpy|torch|numpy,torch] [--stages-only]

Two parts, run one after the other (never side by side, so they do not slow
each other down):

1. model side, in a child process (bench_pipeline.py): one end-to-end run of
   a full SD 1.5-config UNet + VAE (random weights are fine for timing; default
   /tmp/sd15-random, see napari_diffcut.testing.make_random_model) on a
   512 x 512 image: stage times, ``post_fraction``, ``recut_ms`` and
   ``peak_rss_gib``; then interleaved UNet forwards with and without attention
   capture on the same loaded model: ``capture_overhead``.
2. cut side, in this process (bench_ncut.py): the NCut tree of a 4096-node
   attention-like graph: ``ncut_tree_s``; the DiffCut-style dense baseline:
   ``ncut_speedup_vs_dense``; scikit-learn and scikit-image on the same graph.
3. stages (with ``--device cuda``, ``--post`` or ``--stages-only``), in a child
   process: end-to-end runs per post-model path (``Settings.post``: numpy
   core or torch, issue 14), every stage's seconds from the engine's events
   (:func:`stage_seconds`: encode, diffuse, aggregate, affinity, tree,
   upsample, refine), and how far the paths' results agree.

Every number is measured in this run. Timings are medians of repeats (the
minimum is kept beside them in the JSON); the 1-minute load average before
and after each part is recorded: on a shared machine a load above the core
count means other processes competed for the CPU and times are inflated.
``--quick`` (fewer repeats, one skimage threshold) finishes in about 3 minutes
on 2 idle cores. Without the model folder the model part is skipped and its
keys are null.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench_common import REPO, load_average, machine

#: Targets of issue #5 (CPU, 2 cores); "max" = at most, "min" = at least.
TARGETS: dict[str, tuple[str, float | None]] = {
    "capture_overhead": ("max", 1.20),
    "post_fraction": ("max", 0.20),
    "ncut_tree_s": ("max", 1.0),
    "ncut_speedup_vs_dense": ("min", 10.0),
    "recut_ms": ("max", 50.0),
    "peak_rss_gib": ("max", None),  # model weights + 1.5 GiB, filled in at run time
}

#: Stages of one run, in order, as :func:`stage_seconds` times them.
STAGES = ("encode", "diffuse", "aggregate", "affinity", "tree", "upsample", "refine")

POSTS = ("auto", "numpy", "torch")


def run_model_part(args: argparse.Namespace) -> dict[str, Any]:
    """bench_pipeline.py in a child process; its JSON record, or the reason it is missing."""
    if not os.path.isdir(os.path.join(args.model, "unet")):
        return {"skipped": f"no diffusers model at {args.model} (pass --model DIR)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "pipeline.json")
        cmd = [
            sys.executable,
            os.path.join(REPO, "benchmarks", "bench_pipeline.py"),
            "--model",
            args.model,
            "--device",
            args.device,
            "--out",
            out,
        ]
        if args.quick:
            cmd.append("--quick")
        if args.image:
            cmd += ["--image", args.image]
        print(f"[model part] {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout)[-2000:]
            return {"error": f"bench_pipeline.py exited with {proc.returncode}", "log": tail}
        with open(out, encoding="utf-8") as fh:
            return json.load(fh)


def run_cut_part(args: argparse.Namespace) -> dict[str, Any]:
    """bench_ncut.run in this process."""
    import bench_ncut

    print("[cut part] NCut tree, dense baseline, scikit-learn, scikit-image", flush=True)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    return bench_ncut.run(quick=args.quick, device=device)


def stage_seconds(marks: list[tuple[str, int, int, float]], end: float) -> dict[str, float]:
    """Seconds per stage of one run from its ``(stage, step, total, time)`` event marks.

    Each stage runs from its first event to the next stage's first event:
    encode (VAE, and the UNet up to its first attention layer) to the first
    "diffuse"; diffuse (UNet with capture) to the last "diffuse" (on CUDA the
    torch path waits for the device there); aggregate to the "walk" 1/1 event;
    affinity (pi, walk, graph) to the first "cut"; tree (NCut tree with the
    null costs) to the first "upsample"; upsample (soft pixel labels) to the
    refinement's event ("upsample" 1/2) or the end; refine (PAMR) to the end.
    Both post paths synchronise a CUDA device before each of these events.
    """

    def first(stage: str, step: int | None = None, total: int | None = None) -> float | None:
        for s, st, tot, t in marks:
            if s == stage and step in (None, st) and total in (None, tot):
                return t
        return None

    diffuse = [t for s, _, _, t in marks if s == "diffuse"]
    t_refine = first("upsample", 1, 2)
    t_up = first("upsample")
    points = [
        first("encode"),
        first("diffuse"),
        diffuse[-1],
        first("walk", 1, 1),
        first("cut"),
        t_up,
        t_refine if t_refine is not None else end,
        end,
    ]
    if any(p is None for p in points):
        missing = [STAGES[i] for i, p in enumerate(points[:-1]) if p is None]
        raise ValueError(f"no events for stage(s) {missing}")
    out = {k: b - a for k, a, b in zip(STAGES, points[:-1], points[1:], strict=True)}
    out["post"] = end - diffuse[-1]
    out["total"] = end - marks[0][3]
    return out


def process_use(before: Any, after: Any) -> dict[str, float]:
    """CPU seconds (user + kernel), kernel seconds and minor page faults between two rusages.

    Kernel time on a CPU run is mostly page faults: memory freed and
    re-allocated fresh between stages (attention/heap.py).
    """
    return {
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "kernel_s": after.ru_stime - before.ru_stime,
        "page_faults": float(after.ru_minflt - before.ru_minflt),
    }


def stage_runs(args: argparse.Namespace) -> dict[str, Any]:
    """The stages part (run in a child process): timed end-to-end runs per post path."""
    import statistics

    import numpy as np
    from bench_pipeline import bench_image
    from sklearn.metrics import adjusted_rand_score

    from napari_diffcut.large.dispatch import DiffCutEngine, iter_segment

    # fp32 on the CPU by default, as bench_pipeline.py; --dtype auto times what users get
    # (bf16 + channels-last on CPUs with native bf16).
    dtype = args.dtype or ("float32" if args.device == "cpu" else "auto")
    image = bench_image(args.image)
    engine = DiffCutEngine()
    record: dict[str, Any] = {
        "device": args.device,
        "dtype": dtype,
        "image_shape": list(image.shape),
        "working_size": args.working_size,
        "load_avg": [load_average()],
        "posts": {},
    }
    segs = {}
    for post in args.post.split(","):
        settings = {
            "model": args.model,
            "device": args.device,
            "dtype": dtype,
            "power": 1,
            "post": post,
            "working_size": args.working_size,
        }

        def timed(img: Any, settings: dict[str, Any] = settings) -> tuple[dict[str, float], Any]:
            marks: list[tuple[str, int, int, float]] = []
            gen = iter_segment(img, engine=engine, **settings)
            before = resource.getrusage(resource.RUSAGE_SELF)
            while True:
                try:
                    e = next(gen)
                except StopIteration as stop:
                    out = stage_seconds(marks, time.perf_counter())
                    out.update(process_use(before, resource.getrusage(resource.RUSAGE_SELF)))
                    return out, stop.value
                marks.append((e.stage, e.step, e.total, time.perf_counter()))

        timed(image[::4, ::4])  # warm-up: kernels, thread pools, lazy imports
        runs, seg = [], None
        for _ in range(args.runs or (1 if args.quick else 3)):
            stages, seg = timed(image)
            runs.append(stages)
        segs[post] = seg
        record["posts"][post] = {
            "stages": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
            "total_min": min(r["total"] for r in runs),
            "runs": runs,
            "post_device": seg.settings["post_device"],
            "grid": seg.settings["grid"],
            "segments": int(np.unique(seg.labels).size),
            "tree_nodes": int(seg.hierarchy.arrays.n_nodes),
        }
    record["load_avg"].append(load_average())
    if len(segs) == 2:
        a, b = (s.hierarchy.arrays for s in segs.values())
        (sa, sb) = segs.values()
        same = a.n_nodes == b.n_nodes
        kept = (a.cost < 1) | (b.cost < 1) if same else None
        record["agreement"] = {
            "leaf_ari": float(adjusted_rand_score(a.leaf_of_patch, b.leaf_of_patch)),
            "labels_ari": float(adjusted_rand_score(sa.labels.ravel(), sb.labels.ravel())),
            "max_cost_diff": float(np.max(np.abs(a.cost - b.cost)[kept], initial=0.0))
            if same
            else None,
        }
    return record


def run_stage_part(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`stage_runs` in a child process (its own memory); its record or why it is missing."""
    if not os.path.isdir(os.path.join(args.model, "unet")):
        return {"skipped": f"no diffusers model at {args.model} (pass --model DIR)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "stages.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--stages-child", out]
        cmd += ["--model", args.model, "--device", args.device, "--post", args.post]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if args.runs:
            cmd += ["--runs", str(args.runs)]
        if args.working_size:
            cmd += ["--working-size", str(args.working_size)]
        if args.quick:
            cmd.append("--quick")
        if args.image:
            cmd += ["--image", args.image]
        print(f"[stages part] {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout)[-2000:]
            return {"error": f"stages child exited with {proc.returncode}", "log": tail}
        with open(out, encoding="utf-8") as fh:
            return json.load(fh)


def stage_report(st: dict[str, Any]) -> list[str]:
    """The printed stages table: a column per post path, their ratio when there are two."""
    if "posts" not in st:
        why = st.get("skipped") or st.get("error")
        return ["", f"Stages part not run: {why}", st.get("log", "")]
    posts = list(st["posts"])
    header = ["stage", *(f"{p} ({st['posts'][p]['post_device']})" for p in posts)]
    if len(posts) == 2:
        header.append(f"{posts[1]} / {posts[0]}")
    rows = []
    keys = (*STAGES, "post", "total", "total_min", "cpu_s", "kernel_s", "page_faults")
    for key in keys:
        src = [st["posts"][p] if key == "total_min" else st["posts"][p]["stages"] for p in posts]
        if any(key not in d for d in src):  # records written before these keys
            continue
        vals = [d[key] for d in src]
        ratio = [vals[1] / vals[0] if vals[0] > 0 else None] if len(posts) == 2 else []
        rows.append([key, *vals, *ratio])
    pad = [""] if len(posts) == 2 else []
    for key in ("segments", "tree_nodes"):
        rows.append([key, *(st["posts"][p][key] for p in posts), *pad])
    grid = st["posts"][posts[0]]["grid"]
    n = len(st["posts"][posts[0]]["runs"])
    out = [
        "",
        f"## Stages of one end-to-end run, seconds ({st['device']}, {st['dtype']}, image "
        f"{st['image_shape']}, {grid[0]}x{grid[1]} patch grid; median of {n} run(s))",
        table(rows, header),
    ]
    if "agreement" in st:
        ag = st["agreement"]
        out.append(
            f"Agreement: leaf partition ARI {fmt(ag['leaf_ari'])}, labels ARI "
            f"{fmt(ag['labels_ari'])}, max |cost difference| of accepted splits "
            f"{fmt(ag['max_cost_diff'])}"
        )
    return out


def summary(model: dict[str, Any], cut: dict[str, Any]) -> dict[str, Any]:
    """The headline keys with their targets and whether each is met."""
    values = {
        "capture_overhead": model.get("capture_overhead"),
        "post_fraction": model.get("post_fraction"),
        "ncut_tree_s": cut.get("ncut_tree_s"),
        "ncut_speedup_vs_dense": cut.get("ncut_speedup_vs_dense"),
        "recut_ms": model.get("recut_ms"),
        "peak_rss_gib": model.get("peak_rss_gib"),
    }
    # The same ratios from the fastest sample of each side: less sensitive to
    # other processes than medians when the machine is shared.
    cap, tree = model.get("capture") or {}, cut.get("ncut_tree") or {}
    best = {
        "capture_overhead": cap.get("capture_overhead_of_min"),
        "ncut_tree_s": tree.get("min"),
        "ncut_speedup_vs_dense": (
            cut["dense_tree"]["min"] / tree["min"] if tree and "dense_tree" in cut else None
        ),
        "recut_ms": (model.get("recut") or {}).get("min"),
    }
    targets = dict(TARGETS)
    if model.get("weights_gib") is not None:
        targets["peak_rss_gib"] = ("max", model["weights_gib"] + 1.5)
    met = {}
    for key, value in values.items():
        kind, target = targets[key]
        if value is None or target is None:
            met[key] = None
        else:
            met[key] = value <= target if kind == "max" else value >= target
    if met.get("ncut_speedup_vs_dense") is not None:
        met["ncut_speedup_vs_dense"] &= cut["ari_ours"] >= cut["ari_dense"]
    return {
        "values": values,
        "best": best,
        "targets": {k: t for k, (_, t) in targets.items()},
        "met": met,
    }


def fmt(value: Any, digits: int = 3) -> str:
    """Short number formatting for the tables."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A GitHub-flavoured markdown table."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


def report(result: dict[str, Any]) -> str:
    """The printed report: headline, peers, stages."""
    s, model, cut = result["summary"], result["model"], result["cut"]
    notes = {
        "capture_overhead": "UNet fwd with capture / default (SDPA), SD 1.5 config, 512 px, fp32",
        "post_fraction": "after-model time / (VAE encode + UNet), power 1",
        "ncut_tree_s": "whole NCut tree, 4096-node attention-like graph",
        "ncut_speedup_vs_dense": "dense eigh + 100-threshold baseline / ours, same tree",
        "recut_ms": "Segmentation.cut at 512 x 512 for a new threshold",
        "peak_rss_gib": "peak RSS of the end-to-end run (target: weights + 1.5 GiB)",
    }
    head = [
        [k, s["values"][k], s["best"].get(k), s["targets"][k], s["met"][k], notes[k]] for k in notes
    ]
    out = [
        "## Headline (value: median of repeats; best: from the fastest samples)",
        table(head, ["metric", "value", "best", "target", "met", "what"]),
    ]
    if "ncut_tree" in cut:
        peers = [
            [
                "napari-diffcut (auto threshold)",
                cut["ncut_tree"]["median"],
                cut["ari_ours"],
                cut["ncut_tree"]["segments"],
                "exact sweep, float32 products, deflated Lanczos",
            ],
            [
                f"DiffCut-style dense ({cut['dense_tree']['device']})",
                cut["dense_tree"]["median"],
                cut["ari_dense"],
                cut["dense_tree"]["segments"],
                "torch.linalg.eigh every split",
            ],
            [
                "scikit-learn SpectralClustering",
                cut["sklearn_spectral"]["s"],
                cut["sklearn_spectral"]["ari"],
                cut["sklearn_spectral"]["n_clusters_given"],
                "told the true k",
            ],
        ]
        for r in cut["skimage_cut_normalized"]:
            peers.append(
                [
                    f"scikit-image cut_normalized thresh={r['thresh']}",
                    r["s"],
                    r["ari"],
                    r["segments"],
                    "RAG, 8-neighbour edges of W",
                ]
            )
        out += [
            "",
            f"## NCut on the same {cut['graph']['nodes']}-node graph "
            f"({cut['graph']['regions']} planted regions; graph build "
            f"{fmt(cut['graph_s']['median'])} s, not included)",
            table(peers, ["method", "seconds", "ARI", "segments", "notes"]),
        ]
    if "stages" in model:
        st = model["stages"]
        rows = [
            [k.removesuffix("_s"), st[k]]
            for k in (
                "encode_s",
                "unet_s",
                "aggregate_s",
                "walk_graph_tree_s",
                "upsample_s",
                "post_s",
                "total_s",
            )
        ]
        cap = model["capture"]
        rows += [
            [
                "UNet default, median (min)",
                f"{fmt(cap['unet_default_s']['median'])} ({fmt(cap['unet_default_s']['min'])})",
            ],
            [
                "UNet with capture, median (min)",
                f"{fmt(cap['unet_capture_s']['median'])} ({fmt(cap['unet_capture_s']['min'])})",
            ],
        ]
        out += [
            "",
            f"## End-to-end stages, seconds ({model['device']}, image "
            f"{model['image_shape']}, {model['segments']} segments)",
            table(rows, ["stage", "seconds"]),
        ]
    elif model:
        out += ["", f"Model part not run: {model.get('skipped') or model.get('error')}"]
        if model.get("log"):
            out.append(model["log"])
    if result.get("stages"):
        out += stage_report(result["stages"])
    loads = [
        ("model", model.get("load_avg_e2e")),
        ("capture", model.get("capture", {}).get("load_avg")),
        ("cut", cut.get("load_avg")),
        ("stages", (result.get("stages") or {}).get("load_avg")),
    ]
    cores = result["machine"]["cores"] or 1
    busy = [f"{name} {a:.1f}->{b:.1f}" for name, pair in loads if pair for a, b in [pair]]
    out += [
        "",
        f"Load average (1 min) per part: {', '.join(busy)} on {cores} cores"
        + (
            " - CONTENDED: other processes used the CPU, times are inflated"
            if any(pair and max(pair) > cores for _, pair in loads)
            else ""
        ),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (~3 min on 2 cores)")
    parser.add_argument("--json", metavar="OUT", help="write the full record here")
    parser.add_argument(
        "--model",
        default=os.environ.get("DIFFCUT_BENCH_MODEL", "/tmp/sd15-random"),
        help="diffusers folder with SD 1.5-config weights (random is fine)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (the targets' setting) or cuda")
    parser.add_argument(
        "--image",
        default=None,
        help="image of the end-to-end run (default: scikit-image's astronaut, 512 x 512)",
    )
    parser.add_argument("--skip-model", action="store_true", help="cut part only")
    parser.add_argument("--timeout", type=int, default=1800, help="model part limit, seconds")
    parser.add_argument(
        "--post",
        default=None,
        help="stages part: post-model path(s), auto, numpy, torch or a comma list such as "
        "numpy,torch (default auto; the part runs with --device cuda, --post or --stages-only)",
    )
    parser.add_argument("--stages-only", action="store_true", help="the stages part alone")
    parser.add_argument(
        "--working-size",
        type=int,
        default=None,
        help="stages part: working size in pixels (default the model's; a tiny test model "
        "at 512 gets SD 1.5's 64x64 grid)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="stages part: model dtype (default float32 on cpu, auto on cuda; auto is what "
        "users get: bf16 with channels-last on CPUs with native bf16)",
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="stages part: timed runs per post path (default 3)"
    )
    parser.add_argument("--stages-child", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [p for p in (args.post or "auto").split(",") if p not in POSTS]
    if bad:
        parser.error(f"--post takes {', '.join(POSTS)} or a comma list of them, got {bad}")
    with_stages = args.stages_only or args.post is not None or args.device.startswith("cuda")
    args.post = args.post or "auto"
    if args.stages_child:
        with open(args.stages_child, "w", encoding="utf-8") as fh:
            json.dump(stage_runs(args), fh, indent=1)
        return 0
    started = time.perf_counter()
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine(),
        "load_avg_start": load_average(),
    }
    if args.stages_only:
        model, cut = {"skipped": "--stages-only"}, {"skipped": "--stages-only"}
    else:
        model = {"skipped": "--skip-model"} if args.skip_model else run_model_part(args)
        cut = run_cut_part(args)
    stages = run_stage_part(args) if with_stages else None
    result.update(model=model, cut=cut, stages=stages, summary=summary(model, cut))
    result.update(result["summary"]["values"])
    result["ari_ours"], result["ari_dense"] = cut.get("ari_ours"), cut.get("ari_dense")
    result["wall_s"] = time.perf_counter() - started
    print()
    print(
        f"napari-diffcut benchmarks, {result['date']}, {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores), {'--quick' if args.quick else 'full'} run "
        f"in {result['wall_s']:.0f} s"
    )
    print(report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
