"""The run part of the DiffCut dock widget: Run / Cancel, the worker, progress.

A run is ``engine.iter_segment`` (a generator of ``Progress`` events) on a
napari ``GeneratorWorker``; the result's layer-data tuples, features tables
included, are built on the worker too (:func:`run_segmentation`), so the GUI
thread only adds layers. Issue 13, point 2, keeps the event loop free during
a run (what froze it was measured: ``benchmarks/bench_gui.py``):

* progress events are coalesced: the slot only notes the latest one and a
  timer shows it at most every :data:`PROGRESS_MS` ms, the bar without its
  synchronous repaint (:meth:`RunPanel._set_bar`);
* layers are added one per turn of the event loop (:func:`iter_apply_plan`);
* while a run is active the interpreter hands the GIL over more often and the
  objects older than the run are frozen for the garbage collector
  (:func:`responsive_interpreter`): one full ``gc.collect`` at the end of a
  run held the GIL for 0.2-0.8 s, whatever thread ran it;
* Cancel stops at the next step; while the model loads, the wait for it ends
  at once (:class:`~napari_diffcut.plugin.loading.BackgroundLoadEngine`).

Cancel calls ``worker.quit()``: the worker stops before the next step and
closes the generator *in the worker thread* (which stops the UNet within one
attention layer), so no layer is added and the run's arrays are freed. A step
that is one long NumPy call cannot be interrupted: after :data:`CANCEL_WAIT_MS`
the panel is ready again and says that the step finishes in the background;
a new run waits for it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
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
#: After Cancel, how long (ms) the panel waits for the run to stop at its next step
#: before it is ready again and lets that step finish in the background.
CANCEL_WAIT_MS = 1000
#: Thread switch interval (s) while a run is active. Each Python callback of an
#: event-loop turn (napari's window event filter, magicgui signals, vispy) waits
#: for the worker to hand over the GIL, up to this long; Python's default is 5 ms.
RUN_SWITCH_INTERVAL_S = 0.001

_tuning_lock = threading.Lock()
_tuning: dict[str, Any] = {"active": 0, "interval": None, "froze": False}


@contextlib.contextmanager
def responsive_interpreter() -> Iterator[None]:
    """Interpreter settings that keep the GUI thread free while a run is active.

    Process-wide, so counted: the first active run sets them, the last one
    restores them. A shorter switch interval bounds the GUI thread's wait for
    the GIL; ``gc.freeze()`` takes every object older than the run out of the
    collector's scans, so a collection during the run, and the one at its end
    that frees the run's reference cycles (arrays held by tracebacks,
    generator frames), scan the run's objects only: a full collection of a
    napari session holds the GIL for 0.2-0.8 s, from any thread. Nothing
    older than the run is lost: it is unfrozen when the last run ends and
    collected as usual from then on. An application that froze objects
    itself keeps its own freeze.
    """
    with _tuning_lock:
        if _tuning["active"] == 0:
            _tuning["interval"] = sys.getswitchinterval()
            sys.setswitchinterval(min(RUN_SWITCH_INTERVAL_S, _tuning["interval"]))
            _tuning["froze"] = gc.get_freeze_count() == 0
            if _tuning["froze"]:
                gc.freeze()
        _tuning["active"] += 1
    try:
        yield
    finally:
        gc.collect()  # the run's objects only (see above)
        with _tuning_lock:
            _tuning["active"] -= 1
            if _tuning["active"] == 0:
                if _tuning["froze"]:
                    gc.unfreeze()
                sys.setswitchinterval(_tuning["interval"])


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
        return RunOutput(seg, with_tables(result_tuples(seg, taken)))
    except RuntimeError as exc:
        raise RunFailedError(exc) from exc


def with_tables(tuples: list[LayerDataTuple]) -> list[LayerDataTuple]:
    """The layer-data tuples with their ``features`` as pandas tables, built here.

    napari turns a features dict into a ``DataFrame`` when it adds the layer,
    and the first time that imports pandas: 0.6-0.7 s on the GUI thread
    (measured, 2 cores). Called in the worker, so both happen there.
    """
    import pandas as pd  # napari's own dependency (its layers keep features as tables)

    out = []
    for data, kwargs, kind in tuples:
        features = kwargs.get("features")
        if isinstance(features, dict):
            table = pd.DataFrame({key: np.asarray(v) for key, v in features.items()})
            kwargs = {**kwargs, "features": table}
        out.append((data, kwargs, kind))
    return out


class SegmentationWorker(GeneratorWorker):
    """A napari generator worker that closes its generator when it stops.

    superqt's worker just stops iterating on ``quit()``; closing the generator
    here, in the worker thread, runs the engine's cleanup at once (it stops
    the UNet thread and drops the run's arrays); the whole run is inside
    :func:`responsive_interpreter`, whose collection at the end frees the
    run's reference cycles without scanning the rest. Errors are reported by
    the widget (one notification with the engine's message), not relayed
    with a traceback.
    """

    def _relay_error(self, exc: BaseException) -> None:
        """No traceback notification: the widget shows the engine's message."""

    def work(self) -> Any:
        """Run the generator; close it and collect the run's garbage whatever happens."""
        with responsive_interpreter():
            try:
                return super().work()
            finally:
                self._gen.close()


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
        self._stopping: SegmentationWorker | None = None
        self._deferred: tuple[SegmentationWorker, BackgroundLoadEngine] | None = None
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

    @property
    def stopping(self) -> SegmentationWorker | None:
        """A cancelled run's worker still finishing its current step, or None."""
        return self._stopping

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
        While a cancelled run still finishes its current step, the new run
        waits for it (the two would share the model), and says so.
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

        def mine(slot: Callable[..., None]) -> Callable[..., None]:
            # A let-go worker's late signals (see cancel) must not touch a newer run.
            return lambda *args: slot(*args) if self.worker is worker else None

        worker.yielded.connect(mine(self._on_progress))
        worker.returned.connect(mine(lambda out: self._on_returned(out, apply, done)))
        worker.errored.connect(mine(self._on_errored))
        worker.aborted.connect(mine(self._on_aborted))
        worker.finished.connect(lambda: self._on_finished(worker))
        self.worker = worker
        self._cancelled = self._succeeded = False
        self._outer, self._stage, self._pending = None, "", None
        if self._stopping is not None:
            self._set_running(True, "starting once the cancelled run has stopped")
            self._deferred = (worker, engine)
        else:
            self._set_running(True, f"starting on {taken.source!r}")
            self._launch(worker, engine)
        return worker

    def _launch(self, worker: SegmentationWorker, engine: BackgroundLoadEngine) -> None:
        engine.should_stop = lambda: worker.abort_requested
        worker.start()

    def cancel(self, _value: Any = None) -> None:
        """Stop the run at its next step (at once while the model loads); nothing is added.

        The panel is ready again when the run has stopped, or after
        :data:`CANCEL_WAIT_MS` when its current step (one long NumPy call) is
        still running: that step then finishes in the background, and its
        result is dropped.
        """
        worker = self.worker
        if worker is None:
            return
        self._cancelled = True
        self._timer.stop()
        self.status_label.value = "cancelling..."
        self.cancel_button.enabled = False
        worker.quit()
        if self._deferred is not None and self._deferred[0] is worker:
            self._deferred = None  # never started: nothing to wait for
            self.worker = None
            self._end("cancelled")
            return
        QTimer.singleShot(CANCEL_WAIT_MS, lambda: self._let_go(worker))

    def _let_go(self, worker: SegmentationWorker) -> None:
        """Ready again while a cancelled run's current step finishes in the background."""
        if self._disposed or self.worker is not worker:
            return  # stopped in time (or the widget is gone)
        self.worker = None
        self._stopping = worker
        stage = f" ({self._stage})" if self._stage else ""
        self._end(f"cancelled; the current step{stage} finishes in the background")

    def dispose(self) -> None:
        """Stop any run (the widget was closed)."""
        self._disposed = True
        self._timer.stop()
        self._steps = None
        if self._deferred is not None:  # never started: nothing will finish it
            self._deferred = None
            self.worker = None
        if self.worker is not None:
            self.worker.quit()

    def _set_running(self, running: bool, status: str) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        self.status_label.value = status
        if running:
            self._set_bar(0, 1)

    def _set_bar(self, value: int, maximum: int | None = None) -> None:
        """Move the bar, repainted with the next coalesced update, not at once.

        ``QProgressBar.setValue`` repaints synchronously, and in a window that
        holds napari's GL canvas every repaint composes the whole window: about
        30 ms of GUI-thread time per call under software GL (measured), twice
        per progress refresh with the status line's own repaint.
        """
        native = self.progress_bar.native
        native.setUpdatesEnabled(False)  # makes setValue's repaint() a no-op
        try:
            if maximum is not None:
                self.progress_bar.max = maximum
            self.progress_bar.value = value
        finally:
            native.setUpdatesEnabled(True)  # schedules the (coalesced) update

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
            self._set_bar(bar[0], bar[1])
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

    def _on_finished(self, worker: SegmentationWorker) -> None:
        if worker is self._stopping:  # a let-go run has stopped: start the one waiting
            self._stopping = None
            deferred, self._deferred = self._deferred, None
            if deferred is not None and not self._disposed and self.worker is deferred[0]:
                self.status_label.value = "starting"
                self._launch(*deferred)
            return
        if worker is not self.worker:
            return
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
        self._set_bar(self.progress_bar.max if self._succeeded else 0)


__all__ = [
    "CANCEL_WAIT_MS",
    "OUTER_STAGES",
    "RUN_SWITCH_INTERVAL_S",
    "RunFailedError",
    "RunOutput",
    "RunPanel",
    "SegmentationWorker",
    "progress_view",
    "responsive_interpreter",
    "run_segmentation",
    "with_tables",
]
