"""``napari-diffcut batch``: the command line of :func:`~napari_diffcut.batch.runner.run_batch`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from napari_diffcut.batch.runner import (
    run_batch,
)

if TYPE_CHECKING:  # pragma: no cover
    pass


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``napari-diffcut batch`` (see :func:`napari_diffcut.cli.main`)."""
    from napari_diffcut.pipeline.options import add_segment_options

    p = subparsers.add_parser(
        "batch",
        help="segment every image of a folder or glob; resumable; optionally on Dask",
        description="Segment every image of INPUT into --out DIR. Images already "
        "done with the same settings are skipped, so the command can be stopped and "
        "run again. Outputs made with other settings are refused unless --overwrite. "
        "Exit status 0 when every image is done, 1 when "
        "some failed (see DIR/diffcut-batch.log), 2 on a usage error.",
    )
    p.add_argument(
        "input",
        help="folder (its images, not subfolders), image file, or quoted glob "
        "such as 'data/**/*.tif'",
    )
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument(
        "--levels",
        action="store_true",
        help="also write every hierarchy level (KEY.levels.tif)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo images whose outputs were made with other settings",
    )
    cluster = p.add_mutually_exclusive_group()
    cluster.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="run on a local Dask cluster of N worker processes (1 thread each)",
    )
    cluster.add_argument(
        "--scheduler",
        default=None,
        help="run on an existing Dask cluster, e.g. tcp://10.0.0.5:8786",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_segment_options(p)
    p.set_defaults(func=_batch_command)
    return p


def _batch_command(args: argparse.Namespace) -> int:
    from napari_diffcut.pipeline.options import settings_from_args

    summary = run_batch(
        args.input,
        args.out,
        settings_from_args(args),
        workers=args.workers,
        scheduler=args.scheduler,
        levels=args.levels,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(summary)
    return 1 if summary.failed else 0
