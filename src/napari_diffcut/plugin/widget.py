"""The DiffCut dock widget: segment an image layer on a background thread.

Layout (top to bottom): image picker (follows the active layer) and a note on
what a run covers; "run on" (the displayed plane or the whole stack, for
layers with more than two non-channel axes) with "consistent labels through
the stack"; backbone and model (repo id, or a folder to browse to), device,
mode, power k, graph, minimum segment size, max depth, seed; working size and
tiles (size, 0 = off: downscale mode; overlap); intensity mapping, channel
axis and channels; Run / Cancel; a progress bar with the current stage (in
planes for a stack, in tiles for a tiled run); the threshold ("auto" or a
slider) that re-cuts the result at once; and, when installed, the hierarchy
editor (issue #7).

Defaults come from the layer (issue #4, point 6): the channel axis (an RGB
layer's colours, or an axis labelled "c"/"channel"), whether it is a stack,
its pyramid levels, dtype and contrast limits (:func:`layer_defaults`).

Threading: the run is ``engine.iter_segment`` (a generator of ``Progress``
events) on a napari ``GeneratorWorker``. Slots connected to the worker run on
the GUI thread and are the only code that touches the viewer. Cancel calls
``worker.quit()``: the worker stops before the next step and closes the
generator *in the worker thread* (which stops the UNet within one attention
layer, engine.py; a stack stops between planes or within the current one),
so no layer is added and the run's arrays are freed.
One :class:`~napari_diffcut.large.dispatch.DiffCutEngine` per widget keeps the model
between runs; removing the widget or closing the viewer unloads it
(:meth:`DiffCutWidget.dispose`, from the dock's parent change or an event
filter on the viewer's window: never a slot on Qt's ``destroyed`` signal,
which PyQt may call while it garbage-collects a widget that Python owns).
"""

import contextlib
import gc
import logging
from collections.abc import Generator
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtWidgets import QMainWindow, QSizePolicy

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.large.dispatch import DiffCutEngine
from napari_diffcut.pipeline.settings import (
    BACKBONES,
    DEFAULT_MODEL,
    MODES,
    Progress,
    Settings,
    make_settings,
)
from napari_diffcut.plugin.layers import (
    diffcut_meta,
    displayed_plane_axes,
    lines_up,
    plane_selection,
    recut_refusal,
    result_kind,
)
from napari_diffcut.plugin.scripting import (
    FROM_LAYER,
    LayerDefaults,
    LayerImage,
    apply_result_layers,
    find_result,
    layer_defaults,
    layer_image,
    recut_layer,
    result_tuples,
    warn_alignment,
)

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
GRAPHS = ("walk", "similarity")
INTENSITY = (
    ("layer contrast limits", "layer"),
    ("percentiles 1-99.8", "percentiles"),
    ("min-max", "minmax"),
)
#: Slider range of the NCut threshold; costs live in (0, 1] and real boundaries
#: cost orders of magnitude less than splits through flat regions (method.md 6),
#: hence a slider over log10(threshold), with the threshold itself shown next to it.
THRESHOLD_RANGE = (1e-3, 1.0)
_LOG_RANGE = (float(np.log10(THRESHOLD_RANGE[0])), float(np.log10(THRESHOLD_RANGE[1])))
THRESHOLD_TOOLTIP = (
    "NCut threshold (log scale): a split is kept when its cost is below it; lower = fewer, "
    "stronger boundaries"
)
RUN_ON_CHOICES = (("displayed plane", "plane"), ("whole stack", "stack"))
#: Progress stages that count the run as a whole (a bar in planes or in tiles).
OUTER_STAGES = ("plane", "tile")


def parse_channels(text: str) -> tuple[int, ...] | None:
    """'0, 2, 1' -> (0, 2, 1); '' -> None (first three channels)."""
    text = text.strip()
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(
            f"channels must be empty or comma-separated channel indices like 0,1,2, got {text!r}"
        ) from None


def _level0_shape(layer: Any) -> tuple[int, ...]:
    """Shape of a layer's data (level 0 of a pyramid), colour axis included."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return tuple(int(n) for n in data.shape)


def _channel_axis_choices(layer: Any) -> list[tuple[str, Any]]:
    """Channel axis choices of a layer: its RGB axis only, or "none" and each axis."""
    shape = _level0_shape(layer)
    if getattr(layer, "rgb", False):
        return [(f"{len(shape) - 1}: RGB colours ({shape[-1]})", len(shape) - 1)]
    labels = list(getattr(layer, "axis_labels", None) or [str(a) for a in range(len(shape))])
    return [("none", "none")] + [(f"{a}: {labels[a]} ({shape[a]})", a) for a in range(len(shape))]


class RunFailedError(Exception):
    """Carries an engine error out of the worker (see :func:`run_segmentation`)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def run_segmentation(
    engine: DiffCutEngine,
    image: Any,
    settings: Settings,
    contrast_limits: tuple[float, float] | None,
) -> Generator[Progress, None, Any]:
    """The worker's generator: the engine run, one ``Progress`` per step.

    superqt's generator worker treats a ``RuntimeError`` raised by the
    generator as "the worker was deleted" and drops it without ``errored`` or
    ``finished``; ``DiffCutError`` is a ``RuntimeError``, so engine errors are
    wrapped in :class:`RunFailedError` to reach the widget.
    """
    try:
        return (yield from engine.iter_segment(image, settings, contrast_limits=contrast_limits))
    except RuntimeError as exc:
        raise RunFailedError(exc) from exc


class SegmentationWorker(GeneratorWorker):
    """A napari generator worker that closes its generator when it stops.

    superqt's worker just stops iterating on ``quit()``; closing the generator
    here, in the worker thread, runs the engine's cleanup at once (it stops
    the UNet thread and drops the run's arrays) instead of whenever the
    generator is garbage-collected. Errors are reported by the widget (one
    notification with the engine's message), not relayed with a traceback.
    """

    def _relay_error(self, exc: BaseException) -> None:
        """No traceback notification: the widget shows the engine's message."""

    def work(self) -> Any:
        """Run the generator; close it whatever happens."""
        try:
            return super().work()
        finally:
            self._gen.close()


class DiffCutWidget(Container):
    """Dock widget: segment an image layer with DiffCut and browse the hierarchy.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari when the widget is docked.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.engine = DiffCutEngine()
        self.worker: SegmentationWorker | None = None
        self._syncing = False
        self._disposed = False
        self._docked = False
        self._cancelled = False
        self._succeeded = False
        self._outer_stage: str | None = None
        self._window: Any = None  # the viewer's main window, watched for its close
        self._window_watcher: _WindowCloseWatcher | None = None
        self._build()
        self._connect_viewer()
        self._refresh_images()
        self._on_backbone()
        self._embed_hierarchy_editor()

    # -- construction -------------------------------------------------------------
    def _build(self) -> None:
        self.image_combo = ComboBox(label="image", choices=self._image_choices, nullable=True)
        self.plane_label = Label(value="", visible=False)
        self.run_on_combo = ComboBox(
            label="run on",
            choices=RUN_ON_CHOICES,
            value="plane",
            visible=False,
            tooltip="displayed plane: the 2-D plane now shown; whole stack: every plane, one "
            "at a time (progress per plane, Cancel between planes), one labels layer with the "
            "stack's shape",
        )
        self.consistent_check = CheckBox(
            text="consistent labels through the stack",
            value=False,
            visible=False,
            tooltip="match each plane's segments to its neighbour's (overlap, one-to-one), so "
            "a region keeps its label from plane to plane",
        )
        self.backbone_combo = ComboBox(
            label="backbone",
            choices=BACKBONES,
            value="diffusion",
            tooltip="diffusion: Stable Diffusion self-attention; pixels: weight-free "
            "colour/position walk (fast preview, no model)",
        )
        self.model_edit = LineEdit(
            label="model",
            value=DEFAULT_MODEL,
            tooltip="Hugging Face repo id or a local diffusers folder",
        )
        self.browse_button = PushButton(text="Browse...", tooltip="choose a local model folder")
        model_row = Container(
            widgets=[self.model_edit, self.browse_button],
            layout="horizontal",
            labels=False,
            label="model",
        )
        model_row.margins = (0, 0, 0, 0)
        self.device_combo = ComboBox(
            label="device",
            choices=DEVICES,
            value="auto",
            tooltip="auto: cuda > mps > cpu",
        )
        self.mode_combo = ComboBox(
            label="mode",
            choices=MODES,
            value="fast",
            tooltip="fast: one UNet call; inversion: 10 DDIM-inversion steps",
        )
        self.power_spin = SpinBox(
            label="power k",
            min=1,
            max=64,
            value=1,
            tooltip="walk length: P^k (coarser segments for larger k)",
        )
        self.graph_combo = ComboBox(
            label="graph",
            choices=GRAPHS,
            value="walk",
            tooltip="walk: random-walk graph; similarity: cosine of P^k rows",
        )
        self.min_size_spin = SpinBox(
            label="min segment size",
            min=1,
            max=100_000,
            value=16,
            tooltip="in patches (one patch = 8x8 working pixels)",
        )
        self.max_depth_spin = SpinBox(
            label="max depth",
            min=1,
            max=16,
            value=8,
            tooltip="maximum depth of the NCut tree",
        )
        self.seed_spin = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.working_size_spin = SpinBox(
            label="working size",
            min=0,
            max=4096,
            step=64,
            value=0,
            tooltip="side in pixels the model works at (0: the model's own, 512 for SD 1.5); "
            "smaller is faster and coarser",
        )
        self.tile_size_spin = SpinBox(
            label="tile size",
            min=0,
            max=65536,
            step=64,
            value=0,
            tooltip="0 (off): downscale mode, the whole plane at the working size; N: planes "
            "larger than N pixels are cut into N x N tiles, segmented alone and stitched (one "
            "label per object across tile borders; no levels, no threshold slider)",
        )
        self.tile_overlap_spin = SpinBox(
            label="tile overlap",
            min=-1,
            max=32768,
            step=8,
            value=-1,
            enabled=False,
            tooltip="pixels shared by neighbouring tiles (auto: tile size / 8, at most "
            "tile size / 2)",
        )
        # Special values read as words, not numbers (0 and -1 are not sizes).
        self.working_size_spin.native.setSpecialValueText("model")
        self.tile_size_spin.native.setSpecialValueText("off")
        self.tile_overlap_spin.native.setSpecialValueText("auto")
        self.intensity_combo = ComboBox(
            label="intensity",
            choices=INTENSITY,
            value="layer",
            tooltip="what the model sees: the layer's contrast limits (default, "
            "right for "
            "16-bit), percentiles 1-99.8, or min-max",
        )
        # Choices from a callable: napari resets the choices of docked magicgui
        # widgets when layers change, and a fixed list would be restored then.
        self.channel_axis_combo = ComboBox(
            label="channel axis",
            choices=self._axis_choices,
            tooltip="the axis holding channels (default from the layer: RGB colours, or an "
            "axis labelled 'c' or 'channel'); 'none': every axis is shown as a plane or stack",
        )
        self.channels_edit = LineEdit(
            label="channels",
            value="",
            enabled=False,
            tooltip="up to 3 channel indices mapped to R, G, B (empty: the first 3; one "
            "channel is grey, two fill red and green)",
        )
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        buttons = Container(
            widgets=[self.run_button, self.cancel_button],
            layout="horizontal",
            labels=False,
            label="",
        )
        buttons.margins = (0, 0, 0, 0)
        self.progress_bar = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status_label = Label(value="ready")
        self.auto_check = CheckBox(
            text="auto",
            value=True,
            tooltip="automatic threshold (Otsu on log NCut costs)",
        )
        self.threshold_slider = FloatSlider(
            min=_LOG_RANGE[0],
            max=_LOG_RANGE[1],
            step=0.01,
            value=float(np.log10(0.5)),
            readout=False,
            enabled=False,
            tooltip=THRESHOLD_TOOLTIP,
        )
        self.threshold_readout = Label(value="0.5")
        threshold_row = Container(
            widgets=[self.auto_check, self.threshold_slider, self.threshold_readout],
            layout="horizontal",
            labels=False,
            label="threshold",
        )
        threshold_row.margins = (0, 0, 0, 0)
        self.result_label = Label(value="")
        for label in (self.plane_label, self.status_label, self.result_label):
            label.native.setWordWrap(True)  # long messages must not widen the dock
            label.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
            label.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.extend(
            [
                self.image_combo,
                self.plane_label,
                self.run_on_combo,
                self.consistent_check,
                self.backbone_combo,
                model_row,
                self.device_combo,
                self.mode_combo,
                self.power_spin,
                self.graph_combo,
                self.min_size_spin,
                self.max_depth_spin,
                self.seed_spin,
                self.working_size_spin,
                self.tile_size_spin,
                self.tile_overlap_spin,
                self.intensity_combo,
                self.channel_axis_combo,
                self.channels_edit,
                buttons,
                self.progress_bar,
                self.status_label,
                threshold_row,
                self.result_label,
            ]
        )
        self.run_button.changed.connect(self._on_run)
        self.cancel_button.changed.connect(self.cancel)
        self.browse_button.changed.connect(self._on_browse)
        self.backbone_combo.changed.connect(self._on_backbone)
        self.image_combo.changed.connect(self._on_image_changed)
        self.auto_check.changed.connect(self._on_threshold_changed)
        self.threshold_slider.changed.connect(self._on_threshold_changed)
        self.run_on_combo.changed.connect(self._on_run_on)
        self.channel_axis_combo.changed.connect(self._on_channel_axis)
        self.tile_size_spin.changed.connect(self._on_tile_size)
        self.native_parent_changed.connect(self._on_parent_changed)

    def _viewer_connections(self) -> list[tuple[Any, Any]]:
        """(emitter, callback) pairs tying this widget to the viewer."""
        layers = self._viewer.layers
        dims = self._viewer.dims
        pairs = [
            (layers.events.inserted, self._refresh_images),
            (layers.events.removed, self._refresh_images),
            (layers.events.reordered, self._refresh_images),
            (layers.events.inserted, self._on_layer_inserted),
            (layers.selection.events.active, self._on_active_layer),
            (dims.events.current_step, self._update_plane_label),
            (dims.events.order, self._update_plane_label),
            (dims.events.ndisplay, self._update_plane_label),
        ]
        return pairs + [(layer.events.name, self._refresh_images) for layer in layers]

    def _connect_viewer(self) -> None:
        for emitter, callback in self._viewer_connections():
            emitter.connect(callback)

    def _embed_hierarchy_editor(self) -> None:
        """Add the hierarchy editor (issue #7) at the bottom, when it is installed."""
        try:
            from napari_diffcut.plugin.edit_widget import HierarchyEditor
        except ImportError as exc:  # not there yet, or broken: the main widget still works
            logger.info("DiffCut: hierarchy editor not available (%s)", exc)
            self.hierarchy_editor = None
            return
        self.hierarchy_editor = HierarchyEditor(self._viewer)
        self.append(Label(value="<b>Edit the hierarchy</b>"))
        self.append(self.hierarchy_editor)

    # -- image picker ---------------------------------------------------------------
    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [
            (lay.name, lay) for lay in self._viewer.layers if isinstance(lay, napari.layers.Image)
        ]

    def _refresh_images(self, _event: Any = None) -> None:
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
        event.value.events.name.connect(self._refresh_images)

    def _on_active_layer(self, event: Any) -> None:
        if self._disposed:
            return
        active = event.value
        if isinstance(active, napari.layers.Image):
            self.image_combo.reset_choices()
            self.image_combo.value = active

    def _on_image_changed(self, _value: Any = None) -> None:
        self._apply_layer_defaults()
        self._sync_threshold_controls()

    def _apply_layer_defaults(self) -> None:
        """Set the channel axis choices and stack controls from the chosen layer."""
        layer = self.image_combo.value
        if self._disposed:
            return
        self.channel_axis_combo.reset_choices()
        try:
            found = None if layer is None else layer_defaults(layer)
        except ValueError:
            found = None
        default = "none" if found is None or found.channel_axis is None else found.channel_axis
        if default in [value for _, value in self._axis_choices()]:
            self.channel_axis_combo.value = default
        self.run_on_combo.value = "plane"  # today's behaviour unless asked
        self._update_plane_label()

    def _axis_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        """Channel axis choices of the chosen layer (a callable: napari resets choices)."""
        layer = self.image_combo.value if hasattr(self, "image_combo") else None
        return [("none", "none")] if layer is None else _channel_axis_choices(layer)

    def _defaults(self) -> LayerDefaults | None:
        """Defaults of the chosen layer with the chosen channel axis (None: no layer)."""
        layer = self.image_combo.value
        if layer is None:
            return None
        return layer_defaults(layer, self.channel_axis_combo.value)

    def _on_run_on(self, _value: Any = None) -> None:
        self.consistent_check.enabled = self.run_on_combo.value == "stack"
        self._update_plane_label()

    def _on_channel_axis(self, _value: Any = None) -> None:
        self.channels_edit.enabled = self.channel_axis_combo.value != "none"
        self._update_plane_label()

    def _on_tile_size(self, _value: Any = None) -> None:
        self.tile_overlap_spin.enabled = int(self.tile_size_spin.value) > 0

    def _update_plane_label(self, _event: Any = None) -> None:
        """Say what a run covers: the displayed plane, the whole stack, a pyramid level."""
        if self._disposed:
            return
        layer = self.image_combo.value
        try:
            found = self._defaults()
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
            notes += self._coverage_notes(layer, found)
        self.plane_label.value = "; ".join(n for n in notes if n)
        self.plane_label.visible = bool(self.plane_label.value)

    def _coverage_notes(self, layer: Any, found: LayerDefaults) -> list[str]:
        notes: list[str] = []
        kept = found.kept_axes
        if found.stacked and self.run_on_combo.value == "stack":
            full = _level0_shape(layer)
            shape = (*found.stack_shape, *(full[a] for a in kept[-2:]))
            notes.append(
                f"whole stack: {found.n_planes} planes, one at a time; labels of shape {shape}"
            )
        elif found.stacked:
            try:
                axes = displayed_plane_axes(
                    layer.ndim,
                    self._viewer.dims.ndim,
                    tuple(self._viewer.dims.displayed),
                    kept[-2:],
                )
                whole = (
                    *axes,
                    *(
                        [found.channel_axis]
                        if found.channel_axis is not None and found.channel_axis < layer.ndim
                        else []
                    ),
                )
                position = layer.world_to_data(self._viewer.dims.point)
                shape = _level0_shape(layer)[: layer.ndim]
                _, plane = plane_selection(shape, position, whole)
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

    # -- settings -------------------------------------------------------------------
    def _on_backbone(self, _value: Any = None) -> None:
        diffusion = self.backbone_combo.value == "diffusion"
        for w in (
            self.model_edit,
            self.browse_button,
            self.device_combo,
            self.mode_combo,
        ):
            w.enabled = diffusion

    def _on_browse(self, _value: Any = None) -> None:
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self.native, "Choose a diffusers model folder")
        if folder:
            self.model_edit.value = folder

    def threshold_setting(self) -> float | str:
        """The threshold chosen in the widget: "auto" or the slider value."""
        return "auto" if self.auto_check.value else self.threshold_value

    @property
    def threshold_value(self) -> float:
        """The slider's threshold (the slider itself moves over log10 of it)."""
        return float(10.0**self.threshold_slider.value)

    @threshold_value.setter
    def threshold_value(self, value: float) -> None:
        tau = float(np.clip(value, *THRESHOLD_RANGE))
        self.threshold_slider.value = float(np.log10(tau))

    def settings(self) -> tuple[Settings, Any]:
        """Validated run settings and the ``contrast_limits`` choice (controls).

        ``channel_axis`` is in the chosen layer's data axes;
        :func:`~napari_diffcut.plugin.scripting.layer_image` turns it into the axis
        of the image a run sees.
        """
        intensity = self.intensity_combo.value
        tile = int(self.tile_size_spin.value)
        overlap = int(self.tile_overlap_spin.value)
        working = int(self.working_size_spin.value)
        kwargs: dict[str, Any] = {
            "model": self.model_edit.value.strip(),
            "backbone": self.backbone_combo.value,
            "device": self.device_combo.value,
            "mode": self.mode_combo.value,
            "power": int(self.power_spin.value),
            "graph": self.graph_combo.value,
            "min_size": int(self.min_size_spin.value),
            "max_depth": int(self.max_depth_spin.value),
            "seed": int(self.seed_spin.value),
            "threshold": self.threshold_setting(),
            "channel_axis": self.channel_axis_combo.value,
            "channels": (
                parse_channels(self.channels_edit.value)
                if self.channel_axis_combo.value != "none"
                else None
            ),
            "working_size": working if working > 0 else None,
            "tile_size": tile if tile > 0 else None,
            "tile_overlap": overlap if tile > 0 and overlap >= 0 else None,
            "consistent_stack": bool(
                self.consistent_check.value and self.run_on_combo.value == "stack"
            ),
        }
        if intensity == "minmax":
            kwargs["normalize"] = None
        return make_settings(**kwargs), (FROM_LAYER if intensity == "layer" else None)

    @property
    def run_on(self) -> str:
        """ "plane" or "stack" (what a run on a stack covers)."""
        return str(self.run_on_combo.value)

    # -- running --------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether a run is in progress."""
        return self.worker is not None

    def _on_run(self, _value: Any = None) -> None:
        if self.running or self._disposed:
            return
        layer = self.image_combo.value
        if layer is None:
            show_error("DiffCut: open or choose an image layer first")
            return
        try:
            settings, limits = self.settings()
            taken = layer_image(
                self._viewer,
                layer,
                contrast_limits=limits,
                run_on=self.run_on,
                channel_axis=settings.channel_axis,
                memory_budget=settings.memory_budget,
            )
            settings = taken.run_settings(settings)
        except (ValueError, TypeError, DiffCutError) as exc:
            show_error(f"DiffCut: {exc}")
            return
        self.start(taken, settings)

    def start(self, taken: LayerImage, settings: Settings) -> SegmentationWorker:
        """Start a run on a background thread; layers are added when it returns."""
        worker = create_worker(
            run_segmentation,
            self.engine,
            taken.image,
            settings,
            taken.contrast_limits,
            _worker_class=SegmentationWorker,
            _ignore_errors=True,
            _start_thread=False,
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda seg: self._on_returned(seg, taken))
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._cancelled = False
        self._succeeded = False
        self._outer_stage = None
        self._watch_window()
        self._set_running(True, f"starting on {taken.source!r}")
        worker.start()
        return worker

    def cancel(self, _value: Any = None) -> None:
        """Stop the run at its next step; nothing is added."""
        if self.worker is not None:
            self._cancelled = True
            self.status_label.value = "cancelling..."
            self.cancel_button.enabled = False
            self.worker.quit()

    def _set_running(self, running: bool, status: str) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        self.status_label.value = status
        if running:
            self.progress_bar.max = 1
            self.progress_bar.value = 0

    def _on_progress(self, event: Progress) -> None:
        """Status line for every event; the bar follows planes (stacks), tiles, or the stage."""
        if self._disposed or self._cancelled:
            return
        outer = self._outer_stage
        if event.stage in OUTER_STAGES and (outer is None or event.stage == "plane"):
            outer = self._outer_stage = event.stage
        if outer is None or event.stage == outer:
            total = max(int(event.total), 1)
            self.progress_bar.max = total
            self.progress_bar.value = min(int(event.step), total)
        self.status_label.value = (
            f"{event.stage}: {event.message}" if event.message else event.stage
        )

    def _on_returned(self, seg: Any, taken: LayerImage) -> None:
        if self._disposed:
            return
        try:
            layers, _ = apply_result_layers(self._viewer, result_tuples(seg, taken))
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: say so, stay usable
            logger.error("DiffCut could not add the result layers", exc_info=exc)
            show_error(f"DiffCut: could not add the result layers: {type(exc).__name__}: {exc}")
            self.status_label.value = "failed (see notification)"
            return
        self._succeeded = True
        warn_alignment(taken)
        kind = result_kind(seg)
        if kind == "stack":
            done = f"done: {int(np.prod(seg.stack_shape))} planes"
        elif kind == "tiled":
            done = f"done: {len(seg.tiles)} tiles stitched"
        else:
            done = f"done: {len(layers) - 1} level(s)"
        self.status_label.value = done
        if self.image_combo.value is not None and self.image_combo.value.name == taken.source:
            self._sync_threshold_controls()

    def _on_errored(self, exc: BaseException) -> None:
        if self._disposed:
            return
        if isinstance(exc, RunFailedError):
            exc = exc.error
        if isinstance(exc, DiffCutError | ValueError | TypeError):
            message = str(exc)
        else:  # a bug, not a user mistake: keep the traceback in the log
            logger.error("DiffCut run failed", exc_info=exc)
            message = f"{type(exc).__name__}: {exc}"
        show_error(f"DiffCut: {message}")
        self.status_label.value = "failed (see notification)"

    def _on_aborted(self) -> None:
        if not self._disposed:
            self.status_label.value = "cancelled"

    def _on_finished(self) -> None:
        self.worker = None
        if self._disposed:
            # Closed mid-run: the run may have loaded the model after dispose().
            self.engine.unload()
        gc.collect()  # free the run's arrays (attention, affinity) now
        if self._disposed:
            return
        status = self.status_label.value
        if self._cancelled and not self._succeeded:
            status = "cancelled"  # also when the run ended before it saw the request
        elif status.startswith("starting"):
            status = "ready"
        self._set_running(False, status)
        # A full bar only for a result: not after an error or a cancel.
        self.progress_bar.value = self.progress_bar.max if self._succeeded else 0

    # -- threshold --------------------------------------------------------------
    def _current_result(self) -> tuple[Any, Any] | None:
        layer = self.image_combo.value
        return None if layer is None else find_result(self._viewer, layer.name)

    def _on_threshold_changed(self, _value: Any = None) -> None:
        self.threshold_readout.value = f"{self.threshold_value:.3g}"
        if self._syncing or self._disposed:
            return
        found = self._current_result()
        if found is not None and recut_refusal(found[0]):
            self._sync_threshold_controls()  # a tiled result: nothing to re-cut
            return
        self.threshold_slider.enabled = not self.auto_check.value
        layer = self.image_combo.value
        if layer is None or found is None:
            return
        # A lookup on the built tree(s) (no model, no eigen solve): instant.
        try:
            recut_layer(self._viewer, layer.name, self.threshold_setting())
        except (ValueError, DiffCutError) as exc:
            show_error(f"DiffCut: {exc}")
        self._sync_threshold_controls()

    def _set_threshold_enabled(self, refusal: str) -> None:
        """Threshold controls on, or off with the reason in their tooltip."""
        self.auto_check.enabled = not refusal
        self.threshold_slider.enabled = not refusal and not self.auto_check.value
        tip = f"threshold fixed: {refusal}" if refusal else THRESHOLD_TOOLTIP
        self.threshold_slider.tooltip = tip
        self.auto_check.tooltip = tip if refusal else "automatic threshold (Otsu on log NCut costs)"

    def _sync_threshold_controls(self) -> None:
        """Show the threshold and size of the selected image's result."""
        found = self._current_result()
        if found is None:
            self.result_label.value = ""
            self._set_threshold_enabled("")
            return
        seg, main = found
        meta = diffcut_meta(main.metadata) or {}
        setting = (meta.get("settings") or {}).get("threshold", "auto")
        value = float(meta.get("threshold", float("nan")))
        refusal = recut_refusal(seg)
        self._syncing = True
        try:
            self.auto_check.value = setting == "auto"
            if np.isfinite(value):
                self.threshold_value = value
                self.threshold_readout.value = f"{value:.3g}"
            self._set_threshold_enabled(refusal)
        finally:
            self._syncing = False
        self.result_label.value = _result_summary(seg, main, value)

    # -- lifetime ---------------------------------------------------------------
    def _on_parent_changed(self, parent: Any) -> None:
        if parent is not None:
            self._docked = True
        elif self._docked:  # napari's remove_dock_widget un-parents the widget
            self.dispose()

    def _watch_window(self) -> None:
        """Dispose when the viewer's main window closes (an event filter, no ``destroyed`` slot).

        Installed when a run starts (the model is loaded by runs only), on the
        window the dock sits in; a widget that is not docked in a viewer
        window is disposed by its owner.
        """
        window = self.native.window()
        if self._disposed or window is self._window or not isinstance(window, QMainWindow):
            return
        self._unwatch_window()
        self._window_watcher = _WindowCloseWatcher(self.dispose, self.native)
        window.installEventFilter(self._window_watcher)
        self._window = window

    def _unwatch_window(self) -> None:
        window, watcher = self._window, self._window_watcher
        self._window = self._window_watcher = None
        if window is not None and watcher is not None:
            # RuntimeError: the window is already gone (and its filters with it).
            with contextlib.suppress(RuntimeError):
                window.removeEventFilter(watcher)

    def dispose(self) -> None:
        """Stop any run and free the model (called when the widget or the viewer is closed)."""
        if self._disposed:
            return
        self._disposed = True
        self._unwatch_window()
        if self.worker is not None:
            self.worker.quit()
        for emitter, callback in self._viewer_connections():
            emitter.disconnect(callback)
        if self.hierarchy_editor is not None:
            self.hierarchy_editor.dispose()  # no more click edits from a closed widget
        self.engine.unload()
        gc.collect()


class _WindowCloseWatcher(QObject):
    """Event filter on the viewer's main window that calls ``on_close`` when it closes.

    A programmatic close (``viewer.close()``) is always accepted by napari,
    so its Close event is enough. A close by the user may be refused in a
    confirmation dialog; napari's window deletes itself once the close is
    accepted, so the deferred delete is the sign there. Both arrive through
    the event loop, while every widget still exists: unlike a slot on
    ``destroyed``, nothing runs during the C++ destruction of a widget.
    """

    def __init__(self, on_close: Any, parent: Any) -> None:
        super().__init__(parent)
        self._on_close = on_close

    def eventFilter(self, watched: Any, event: Any) -> bool:  # noqa: N802 - Qt's name
        """Call ``on_close`` on a programmatic Close or a DeferredDelete; never filter."""
        kind = event.type()
        closing = kind == QEvent.Type.Close and not event.spontaneous()
        if closing or kind == QEvent.Type.DeferredDelete:
            self._on_close()
        return False


def _result_summary(seg: Any, main: Any, threshold: float) -> str:
    """One line about a result: segments, levels or planes or tiles, threshold."""
    kind = result_kind(seg)
    if kind == "tiled":
        return (
            f"{seg.n_labels} segments stitched from {len(seg.tiles)} tiles; each tile cut at "
            f"its own threshold (median {seg.threshold:.3g}); no levels"
        )
    if kind == "stack":
        planes = int(np.prod(seg.stack_shape))
        labels = (
            f"{len(main.features)} labels through the stack"
            if seg.consistent
            else "labels per plane (own tree each)"
        )
        where = f"threshold {threshold:.3g} (median)" if np.isfinite(threshold) else "auto"
        return f"{planes} planes, {labels}; {where}"
    return (
        f"{len(main.features)} segments, {seg.hierarchy.n_levels()} level(s); "
        f"threshold {seg.threshold:.3g} (auto {seg.hierarchy.auto_threshold:.3g})"
    )


__all__ = [
    "DiffCutWidget",
    "RunFailedError",
    "SegmentationWorker",
    "parse_channels",
    "run_segmentation",
]
