"""Run settings and progress events of the per-plane pipeline.

:class:`Settings` holds every option of a run (validated on creation, JSON
round trip through ``as_dict``/``from_dict``); :class:`Progress` is the event
that every stage yields, so callers can show progress and cancel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from napari_diffcut.core.errors import check_choice, check_int, check_threshold
from napari_diffcut.core.image import NO_CHANNEL_AXIS, check_normalize
from napari_diffcut.core.walk import GRAPHS

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


BACKBONES = ("diffusion", "pixels")


MODES = ("fast", "inversion")


#: Where the post-model stages run: "auto" (torch on the model's device iff it is CUDA),
#: "numpy" (the core, on the host), "torch" (:mod:`napari_diffcut.accel`; see ``post``).
POSTS = ("auto", "numpy", "torch")


#: Native latent side of the pixels backbone (same grid as SD 1.5: 64 x 64 patches).
PIXELS_NATIVE_LATENT = 64


PIXELS_PATCH = 8


#: Default memory budget in MiB: label images (and the float RGB of a plane)
#: beyond it are never held whole; they go to zarr or stay lazy (dask).
DEFAULT_MEMORY_BUDGET = 512


@dataclass(frozen=True)
class Progress:
    """A progress event of a run.

    Attributes
    ----------
    stage : str
        "load", "encode", "diffuse", "walk", "cut" or "upsample"; stacks add
        "plane" (step = planes done, total = planes) and tiled runs "tile"
        (tiles done of all) and "stitch"; the events of one plane or tile
        carry a "plane i/n: " or "tile i/n: " prefix in their message.
    step, total : int
        Position within the stage (total may be an upper bound for "cut").
    message : str
        Human-readable status line.
    """

    stage: str
    step: int
    total: int
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """All run settings; validated on creation. ``as_dict`` is JSON-serialisable.

    The model, diffusion, walk and cut settings are described in :func:`segment`.
    Settings for real-size images (issue #4, README "Large images"):

    Attributes
    ----------
    channels : tuple of int or None
        Up to 3 channels mapped to R, G, B (default: the first 3; one is grey).
    normalize : (low, high) or None
        Per-channel percentile window for non-uint8 data; None: min-max.
    channel_axis : int, "none" or None
        Channel axis; None infers it (see
        :func:`~napari_diffcut.core.image.resolve_channel_axis`).
    working_size : int or None
        Side in pixels of a square image at the working size (area kept for
        other aspects); None: the checkpoint's (SD 1.5: 512; pixels backbone: 512).
    tile_size, tile_overlap : int or None
        Tiled mode for planes larger than ``tile_size`` (overlap default
        ``tile_size // 8``, at most ``tile_size // 2``).
    consistent_stack : bool
        Match segments between neighbouring planes of a stack.
    memory_budget : int
        MiB: label images (and a plane's float RGB) beyond it are never held
        whole; labels go to zarr (tiles, stacks) or stay lazy (dask).
    refine : bool
        Move segment edges onto the image's own boundaries (PAMR on the tree's
        leaves, :mod:`napari_diffcut.core.refine`); on by default. Lazy label
        images (beyond the memory budget) are not refined (the record says so).
    post : {"auto", "numpy", "torch"}
        Where aggregation, graph, NCut tree and pixel labels run: "auto" runs
        them in torch on the model's device when that is CUDA, else in numpy;
        "torch" always in torch (on CUDA when the model is there, else on the
        CPU; also for the pixels backbone); "numpy" always on the host. The
        record's ``post_device`` says which ran (:mod:`napari_diffcut.pipeline.accel_plane`).
    """

    model: str = DEFAULT_MODEL
    backbone: str = "diffusion"
    device: str = "auto"
    dtype: str = "auto"
    mode: str = "fast"
    timestep: int = 300
    steps: int = 10
    noise: bool = False
    power: int = 1
    graph: str = "walk"
    threshold: float | str = "auto"
    min_size: int = 16
    max_depth: int = 8
    resolution_weights: dict[int, float] | None = None
    seed: int = 0
    revision: str | None = None
    allow_pickle: bool = False
    channels: tuple[int, ...] | None = None
    normalize: tuple[float, float] | None = (1.0, 99.8)
    channel_axis: int | str | None = None
    working_size: int | None = None
    tile_size: int | None = None
    tile_overlap: int | None = None
    consistent_stack: bool = False
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    refine: bool = True
    post: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("mode", self.mode, MODES)
        check_choice("post", self.post, POSTS)
        check_choice("graph", self.graph, GRAPHS)
        check_int("power", self.power, 1)
        check_int("min_size", self.min_size, 1)
        check_int("max_depth", self.max_depth, 1)
        check_int("steps", self.steps, 1)
        check_int("seed", self.seed, 0)
        check_int("timestep", self.timestep, 0)
        if self.timestep >= 1000:
            raise ValueError(f"timestep must be in [0, 999], got {self.timestep}")
        if self.mode == "inversion" and self.steps > 50:
            raise ValueError(f"steps must be <= 50 (a 50-step DDIM grid), got {self.steps}")
        check_threshold(self.threshold)
        if not isinstance(self.refine, bool):
            raise ValueError(f"refine must be True or False, got {self.refine!r}")
        object.__setattr__(self, "normalize", check_normalize(self.normalize))
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.resolution_weights is not None:
            w = {int(k): float(v) for k, v in dict(self.resolution_weights).items()}
            bad_keys = any(k < 1 or k & (k - 1) for k in w)
            if bad_keys or any(v < 0 for v in w.values()) or not any(w.values()):
                raise ValueError(
                    "resolution_weights must map downsampling factors (1, 2, 4, 8) to "
                    f"weights >= 0 with a positive sum, got {self.resolution_weights!r}"
                )
            object.__setattr__(self, "resolution_weights", w)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a repo id or a folder path, got {self.model!r}")
        check_large_image_settings(self)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the settings."""
        d = dataclasses.asdict(self)
        if d["resolution_weights"] is not None:
            d["resolution_weights"] = {str(k): v for k, v in d["resolution_weights"].items()}
        d["channels"] = list(d["channels"]) if d["channels"] is not None else None
        d["normalize"] = list(d["normalize"]) if d["normalize"] is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Inverse of :meth:`as_dict` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "napari_diffcut_version" in data and "refine" not in data:
            # A record of a version before refinement existed: its labels were not refined.
            kwargs["refine"] = False
        if kwargs.get("resolution_weights"):
            weights = kwargs["resolution_weights"]
            kwargs["resolution_weights"] = {int(k): v for k, v in weights.items()}
        if kwargs.get("normalize") is not None:
            kwargs["normalize"] = tuple(kwargs["normalize"])
        return cls(**kwargs)


def check_large_image_settings(s: Settings) -> None:
    """Validate the channel, working-size, tiling, stack and memory settings (issue #4)."""
    if isinstance(s.channel_axis, str):
        if s.channel_axis.lower() != NO_CHANNEL_AXIS:
            raise ValueError(
                "channel_axis must be an int, None (infer) or 'none', "
                f"got {s.channel_axis!r}"
            )
        object.__setattr__(s, "channel_axis", NO_CHANNEL_AXIS)
    elif s.channel_axis is not None:
        object.__setattr__(s, "channel_axis", check_int("channel_axis", s.channel_axis, -64))
    if s.working_size is not None:
        check_int("working_size", s.working_size, 64)
    if s.tile_size is not None:
        check_int("tile_size", s.tile_size, 64)
    if s.tile_overlap is not None:
        check_int("tile_overlap", s.tile_overlap, 0)
        limit = (s.tile_size or 0) // 2
        if s.tile_size is None or s.tile_overlap > limit:
            raise ValueError(
                f"tile_overlap must be <= tile_size // 2 ({limit}) and needs a tile_size, "
                f"got tile_overlap={s.tile_overlap}, tile_size={s.tile_size}"
            )
    if not isinstance(s.consistent_stack, bool):
        raise ValueError(f"consistent_stack must be True or False, got {s.consistent_stack!r}")
    check_int("memory_budget", s.memory_budget, 1)


def make_settings(settings: Settings | None = None, **overrides: Any) -> Settings:
    """Settings from an optional base plus keyword overrides (validated)."""
    base = settings if settings is not None else Settings()
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        valid = sorted(names - {"extra"})
        raise TypeError(f"unknown setting(s) {unknown}; valid settings: {valid}")
    return dataclasses.replace(base, **overrides)
