"""The one engine API: a 2-D image, a stack, a tiled or a multiscale input.

``iter_segment`` is the generator form (used by the widget's worker): it yields
:class:`~napari_diffcut.pipeline.settings.Progress` events between UNet calls,
captured attention layers and NCut splits; closing it stops the run promptly.
``segment`` drains it. ``DiffCutEngine`` keeps a loaded model between runs
(widget, batch, scripts). Heavy imports (torch, diffusers) happen only when a
diffusion run starts.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

from numpy.typing import NDArray

from napari_diffcut.core.image import NO_CHANNEL_AXIS
from napari_diffcut.large.sources import ImageSource, is_multiscale, is_tiled, iter_segment_plane
from napari_diffcut.pipeline.engine import ModelCache, drain
from napari_diffcut.pipeline.plane import latent_side
from napari_diffcut.pipeline.settings import DEFAULT_MODEL, Progress, Settings, make_settings


class DiffCutEngine(ModelCache):
    """Keeps a loaded model between runs; one engine per widget or batch worker.

    The model is loaded on the first diffusion run and reloaded only when the
    model, device, dtype, revision or pickle setting changes.
    """

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
        For a 2-D image (a :class:`~napari_diffcut.pipeline.segmentation.LazySegmentation`
        with dask labels when they exceed ``memory_budget``).
    StackSegmentation
        For a stack (see :mod:`napari_diffcut.large.stacks`).
    TiledSegmentation
        For a 2-D image larger than ``tile_size`` (see :mod:`napari_diffcut.large.tiling`).
    """

    s = make_settings(settings, **overrides)
    engine = engine or DiffCutEngine()
    levels = list(image) if is_multiscale(image) else [image]
    base = ImageSource(levels[0], s.channel_axis, s.channels)
    source, level = base, 0
    if len(levels) > 1 and not is_tiled(base, s):
        from napari_diffcut.large.sources import choose_level

        latent = yield from latent_side(s, engine)
        level = choose_level(levels, latent * 8, base.channel_axis)
        axis = NO_CHANNEL_AXIS if base.channel_axis is None else base.channel_axis
        source = ImageSource(levels[level], axis, s.channels)
    info = {"source_level": level, "levels_in": len(levels)} if len(levels) > 1 else {}
    if base.stack_shape:
        from napari_diffcut.large.stacks import iter_segment_stack

        return (yield from iter_segment_stack(
            source, s, engine=engine, contrast_limits=contrast_limits, out=out,
            plane_shape=base.plane_shape, info=info,
        ))
    if is_tiled(base, s):
        from napari_diffcut.large.tiling import iter_segment_tiled

        return (yield from iter_segment_tiled(
            base, (), s, engine=engine, contrast_limits=contrast_limits, out=out,
        ))
    return (yield from iter_segment_plane(
        source, (), s, engine=engine, contrast_limits=contrast_limits,
        out_shape=base.plane_shape, info=info,
    ))


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
