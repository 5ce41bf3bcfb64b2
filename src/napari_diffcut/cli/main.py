"""Command line: ``napari-diffcut segment IMAGE ...`` (and further subcommands).

A user mistake (bad option value, missing file or model) prints one line
``napari-diffcut: error: ...`` and exits with status 2, never a traceback.
Heavy imports happen only once a command runs, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.core.version import __version__
from napari_diffcut.pipeline.options import (
    UserError,
    add_segment_options,
    print_progress,
    settings_from_args,
)

PROG = "napari-diffcut"

#: Subcommands living in other modules: name -> module with ``add_parser(subparsers)``
#: returning the parser, whose ``func`` default runs the command.
EXTRA_COMMANDS: dict[str, str] = {
    "batch": "napari_diffcut.batch.command",
    "evaluate": "napari_diffcut.evaluation.command",
}


def _segment_command(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_diffcut.files.outputs import OutputRun, plan_outputs
    from napari_diffcut.large.dispatch import DiffCutEngine, iter_segment
    from napari_diffcut.large.sources import open_image
    from napari_diffcut.pipeline.engine import drain

    settings = settings_from_args(args)
    src = Path(args.image)
    out = Path(args.out) if args.out else src.with_name(src.name.split(".")[0] + ".diffcut.tif")
    image, axes = open_image(src, memory_budget=settings.memory_budget)
    if settings.channel_axis is None and axes:
        settings = _channel_axis_from_axes(settings, axes)
    if args.levels:
        _check_levels_possible(image, settings)
    # Every name is checked (inputs, existing files) before anything is computed.
    plan = plan_outputs(
        out, inputs=[src], levels=args.levels, overwrite=args.overwrite,
        need_bytes=_label_bytes(image),
    )
    to_zarr = out.suffix.lower() == ".zarr"
    with OutputRun(plan, own_temp=True) as run:
        staged = run.staged(plan.labels)
        seg = drain(
            iter_segment(
                image, settings, engine=DiffCutEngine(), out=str(staged) if to_zarr else None
            ),
            print_progress(args.quiet),
        )
        record = dict(seg.settings, input=str(src), threshold_used=getattr(seg, "threshold", None))
        if to_zarr and record.get("labels_store"):
            record["labels_store"] = str(plan.labels)
        if axes:
            record["input_axes"] = axes
            used = record.get("channel_axis_used")
            record["labels_axes"] = axes if used is None else axes[:used] + axes[used + 1 :]
        levels = np.stack([np.asarray(v) for v in seg.levels]) if args.levels else None
        run.write(seg.labels, levels, record, write=write_label_output)
        _drop_temporary_store(seg, staged)
        written = run.commit()
    print(f"{src}: {_summary(seg)}")
    for path in written:
        print(f"  wrote {path}")
    return 0


def _label_bytes(image: Any) -> int:
    """Uncompressed size of the label image (an upper bound of the label TIFF)."""
    import math

    from napari_diffcut.large.sources import is_multiscale

    first = image[0] if is_multiscale(image) else image
    shape = tuple(int(n) for n in first.shape)
    if len(shape) >= 3 and shape[-1] <= 4:
        shape = shape[:-1]  # RGB(A) samples share one label
    return 4 * math.prod(shape)


def _check_levels_possible(image: Any, settings: Any) -> None:
    """``--levels`` needs one tree: a 2-D image in downscale mode."""
    from napari_diffcut.large.sources import ImageSource, is_multiscale, is_tiled

    first = image[0] if is_multiscale(image) else image
    try:
        source = ImageSource(first, settings.channel_axis, settings.channels)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if source.stack_shape or is_tiled(source, settings):
        what = f"stack axes {source.stack_shape}" if source.stack_shape else "tiles"
        raise UserError(
            f"--levels needs a 2-D image in downscale mode (one tree); this run has {what}"
        )


def _drop_temporary_store(seg: Any, out: Path) -> None:
    """Remove the temporary zarr folder of a large run once its labels are written."""
    import shutil

    store = getattr(seg, "store", None)
    if store and Path(store).resolve() != out.resolve():
        folder = Path(store).parent
        if folder.name.startswith("napari-diffcut-"):
            shutil.rmtree(folder, ignore_errors=True)
            seg.settings["labels_store"] = None


def _channel_axis_from_axes(settings: Any, axes: str) -> Any:
    """Default ``channel_axis`` from a TIFF's axes string ('C', or 'S' samples)."""
    import dataclasses

    for letter in ("C", "S"):
        if letter in axes and len(axes) >= 3:
            axis = axes.index(letter)
            if letter == "S" and axis == len(axes) - 1:
                return settings  # RGB samples last: inferred anyway
            return dataclasses.replace(settings, channel_axis=axis)
    return settings


def _summary(seg: Any) -> str:
    """One line: segments (and levels, threshold) of any result type."""
    import numpy as np

    if hasattr(seg, "n_labels"):
        return f"{seg.n_labels} segments stitched from {len(seg.tiles)} tiles"
    if hasattr(seg, "stack_shape"):
        return f"{int(np.prod(seg.stack_shape))} planes segmented, labels {seg.shape}"
    labels = seg.labels
    if isinstance(labels, np.ndarray):
        n = int(np.unique(labels).size)
    else:  # lazy labels: count the segments the tree's leaves fall into
        lut = seg.hierarchy.node_lut()
        n = int(np.unique(lut[list(seg.hierarchy.iter_leaves())]).size)
    return f"{n} segments, {len(seg.levels)} levels, threshold {seg.threshold:.3g}"


def write_label_output(path: Path, labels: Any) -> Path:
    """Write labels (numpy, dask or zarr; 2-D or a stack) as TIFF or zarr.

    In-memory labels go through :func:`napari_diffcut.files.io.write_labels`;
    lazy ones are written tile by tile (bounded memory) to a BigTIFF, or to a
    zarr folder when ``path`` ends in ``.zarr`` (nothing to do when the run
    already wrote there).
    """
    import numpy as np

    from napari_diffcut.files.io import write_labels

    if path.suffix.lower() == ".zarr":
        return _write_zarr(path, labels)
    if isinstance(labels, np.ndarray):
        return write_labels(path, labels)
    return _write_tiled_tiff(path, labels)


#: Tile side of label TIFFs written from lazy labels.
TIFF_TILE = 512


def _blocks(shape: tuple[int, ...], side: int) -> Any:
    """(plane index, row slice, column slice) of every tile, in TIFF order."""
    import numpy as np

    for index in np.ndindex(*shape[:-2]):
        for y0 in range(0, shape[-2], side):
            for x0 in range(0, shape[-1], side):
                ys = slice(y0, min(shape[-2], y0 + side))
                yield index, ys, slice(x0, min(shape[-1], x0 + side))


def _write_tiled_tiff(path: Path, labels: Any) -> Path:
    """Tile-by-tile BigTIFF from lazy labels, then rename into place (atomic)."""
    import numpy as np
    import tifffile

    from napari_diffcut.files.io import TIFF_SOFTWARE, atomic_path

    shape = tuple(int(n) for n in labels.shape)

    def tiles() -> Any:
        for index, ys, xs in _blocks(shape, TIFF_TILE):
            tile = np.zeros((TIFF_TILE, TIFF_TILE), np.uint32)
            block = np.asarray(labels[(*index, ys, xs)])
            tile[: block.shape[0], : block.shape[1]] = block
            yield tile

    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            data=tiles(),
            shape=shape,
            dtype=np.uint32,
            tile=(TIFF_TILE, TIFF_TILE),
            compression="zlib",
            bigtiff=True,
            software=TIFF_SOFTWARE,
        )
    return path


def _write_zarr(path: Path, labels: Any) -> Path:
    """Copy labels into a zarr folder block by block (no-op if they live there)."""
    import numpy as np

    from napari_diffcut.large.sources import create_label_store

    store = getattr(getattr(labels, "store", None), "root", None)
    if store is not None and Path(str(store)).resolve() == path.resolve():
        return path
    shape = tuple(int(n) for n in labels.shape)
    dest, _ = create_label_store(shape, str(path))
    for index, ys, xs in _blocks(shape, 1024):
        dest[(*index, ys, xs)] = np.asarray(labels[(*index, ys, xs)])
    return path


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (subcommands registered lazily by module)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Zero-shot segmentation from Stable Diffusion self-attention "
        "(diffuse, walk, cut). See README.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seg = sub.add_parser("segment", help="segment one image, write a label TIFF and settings JSON")
    seg.add_argument("image", help="input image (TIFF, PNG, JPEG, ...)")
    seg.add_argument(
        "--out",
        "-o",
        default=None,
        help="output label TIFF (default: IMAGE stem + .diffcut.tif beside the input)",
    )
    seg.add_argument(
        "--levels", action="store_true", help="also write every hierarchy level (STEM.levels.tif)"
    )
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    seg.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    add_segment_options(seg)
    seg.set_defaults(func=_segment_command)
    for module in EXTRA_COMMANDS.values():
        import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-diffcut`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, DiffCutError, ValueError, FileNotFoundError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
