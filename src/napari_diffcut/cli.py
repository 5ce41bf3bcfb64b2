"""Command line: ``napari-diffcut segment IMAGE ...`` (and further subcommands).

A user mistake (bad option value, missing file or model) prints one line
``napari-diffcut: error: ...`` and exits with status 2, never a traceback.
Heavy imports happen only once a command runs, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

from napari_diffcut import __version__
from napari_diffcut.core.errors import DiffCutError

PROG = "napari-diffcut"
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

#: Subcommands living in other modules: name -> module with ``add_parser(subparsers)``
#: returning the parser, whose ``func`` default runs the command.
EXTRA_COMMANDS: dict[str, str] = {
    "batch": "napari_diffcut.batch",
    "evaluate": "napari_diffcut.evaluate",
}


class UserError(Exception):
    """A mistake in the command line; printed without a traceback."""


def _threshold(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a number in (0, 1], got {text!r}"
        ) from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in (0, 1], got {text!r}")
    return value


def _weights(text: str) -> dict[int, float]:
    """'1:8,2:4,4:2,8:1' -> {1: 8.0, 2: 4.0, 4: 2.0, 8: 1.0}."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item]
        return {int(k): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FACTOR:WEIGHT pairs like '1:8,2:4,4:2,8:1', got {text!r}"
        ) from None


def _percentiles(text: str) -> tuple[float, float] | None:
    if text.lower() in ("none", "off", "minmax"):
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LOW,HIGH percentiles like '1,99.8' or 'none', got {text!r}"
        ) from None
    return (lo, hi)


def _channel_axis(text: str) -> int | str:
    if text.lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        msg = f"expected an axis number or 'none', got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def add_segment_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that segments (segment, batch, evaluate)."""
    g = parser.add_argument_group("segmentation")
    add = g.add_argument
    add(
        "--model",
        default=DEFAULT_MODEL,
        help="Hugging Face repo id or local diffusers folder (default: %(default)s)",
    )
    add(
        "--backbone",
        choices=("diffusion", "pixels"),
        default="diffusion",
        help="diffusion: Stable Diffusion self-attention; pixels: weight-free colour/position walk",
    )
    add("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    add(
        "--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), float16, bfloat16, float32"
    )
    add(
        "--mode",
        choices=("fast", "inversion"),
        default="fast",
        help="fast: one UNet call at --timestep; inversion: --steps DDIM-inversion steps",
    )
    add(
        "--timestep",
        type=int,
        default=300,
        help="UNet timestep of fast mode (default 300, DiffSeg)",
    )
    add("--steps", type=int, default=10, help="DDIM-inversion steps of 50 (default 10)")
    add("--noise", action="store_true", help="fast mode: add seeded DDPM noise (DiffCut style)")
    add("--power", type=int, default=1, help="walk length k: use P^k (default 1)")
    add(
        "--graph",
        choices=("walk", "similarity"),
        default="walk",
        help="walk: random-walk graph; similarity: cosine of attention rows",
    )
    add(
        "--threshold",
        type=_threshold,
        default="auto",
        help="NCut threshold in (0, 1], or auto (default)",
    )
    add("--min-size", type=int, default=16, help="minimum segment size in patches (default 16)")
    add("--max-depth", type=int, default=8, help="maximum tree depth (default 8)")
    add(
        "--resolution-weights",
        type=_weights,
        default=None,
        help="attention weights per downsampling factor, e.g. '1:8,2:4,4:2,8:1'",
    )
    add("--seed", type=int, default=0, help="seed of eigen-solver start vectors and noise")
    add("--revision", default=None, help="model revision (hub models)")
    add(
        "--allow-pickle",
        action="store_true",
        help="accept pickled .bin weights (can run code; only for trusted models)",
    )
    add(
        "--channels",
        type=lambda t: [int(c) for c in t.split(",")],
        default=None,
        help="up to 3 channel indices mapped to RGB, e.g. '0,2,1' (default: the first 3)",
    )
    add(
        "--normalize",
        type=_percentiles,
        default=(1.0, 99.8),
        help="percentiles LOW,HIGH for non-8-bit data (default 1,99.8), or none for min-max",
    )
    add(
        "--channel-axis",
        type=_channel_axis,
        default=None,
        help="axis holding channels (e.g. 1 for ZCYX), or 'none'; default: from the TIFF's "
        "axes, else a last axis of at most 4 is channels",
    )
    add(
        "--working-size",
        type=int,
        default=None,
        help="working size in pixels of a square image (default: the model's; SD 1.5: 512)",
    )
    add(
        "--tile-size",
        type=int,
        default=None,
        help="tiled mode: tiles of this many pixels, stitched (default: the whole image at "
        "the working size)",
    )
    add(
        "--tile-overlap",
        type=int,
        default=None,
        help="overlap of neighbouring tiles in pixels (default: tile size / 8)",
    )
    add(
        "--consistent-stack",
        action="store_true",
        help="stacks: a region keeps its label from plane to plane",
    )
    add(
        "--memory-budget",
        type=int,
        default=512,
        help="MiB of labels held in memory; larger label images go to zarr (default 512)",
    )


SETTING_OPTIONS = (
    "model",
    "backbone",
    "device",
    "dtype",
    "mode",
    "timestep",
    "steps",
    "noise",
    "power",
    "graph",
    "threshold",
    "min_size",
    "max_depth",
    "resolution_weights",
    "seed",
    "revision",
    "allow_pickle",
    "channels",
    "normalize",
    "channel_axis",
    "working_size",
    "tile_size",
    "tile_overlap",
    "consistent_stack",
    "memory_budget",
)


def settings_from_args(args: argparse.Namespace) -> Any:
    """Validated :class:`~napari_diffcut.engine.Settings` from parsed options."""
    from napari_diffcut.engine import Settings

    kwargs = {name: getattr(args, name) for name in SETTING_OPTIONS if hasattr(args, name)}
    try:
        return Settings(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def print_progress(quiet: bool) -> Callable[[Any], None] | None:
    """A progress printer for stderr (one line per stage change)."""
    if quiet:
        return None
    last: list[str] = [""]
    start = time.perf_counter()

    def show(event: Any) -> None:
        if event.stage != last[0]:
            last[0] = event.stage
            print(
                f"[{time.perf_counter() - start:6.1f}s] {event.stage}: {event.message}",
                file=sys.stderr,
            )

    return show


def _segment_command(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_diffcut.engine import DiffCutEngine, drain, iter_segment
    from napari_diffcut.io import write_json
    from napari_diffcut.lazy import open_image

    settings = settings_from_args(args)
    src = Path(args.image)
    out = Path(args.out) if args.out else src.with_name(src.name.split(".")[0] + ".diffcut.tif")
    if out.resolve() == src.resolve():
        raise UserError(f"--out {out} is the input image; choose another file name")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    image, axes = open_image(src, memory_budget=settings.memory_budget)
    if settings.channel_axis is None and axes:
        settings = _channel_axis_from_axes(settings, axes)
    if args.levels:
        _check_levels_possible(image, settings)
    to_zarr = out.suffix.lower() == ".zarr"
    seg = drain(
        iter_segment(image, settings, engine=DiffCutEngine(), out=str(out) if to_zarr else None),
        print_progress(args.quiet),
    )
    write_label_output(out, seg.labels)
    _drop_temporary_store(seg, out)
    settings_path = out.with_name(out.name.split(".")[0] + ".diffcut.json")
    threshold = getattr(seg, "threshold", None)
    record = dict(seg.settings, input=str(src), output=str(out), threshold_used=threshold)
    if axes:
        record["input_axes"] = axes
        used = record.get("channel_axis_used")
        record["labels_axes"] = axes if used is None else axes[:used] + axes[used + 1 :]
    written = [out]
    if args.levels:
        levels_path = out.with_name(out.name.split(".")[0] + ".levels.tif")
        write_label_output(levels_path, np.stack([np.asarray(v) for v in seg.levels]))
        record["levels_output"] = str(levels_path)
        written.append(levels_path)
    write_json(settings_path, record)
    written.append(settings_path)
    print(f"{src}: {_summary(seg)}")
    for path in written:
        print(f"  wrote {path}")
    return 0


def _check_levels_possible(image: Any, settings: Any) -> None:
    """``--levels`` needs one tree: a 2-D image in downscale mode."""
    from napari_diffcut.engine import _tiled
    from napari_diffcut.lazy import ImageSource, is_multiscale

    first = image[0] if is_multiscale(image) else image
    try:
        source = ImageSource(first, settings.channel_axis, settings.channels)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if source.stack_shape or _tiled(source, settings):
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

    In-memory labels go through :func:`napari_diffcut.io.write_labels`;
    lazy ones are written tile by tile (bounded memory) to a BigTIFF, or to a
    zarr folder when ``path`` ends in ``.zarr`` (nothing to do when the run
    already wrote there).
    """
    import numpy as np

    from napari_diffcut.io import write_labels

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

    from napari_diffcut.io import atomic_path

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
        )
    return path


def _write_zarr(path: Path, labels: Any) -> Path:
    """Copy labels into a zarr folder block by block (no-op if they live there)."""
    import numpy as np

    from napari_diffcut.lazy import create_label_store

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
