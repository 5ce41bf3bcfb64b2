"""The DiffCut dock widget: the form, the run and the result parts, and the editor.

:class:`DiffCutWidget` stacks, top to bottom, the options
(:class:`~napari_diffcut.plugin.form.DiffCutForm`), Run / Cancel with the
progress (:class:`~napari_diffcut.plugin.run.RunPanel`), the threshold and
result line (:class:`~napari_diffcut.plugin.result.ResultPanel`) and, when
installed, the hierarchy editor. Each part is testable alone; this module
only wires them: Run takes the image on the GUI thread and starts the worker;
the worker's result is added as one result set (main layer and levels
together), one layer per turn of the event loop.

One :class:`~napari_diffcut.plugin.loading.BackgroundLoadEngine` per widget
keeps the model between runs; removing the widget or closing the viewer
frees it (:meth:`DiffCutWidget.dispose`, from the dock's parent change or an
event filter on the viewer's window: never a slot on Qt's ``destroyed``
signal, which PyQt may call while it garbage-collects a widget Python owns).
The widget's controls are reachable as attributes (``widget.run_button``,
``widget.backbone_combo``, ...) for scripts and tests.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from typing import Any

import napari
import numpy as np
from magicgui.widgets import Container, Label
from napari.utils.notifications import show_error
from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QMainWindow

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.pipeline.settings import Settings
from napari_diffcut.plugin.features import result_kind
from napari_diffcut.plugin.form import DiffCutForm
from napari_diffcut.plugin.instances import apply_instances, instances_meta, instances_summary
from napari_diffcut.plugin.loading import BackgroundLoadEngine
from napari_diffcut.plugin.result import ResultPanel
from napari_diffcut.plugin.run import RunOutput, RunPanel, SegmentationWorker
from napari_diffcut.plugin.scripting import (
    check_instances_option,
    iter_apply_plan,
    plan_result_layers,
    warn_alignment,
)
from napari_diffcut.plugin.take import LayerImage, layer_image

logger = logging.getLogger(__name__)

#: Controls of the parts, reachable as attributes of the widget.
FORM_CONTROLS = (
    "image_combo", "plane_label", "run_on_combo", "consistent_check", "backbone_combo",
    "model_edit", "browse_button", "device_combo", "mode_combo", "power_spin", "graph_combo",
    "min_size_spin", "max_depth_spin", "seed_spin", "working_size_spin", "tile_size_spin",
    "overlap_auto_check", "tile_overlap_spin", "contrast_check", "channel_axis_combo",
    "channels_edit", "advanced_button", "refine_check", "instances_check", "instance_min_spin",
)  # fmt: skip
RUN_CONTROLS = ("run_button", "cancel_button", "progress_bar", "status_label")
RESULT_CONTROLS = ("auto_check", "threshold_slider", "threshold_readout", "result_label")


def done_message(seg: Any, layers: list[Any]) -> str:
    """Status after a run: planes, tiles or levels (and the count of an instance layer)."""
    counted = [lay for lay in layers if instances_meta(lay) is not None]
    if counted:
        rest = [lay for lay in layers if instances_meta(lay) is None]
        return f"{done_message(seg, rest)}; {instances_summary(counted[-1])}"
    kind = result_kind(seg)
    if kind == "stack":
        return f"done: {int(np.prod(seg.stack_shape))} planes"
    if kind == "tiled":
        return f"done: {len(seg.tiles)} tiles stitched"
    return f"done: {len(layers) - 1} level(s)"


class DiffCutWidget(Container):
    """Dock widget: segment an image layer with DiffCut and browse the hierarchy.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari when the widget is docked.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = napari_viewer
        self.engine = BackgroundLoadEngine()
        self._disposed = False
        self._docked = False
        self._window: Any = None  # the viewer's main window, watched for its close
        self._window_watcher: _WindowCloseWatcher | None = None
        self.form = DiffCutForm(napari_viewer)
        self.run_panel = RunPanel()
        self.result_panel = ResultPanel(napari_viewer, lambda: self.form.image)
        for part, names in (
            (self.form, FORM_CONTROLS),
            (self.run_panel, RUN_CONTROLS),
            (self.result_panel, RESULT_CONTROLS),
        ):
            for name in names:
                setattr(self, name, getattr(part, name))
        self.extend([self.form, self.run_panel, self.result_panel])
        for part in (self.form, self.run_panel, self.result_panel):
            part.margins = (0, 0, 0, 0)
        self.run_panel.run_clicked.connect(self._on_run)
        self.form.image_combo.changed.connect(self.result_panel.sync)
        self.native_parent_changed.connect(self._on_parent_changed)
        for emitter, callback in self._viewer_connections():
            emitter.connect(callback)
        self._embed_hierarchy_editor()
        self.result_panel.sync()

    def _viewer_connections(self) -> list[tuple[Any, Any]]:
        return self.form.viewer_connections()

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

    # -- the parts' API, on the widget ------------------------------------------------
    @property
    def worker(self) -> SegmentationWorker | None:
        """The running worker, or None."""
        return self.run_panel.worker

    @property
    def running(self) -> bool:
        """Whether a run is in progress (until its layers are all added)."""
        return self.run_panel.running

    @property
    def run_on(self) -> str:
        """ "plane" or "stack" (what a run on a stack covers)."""
        return self.form.run_on

    @property
    def threshold_value(self) -> float:
        """The threshold slider's value."""
        return self.result_panel.threshold_value

    @threshold_value.setter
    def threshold_value(self, value: float) -> None:
        self.result_panel.threshold_value = value

    def threshold_setting(self) -> float | str:
        """The threshold chosen: "auto" or the slider value."""
        return self.result_panel.threshold_setting()

    def settings(self) -> tuple[Settings, Any]:
        """Validated run settings and the ``contrast_limits`` choice (form + threshold)."""
        return self.form.settings(self.threshold_setting())

    def cancel(self, _value: Any = None) -> None:
        """Stop the run at its next step; nothing is added."""
        self.run_panel.cancel()

    # -- running ----------------------------------------------------------------------
    def _on_run(self) -> None:
        if self.running or self._disposed:
            return
        layer = self.form.image
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
            fields = self.form.fields()
            wanted = fields.instance_min_size if fields.instances else False
            count = check_instances_option(wanted, self.run_on)
        except (ValueError, TypeError, DiffCutError) as exc:
            show_error(f"DiffCut: {exc}")
            return
        self.start(taken, settings, instances=count)

    def start(
        self, taken: LayerImage, settings: Settings, instances: int | None = None
    ) -> SegmentationWorker:
        """Start a run on a background thread; layers are added when it returns.

        ``instances``: also count the result's objects into an instance layer,
        pieces of at least this many pixels (:mod:`~napari_diffcut.plugin.instances`).
        """
        self._watch_window()

        def apply(out: RunOutput) -> Iterator[Any]:
            plan = plan_result_layers(self._viewer, out.tuples)
            last = None
            for last in iter_apply_plan(self._viewer, plan):  # one layer per event-loop turn
                yield last
            if instances is not None and last is not None:  # the main layer is placed last
                yield apply_instances(self._viewer, last, instances)

        def done(out: RunOutput, layers: list[Any]) -> str:
            warn_alignment(taken)
            image = self.form.image
            if image is not None and image.name == taken.source:
                self.result_panel.sync()
            return done_message(out.segmentation, layers)

        return self.run_panel.start(self.engine, taken, settings, apply, done)

    # -- lifetime -----------------------------------------------------------------------
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
        self.run_panel.dispose()
        for emitter, callback in self._viewer_connections():
            emitter.disconnect(callback)
        self.form.dispose()
        self.result_panel.dispose()
        if self.hierarchy_editor is not None:
            self.hierarchy_editor.dispose()  # no more click edits from a closed widget
        # A load still running (a run closed mid-load) frees its model when it ends.
        self.engine.close()
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


__all__ = ["DiffCutWidget", "done_message"]
