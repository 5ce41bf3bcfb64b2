"""The DiffCut dock widget: segment an image layer on a background thread.

Layout (top to bottom): image picker (follows the active layer), backbone and
model (repo id, or a folder to browse to), device, mode, power k, graph,
minimum segment size, max depth, seed, intensity mapping and channels; Run /
Cancel; a progress bar with the current stage; the threshold ("auto" or a
slider) that re-cuts the result at once; and, when installed, the hierarchy
editor (issue #7).

Threading: the run is ``engine.iter_segment`` (a generator of ``Progress``
events) on a napari ``GeneratorWorker``. Slots connected to the worker run on
the GUI thread and are the only code that touches the viewer. Cancel calls
``worker.quit()``: the worker stops before the next step and closes the
generator *in the worker thread* (which stops the UNet within one attention
layer, engine.py), so no layer is added and the run's arrays are freed.
One :class:`~napari_diffcut.engine.DiffCutEngine` per widget keeps the model
between runs; removing the widget or closing the viewer unloads it.
"""

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
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QSizePolicy

from napari_diffcut._layers import displayed_plane_axes, plane_selection
from napari_diffcut.engine import (
    BACKBONES,
    DEFAULT_MODEL,
    MODES,
    DiffCutEngine,
    Progress,
    Segmentation,
    Settings,
    make_settings,
)
from napari_diffcut.errors import DiffCutError
from napari_diffcut.scripting import (
    FROM_LAYER,
    LayerImage,
    apply_result_layers,
    find_result,
    layer_image,
    recut_layer,
    result_tuples,
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


class RunFailedError(Exception):
    """Carries an engine error out of the worker (see :func:`run_segmentation`)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def run_segmentation(
    engine: DiffCutEngine,
    image: np.ndarray,
    settings: Settings,
    contrast_limits: tuple[float, float] | None,
) -> Generator[Progress, None, Segmentation]:
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
        self._build()
        self._connect_viewer()
        self._refresh_images()
        self._on_backbone()
        self._embed_hierarchy_editor()

    # -- construction -------------------------------------------------------------
    def _build(self) -> None:
        self.image_combo = ComboBox(label="image", choices=self._image_choices, nullable=True)
        self.plane_label = Label(value="", visible=False)
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
        self.intensity_combo = ComboBox(
            label="intensity",
            choices=INTENSITY,
            value="layer",
            tooltip="what the model sees: the layer's contrast limits (default, "
            "right for "
            "16-bit), percentiles 1-99.8, or min-max",
        )
        self.channels_edit = LineEdit(
            label="channels",
            value="",
            tooltip="channels-last images: up to 3 indices mapped to R, G, B (empty: first 3)",
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
            tooltip="NCut threshold (log scale): a split is kept when its cost is "
            "below it; lower = fewer, stronger boundaries",
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
                self.backbone_combo,
                model_row,
                self.device_combo,
                self.mode_combo,
                self.power_spin,
                self.graph_combo,
                self.min_size_spin,
                self.max_depth_spin,
                self.seed_spin,
                self.intensity_combo,
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
        self.native_parent_changed.connect(self._on_parent_changed)
        engine = self.engine
        # Viewer closed: the dock and this widget are destroyed with the window.
        self.native.destroyed.connect(lambda *_: engine.unload())

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
            from napari_diffcut._edit_widget import HierarchyEditor
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
        self._update_plane_label()
        self._sync_threshold_controls()

    def _update_plane_label(self, _event: Any = None) -> None:
        if self._disposed:
            return
        layer = self.image_combo.value
        if layer is None or layer.ndim <= 2:
            self.plane_label.value = ""
            self.plane_label.visible = False
            return
        try:
            axes = displayed_plane_axes(
                layer.ndim, self._viewer.dims.ndim, tuple(self._viewer.dims.displayed)
            )
            position = layer.world_to_data(self._viewer.dims.point)
            _, plane = plane_selection(layer.data.shape[: layer.ndim], position, axes)
            where = ", ".join(f"axis {a} = {i}" for a, i in enumerate(plane) if i is not None)
            text = f"{layer.ndim}-D layer: segments the displayed plane only ({where})"
        except ValueError as exc:
            text = str(exc)
        self.plane_label.value = text
        self.plane_label.visible = True

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
        """Validated run settings and the ``contrast_limits`` choice (controls)."""
        intensity = self.intensity_combo.value
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
            "channels": parse_channels(self.channels_edit.value),
        }
        if intensity == "minmax":
            kwargs["normalize"] = None
        return make_settings(**kwargs), (FROM_LAYER if intensity == "layer" else None)

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
            taken = layer_image(self._viewer, layer, contrast_limits=limits)
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
        if self._disposed or self._cancelled:
            return
        total = max(int(event.total), 1)
        self.progress_bar.max = total
        self.progress_bar.value = min(int(event.step), total)
        self.status_label.value = (
            f"{event.stage}: {event.message}" if event.message else event.stage
        )

    def _on_returned(self, seg: Segmentation, taken: LayerImage) -> None:
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
        self.status_label.value = f"done: {len(layers) - 1} level(s)"
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
    def _current_result(self) -> tuple[Segmentation, Any] | None:
        layer = self.image_combo.value
        return None if layer is None else find_result(self._viewer, layer.name)

    def _on_threshold_changed(self, _value: Any = None) -> None:
        self.threshold_slider.enabled = not self.auto_check.value
        self.threshold_readout.value = f"{self.threshold_value:.3g}"
        if self._syncing or self._disposed:
            return
        layer = self.image_combo.value
        if layer is None or self._current_result() is None:
            return
        # A lookup on the built tree (no model, no eigen solve): instant.
        recut_layer(self._viewer, layer.name, self.threshold_setting())
        self._sync_threshold_controls()

    def _sync_threshold_controls(self) -> None:
        """Show the threshold and size of the selected image's result."""
        found = self._current_result()
        if found is None:
            self.result_label.value = ""
            return
        seg, main = found
        setting = seg.hierarchy.threshold_setting
        self._syncing = True
        try:
            self.auto_check.value = setting == "auto"
            self.threshold_value = seg.threshold
            self.threshold_slider.enabled = setting != "auto"
            self.threshold_readout.value = f"{seg.threshold:.3g}"
        finally:
            self._syncing = False
        n_segments = len(main.features)
        self.result_label.value = (
            f"{n_segments} segments, {seg.hierarchy.n_levels()} level(s); "
            f"threshold {seg.threshold:.3g} (auto {seg.hierarchy.auto_threshold:.3g})"
        )

    # -- lifetime ---------------------------------------------------------------
    def _on_parent_changed(self, parent: Any) -> None:
        if parent is not None:
            self._docked = True
        elif self._docked:  # napari's remove_dock_widget un-parents the widget
            self.dispose()

    def dispose(self) -> None:
        """Stop any run and free the model (called when the widget is closed)."""
        if self._disposed:
            return
        self._disposed = True
        if self.worker is not None:
            self.worker.quit()
        for emitter, callback in self._viewer_connections():
            emitter.disconnect(callback)
        if self.hierarchy_editor is not None:
            self.hierarchy_editor.dispose()  # no more click edits from a closed widget
        self.engine.unload()
        gc.collect()


__all__ = [
    "DiffCutWidget",
    "RunFailedError",
    "SegmentationWorker",
    "parse_channels",
    "run_segmentation",
]
