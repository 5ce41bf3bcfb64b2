"""What the widget's form means: pure functions from field values to run settings.

No Qt here, so every rule is testable alone: the channel text, the channel
axis choices of a layer, the note on what a run covers, and the one place the
form becomes :class:`~napari_diffcut.pipeline.settings.Settings`
(:func:`settings_from_fields`; new settings such as ``refine`` or
``instances`` are one more key in :class:`FormFields`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from napari_diffcut.pipeline.settings import Settings, make_settings
from napari_diffcut.plugin.geometry import displayed_plane_axes, lines_up, plane_selection
from napari_diffcut.plugin.take import FROM_LAYER, LayerDefaults

DEVICES = ("auto", "cpu", "cuda", "mps")
GRAPHS = ("walk", "similarity")
RUN_ON_CHOICES = (("displayed plane", "plane"), ("whole stack", "stack"))


@dataclass(frozen=True)
class FormFields:
    """The values of the form's fields, as the widgets hold them.

    ``working_size`` and ``tile_size`` are 0 for "off" (the model's own size,
    no tiles); ``tile_overlap`` is None for "auto"; ``channel_axis`` is an
    axis of the layer's data or "none"; ``channels`` is the text typed.
    ``instances`` (with ``instance_min_size`` pixels) is no run setting: the
    widget counts the result's objects after the run
    (:mod:`~napari_diffcut.plugin.instances`).
    """

    model: str = ""
    backbone: str = "diffusion"
    device: str = "auto"
    mode: str = "fast"
    power: int = 1
    graph: str = "walk"
    min_size: int = 16
    max_depth: int = 8
    seed: int = 0
    working_size: int = 0
    tile_size: int = 0
    tile_overlap: int | None = None
    channel_axis: Any = "none"
    channels: str = ""
    consistent_stack: bool = False
    layer_contrast_limits: bool = False
    refine: bool = True
    instances: bool = False
    instance_min_size: int = 16


def parse_channels(text: str) -> tuple[int, ...] | None:
    """'0, 2, 1' -> (0, 2, 1); '' -> None (first three channels).

    Examples
    --------
    >>> parse_channels(" 0, 2,1"), parse_channels("")
    ((0, 2, 1), None)
    """
    text = text.strip()
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(
            f"channels must be empty or comma-separated channel indices like 0,1,2, got {text!r}"
        ) from None


def settings_from_fields(
    fields: FormFields, threshold: float | str
) -> tuple[Settings, tuple[float, float] | str | None]:
    """Validated run settings and the ``contrast_limits`` choice of a form.

    The intensity mapping is the settings' own (``Settings.normalize``, as
    in the CLI) unless ``layer_contrast_limits``: then the layer's contrast
    limits (:data:`~napari_diffcut.plugin.take.FROM_LAYER`).
    """
    tile = int(fields.tile_size)
    overlap = fields.tile_overlap
    working = int(fields.working_size)
    has_channels = fields.channel_axis != "none"
    settings = make_settings(
        model=fields.model.strip(),
        backbone=fields.backbone,
        device=fields.device,
        mode=fields.mode,
        power=int(fields.power),
        graph=fields.graph,
        min_size=int(fields.min_size),
        max_depth=int(fields.max_depth),
        seed=int(fields.seed),
        threshold=threshold,
        channel_axis=fields.channel_axis,
        channels=parse_channels(fields.channels) if has_channels else None,
        working_size=working if working > 0 else None,
        tile_size=tile if tile > 0 else None,
        tile_overlap=int(overlap) if tile > 0 and overlap is not None else None,
        consistent_stack=bool(fields.consistent_stack),
        refine=bool(fields.refine),
    )
    return settings, (FROM_LAYER if fields.layer_contrast_limits else None)


def level0_shape(layer: Any) -> tuple[int, ...]:
    """Shape of a layer's data (level 0 of a pyramid), colour axis included."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return tuple(int(n) for n in data.shape)


def channel_axis_choices(layer: Any) -> list[tuple[str, Any]]:
    """Channel axis choices of a layer: its RGB axis only, or "none" and each axis."""
    shape = level0_shape(layer)
    if getattr(layer, "rgb", False):
        return [(f"{len(shape) - 1}: RGB ({shape[-1]})", len(shape) - 1)]
    labels = list(getattr(layer, "axis_labels", None) or [str(a) for a in range(len(shape))])
    return [("none", "none")] + [(f"{a}: {labels[a]} ({shape[a]})", a) for a in range(len(shape))]


def coverage_notes(
    layer: Any,
    found: LayerDefaults,
    run_on: str,
    dims_ndim: int,
    displayed: Sequence[int],
    point: Sequence[float],
) -> list[str]:
    """What a run of ``layer`` covers: the displayed plane, the whole stack, a pyramid level.

    ``dims_ndim``, ``displayed`` and ``point`` are the viewer's ``dims``.
    """
    notes: list[str] = []
    kept = found.kept_axes
    if found.stacked and run_on == "stack":
        full = level0_shape(layer)
        shape = (*found.stack_shape, *(full[a] for a in kept[-2:]))
        notes.append(
            f"whole stack: {found.n_planes} planes, one at a time; labels of shape {shape}"
        )
    elif found.stacked:
        try:
            axes = displayed_plane_axes(layer.ndim, dims_ndim, tuple(displayed), kept[-2:])
            cax = found.channel_axis
            whole = (*axes, *([cax] if cax is not None and cax < layer.ndim else []))
            position = layer.world_to_data(point)
            _, plane = plane_selection(level0_shape(layer)[: layer.ndim], position, whole)
            where = ", ".join(f"axis {a} = {i}" for a, i in enumerate(plane) if i is not None)
            notes.append(f"{len(kept)}-D layer: segments the displayed plane only ({where})")
        except ValueError as exc:
            notes.append(str(exc))
        kept = kept[-2:]
    if found.levels > 1:
        notes.append(
            f"multiscale ({found.levels} levels): runs on the level nearest the working "
            "size; labels at full size"
        )
    if not lines_up(kept, int(layer.ndim)):
        notes.append(
            "the channel axis is not the first axis: the result (without it) will not "
            "overlay the image"
        )
    return notes


__all__ = [
    "DEVICES",
    "GRAPHS",
    "RUN_ON_CHOICES",
    "FormFields",
    "channel_axis_choices",
    "coverage_notes",
    "level0_shape",
    "parse_channels",
    "settings_from_fields",
]
