"""The one engine API: diffuse -> walk -> cut -> pixel labels.

``iter_segment`` is the generator form (used by the widget's worker): it yields
:class:`Progress` events between UNet calls, captured attention layers and NCut
splits; closing it stops the run promptly. ``segment`` drains it.
``DiffCutEngine`` keeps a loaded model between runs (widget, batch, scripts).
Heavy imports (torch, diffusers) happen only when a diffusion run starts.
"""

from __future__ import annotations

import dataclasses
import platform
import queue
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.hierarchy import Hierarchy, Node, iter_ncut_tree
from napari_diffcut.core.image import (
    NO_CHANNEL_AXIS,
    check_normalize,
    latent_grid,
    resize,
    to_rgb,
)
from napari_diffcut.core.upsample import soft_upsample
from napari_diffcut.core.walk import GRAPHS, aggregate_attention, build_affinity
from napari_diffcut.core.errors import DiffCutError, check_choice, check_int, check_threshold

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BACKBONES = ("diffusion", "pixels")
MODES = ("fast", "inversion")
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
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("mode", self.mode, MODES)
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
        _check_large_image_settings(self)

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
        if kwargs.get("resolution_weights"):
            weights = kwargs["resolution_weights"]
            kwargs["resolution_weights"] = {int(k): v for k, v in weights.items()}
        if kwargs.get("normalize") is not None:
            kwargs["normalize"] = tuple(kwargs["normalize"])
        return cls(**kwargs)


def _check_large_image_settings(s: Settings) -> None:
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


class Segmentation:
    """Result of :func:`segment`: a hierarchy of nested segments at pixel level.

    Label values are tree node ids + 1 (see :mod:`napari_diffcut.core.hierarchy`),
    so a label names its node in :attr:`tree` and stays the same across
    thresholds and levels.

    Parameters
    ----------
    hierarchy : Hierarchy
        The NCut tree on the patch grid.
    pixel_leaf : ndarray of int32, shape (H, W)
        Deepest tree node of every pixel (from the soft upsampling).
    settings : dict
        JSON-serialisable record of the run.
    """

    def __init__(
        self, hierarchy: Hierarchy, pixel_leaf: NDArray[np.integer], settings: dict[str, Any]
    ) -> None:
        self.hierarchy = hierarchy
        self.pixel_leaf = np.asarray(pixel_leaf, np.int32)
        self.settings = settings

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the label images."""
        return (int(self.pixel_leaf.shape[0]), int(self.pixel_leaf.shape[1]))

    @property
    def threshold(self) -> float:
        """NCut threshold in force (the automatic one when the setting is "auto")."""
        return self.hierarchy.threshold

    @property
    def labels(self) -> NDArray[np.uint32]:
        """(H, W) uint32 labels at the chosen threshold; 0 is never a segment."""
        return self.hierarchy.node_lut()[self.pixel_leaf]

    @property
    def levels(self) -> list[NDArray[np.uint32]]:
        """(H, W) uint32 labels per hierarchy level, coarsest first (nested)."""
        return [lut[self.pixel_leaf] for lut in self.hierarchy.level_luts()]

    def cut(self, threshold: float | str) -> NDArray[np.uint32]:
        """Labels for another threshold, instantly (a lookup on the built tree)."""
        return self.hierarchy.node_lut(threshold)[self.pixel_leaf]

    def levels_at(self, threshold: float | str) -> list[NDArray[np.uint32]]:
        """Levels for another threshold, coarsest first."""
        return [lut[self.pixel_leaf] for lut in self.hierarchy.level_luts(threshold)]

    @property
    def tree(self) -> list[Node]:
        """Tree nodes (id, parent, children, cost, size, depth); label = id + 1."""
        return self.hierarchy.tree

    def save(self, path: str) -> Any:
        """Save labels, levels, tree and settings as ``*.diffcut.zarr``.

        See :mod:`napari_diffcut.store`.
        """
        from napari_diffcut.store import save

        return save(self, path)

    def __repr__(self) -> str:
        n = len(np.unique(self.labels))
        return (
            f"Segmentation(shape={self.shape}, segments={n}, levels="
            f"{self.hierarchy.n_levels()}, threshold={self.threshold:.3g})"
        )


class DiffCutEngine:
    """Keeps a loaded model between runs; one engine per widget or batch worker.

    The model is loaded on the first diffusion run and reloaded only when the
    model, device, dtype, revision or pickle setting changes.
    """

    def __init__(self) -> None:
        self._model: Any = None
        self._key: tuple[Any, ...] | None = None

    def model_for(self, settings: Settings) -> Any:
        """The loaded model for ``settings`` (loading it when needed)."""
        from napari_diffcut.attention.model import load_model

        s = settings
        key = (s.model, s.device, s.dtype, s.revision, s.allow_pickle)
        if self._key != key:
            self.unload()
            self._model = load_model(
                settings.model,
                device=settings.device,
                dtype=settings.dtype,
                revision=settings.revision,
                allow_pickle=settings.allow_pickle,
            )
            self._key = key
        return self._model

    @property
    def loaded(self) -> bool:
        """Whether a model is in memory."""
        return self._model is not None

    def unload(self) -> None:
        """Free the model (and GPU memory)."""
        was_cuda = self._model is not None and self._model.device.type == "cuda"
        self._model = None
        self._key = None
        if was_cuda:
            import torch

            torch.cuda.empty_cache()

    def iter_segment(
        self,
        image: Any,
        settings: Settings | None = None,
        *,
        contrast_limits: Any = None,
        out: Any = None,
        **overrides: Any,
    ) -> Generator[Progress, None, Any]:
        """Generator form of :meth:`segment` (see :func:`iter_segment`)."""
        return iter_segment(
            image, settings, engine=self, contrast_limits=contrast_limits, out=out, **overrides
        )

    def segment(
        self,
        image: Any,
        settings: Settings | None = None,
        *,
        contrast_limits: Any = None,
        out: Any = None,
        **overrides: Any,
    ) -> Any:
        """Segment an image (2-D, stack or tiled), reusing this engine's model."""
        gen = self.iter_segment(
            image, settings, contrast_limits=contrast_limits, out=out, **overrides
        )
        return drain(gen)


def make_settings(settings: Settings | None = None, **overrides: Any) -> Settings:
    """Settings from an optional base plus keyword overrides (validated)."""
    base = settings if settings is not None else Settings()
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        valid = sorted(names - {"extra"})
        raise TypeError(f"unknown setting(s) {unknown}; valid settings: {valid}")
    return dataclasses.replace(base, **overrides)


def prepare_image(
    image: NDArray[Any],
    settings: Settings,
    contrast_limits: tuple[float, float] | None = None,
) -> NDArray[np.float32]:
    """Validate a 2-D (Y, X) or (Y, X, C) image and return RGB float32 in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] > 4 and settings.channels is None:
        raise ValueError(
            f"image of shape {arr.shape} has {arr.shape[-1]} channels last; pass "
            "channels=[i, j, k] to pick up to 3, or segment a stack plane by plane"
        )
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 2:
        raise ValueError(
            f"image must be (Y, X) or (Y, X, C) with Y, X >= 2, got shape {arr.shape}"
        )
    return to_rgb(
        arr, channels=settings.channels, normalize=settings.normalize,
        contrast_limits=contrast_limits,
    )


def iter_segment(
    image: Any,
    settings: Settings | None = None,
    *,
    engine: DiffCutEngine | None = None,
    contrast_limits: Any = None,
    out: Any = None,
    **overrides: Any,
) -> Generator[Progress, None, Any]:
    """Segment an image, a stack or a large image, yielding :class:`Progress` events.

    Stages: load, encode, diffuse (one event per UNet call and per captured
    attention layer), walk, cut (one per NCut split), upsample; stacks add
    "plane" events and tiled runs "tile" and "stitch" events. Closing the
    generator stops the run at the next event (for the UNet: within one
    attention layer), so a stack or a tiled run stops within its current
    plane or tile.

    Parameters
    ----------
    image : array-like or list of array-likes
        (..., Y, X) or (..., Y, X, C): numpy, dask or zarr (read one plane or
        tile at a time), or a napari multiscale list (largest level first).
    settings : Settings, optional
        Base settings; ``overrides`` replace fields.
    engine : DiffCutEngine, optional
        Reuse a loaded model.
    contrast_limits : (low, high) or one pair per picked channel, optional
        Intensity window (napari's layer contrast limits) instead of percentiles.
    out : str, Path or array-like, optional
        Where tiled and stacked runs write their labels incrementally (a zarr
        path, or an array with the label shape); by default labels beyond
        ``memory_budget`` go to a zarr array in a temporary folder.

    Returns
    -------
    Segmentation
        For a 2-D image (a :class:`~napari_diffcut.lazy.LazySegmentation`
        with dask labels when they exceed ``memory_budget``).
    StackSegmentation
        For a stack (see :mod:`napari_diffcut.stacks`).
    TiledSegmentation
        For a 2-D image larger than ``tile_size`` (see :mod:`napari_diffcut.tiling`).
    """
    from napari_diffcut.lazy import ImageSource, is_multiscale

    s = make_settings(settings, **overrides)
    engine = engine or DiffCutEngine()
    levels = list(image) if is_multiscale(image) else [image]
    base = ImageSource(levels[0], s.channel_axis, s.channels)
    source, level = base, 0
    if len(levels) > 1 and not _tiled(base, s):
        from napari_diffcut.lazy import choose_level

        latent = yield from _latent_side(s, engine)
        level = choose_level(levels, latent * 8, base.channel_axis)
        axis = NO_CHANNEL_AXIS if base.channel_axis is None else base.channel_axis
        source = ImageSource(levels[level], axis, s.channels)
    info = {"source_level": level, "levels_in": len(levels)} if len(levels) > 1 else {}
    if base.stack_shape:
        from napari_diffcut.stacks import iter_segment_stack

        return (yield from iter_segment_stack(
            source, s, engine=engine, contrast_limits=contrast_limits, out=out,
            plane_shape=base.plane_shape, info=info,
        ))
    if _tiled(base, s):
        from napari_diffcut.tiling import iter_segment_tiled

        return (yield from iter_segment_tiled(
            base, (), s, engine=engine, contrast_limits=contrast_limits, out=out,
        ))
    return (yield from iter_segment_plane(
        source, (), s, engine=engine, contrast_limits=contrast_limits,
        out_shape=base.plane_shape, info=info,
    ))


def _tiled(source: Any, s: Settings) -> bool:
    """Tiled mode: a tile size is set and the plane is larger than one tile."""
    return s.tile_size is not None and max(source.plane_shape) > s.tile_size


def _latent_side(s: Settings, engine: DiffCutEngine) -> Generator[Progress, None, int]:
    """Native latent side of the run (loads the diffusion model when needed)."""
    if s.working_size is not None:
        return s.working_size // PIXELS_PATCH
    if s.backbone == "pixels":
        return PIXELS_NATIVE_LATENT
    yield Progress("load", 0, 1, f"loading {s.model}")
    return int(engine.model_for(s).native_latent)


def _budget_bytes(s: Settings) -> int:
    return int(s.memory_budget) * (1 << 20)


def iter_segment_plane(
    source: Any,
    index: tuple[int, ...],
    s: Settings,
    *,
    engine: DiffCutEngine,
    contrast_limits: Any = None,
    out_shape: tuple[int, int] | None = None,
    info: dict[str, Any] | None = None,
) -> Generator[Progress, None, Segmentation]:
    """Segment one (Y, X) plane of an :class:`~napari_diffcut.lazy.ImageSource` (downscale mode).

    A plane whose float RGB fits the memory budget is read whole (one read
    per plane for dask and zarr) and converted with exact percentiles, as any
    2-D image. Larger planes are read in strips and block-averaged on the fly
    down to about the working size, with percentiles from a strided sample,
    so memory stays bounded. Labels come back at ``out_shape`` (default: the plane's size;
    level 0 for a multiscale input read at a coarser level).
    """
    from napari_diffcut.lazy import working_target

    plane = source.plane_shape
    full = tuple(out_shape or plane)
    if plane[0] * plane[1] * 12 <= _budget_bytes(s):
        # Read whole (one access per plane for dask/zarr); exact percentiles.
        rgb = source.plane_rgb(index, s.normalize, contrast_limits)
    else:
        latent = yield from _latent_side(s, engine)
        limits = source.limits(index, s.normalize, contrast_limits)
        rgb = source.shrunk_rgb(index, working_target(plane, latent), limits)
    record = _base_record(s, source, full)
    if index:
        record["plane_index"] = list(index)
    record.update(info or {})
    return (yield from segment_rgb(rgb, s, engine=engine, record=record, out_shape=full))


def segment_rgb(
    rgb: NDArray[np.float32],
    s: Settings,
    *,
    engine: DiffCutEngine,
    record: dict[str, Any],
    out_shape: tuple[int, ...] | None = None,
    lazy: bool | None = None,
) -> Generator[Progress, None, Segmentation]:
    """Diffuse, walk, cut and upsample an RGB float image in [0, 1] (the 2-D core).

    ``rgb`` may already be shrunk towards the working size; ``out_shape``
    (default: ``rgb``'s) is the size of the label image and sets the latent
    grid's aspect. Labels beyond the memory budget stay lazy
    (:class:`~napari_diffcut.lazy.LazySegmentation`) unless ``lazy`` is False
    (tiles); ``lazy=True`` forces it.
    """
    out_hw = (int((out_shape or rgb.shape)[0]), int((out_shape or rgb.shape)[1]))
    if s.backbone == "pixels":
        from napari_diffcut.core.pixels import pixel_transition

        latent = s.working_size // PIXELS_PATCH if s.working_size else PIXELS_NATIVE_LATENT
        grid = latent_grid(out_hw, latent)
        yield Progress("walk", 0, 1, f"pixels backbone on a {grid[0]}x{grid[1]} grid")
        work = resize(rgb, (grid[0] * PIXELS_PATCH, grid[1] * PIXELS_PATCH))
        record["working_size"] = [grid[0] * PIXELS_PATCH, grid[1] * PIXELS_PATCH]
        transition = pixel_transition(work, grid)
    else:
        grid, transition = yield from _diffuse(
            rgb, s, engine, record, image_shape=out_hw
        )
    record["grid"] = list(grid)
    yield Progress("walk", 1, 1, f"power {s.power}, {s.graph} graph")
    affinity, walk = build_affinity(transition, power=s.power, graph=s.graph, dtype=np.float32)
    del transition
    tree = yield from _cut(affinity, s)
    del affinity
    hierarchy = Hierarchy(tree, grid, s.threshold)
    yield Progress("upsample", 0, 1, f"labels at {out_hw[0]}x{out_hw[1]}")
    record["auto_threshold"] = hierarchy.auto_threshold
    record["tree_nodes"] = tree.n_nodes
    if lazy is None:
        lazy = out_hw[0] * out_hw[1] * 8 > _budget_bytes(s)
    if lazy:
        from napari_diffcut.lazy import LazySegmentation, lazy_pixel_leaf, leaf_maps

        maps, uniq = leaf_maps(walk, tree.leaf_of_patch, grid)
        del walk
        record["lazy_labels"] = True
        yield Progress("upsample", 1, 1, "done (labels computed lazily, block by block)")
        return LazySegmentation(hierarchy, lazy_pixel_leaf(maps, uniq, out_hw), record)
    # Transient upsampling buffers (leaves x rows x width floats, a few of
    # them) follow the memory budget, up to soft_upsample's own cap.
    chunk = int(min(1 << 24, max(1 << 16, _budget_bytes(s) // 32)))
    pixel_leaf = soft_upsample(walk, tree.leaf_of_patch, grid, out_hw, max_elements=chunk)
    yield Progress("upsample", 1, 1, "done")
    return Segmentation(hierarchy, pixel_leaf.astype(np.int32), record)


def relay(
    gen: Generator[Progress, None, Any], prefix: str
) -> Generator[Progress, None, Any]:
    """Re-yield ``gen``'s events with ``prefix`` on their messages; return its value.

    Closing the relay closes ``gen`` (so a cancelled stack or tiled run stops
    its current plane or tile, UNet thread included).
    """
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            yield Progress(event.stage, event.step, event.total, prefix + event.message)
    finally:
        gen.close()


def _cut(affinity: NDArray[np.float64], s: Settings) -> Generator[Progress, None, Any]:
    """NCut tree with one progress event per split."""
    gen = iter_ncut_tree(affinity, min_size=s.min_size, max_depth=s.max_depth, seed=s.seed)
    while True:
        try:
            done, bound = next(gen)
        except StopIteration as stop:
            return stop.value
        yield Progress("cut", done, max(done, bound), f"NCut split {done}")


def _diffuse(
    rgb: NDArray[np.float32],
    s: Settings,
    engine: DiffCutEngine,
    record: dict[str, Any],
    image_shape: tuple[int, int] | None = None,
) -> Generator[Progress, None, tuple[tuple[int, int], NDArray[np.float32]]]:
    """Load the model, encode, run the UNet with capture, aggregate attention.

    ``image_shape`` is the label image's size when ``rgb`` was shrunk already
    (it sets the latent grid's aspect); ``s.working_size`` overrides the
    checkpoint's native working size.
    """
    yield Progress("load", 0, 1, f"loading {s.model}")
    model = engine.model_for(s)
    latent = (
        s.working_size // model.vae_scale_factor if s.working_size else model.native_latent
    )
    grid = latent_grid(image_shape or rgb.shape[:2], latent)
    record.update(
        device_used=str(model.device),
        dtype_used=str(model.dtype).replace("torch.", ""),
        working_size=[grid[0] * model.vae_scale_factor, grid[1] * model.vae_scale_factor],
    )
    yield Progress("encode", 0, 1, f"VAE encode at {record['working_size']}")
    from napari_diffcut.attention.diffuse import encode

    work = resize(rgb, tuple(record["working_size"]))
    latents = encode(model, work)
    factors = (
        {f for f, w in s.resolution_weights.items() if w > 0} if s.resolution_weights else None
    )
    per_res = yield from _attention_in_thread(model, latents, s, factors)
    weights = None
    if s.resolution_weights:
        weights = {
            (grid[0] // f, grid[1] // f): w for f, w in s.resolution_weights.items()
        }
    record["attention_grids"] = [list(g) for g in sorted(per_res, reverse=True)]
    return grid, aggregate_attention(per_res, weights)


class _Cancelled(Exception):  # noqa: N818 - a private control-flow signal
    """Raised inside the UNet forward when the consumer closed the generator."""


def _attention_in_thread(
    model: Any, latents: Any, s: Settings, factors: set[int] | None
) -> Generator[Progress, None, dict[tuple[int, int], NDArray[np.float32]]]:
    """Run the UNet in a helper thread so that progress can be yielded per layer.

    The helper reports each captured layer through a queue; when the generator
    is closed, a flag makes the next captured layer raise, which aborts the
    forward pass within one attention layer.
    """
    from napari_diffcut.attention.capture import self_attention_names
    from napari_diffcut.attention.diffuse import iter_attention

    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    cancel = threading.Event()
    n_layers = len(self_attention_names(model.unet))
    calls = 1 if s.mode == "fast" else s.steps

    def on_layer() -> None:
        if cancel.is_set():
            raise _Cancelled
        events.put(("layer", None))

    def target() -> None:
        try:
            gen = iter_attention(
                model, latents, mode=s.mode, timestep=s.timestep, steps=s.steps,
                noise=s.noise, seed=s.seed, factors=factors, on_layer=on_layer,
            )
            while True:
                try:
                    events.put(("step", next(gen)))
                except StopIteration as stop:
                    events.put(("done", stop.value))
                    return
        except BaseException as exc:  # noqa: BLE001 - relayed to the consumer
            events.put(("error", exc))

    worker = threading.Thread(target=target, name="napari-diffcut-unet", daemon=True)
    worker.start()
    layers = 0
    try:
        while True:
            kind, value = events.get()
            if kind == "layer":
                layers += 1
                yield Progress("diffuse", layers, n_layers * calls,
                               f"attention layer {layers} of ~{n_layers * calls}")
            elif kind == "step":
                yield Progress("diffuse", layers, n_layers * calls,
                               f"UNet call {value[0]} of {value[1]}")
            elif kind == "done":
                return value
            else:
                if isinstance(value, _Cancelled):
                    raise DiffCutError("run cancelled")
                raise value
    finally:
        cancel.set()
        worker.join()


def _base_record(s: Settings, image: Any, out_shape: tuple[int, ...]) -> dict[str, Any]:
    """JSON-serialisable record of everything needed to reproduce the run."""
    from napari_diffcut import __version__

    rec = s.as_dict()
    rec.update(
        napari_diffcut_version=__version__,
        image_shape=list(image.shape),
        image_dtype=str(image.dtype),
        output_shape=list(out_shape),
        python=platform.python_version(),
        numpy=np.__version__,
    )
    if hasattr(image, "picked"):  # an ImageSource: how its axes were read
        rec.update(channel_axis_used=image.channel_axis, channels_used=image.picked)
    if s.backbone == "diffusion":
        import diffusers
        import torch

        rec.update(torch=torch.__version__, diffusers=diffusers.__version__)
    return rec


def drain(
    gen: Generator[Progress, None, Any], progress: Callable[[Progress], None] | None = None
) -> Any:
    """Run a progress generator to the end, passing events to ``progress``."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(event)


def segment(
    image: NDArray[Any],
    *,
    model: str = DEFAULT_MODEL,
    backbone: str = "diffusion",
    device: str = "auto",
    mode: str = "fast",
    power: int = 1,
    graph: str = "walk",
    threshold: float | str = "auto",
    min_size: int = 16,
    max_depth: int = 8,
    seed: int = 0,
    channel_axis: int | str | None = None,
    channels: Sequence[int] | None = None,
    normalize: tuple[float, float] | None = (1.0, 99.8),
    tile_size: int | None = None,
    consistent_stack: bool = False,
    contrast_limits: Any = None,
    out: Any = None,
    progress: Callable[[Progress], None] | None = None,
    engine: DiffCutEngine | None = None,
    **settings: Any,
) -> Any:
    """Zero-shot hierarchical segmentation of an image, a stack or a large image.

    Parameters
    ----------
    image : array-like, shape (..., Y, X) or (..., Y, X, C), or a multiscale list
        Grey, RGB(A) or multichannel; any dtype, any aspect; numpy, dask or
        zarr (read one plane or tile at a time); or a napari multiscale list
        (largest first; run on the level closest to the working size).
        Axes before (Y, X) are a stack, segmented plane by plane.
    model : str
        Hugging Face repo id or local diffusers folder.
    backbone : {"diffusion", "pixels"}
        Stable Diffusion self-attention, or the weight-free colour/position walk.
    device : str
        "auto" (cuda > mps > cpu), "cpu", "cuda", "mps".
    mode : {"fast", "inversion"}
        One UNet call at t=300, or 10 DDIM-inversion steps (see ``steps``).
    power : int
        Walk length k (P^k).
    graph : {"walk", "similarity"}
        Random-walk graph or attention-row similarity.
    threshold : "auto" or float in (0, 1]
        NCut threshold for :attr:`Segmentation.labels`.
    min_size : int
        Minimum segment size in patches (one patch = 8x8 working pixels).
    max_depth : int
        Maximum tree depth.
    seed : int
        Seeds the Lanczos start vectors and any noise.
    channel_axis : int, "none" or None
        Axis holding channels. None infers it: a last axis of at most 4 (or
        any last axis when ``channels`` is given) is channels; otherwise there
        is none (see :func:`~napari_diffcut.core.image.resolve_channel_axis`).
    channels : sequence of int, optional
        Up to 3 channels mapped to R, G, B (default: the first 3; one channel
        is grey).
    normalize : (low, high) percentiles or None
        Per-channel percentile window for non-uint8 data (None: min-max).
    tile_size : int, optional
        Tiled mode: images larger than this many pixels are cut into
        overlapping tiles segmented on their own and stitched (one label per
        object across tile borders). None: downscale mode, the whole image
        at the working size.
    consistent_stack : bool
        Stacks: match segments between neighbouring planes so that a region
        keeps its label through the stack.
    contrast_limits : (low, high) or one pair per picked channel, optional
        Intensity window instead of percentiles (napari's layer limits).
    out : str, Path or array-like, optional
        zarr path or array receiving the labels of tiled and stacked runs.
    progress : callable, optional
        Called with each :class:`Progress` event.
    engine : DiffCutEngine, optional
        Reuse a loaded model across calls.
    **settings
        Further :class:`Settings` fields (dtype, timestep, steps, noise,
        resolution_weights, revision, allow_pickle, working_size,
        tile_overlap, memory_budget).

    Returns
    -------
    Segmentation
        For a 2-D image (labels (Y, X) uint32).
    StackSegmentation
        For a stack: labels (..., Y, X) uint32, per-plane results.
    TiledSegmentation
        For a 2-D image in tiled mode: stitched labels (Y, X) uint32.

    Examples
    --------
    >>> import numpy as np, napari_diffcut
    >>> img = np.zeros((64, 96), np.uint8); img[:, 48:] = 200
    >>> seg = napari_diffcut.segment(img, backbone="pixels", min_size=4)
    >>> seg.labels.shape, len(np.unique(seg.labels)) >= 2
    ((64, 96), True)
    """
    s = make_settings(
        None, model=model, backbone=backbone, device=device, mode=mode, power=power,
        graph=graph, threshold=threshold, min_size=min_size, max_depth=max_depth, seed=seed,
        channel_axis=channel_axis, channels=channels, normalize=normalize,
        tile_size=tile_size, consistent_stack=consistent_stack, **settings,
    )
    gen = iter_segment(image, s, engine=engine, contrast_limits=contrast_limits, out=out)
    return drain(gen, progress)

