"""Scripted napari sessions: segment a layer in the calling thread, no widget needed.

:func:`segment_layer` adds (or updates in place) exactly the layers the DiffCut
dock widget adds, so a notebook or script and a click give the same result.
It works with a viewer that was never shown (``napari.Viewer(show=False)``).
The helpers here (:func:`apply_result_layers`, :func:`iter_apply_plan`,
:func:`recut_layer`, :func:`find_result`) are what the widget itself calls
on the GUI thread; taking the image from a layer is
:mod:`~napari_diffcut.plugin.take`.

Intensities: the same percentile mapping as the CLI and the Python API by
default; ``contrast_limits="layer"`` maps through the layer's contrast
limits. The result's settings record says which (``"intensity"``).

napari is imported inside the functions only, so importing this module is
cheap; the functions need napari installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from napari_diffcut.plugin.features import result_kind
from napari_diffcut.plugin.geometry import axes_geometry
from napari_diffcut.plugin.instances import apply_instances, recount_instances
from napari_diffcut.plugin.layers import (
    LayerDataTuple,
    diffcut_meta,
    is_edited,
    is_result_of,
    result_layer_data,
    update_layer,
)
from napari_diffcut.plugin.plan import ExistingLayer, LayerPlan, plan_layer_updates
from napari_diffcut.plugin.take import (
    LAYER_DEFAULT,
    LayerImage,
    layer_image,
    record_intensity,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from napari_diffcut.large.dispatch import DiffCutEngine
    from napari_diffcut.pipeline.segmentation import Segmentation
    from napari_diffcut.pipeline.settings import Progress


def plan_result_layers(viewer: Any, tuples: list[LayerDataTuple]) -> LayerPlan:
    """:func:`~napari_diffcut.plugin.plan.plan_layer_updates` for the layers of ``viewer``."""
    import napari.layers

    existing = [
        ExistingLayer(lay.name, lay.data, lay.metadata, isinstance(lay, napari.layers.Labels))
        for lay in viewer.layers
    ]
    return plan_layer_updates(existing, tuples)


def iter_apply_plan(viewer: Any, plan: LayerPlan) -> Iterator[Any]:
    """Carry out ``plan`` one layer at a time; yields each layer added or updated.

    The widget advances it once per turn of the event loop, so that adding
    several layers never blocks the GUI for long; scripts drain it
    (:func:`apply_result_layers`). Stale levels go first; new levels are
    added before the main layer (which ends up on top) and then tucked right
    below it; a notification says where a protected set went.
    """
    for name in plan.remove:
        if name in viewer.layers:
            viewer.layers.remove(name)
    placed: dict[int, Any] = {}
    for i in [*range(1, len(plan.steps)), 0]:
        name, update, (data, kwargs, _kind) = plan.steps[i]
        if update:
            layer = viewer.layers[name]
            update_layer(layer, data, kwargs)
        else:
            layer = viewer.add_labels(data, **{**kwargs, "name": name})
        placed[i] = layer
        yield layer
    _tuck_new_levels_below_main(viewer, plan, placed)
    if plan.protected:
        from napari.utils.notifications import show_info

        moved = "; ".join(f"{old!r} -> {new!r}" for old, new in plan.protected)
        show_info(
            "DiffCut kept a result you edited (or layers that are not DiffCut results) and "
            f"wrote the new result, main layer and levels together, next to it: {moved}"
        )


def apply_result_layers(viewer: Any, tuples: list[LayerDataTuple]) -> tuple[list[Any], LayerPlan]:
    """Add or update result layers in ``viewer`` as one result set (main and levels).

    Must run on the GUI thread. A result set with an edited layer, and
    layers that are not ours, are never changed: the new result goes to a
    new set (``"<image> diffcut [1]"`` with its levels ``"... level d [1]"``)
    and a notification says where (:mod:`~napari_diffcut.plugin.plan`).

    Returns
    -------
    layers : list of napari.layers.Labels
        In the order of ``tuples`` (main layer first).
    plan : LayerPlan
        What was updated, added, removed or protected.
    """
    plan = plan_result_layers(viewer, tuples)
    done = list(iter_apply_plan(viewer, plan))
    # iter_apply_plan yields levels first, then the main layer.
    return [done[-1], *done[:-1]], plan


def _tuck_new_levels_below_main(viewer: Any, plan: LayerPlan, placed: dict[int, Any]) -> None:
    """Keep the layer list tidy: new level layers go right below the main one."""
    if 0 not in placed:
        return
    for i in sorted(placed):
        if i == 0 or plan.steps[i][1]:  # the main layer, or an existing layer
            continue
        src = viewer.layers.index(placed[i].name)
        dest = viewer.layers.index(placed[0].name)
        if src > dest:
            viewer.layers.move(src, dest)


def find_result(viewer: Any, source: str) -> tuple[Segmentation, Any] | None:
    """The segmentation shown for image ``source`` and its main layer, or None.

    Prefers an unedited main layer (the one a re-run or a re-cut updates),
    lowest ``[n]`` suffix first; falls back to the last main layer.
    """
    import napari.layers

    mains = [
        lay
        for lay in viewer.layers
        if isinstance(lay, napari.layers.Labels)
        and is_result_of(lay.metadata, source, "main")
        and diffcut_meta(lay.metadata).get("segmentation") is not None  # type: ignore[union-attr]
    ]
    if not mains:
        return None
    unedited = [lay for lay in mains if not is_edited(lay.data, lay.metadata)]
    layer = unedited[0] if unedited else mains[-1]
    return diffcut_meta(layer.metadata)["segmentation"], layer  # type: ignore[index]


def recut_layer(viewer: Any, layer: Any, threshold: float | str) -> list[Any]:
    """Re-cut the result of image ``layer`` at another NCut threshold, instantly.

    No model and no eigen solve: the tree is pruned at ``threshold`` and the
    main and level layers are updated in place (edited layers are kept, see
    :func:`apply_result_layers`). The segmentation's own threshold setting is
    set too, so ``Segmentation.labels`` and a saved result match the layer.
    A whole-stack result re-cuts every plane's tree (and matches the planes
    again with ``consistent_stack``).

    Parameters
    ----------
    viewer : napari.Viewer
    layer : napari.layers.Image or str
        The source image layer (or its name).
    threshold : "auto" or float in (0, 1]

    Returns
    -------
    list of napari.layers.Labels
        Main layer first, then levels; empty when ``layer`` has no result.

    Raises
    ------
    ValueError
        The result cannot be re-cut (a tiled result, or a stack whose trees
        were not kept: :func:`~napari_diffcut.plugin.layers.recut_refusal`).
    """
    from napari_diffcut.core.errors import check_threshold

    source = layer if isinstance(layer, str) else layer.name
    setting = check_threshold(threshold)
    found = find_result(viewer, source)
    if found is None:
        return []
    seg, main = found
    meta = diffcut_meta(main.metadata) or {}
    tuples = result_layer_data(
        seg,
        source,
        threshold=setting,
        geometry=axes_geometry(main),
        plane=meta.get("plane"),
    )
    set_segmentation_threshold(seg, setting)
    layers, _ = apply_result_layers(viewer, tuples)
    if layers:
        recount_instances(viewer, layers[0])  # an instance layer follows the cut
    return layers


def set_segmentation_threshold(seg: Any, threshold: float | str) -> None:
    """Make ``seg.labels`` (and its settings record) follow the threshold shown.

    2-D results only: a stack keeps the labels of its run (its layers record
    the threshold shown in their metadata), a tiled result has no threshold
    to change.
    """
    from napari_diffcut.core.errors import check_threshold

    setting = check_threshold(threshold)
    if result_kind(seg) != "tree":
        return
    seg.hierarchy.threshold_setting = setting
    seg.settings["threshold"] = setting


def result_tuples(seg: Any, taken: LayerImage) -> list[LayerDataTuple]:
    """Layer-data tuples of a run on ``taken`` (main first, then levels)."""
    return result_layer_data(seg, taken.source, geometry=taken.geometry, plane=taken.plane)


def warn_alignment(taken: LayerImage) -> None:
    """A napari warning when the result will not overlay its layer (see :class:`LayerImage`)."""
    if not taken.lines_up:
        from napari.utils.notifications import show_warning

        show_warning(f"DiffCut: {taken.alignment_note}")


def segment_layer(
    viewer: napari.Viewer,
    layer: Any,
    *,
    engine: DiffCutEngine | None = None,
    progress: Callable[[Progress], None] | None = None,
    contrast_limits: Any = None,
    run_on: str = "plane",
    instances: bool | int = False,
    **settings: Any,
) -> list[Any]:
    """Segment an image layer in the calling thread and add the result layers.

    Adds, or updates in place, exactly the layers the DiffCut widget makes:
    ``"<image> diffcut"`` (visible, at the chosen threshold) and, for a 2-D
    result, ``"<image> diffcut level d"`` (hidden), with features and
    metadata (see :mod:`napari_diffcut.plugin.layers`). Layers you painted on are
    never overwritten: the new result goes to a new layer instead. The image
    layer and every other layer are left unchanged.

    Parameters
    ----------
    viewer : napari.Viewer
        May be hidden (``napari.Viewer(show=False)``).
    layer : napari.layers.Image or str
        The image layer, or its name: numpy, dask or zarr data, or a
        multiscale pyramid (run on the level nearest the working size;
        labels at level 0's size, lazy beyond ``memory_budget``).
    engine : DiffCutEngine, optional
        Reuse a loaded model across calls (a fresh engine loads it each call).
    progress : callable, optional
        Called with each :class:`~napari_diffcut.pipeline.settings.Progress` event
        (stacks add "plane" events, tiled runs "tile" and "stitch").
    contrast_limits : None, "layer" or (low, high)
        None (default): ``normalize`` percentiles, as the CLI and the API;
        "layer": the layer's contrast limits; a pair: that window (see
        :func:`~napari_diffcut.plugin.take.layer_image`).
    run_on : {"plane", "stack"}
        For a layer with more than two non-channel axes: the displayed 2-D
        plane (default), or the whole stack, plane by plane (one Labels
        layer with the stack's shape, no level layers).
    instances : bool or int
        Also add ``"<image> diffcut instances"``: every connected object
        outside the background (the largest segment) with its own id, and a
        feature table of segment, area and centroid
        (:mod:`napari_diffcut.plugin.instances`); an int is the smallest
        object in pixels (True: 16). Re-cuts recount it. 2-D results only.
    **settings
        :class:`~napari_diffcut.pipeline.settings.Settings` fields: model, backbone,
        device, mode, power, graph, threshold, min_size, max_depth, seed,
        channels, normalize, working_size, tile_size, tile_overlap,
        consistent_stack, memory_budget, ... ``channel_axis`` is an axis of
        the layer's data, or "none"; by default (or None) the layer's own:
        the colour axis of an RGB layer, else an axis labelled "c" or
        "channel", else none.

    Returns
    -------
    list of napari.layers.Labels
        The main layer first, then level 1, 2, ... (2-D results only), then
        the instance layer when asked for.

    Raises
    ------
    ValueError
        ``instances`` with ``run_on="stack"`` (before anything is computed).

    Examples
    --------
    >>> import napari, napari_diffcut as nd  # doctest: +SKIP
    >>> viewer = napari.Viewer(show=False)  # doctest: +SKIP
    >>> image = viewer.open_sample("napari-diffcut", "blood_smear")[0]  # doctest: +SKIP
    >>> out = nd.segment_layer(viewer, image, backbone="pixels")  # doctest: +SKIP
    """
    from napari_diffcut.large.dispatch import DiffCutEngine
    from napari_diffcut.pipeline.engine import drain
    from napari_diffcut.pipeline.settings import make_settings

    channel_axis = settings.pop("channel_axis", LAYER_DEFAULT)
    base = make_settings(None, **settings)  # unknown names and bad values fail first
    min_size = check_instances_option(instances, run_on)
    taken = layer_image(
        viewer,
        layer,
        contrast_limits=contrast_limits,
        run_on=run_on,
        channel_axis=channel_axis,
        memory_budget=base.memory_budget,
    )
    engine = engine if engine is not None else DiffCutEngine()
    gen = engine.iter_segment(
        taken.image, taken.run_settings(base), contrast_limits=taken.contrast_limits
    )
    seg = drain(gen, progress)
    record_intensity(seg, taken.contrast_limits)
    layers, _ = apply_result_layers(viewer, result_tuples(seg, taken))
    if min_size is not None:
        layers.append(apply_instances(viewer, layers[0], min_size))
    warn_alignment(taken)
    return layers


def check_instances_option(instances: bool | int, run_on: str) -> int | None:
    """The smallest instance in pixels asked for (None: no instances), checked up front."""
    from napari_diffcut.core.instances import DEFAULT_MIN_SIZE

    if instances is False or instances is None:
        return None
    if instances is True:
        size = DEFAULT_MIN_SIZE
    elif isinstance(instances, int) and instances >= 1:
        size = int(instances)
    else:
        raise ValueError(
            f"instances must be True, False or a minimum size in pixels >= 1, got {instances!r}"
        )
    if run_on == "stack":
        raise ValueError(
            "instances count objects in a 2-D result; run_on='stack' gives a stack: use "
            "run_on='plane'"
        )
    return size
