"""Run settings spelled as command-line options, shared by every command.

``segment``, ``batch`` and ``evaluate`` take the same options; they are
declared once here (:func:`add_segment_options`) and turned into validated
:class:`~napari_diffcut.pipeline.settings.Settings` by :func:`settings_from_args`.
Only the standard library is imported, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from napari_diffcut.attention.preflight import check_device_name, check_dtype_name

#: The default model, spelled here rather than imported: importing
#: :mod:`napari_diffcut.pipeline.settings` pulls in numpy and scipy (about 1 s),
#: and every command line, even a mistaken one, builds these options.
#: tests/cli/test_cli.py checks it equals ``settings.DEFAULT_MODEL``.
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


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


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type for integers in [minimum, maximum]: a one-line error at parse
    time, before the settings module (numpy, scipy) is imported."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value

    return convert


def _checked(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse type from a ``ValueError``-raising check (a one-line usage error)."""

    def convert(text: str) -> str:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


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
    # Spellings are checked here, before torch is imported (a mistake answers at once);
    # whether CUDA or MPS is there is known only once torch is.
    add(
        "--device",
        type=_checked(check_device_name),
        default="auto",
        help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps",
    )
    add(
        "--dtype",
        type=_checked(check_dtype_name),
        default="auto",
        help="auto (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), float16, "
        "bfloat16, float32",
    )
    add(
        "--mode",
        choices=("fast", "inversion"),
        default="fast",
        help="fast: one UNet call at --timestep; inversion: --steps DDIM-inversion steps",
    )
    add(
        "--timestep",
        type=at_least(0, 999),
        default=300,
        help="UNet timestep of fast mode (default 300, DiffSeg)",
    )
    add("--steps", type=at_least(1), default=10, help="DDIM-inversion steps of 50 (default 10)")
    add("--noise", action="store_true", help="fast mode: add seeded DDPM noise (DiffCut style)")
    add("--power", type=at_least(1), default=1, help="walk length k: use P^k (default 1)")
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
    add(
        "--min-size",
        type=at_least(1),
        default=16,
        help="minimum segment size in patches (default 16)",
    )
    add("--max-depth", type=at_least(1), default=8, help="maximum tree depth (default 8)")
    add(
        "--resolution-weights",
        type=_weights,
        default=None,
        help="attention weights per downsampling factor, e.g. '1:8,2:4,4:2,8:1'",
    )
    add("--seed", type=at_least(0), default=0, help="seed of eigen-solver start vectors and noise")
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
        type=at_least(64),
        default=None,
        help="working size in pixels of a square image (default: the model's; SD 1.5: 512)",
    )
    add(
        "--tile-size",
        type=at_least(64),
        default=None,
        help="tiled mode: tiles of this many pixels, stitched (default: the whole image at "
        "the working size)",
    )
    add(
        "--tile-overlap",
        type=at_least(0),
        default=None,
        help="overlap of neighbouring tiles in pixels (default: tile size / 8)",
    )
    add(
        "--consistent-stack",
        action="store_true",
        help="stacks: a region keeps its label from plane to plane",
    )
    add(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="move segment edges onto the image's own boundaries (PAMR on the tree's leaves; "
        "default on, --no-refine keeps the patch-grid edges)",
    )
    add(
        "--post",
        choices=("auto", "numpy", "torch"),
        default="auto",
        help="where the stages after the model run: auto (torch on the GPU when the model is "
        "on CUDA, else numpy), numpy, or torch (on the model's GPU, else the CPU)",
    )
    add(
        "--memory-budget",
        type=at_least(1),
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
    "refine",
    "post",
)


def settings_from_args(args: argparse.Namespace) -> Any:
    """Validated :class:`~napari_diffcut.pipeline.settings.Settings` from parsed options."""
    from napari_diffcut.pipeline.settings import Settings

    kwargs = {name: getattr(args, name) for name in SETTING_OPTIONS if hasattr(args, name)}
    try:
        return Settings(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def print_progress(quiet: bool, stream: TextIO | None = None) -> Callable[[Any], None] | None:
    """A live status line for a terminal: the current stage, rewritten in place.

    The command prints one line per image when it is done; the stages of the
    run in between (load, encode, diffuse, walk, cut, upsample) are shown on
    one line that each new stage overwrites, and only when ``stream`` (default:
    stderr) is a terminal, so logs and pipes get the per-image lines alone.
    Returns None (no progress) when ``quiet`` or not a terminal.
    """
    out = stream if stream is not None else sys.stderr
    if quiet or not (hasattr(out, "isatty") and out.isatty()):
        return None
    last: list[str] = [""]
    start = time.perf_counter()

    def show(event: Any) -> None:
        if event.stage != last[0]:
            last[0] = event.stage
            width = shutil.get_terminal_size((100, 20)).columns - 1
            line = f"[{time.perf_counter() - start:6.1f}s] {event.stage}: {event.message}"
            out.write("\r" + line[:width].ljust(width))
            out.flush()

    return show


def clear_progress(stream: TextIO | None = None) -> None:
    """Erase the live status line (before the per-image line is printed)."""
    out = stream if stream is not None else sys.stderr
    if hasattr(out, "isatty") and out.isatty():
        width = shutil.get_terminal_size((100, 20)).columns - 1
        out.write("\r" + " " * width + "\r")
        out.flush()
