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
from napari_diffcut.errors import DiffCutError

PROG = "napari-diffcut"
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

#: Subcommands living in other modules: name -> module with ``add_parser(subparsers)``
#: returning the parser, whose ``func`` default runs the command.
EXTRA_COMMANDS: dict[str, str] = {}


class UserError(Exception):
    """A mistake in the command line; printed without a traceback."""


def _threshold(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in (0, 1], got {text!r}") from None
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
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH percentiles like '1,99.8' or 'none', got {text!r}") from None
    return (lo, hi)


def add_segment_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that segments (segment, batch, evaluate)."""
    g = parser.add_argument_group("segmentation")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hugging Face repo id or local diffusers folder (default: %(default)s)")
    g.add_argument("--backbone", choices=("diffusion", "pixels"), default="diffusion",
                   help="diffusion: Stable Diffusion self-attention; pixels: weight-free colour/position walk")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), float16, bfloat16, float32")
    g.add_argument("--mode", choices=("fast", "inversion"), default="fast",
                   help="fast: one UNet call at --timestep; inversion: --steps DDIM-inversion steps")
    g.add_argument("--timestep", type=int, default=300, help="UNet timestep of fast mode (default 300, DiffSeg)")
    g.add_argument("--steps", type=int, default=10, help="DDIM-inversion steps of 50 (default 10)")
    g.add_argument("--noise", action="store_true", help="fast mode: add seeded DDPM noise (DiffCut style)")
    g.add_argument("--power", type=int, default=1, help="walk length k: use P^k (default 1)")
    g.add_argument("--graph", choices=("walk", "similarity"), default="walk",
                   help="walk: random-walk graph; similarity: cosine of attention rows")
    g.add_argument("--threshold", type=_threshold, default="auto",
                   help="NCut threshold in (0, 1], or auto (default)")
    g.add_argument("--min-size", type=int, default=16, help="minimum segment size in patches (default 16)")
    g.add_argument("--max-depth", type=int, default=8, help="maximum tree depth (default 8)")
    g.add_argument("--resolution-weights", type=_weights, default=None,
                   help="attention weights per downsampling factor, e.g. '1:8,2:4,4:2,8:1'")
    g.add_argument("--seed", type=int, default=0, help="seed of eigen-solver start vectors and noise")
    g.add_argument("--revision", default=None, help="model revision (hub models)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled .bin weights (can run code; only for trusted models)")
    g.add_argument("--channels", type=lambda t: [int(c) for c in t.split(",")], default=None,
                   help="channel indices mapped to RGB, e.g. '0,2,1'")
    g.add_argument("--normalize", type=_percentiles, default=(1.0, 99.8),
                   help="percentiles LOW,HIGH for non-8-bit data (default 1,99.8), or none for min-max")


SETTING_OPTIONS = (
    "model", "backbone", "device", "dtype", "mode", "timestep", "steps", "noise", "power",
    "graph", "threshold", "min_size", "max_depth", "resolution_weights", "seed", "revision",
    "allow_pickle", "channels", "normalize",
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
            print(f"[{time.perf_counter() - start:6.1f}s] {event.stage}: {event.message}", file=sys.stderr)

    return show


def _segment_command(args: argparse.Namespace) -> int:
    from napari_diffcut.engine import DiffCutEngine, drain, iter_segment
    from napari_diffcut.io import read_image, write_json, write_labels

    settings = settings_from_args(args)
    src = Path(args.image)
    out = Path(args.out) if args.out else src.with_name(src.name.split(".")[0] + ".diffcut.tif")
    if out.resolve() == src.resolve():
        raise UserError(f"--out {out} is the input image; choose another file name")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    image = read_image(src)
    seg = drain(iter_segment(image, settings, engine=DiffCutEngine()), print_progress(args.quiet))
    write_labels(out, seg.labels)
    settings_path = out.with_name(out.name.split(".")[0] + ".diffcut.json")
    record = dict(seg.settings, input=str(src), output=str(out), threshold_used=seg.threshold)
    written = [out]
    if args.levels:
        import numpy as np

        levels_path = out.with_name(out.name.split(".")[0] + ".levels.tif")
        write_labels(levels_path, np.stack(seg.levels))
        record["levels_output"] = str(levels_path)
        written.append(levels_path)
    write_json(settings_path, record)
    written.append(settings_path)
    n = len(set(seg.labels.ravel().tolist()))
    print(f"{src}: {n} segments, {len(seg.levels)} levels, threshold {seg.threshold:.3g}")
    for path in written:
        print(f"  wrote {path}")
    return 0


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
    seg.add_argument("--out", "-o", default=None,
                     help="output label TIFF (default: IMAGE stem + .diffcut.tif beside the input)")
    seg.add_argument("--levels", action="store_true", help="also write every hierarchy level (STEM.levels.tif)")
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
