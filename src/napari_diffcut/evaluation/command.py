"""``napari-diffcut evaluate``: mIoU and pixel accuracy on the peers' benchmarks.

Per image, a Hungarian matching between ground-truth classes and predicted
segments; over the dataset, IoU per class, mIoU and pixel accuracy, exactly as
DiffSeg and DiffCut compute them (method.md 9.2), with their crops and
resolutions (``--protocol``). Instance masks (``--instances``) also give
foreground IoU and object F1 at IoU 0.5. Results go to a printed table and,
with ``--json OUT``, to OUT plus per-image records in ``OUT.images.jsonl``
that make a long run resumable: rerun the same command to continue.

The library side is :mod:`napari_diffcut.evaluation`; this module only parses
options and prints (no torch at import time).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from napari_diffcut.pipeline.options import UserError, add_segment_options, settings_from_args


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to the CLI's subparsers."""
    from napari_diffcut.evaluation.datasets import DATASETS
    from napari_diffcut.evaluation.protocols import PROTOCOLS

    p = subparsers.add_parser(
        "evaluate",
        help="score segmentations against ground truth (COCO-Stuff-27, Cityscapes, a folder)",
        description=(
            "Per-image Hungarian matching, then mIoU and pixel accuracy over the dataset, as "
            "DiffSeg and DiffCut compute them. With --json OUT the per-image results are kept in "
            "OUT.images.jsonl and a rerun of the same command continues where it stopped."
        ),
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=DATASETS,
        help="benchmark layout under --root",
    )
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument(
        "--json",
        default=None,
        metavar="OUT",
        help="results JSON (per-image records in OUT.images.jsonl, for resuming)",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images")
    p.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default=None,
        help="crop and sizes: diffseg (centre crop, 512 in, scored at 512; default for "
        "coco-stuff-27 and cityscapes), diffcut (centre crop, 1024 in, scored at 128), "
        "native (whole image at its size; default for folder)",
    )
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="override the protocol's input size",
    )
    p.add_argument(
        "--score-size",
        type=int,
        default=None,
        help="override the protocol's scoring size",
    )
    p.add_argument("--split", default="val", help="COCO / Cityscapes split (default: val)")
    p.add_argument(
        "--image-list",
        default=None,
        help="coco-stuff-27: other image ids, one per line (default: the curated 2,175)",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="coco-stuff-27: skip listed images not on disk (not comparable with papers)",
    )
    p.add_argument(
        "--instances",
        action="store_true",
        help="folder: masks are instance labels (0 = background); adds foreground "
        "IoU and object F1 at IoU 0.5",
    )
    p.add_argument(
        "--masks-dir",
        default=None,
        help="folder: mask folder name (default: masks, else labels)",
    )
    p.add_argument(
        "--n-classes",
        type=int,
        default=None,
        help="folder, semantic masks: classes are the values 0..N-1 (default: every value "
        "present in the masks is a class)",
    )
    p.add_argument(
        "--ignore-index",
        type=int,
        default=None,
        help="folder: unlabelled mask value (semantic default 255; -1 for 0/255 binary masks)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard per-image results of an earlier run",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no per-image progress on stderr")
    add_segment_options(p)
    p.set_defaults(func=_evaluate_command)
    return p


def _dataset(args: argparse.Namespace) -> Any:
    from napari_diffcut.evaluation import datasets as ds

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.dataset != "folder" and (
        args.instances
        or args.masks_dir
        or args.n_classes is not None
        or args.ignore_index is not None
    ):
        raise UserError(
            "--instances, --masks-dir, --n-classes and --ignore-index apply to --dataset folder "
            f"only (got --dataset {args.dataset})"
        )
    if args.dataset == "coco-stuff-27":
        return ds.coco_stuff_27(
            args.root,
            split=args.split,
            image_list=args.image_list,
            allow_missing=args.allow_missing,
            limit=args.limit,
        )
    if args.image_list or args.allow_missing:
        raise UserError("--image-list and --allow-missing apply to --dataset coco-stuff-27 only")
    if args.dataset == "cityscapes":
        return ds.cityscapes(args.root, split=args.split, limit=args.limit)
    if args.n_classes is not None and args.n_classes < 1:
        raise UserError(f"--n-classes must be >= 1, got {args.n_classes}")
    return ds.folder(
        args.root,
        instances=args.instances,
        masks_dir=args.masks_dir,
        n_class=args.n_classes,
        ignore_index=args.ignore_index,
        limit=args.limit,
    )


def _pct(x: float | None) -> str:
    return "    -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}"


def format_table(result: dict[str, Any]) -> str:
    """The printed summary of a results dict (percentages, as the papers print them)."""
    from napari_diffcut.evaluation.protocols import Protocol, protocol_summary

    p = Protocol(**result["protocol"])
    lines = [
        f"{result['dataset']}: {result['n_images']} of {result['n_selected']} images scored, "
        f"protocol {protocol_summary(p)}",
        f"  mIoU            {_pct(result['miou'])} %",
        f"  pixel accuracy  {_pct(result['pixel_accuracy'])} %",
    ]
    if result.get("mean_segments") is not None:
        lines.append(f"  segments/image  {result['mean_segments']:7.1f}")
    if result.get("seconds_per_image") is not None:
        lines.append(f"  s/image         {result['seconds_per_image']:7.2f}")
    inst = result.get("instances")
    if inst:
        fg, fg_mean = _pct(inst["fg_iou"]), _pct(inst["fg_iou_mean"])
        f1, prec, rec = (_pct(inst[k]) for k in ("object_f1", "object_precision", "object_recall"))
        matched, true, pred = (
            int(inst[k]) for k in ("objects_matched", "objects_true", "objects_pred")
        )
        lines += [
            f"  foreground IoU  {fg} %   (mean per image {fg_mean} %)",
            f"  object F1@0.5   {f1} %   (precision {prec} %, recall {rec} %; "
            f"{matched} matched of {true} true, {pred} predicted objects)",
        ]
    lines.append(f"  {'class':<18} {'IoU %':>6} {'TP':>12} {'FP':>12} {'FN':>12}")
    for row in result["per_class"]:
        counts = f"{row['tp']:>12} {row['fp']:>12} {row['fn']:>12}"
        lines.append(f"  {row['class']:<18} {_pct(row['iou']):>6} {counts}")
    return "\n".join(lines)


def _progress_printer(quiet: bool) -> Any:
    if quiet:
        return None
    start = time.perf_counter()
    state = {"first": True}

    def show(event: Any) -> None:
        if state["first"] and event.skipped:
            print(f"resuming: {event.skipped} image(s) already scored", file=sys.stderr)
        state["first"] = False
        rec = event.record
        elapsed = time.perf_counter() - start
        print(
            f"[{event.index}/{event.total}] {event.name}: {rec['segments']} segments, "
            f"{rec['seconds']:.1f} s; running mIoU {_pct(event.miou).strip()} %, "
            f"acc {_pct(event.pixel_accuracy).strip()} % ({elapsed:.0f} s)",
            file=sys.stderr,
        )

    return show


def _evaluate_command(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_diffcut.evaluation.protocols import make_protocol
    from napari_diffcut.evaluation.runner import evaluate
    from napari_diffcut.large.dispatch import DiffCutEngine

    settings = settings_from_args(args)
    dataset = _dataset(args)
    protocol = make_protocol(
        args.protocol or dataset.default_protocol, args.input_size, args.score_size
    )
    engine = DiffCutEngine()
    run_info: dict[str, Any] = {}

    def predict(image: Any) -> tuple[Any, dict[str, Any]]:
        seg = engine.segment(image, settings)
        if not run_info:
            keys = (
                "device_used",
                "dtype_used",
                "napari_diffcut_version",
                "torch",
                "diffusers",
                "numpy",
            )
            run_info.update({k: seg.settings[k] for k in keys if k in seg.settings})
        # Tiled runs return other result types (lazy labels, no single threshold).
        threshold = getattr(seg, "threshold", None)
        extra = {"threshold": round(float(threshold), 6)} if threshold is not None else {}
        return np.asarray(seg.labels), extra

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    meta = {"options": options, "run": run_info}
    try:
        result = evaluate(
            dataset,
            predict,
            protocol,
            out=args.json,
            config={"settings": settings.as_dict()},
            restart=args.restart,
            progress=_progress_printer(args.quiet),
            meta=meta,
        )
    except KeyboardInterrupt:
        if args.json:
            print(
                "interrupted; per-image results are kept: rerun the same command to continue",
                file=sys.stderr,
            )
        raise
    print(format_table(result))
    if args.json:
        print(f"  wrote {args.json} and {result['per_image_results']}")
    return 0
