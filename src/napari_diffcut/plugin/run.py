"""The run part of the DiffCut dock widget: Run / Cancel, the worker, progress.

A run is ``engine.iter_segment`` (a generator of ``Progress`` events) on a
napari ``GeneratorWorker``; the result's layer-data tuples are built on the
worker too (:func:`run_segmentation`), so the GUI thread only adds layers.
Issue 13, point 2, keeps the event loop free during a run:

* progress events are coalesced: the slot only notes the latest one and a
  timer shows it at most every :data:`PROGRESS_MS` ms (each Qt call of a slot
  waits for the worker's GIL turn, so one repaint per event froze the GUI);
* layers are added one per turn of the event loop (:func:`iter_apply_plan`);
* the run's memory is freed (``gc.collect``) in the worker thread, not in a slot;
* Cancel stops at the next step; while the model loads, the wait for it ends
  at once (:class:`~napari_diffcut.plugin.loading.BackgroundLoadEngine`).

Cancel calls ``worker.quit()``: the worker stops before the next step and
closes the generator *in the worker thread* (which stops the UNet within one
attention layer), so no layer is added and the run's arrays are freed.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from magicgui.widgets import Container, Label, ProgressBar, PushButton
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error
from psygnal import Signal
from qtpy.QtCore import QTimer

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.pipeline.settings import Progress, Settings
from napari_diffcut.plugin.form import tight_row, wrap_label
from napari_diffcut.plugin.layers import LayerDataTuple
from napari_diffcut.plugin.loading import BackgroundLoadEngine, LoadCancelledError
from napari_diffcut.plugin.scripting import result_tuples
from napari_diffcut.plugin.take import LayerImage, record_intensity

logger = logging.getLogger(__name__)

#: Progress stages that count the run as a whole (a bar in planes or in tiles).
OUTER_STAGES = ("plane", "tile")
#: The progress display is refreshed at most this often (ms).
PROGRESS_MS = 100


class RunFailedError(Exception):
    """Carries an engine error out of the worker (see :func:`run_segmentation`)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class RunOutput:
    """What a run hands to the GUI thread: the result and its layer-data tuples."""

    segmentation: Any
    tuples: list[LayerDataTuple]


def run_segmentation(
    engine: Any, taken: LayerImage, settings: Settings
) -> Generator[Progress, None, RunOutput]:
    """The worker's generator: the engine run, then the result layers' data.

    superqt's generator worker treats a ``RuntimeError`` raised by the
    generator as "the worker was deleted" and drops it without ``errored`` or
    ``finished``; ``DiffCutError`` is a ``RuntimeError``, so engine errors are
    wrapped in :class:`RunFailedError` to reach the widget.
    """
    try:
        seg = yield from engine.iter_segment(
            taken.image, settings, contrast_limits=taken.contrast_limits
        )
        record_intensity(seg, taken.contrast_limits)
        yield Progress("layers", 0, 1, "building the result layers")
        return RunOutput(seg, result_tuples(seg, taken))
    except RuntimeError as exc:
        raise RunFailedError(exc) from exc


class SegmentationWorker(GeneratorWorker):
    """A napari generator worker that closes its generator when it stops.

    superqt's worker just stops iterating on ``quit()``; closing the generator
    here, in the worker thread, runs the engine's cleanup at once (it stops
    the UNet thread and drops the run's arrays), and the garbage collection
    that frees them runs here too, off the GUI thread. Errors are reported by
    the widget (one notification with the engine's message), not relayed
    with a traceback.
    """

    def _relay_error(self, exc: BaseException) -> None:
        """No traceback notification: the widget shows the engine's message."""

    def work(self) -> Any:
        """Run the generator; close it and collect garbage whatever happens."""
        try:
            return super().work()
        finally:
            self._gen.close()
            gc.collect()


def progress_view(
    event: Progress, outer: str | None
) -> tuple[str | None, tuple[int, int] | None, str]:
    """(outer stage, (value, max) for the bar or None, status text) for one event.

    The bar follows the whole run (planes of a stack, tiles) once such an
    event was seen, else the current stage.
    """
    if event.stage in OUTER_STAGES and (outer is None or event.stage == "plane"):
        outer = event.stage
    bar = None
    if outer is None or event.stage == outer:
        total = max(int(event.total), 1)
        bar = (min(int(event.step), total), total)
    text = f"{event.stage}: {event.message}" if event.message else event.stage
    return outer, bar, text


class RunPanel(Container):
    """Run / Cancel buttons, a progress bar and a status line; owns the worker.

    The widget connects :attr:`run_clicked` and calls :meth:`start`.
    """

    run_clicked = Signal()

    def __init__(self) -> None:
        super().__init__(labels=True)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status_label = wrap_label(Label(value="ready"))
        buttons = tight_row([self.run_button, self.cancel_button], "")
        self.extend([buttons, self.progress_bar, self.status_label])
        self.worker: SegmentationWorker | None = None
        self._steps: Iterator[Any] | None = None
        self._disposed = False
        self._cancelled = False
        self._succeeded = False
        self._outer: str | None = None
        self._stage = ""
        self._pending: tuple[tuple[int, int] | None, str] | None = None
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(PROGRESS_MS)
        self._timer.timeout.connect(self._show_progress)
        self.run_button.changed.connect(lambda _=None: self.run_clicked.emit())
        self.cancel_button.changed.connect(self.cancel)

    @property
    def running(self) -> bool:
        """Whether a run is in progress (its layers not all added yet)."""
        return self.worker is not None or self._steps is not None

    def start(
        self,
        engine: BackgroundLoadEngine,
        taken: LayerImage,
        settings: Settings,
        apply: Callable[[RunOutput], Iterator[Any]],
        done: Callable[[RunOutput, list[Any]], str],
    ) -> SegmentationWorker:
        """Start a run on a background thread.

        ``apply(output)`` yields once per layer it adds (advanced one step
        per event-loop turn); ``done(output, layers)`` returns the status.
        """
        worker = create_worker(
            run_segmentation,
            engine,
            taken,
            settings,
            _worker_class=SegmentationWorker,
            _ignore_errors=True,
            _start_thread=False,
        )
        engine.should_stop = lambda: worker.abort_requested
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda out: self._on_returned(out, apply, done))
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._cancelled = self._succeeded = False
        self._outer, self._stage, self._pending = None, "", None
        self._set_running(True, f"starting on {taken.source!r}")
        worker.start()
        return worker

    def cancel(self, _value: Any = None) -> None:
        """Stop the run at its next step (at once while the model loads); nothing is added."""
        if self.worker is None:
            return
        self._cancelled = True
        self._timer.stop()
        self.status_label.value = "cancelling..."
        self.cancel_button.enabled = False
        self.worker.quit()

    def dispose(self) -> None:
        """Stop any run (the widget was closed)."""
        self._disposed = True
        self._timer.stop()
        self._steps = None
        if self.worker is not None:
            self.worker.quit()

    def _set_running(self, running: bool, status: str) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        self.status_label.value = status
        if running:
            self.progress_bar.max = 1
            self.progress_bar.value = 0

    # -- worker slots (GUI thread) -------------------------------------------------
    def _on_progress(self, event: Progress) -> None:
        """Note the event; the display follows at most every PROGRESS_MS ms."""
        if self._disposed or self._cancelled:
            return
        self._outer, bar, text = progress_view(event, self._outer)
        self._stage = event.stage
        old_bar = self._pending[0] if self._pending else None
        self._pending = (bar if bar is not None else old_bar, text)
        if not self._timer.isActive():
            self._timer.start()

    def _show_progress(self) -> None:
        if self._pending is None or self._disposed or self._cancelled:
            return
        bar, text = self._pending
        self._pending = None
        if bar is not None:
            self.progress_bar.max = bar[1]
            self.progress_bar.value = bar[0]
        self.status_label.value = text

    def _on_returned(
        self,
        out: RunOutput,
        apply: Callable[[RunOutput], Iterator[Any]],
        done: Callable[[RunOutput, list[Any]], str],
    ) -> None:
        if self._disposed:
            return
        self._timer.stop()
        self._show_progress()  # the last bar (planes, tiles) stays up
        self.status_label.value = "adding the result layers"
        layers: list[Any] = []
        steps = apply(out)
        self._steps = steps

        def step() -> None:
            if self._disposed or self._steps is not steps:
                return
            try:
                layers.append(next(steps))
            except StopIteration:
                self._steps = None
                self._succeeded = True
                self._end(done(out, layers))
                return
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: say so, stay usable
                self._steps = None
                logger.error("DiffCut could not add the result layers", exc_info=exc)
                show_error(f"DiffCut: could not add the result layers: {type(exc).__name__}: {exc}")
                self._end("failed (see notification)")
                return
            QTimer.singleShot(0, step)

        QTimer.singleShot(0, step)

    def _on_errored(self, exc: BaseException) -> None:
        if self._disposed:
            return
        if isinstance(exc, RunFailedError):
            exc = exc.error
        if isinstance(exc, LoadCancelledError):
            self.status_label.value = f"cancelled; {exc}" if str(exc) else "cancelled"
            return
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
        if self._disposed or self._steps is not None:
            return  # layers still being added: _end follows
        status = self.status_label.value
        if self._cancelled and not status.startswith("cancelled"):
            status = "cancelled"  # also when the run ended before it saw the request
        elif status.startswith("starting"):
            status = "ready"
        self._end(status)

    def _end(self, status: str) -> None:
        """Back to ready with ``status`` once the worker and the layer steps are both done."""
        self.status_label.value = status
        if self.running or self._disposed:
            return
        self._set_running(False, status)
        # A full bar only for a result: not after an error or a cancel.
        self.progress_bar.value = self.progress_bar.max if self._succeeded else 0


__all__ = [
    "OUTER_STAGES",
    "RunFailedError",
    "RunOutput",
    "RunPanel",
    "SegmentationWorker",
    "progress_view",
    "run_segmentation",
]
