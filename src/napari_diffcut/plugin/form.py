"""The options part of the DiffCut dock widget: the image and how to segment it.

Top to bottom: the image picker (it follows the active layer) and a note on
what a run covers; "run on" and "consistent labels" for stacks; backbone,
model, working size, tile size and channel axis; then a folded *advanced
options* group (device, mode, power k, graph, minimum segment size, max
depth, seed, tile overlap, channels, and *use layer contrast limits*).

Defaults come from the layer (the channel axis, whether it is a stack, its
pyramid levels: :func:`~napari_diffcut.plugin.take.layer_defaults`).
Intensities are mapped as in the CLI (percentiles) unless *use layer contrast
limits* is ticked (issue 13, point 6). The form fits a dock of about 400 px:
notes wrap, combo boxes do not grow with their longest entry, long texts are
tooltips (issue 13, point 1).
"""

from __future__ import annotations

from typing import Any

import napari
from magicgui.backends._qtpy.widgets import QBaseRangedWidget
from magicgui.widgets import CheckBox, ComboBox, Container, Label, LineEdit, PushButton, SpinBox
from magicgui.widgets.bases import RangedWidget
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QSizePolicy, QSpinBox

from napari_diffcut.pipeline.settings import BACKBONES, DEFAULT_MODEL, MODES, Settings
from napari_diffcut.plugin.fields import (
    DEVICES,
    GRAPHS,
    RUN_ON_CHOICES,
    FormFields,
    channel_axis_choices,
    coverage_notes,
    settings_from_fields,
)
from napari_diffcut.plugin.take import LayerDefaults, layer_defaults

#: Characters a combo box is sized for (longer entries are elided, not widening the dock).
COMBO_CHARS = 12
FOLDED = "\u25b8 advanced options"
UNFOLDED = "\u25be advanced options"


def wrap_label(label: Label) -> Label:
    """Make a label wrap its text and never widen its container."""
    label.native.setWordWrap(True)
    label.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
    label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    label.native.setMinimumWidth(0)
    return label


def narrow_combo(combo: ComboBox) -> ComboBox:
    """Size a combo box for :data:`COMBO_CHARS` characters, not for its longest entry."""
    native = combo.native
    native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    native.setMinimumContentsLength(COMBO_CHARS)
    return combo


class _QtSpinBox(QBaseRangedWidget):
    """magicgui's spin box on a plain ``QSpinBox``.

    magicgui's own ``SpinBox`` is superqt's ``QLargeIntSpinBox``, which ignores
    ``setSpecialValueText``: an "off" value of 0 (or -1) showed as a number.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(QSpinBox, **kwargs)

    def _mgui_set_value(self, value: Any) -> None:
        super()._mgui_set_value(int(value))


def word_spin(special: str, **kwargs: Any) -> RangedWidget:
    """An integer spin box whose minimum reads as the word ``special`` (e.g. "off")."""
    spin = RangedWidget(widget_type=_QtSpinBox, **kwargs)
    spin.native.setSpecialValueText(special)
    return spin


def tight_row(widgets: list[Any], label: str) -> Container:
    """A labelled horizontal row of widgets without margins."""
    row = Container(widgets=widgets, layout="horizontal", labels=False, label=label)
    row.margins = (0, 0, 0, 0)
    return row


class DiffCutForm(Container):
    """The options of a run; :meth:`settings` turns them into validated settings.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Gives the image layers and the displayed plane.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._disposed = False
        self._build()
        self._connect()
        self.refresh_images()
        self._on_backbone()
        self._on_tile_size()

    # -- construction ---------------------------------------------------------------
    def _build(self) -> None:
        self.image_combo = narrow_combo(
            ComboBox(label="image", choices=self._image_choices, nullable=True)
        )
        self.plane_label = wrap_label(Label(value="", visible=False))
        self.run_on_combo = narrow_combo(
            ComboBox(
                label="run on",
                choices=RUN_ON_CHOICES,
                value="plane",
                visible=False,
                tooltip="displayed plane: the 2-D plane now shown; whole stack: every plane, "
                "one at a time (progress per plane, Cancel between planes), one labels layer "
                "with the stack's shape",
            )
        )
        self.consistent_check = CheckBox(
            text="consistent labels",
            value=False,
            visible=False,
            tooltip="consistent labels through the stack: match each plane's segments to its "
            "neighbour's (overlap, one-to-one), so a region keeps its label from plane to plane",
        )
        self.backbone_combo = narrow_combo(
            ComboBox(
                label="backbone",
                choices=BACKBONES,
                value="diffusion",
                tooltip="diffusion: Stable Diffusion self-attention; pixels: weight-free "
                "colour/position walk (fast preview, no model)",
            )
        )
        self.model_edit = LineEdit(
            label="model", value=DEFAULT_MODEL, tooltip="Hugging Face repo id or a local folder"
        )
        self.model_edit.native.setMinimumWidth(60)
        self.browse_button = PushButton(text="...", tooltip="choose a local model folder")
        self.browse_button.native.setMaximumWidth(32)
        self.working_size_spin = word_spin(
            "model",
            label="working size",
            min=0,
            max=4096,
            step=64,
            value=0,
            tooltip="side in pixels the model works at (model: its own, 512 for SD 1.5); "
            "smaller is faster and coarser",
        )
        self.tile_size_spin = word_spin(
            "off",
            label="tile size",
            min=0,
            max=65536,
            step=64,
            value=0,
            tooltip="off: downscale mode, the whole plane at the working size; N: planes "
            "larger than N pixels are cut into N x N tiles, segmented alone and stitched (one "
            "label per object across tile borders; no levels, no threshold slider)",
        )
        # Choices from a callable: napari resets the choices of docked magicgui
        # widgets when layers change, and a fixed list would be restored then.
        self.channel_axis_combo = narrow_combo(
            ComboBox(
                label="channel axis",
                choices=self._axis_choices,
                tooltip="the axis holding channels (default from the layer: RGB colours, or an "
                "axis labelled 'c' or 'channel'); 'none': every axis is a plane or stack axis",
            )
        )
        self.refine_check = CheckBox(
            text="refine edges",
            value=True,
            tooltip="move segment edges onto the image's own boundaries (PAMR on the tree's "
            "leaves, once: re-cuts stay instant); off: edges on the 8-pixel patch grid",
        )
        self.instances_check = CheckBox(
            text="count",
            value=False,
            tooltip="also add '<image> diffcut instances': each connected object outside the "
            "background (the largest segment) gets its own id; its features hold segment, "
            "area and centroid; re-cuts recount it (2-D results)",
        )
        self.instance_min_spin = SpinBox(
            min=1,
            max=10**7,
            value=16,
            tooltip="smallest object counted, in pixels",
        )
        self.advanced_button = PushButton(text=FOLDED, tooltip="show or hide the less used options")
        self.advanced = self._build_advanced()
        self.advanced.visible = False
        self.extend(
            [
                self.image_combo,
                self.plane_label,
                self.run_on_combo,
                self.consistent_check,
                self.backbone_combo,
                tight_row([self.model_edit, self.browse_button], "model"),
                self.working_size_spin,
                self.tile_size_spin,
                self.channel_axis_combo,
                self.refine_check,
                tight_row([self.instances_check, self.instance_min_spin], "instances"),
                self.advanced_button,
                self.advanced,
            ]
        )

    def _build_advanced(self) -> Container:
        self.device_combo = narrow_combo(
            ComboBox(
                label="device", choices=DEVICES, value="auto", tooltip="auto: cuda > mps > cpu"
            )
        )
        self.mode_combo = narrow_combo(
            ComboBox(
                label="mode",
                choices=MODES,
                value="fast",
                tooltip="fast: one UNet call; inversion: 10 DDIM-inversion steps",
            )
        )
        self.power_spin = SpinBox(
            label="power k",
            min=1,
            max=64,
            value=1,
            tooltip="walk length: P^k (coarser for larger k)",
        )
        self.graph_combo = narrow_combo(
            ComboBox(
                label="graph",
                choices=GRAPHS,
                value="walk",
                tooltip="walk: random-walk graph; similarity: cosine of P^k rows",
            )
        )
        self.min_size_spin = SpinBox(
            label="min size",
            min=1,
            max=100_000,
            value=16,
            tooltip="minimum segment size, in patches (one patch = 8x8 working pixels)",
        )
        self.max_depth_spin = SpinBox(
            label="max depth", min=1, max=16, value=8, tooltip="maximum depth of the NCut tree"
        )
        self.seed_spin = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.overlap_auto_check = CheckBox(
            text="auto", value=True, tooltip="tile overlap: tile size / 8, at most tile size / 2"
        )
        self.tile_overlap_spin = SpinBox(
            min=0,
            max=32768,
            step=8,
            value=32,
            enabled=False,
            tooltip="pixels shared by neighbouring tiles",
        )
        self.contrast_check = CheckBox(
            text="use layer contrast limits",
            value=False,
            tooltip="map intensities through the layer's contrast limits (what you see) instead "
            "of percentiles 1-99.8 (the default, as in the CLI and the Python API)",
        )
        self.channels_edit = LineEdit(
            label="channels",
            value="",
            enabled=False,
            tooltip="up to 3 channel indices mapped to R, G, B (empty: the first 3; one "
            "channel is grey, two fill red and green)",
        )
        self.channels_edit.native.setMinimumWidth(60)
        advanced = Container(
            labels=True,
            widgets=[
                self.device_combo,
                self.mode_combo,
                self.power_spin,
                self.graph_combo,
                self.min_size_spin,
                self.max_depth_spin,
                self.seed_spin,
                tight_row([self.overlap_auto_check, self.tile_overlap_spin], "tile overlap"),
                self.channels_edit,
                self.contrast_check,
            ],
        )
        advanced.margins = (0, 0, 0, 0)
        return advanced

    def _connect(self) -> None:
        self.browse_button.changed.connect(self._on_browse)
        self.backbone_combo.changed.connect(self._on_backbone)
        self.image_combo.changed.connect(self._on_image_changed)
        self.run_on_combo.changed.connect(self._on_run_on)
        self.channel_axis_combo.changed.connect(self._on_channel_axis)
        self.tile_size_spin.changed.connect(self._on_tile_size)
        self.overlap_auto_check.changed.connect(self._on_tile_size)
        self.advanced_button.changed.connect(self.toggle_advanced)

    def viewer_connections(self) -> list[tuple[Any, Any]]:
        """(emitter, callback) pairs tying the form to the viewer (the widget connects them)."""
        layers = self._viewer.layers
        dims = self._viewer.dims
        pairs = [
            (layers.events.inserted, self.refresh_images),
            (layers.events.removed, self.refresh_images),
            (layers.events.reordered, self.refresh_images),
            (layers.events.inserted, self._on_layer_inserted),
            (layers.selection.events.active, self._on_active_layer),
            (dims.events.current_step, self.update_plane_label),
            (dims.events.order, self.update_plane_label),
            (dims.events.ndisplay, self.update_plane_label),
        ]
        return pairs + [(layer.events.name, self.refresh_images) for layer in layers]

    def dispose(self) -> None:
        """Stop reacting to the viewer (its connections are the widget's to remove)."""
        self._disposed = True

    def toggle_advanced(self, _value: Any = None) -> None:
        """Fold or unfold the advanced options."""
        shown = not self.advanced.visible
        self.advanced.visible = shown
        self.advanced_button.text = UNFOLDED if shown else FOLDED

    # -- image picker ---------------------------------------------------------------
    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [
            (lay.name, lay) for lay in self._viewer.layers if isinstance(lay, napari.layers.Image)
        ]

    @property
    def image(self) -> Any:
        """The chosen image layer, or None."""
        return self.image_combo.value

    def refresh_images(self, _event: Any = None) -> None:
        """Refresh the image choices, keeping the current one (else the active image)."""
        if self._disposed:
            return
        current = self.image_combo.value
        self.image_combo.reset_choices()
        choices = [value for _, value in self._image_choices()]
        if current is None or not any(current is c or current == c for c in choices):
            active = self._viewer.layers.selection.active
            if isinstance(active, napari.layers.Image):
                self.image_combo.value = active
            elif choices:
                self.image_combo.value = choices[-1]

    def _on_layer_inserted(self, event: Any) -> None:
        event.value.events.name.connect(self.refresh_images)

    def _on_active_layer(self, event: Any) -> None:
        if self._disposed:
            return
        if isinstance(event.value, napari.layers.Image):
            self.image_combo.reset_choices()
            self.image_combo.value = event.value

    def _on_image_changed(self, _value: Any = None) -> None:
        """Set the channel axis choices and stack controls from the chosen layer."""
        if self._disposed:
            return
        layer = self.image_combo.value
        self.channel_axis_combo.reset_choices()
        try:
            found = None if layer is None else layer_defaults(layer)
        except ValueError:
            found = None
        default = "none" if found is None or found.channel_axis is None else found.channel_axis
        if default in [value for _, value in self._axis_choices()]:
            self.channel_axis_combo.value = default
        self.run_on_combo.value = "plane"
        self.update_plane_label()

    def _axis_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        """Channel axis choices of the chosen layer (a callable: napari resets choices)."""
        layer = self.image_combo.value if hasattr(self, "image_combo") else None
        return [("none", "none")] if layer is None else channel_axis_choices(layer)

    def defaults(self) -> LayerDefaults | None:
        """Defaults of the chosen layer with the chosen channel axis (None: no layer)."""
        layer = self.image_combo.value
        return None if layer is None else layer_defaults(layer, self.channel_axis_combo.value)

    def _on_run_on(self, _value: Any = None) -> None:
        self.consistent_check.enabled = self.run_on_combo.value == "stack"
        self.update_plane_label()

    def _on_channel_axis(self, _value: Any = None) -> None:
        self.channels_edit.enabled = self.channel_axis_combo.value != "none"
        self.update_plane_label()

    def _on_tile_size(self, _value: Any = None) -> None:
        tiled = int(self.tile_size_spin.value) > 0
        self.overlap_auto_check.enabled = tiled
        self.tile_overlap_spin.enabled = tiled and not self.overlap_auto_check.value

    def _on_backbone(self, _value: Any = None) -> None:
        diffusion = self.backbone_combo.value == "diffusion"
        for w in (self.model_edit, self.browse_button, self.device_combo, self.mode_combo):
            w.enabled = diffusion

    def _on_browse(self, _value: Any = None) -> None:
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self.native, "Choose a diffusers model folder")
        if folder:
            self.model_edit.value = folder

    def update_plane_label(self, _event: Any = None) -> None:
        """Say what a run covers: the displayed plane, the whole stack, a pyramid level."""
        if self._disposed:
            return
        layer = self.image_combo.value
        try:
            found = self.defaults()
        except ValueError as exc:
            found, problem = None, str(exc)
        else:
            problem = ""
        stacked = found is not None and found.stacked
        self.run_on_combo.visible = stacked
        self.consistent_check.visible = stacked
        self.consistent_check.enabled = self.run_on_combo.value == "stack"
        notes = [problem] if problem else []
        if found is not None:
            dims = self._viewer.dims
            notes += coverage_notes(
                layer, found, self.run_on, dims.ndim, dims.displayed, dims.point
            )
        self.plane_label.value = "; ".join(n for n in notes if n)
        self.plane_label.visible = bool(self.plane_label.value)

    # -- settings -------------------------------------------------------------------
    @property
    def run_on(self) -> str:
        """ "plane" or "stack" (what a run on a stack covers)."""
        return str(self.run_on_combo.value)

    def fields(self) -> FormFields:
        """The field values as they stand."""
        return FormFields(
            model=self.model_edit.value,
            backbone=self.backbone_combo.value,
            device=self.device_combo.value,
            mode=self.mode_combo.value,
            power=int(self.power_spin.value),
            graph=self.graph_combo.value,
            min_size=int(self.min_size_spin.value),
            max_depth=int(self.max_depth_spin.value),
            seed=int(self.seed_spin.value),
            working_size=int(self.working_size_spin.value),
            tile_size=int(self.tile_size_spin.value),
            tile_overlap=None
            if self.overlap_auto_check.value
            else int(self.tile_overlap_spin.value),
            channel_axis=self.channel_axis_combo.value,
            channels=self.channels_edit.value,
            consistent_stack=bool(self.consistent_check.value and self.run_on == "stack"),
            layer_contrast_limits=bool(self.contrast_check.value),
            refine=bool(self.refine_check.value),
            instances=bool(self.instances_check.value),
            instance_min_size=int(self.instance_min_spin.value),
        )

    def settings(self, threshold: float | str = "auto") -> tuple[Settings, Any]:
        """Validated run settings and the ``contrast_limits`` choice (see
        :func:`~napari_diffcut.plugin.fields.settings_from_fields`).

        ``channel_axis`` is in the chosen layer's data axes;
        :func:`~napari_diffcut.plugin.take.layer_image` turns it into the axis
        of the image a run sees.
        """
        return settings_from_fields(self.fields(), threshold)


__all__ = ["DiffCutForm", "narrow_combo", "tight_row", "word_spin", "wrap_label"]
