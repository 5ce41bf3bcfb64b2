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
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.hierarchy import Hierarchy, Node, iter_ncut_tree
from napari_diffcut.core.image import check_normalize, latent_grid, resize, to_rgb
from napari_diffcut.core.upsample import soft_upsample
from napari_diffcut.core.walk import GRAPHS, aggregate_attention, build_affinity
from napari_diffcut.errors import DiffCutError, check_choice, check_int, check_threshold

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BACKBONES = ("diffusion", "pixels")
MODES = ("fast", "inversion")
#: Native latent side of the pixels backbone (same grid as SD 1.5: 64 x 64 patches).
PIXELS_NATIVE_LATENT = 64
PIXELS_PATCH = 8


@dataclass(frozen=True)
class Progress:
    """A progress event of a run.

    Attributes
    ----------
    stage : str
        "load", "encode", "diffuse", "walk", "cut" or "upsample".
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
    """All run settings; validated on creation. ``as_dict`` is JSON-serialisable."""

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
            if any(k < 1 or k & (k - 1) for k in w) or any(v < 0 for v in w.values()) or not any(w.values()):
                raise ValueError(
                    "resolution_weights must map downsampling factors (1, 2, 4, 8) to "
                    f"weights >= 0 with a positive sum, got {self.resolution_weights!r}"
                )
            object.__setattr__(self, "resolution_weights", w)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a repo id or a folder path, got {self.model!r}")

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
            kwargs["resolution_weights"] = {int(k): v for k, v in kwargs["resolution_weights"].items()}
        if kwargs.get("normalize") is not None:
            kwargs["normalize"] = tuple(kwargs["normalize"])
        return cls(**kwargs)


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
        """Save labels, levels, tree and settings as ``*.diffcut.zarr`` (see :mod:`napari_diffcut.store`)."""
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

        key = (settings.model, settings.device, settings.dtype, settings.revision, settings.allow_pickle)
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
        self, image: NDArray[Any], settings: Settings | None = None, **overrides: Any
    ) -> Generator[Progress, None, Segmentation]:
        """Generator form of :meth:`segment` (see :func:`iter_segment`)."""
        return iter_segment(image, settings, engine=self, **overrides)

    def segment(
        self, image: NDArray[Any], settings: Settings | None = None, **overrides: Any
    ) -> Segmentation:
        """Segment one 2-D image, reusing this engine's model."""
        return drain(self.iter_segment(image, settings, **overrides))


def make_settings(settings: Settings | None = None, **overrides: Any) -> Settings:
    """Settings from an optional base plus keyword overrides (validated)."""
    base = settings if settings is not None else Settings()
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; valid settings: {sorted(names - {'extra'})}")
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
    image: NDArray[Any],
    settings: Settings | None = None,
    *,
    engine: DiffCutEngine | None = None,
    contrast_limits: tuple[float, float] | None = None,
    **overrides: Any,
) -> Generator[Progress, None, Segmentation]:
    """Segment a 2-D image, yielding :class:`Progress` events.

    Stages: load, encode, diffuse (one event per UNet call and per captured
    attention layer), walk, cut (one per NCut split), upsample. Closing the
    generator stops the run at the next event (for the UNet: within one
    attention layer).

    Returns
    -------
    Segmentation
    """
    s = make_settings(settings, **overrides)
    rgb = prepare_image(image, s, contrast_limits)
    out_shape = (int(rgb.shape[0]), int(rgb.shape[1]))
    record = _base_record(s, np.asarray(image), out_shape)
    if s.backbone == "pixels":
        from napari_diffcut.core.pixels import pixel_transition

        grid = latent_grid(out_shape, PIXELS_NATIVE_LATENT)
        yield Progress("walk", 0, 1, f"pixels backbone on a {grid[0]}x{grid[1]} grid")
        work = resize(rgb, (grid[0] * PIXELS_PATCH, grid[1] * PIXELS_PATCH))
        transition = pixel_transition(work, grid)
    else:
        grid, transition = yield from _diffuse(rgb, s, engine or DiffCutEngine(), record)
    record["grid"] = list(grid)
    yield Progress("walk", 1, 1, f"power {s.power}, {s.graph} graph")
    affinity, walk = build_affinity(transition, power=s.power, graph=s.graph)
    del transition
    tree = yield from _cut(affinity, s)
    del affinity
    hierarchy = Hierarchy(tree, grid, s.threshold)
    yield Progress("upsample", 0, 1, f"labels at {out_shape[0]}x{out_shape[1]}")
    pixel_leaf = soft_upsample(walk, tree.leaf_of_patch, grid, out_shape)
    record["auto_threshold"] = hierarchy.auto_threshold
    record["tree_nodes"] = tree.n_nodes
    yield Progress("upsample", 1, 1, "done")
    return Segmentation(hierarchy, pixel_leaf.astype(np.int32), record)


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
    rgb: NDArray[np.float32], s: Settings, engine: DiffCutEngine, record: dict[str, Any]
) -> Generator[Progress, None, tuple[tuple[int, int], NDArray[np.float32]]]:
    """Load the model, encode, run the UNet with capture, aggregate attention."""
    yield Progress("load", 0, 1, f"loading {s.model}")
    model = engine.model_for(s)
    grid = latent_grid(rgb.shape[:2], model.native_latent)
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


class _Cancelled(Exception):
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


def _base_record(s: Settings, image: NDArray[Any], out_shape: tuple[int, int]) -> dict[str, Any]:
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
    if s.backbone == "diffusion":
        import diffusers
        import torch

        rec.update(torch=torch.__version__, diffusers=diffusers.__version__)
    return rec


def drain(gen: Generator[Progress, None, Any], progress: Callable[[Progress], None] | None = None) -> Any:
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
    progress: Callable[[Progress], None] | None = None,
    engine: DiffCutEngine | None = None,
    **settings: Any,
) -> Segmentation:
    """Zero-shot hierarchical segmentation of a 2-D image.

    Parameters
    ----------
    image : array, shape (Y, X) or (Y, X, C)
        Grey, RGB(A) or multichannel (channels last); any dtype, any aspect.
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
    progress : callable, optional
        Called with each :class:`Progress` event.
    engine : DiffCutEngine, optional
        Reuse a loaded model across calls.
    **settings
        Further :class:`Settings` fields (dtype, timestep, steps, noise,
        resolution_weights, revision, allow_pickle, channels, normalize).

    Returns
    -------
    Segmentation

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
        **settings,
    )
    return drain(iter_segment(image, s, engine=engine), progress)

