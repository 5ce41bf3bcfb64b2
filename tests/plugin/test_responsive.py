"""The run panel keeps the GUI thread free (issue 13, point 2): structure, not timing.

Timing lives in ``benchmarks/bench_gui.py``; here: the worker (not the GUI
thread) builds the result's arrays and tables, Cancel stops the real pipeline
between NCut splits, a step that cannot be interrupted is let go (and a new
run waits for it), and the interpreter settings of a run are restored.
"""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

import napari_diffcut.plugin.run as run_mod
from napari_diffcut.pipeline.settings import Progress, make_settings
from napari_diffcut.plugin.loading import BackgroundLoadEngine
from napari_diffcut.plugin.run import (
    RUN_SWITCH_INTERVAL_S,
    RunPanel,
    responsive_interpreter,
    with_tables,
)

TIMEOUT_MS = 120_000
FAST = {"backbone": "pixels", "working_size": 128, "min_size": 4, "max_depth": 3}


def _image() -> np.ndarray:
    """RGB uint8, 96 x 128: four flat regions and a disc (a few NCut splits)."""
    img = np.zeros((96, 128, 3), np.uint8)
    img[:, 64:] = (200, 200, 200)
    img[48:, :64] = (200, 30, 30)
    yy, xx = np.mgrid[:96, :128]
    img[(yy - 30) ** 2 + (xx - 96) ** 2 < 15**2] = (20, 20, 160)
    return img


def _taken(image: np.ndarray) -> Any:
    """What ``run_segmentation`` reads of a ``LayerImage``."""
    return SimpleNamespace(
        image=image, contrast_limits=None, source="img", geometry=None, plane=None
    )


class Calls:
    """``apply`` / ``done`` callbacks for :meth:`RunPanel.start` that record what they got."""

    def __init__(self) -> None:
        self.applied: list[Any] = []
        self.applied_in: list[threading.Thread] = []

    def apply(self, out: Any) -> Iterator[Any]:
        self.applied.append(out)
        self.applied_in.append(threading.current_thread())
        yield from ()

    def done(self, out: Any, layers: list[Any]) -> str:
        return "done"


def start(panel: RunPanel, engine: Any, calls: Calls) -> Any:
    """Start a FAST pixels run of ``engine`` on :func:`_image`; the worker."""
    settings = make_settings(None, **FAST)
    return panel.start(engine, _taken(_image()), settings, calls.apply, calls.done)


@pytest.fixture
def panel(qtbot: Any) -> Iterator[RunPanel]:
    p = RunPanel()
    yield p
    p.dispose()
    qtbot.waitUntil(lambda: p.worker is None and p.stopping is None, timeout=TIMEOUT_MS)


def test_worker_builds_the_label_arrays_and_tables(
    panel: RunPanel, qtbot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    built_in: list[threading.Thread] = []
    real = run_mod.result_tuples

    def recording(seg: Any, taken: Any) -> Any:
        built_in.append(threading.current_thread())
        return real(seg, taken)

    monkeypatch.setattr(run_mod, "result_tuples", recording)
    calls = Calls()
    start(panel, BackgroundLoadEngine(), calls)
    qtbot.waitUntil(lambda: not panel.running, timeout=TIMEOUT_MS)
    assert panel.status_label.value == "done"
    assert built_in and built_in[0] is not threading.main_thread()
    (out,) = calls.applied
    assert calls.applied_in == [threading.main_thread()]  # only the layers go on the GUI thread
    data, kwargs, _ = out.tuples[0]
    assert isinstance(data, np.ndarray) and data.shape == (96, 128)
    assert all(isinstance(kw["features"], pd.DataFrame) for _, kw, _ in out.tuples)


class CountingEngine(BackgroundLoadEngine):
    """The real engine; records the stages its generator reaches and when Cancel came."""

    def __init__(self) -> None:
        super().__init__()
        self.stages: list[str] = []
        self.cuts = threading.Event()
        self.closed_in: threading.Thread | None = None

    def iter_segment(self, image: Any, settings: Any = None, **kwargs: Any) -> Any:
        gen = super().iter_segment(image, settings, **kwargs)
        try:
            for event in gen:
                self.stages.append("after-cancel" if self.should_stop() else event.stage)
                if self.stages.count("cut") == 2:
                    self.cuts.set()
                yield event
        finally:
            gen.close()
            self.closed_in = threading.current_thread()
        return None


def test_cancel_stops_the_real_pipeline_between_splits(panel: RunPanel, qtbot: Any) -> None:
    engine = CountingEngine()
    calls = Calls()
    start(panel, engine, calls)
    qtbot.waitUntil(engine.cuts.is_set, timeout=TIMEOUT_MS)
    panel.cancel()
    qtbot.waitUntil(lambda: not panel.running, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: engine.closed_in is not None, timeout=TIMEOUT_MS)
    # At most the step under way when Cancel came: no further split, no upsampling.
    assert engine.stages.count("after-cancel") <= 1
    assert "upsample" not in engine.stages
    assert engine.closed_in is not threading.main_thread()
    assert calls.applied == []
    assert panel.status_label.value.startswith("cancelled")


class BlockingEngine:
    """A fake engine whose first step is one long call (a gate) that Cancel cannot interrupt."""

    def __init__(self) -> None:
        self.should_stop: Any = lambda: False
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.runs = 0

    def iter_segment(self, image: Any, settings: Any = None, **kwargs: Any) -> Any:
        self.runs += 1
        yield Progress("walk", 0, 1, "long step")
        self.entered.set()
        self.gate.wait(60)  # one uninterruptible call
        yield Progress("walk", 1, 1, "done")
        return SimpleNamespace(settings={}, shape=(2, 2))


def test_a_step_that_cannot_stop_is_let_go_and_a_new_run_waits(
    panel: RunPanel, qtbot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_mod, "CANCEL_WAIT_MS", 20)
    monkeypatch.setattr(run_mod, "result_tuples", lambda seg, taken: [])
    engine = BlockingEngine()
    calls = Calls()
    first = start(panel, engine, calls)
    qtbot.waitUntil(engine.entered.is_set, timeout=TIMEOUT_MS)
    panel.cancel()
    # Ready again while the long step still runs; the status says so.
    qtbot.waitUntil(lambda: not panel.running, timeout=TIMEOUT_MS)
    assert panel.stopping is first and first.is_running
    assert "background" in panel.status_label.value
    assert panel.run_button.enabled
    # A new run waits for the old one: the engine is not entered a second time.
    second = start(panel, engine, calls)
    assert panel.running and panel.worker is second
    assert "cancelled run" in panel.status_label.value
    qtbot.wait(50)
    assert engine.runs == 1
    engine.gate.set()  # the long step ends: the old run stops, the new one starts
    qtbot.waitUntil(lambda: not panel.running, timeout=TIMEOUT_MS)
    assert panel.stopping is None and engine.runs == 2
    assert len(calls.applied) == 1  # the new run's result only; the cancelled one is dropped
    assert panel.status_label.value == "done"


def test_cancelling_a_waiting_run_never_starts_it(
    panel: RunPanel, qtbot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_mod, "CANCEL_WAIT_MS", 20)
    engine = BlockingEngine()
    calls = Calls()
    start(panel, engine, calls)
    qtbot.waitUntil(engine.entered.is_set, timeout=TIMEOUT_MS)
    panel.cancel()
    qtbot.waitUntil(lambda: not panel.running, timeout=TIMEOUT_MS)
    start(panel, engine, calls)
    panel.cancel()
    assert not panel.running and panel.status_label.value == "cancelled"
    engine.gate.set()
    qtbot.waitUntil(lambda: panel.stopping is None, timeout=TIMEOUT_MS)
    assert engine.runs == 1 and calls.applied == []


def test_progress_bar_is_set_with_updates_back_on(panel: RunPanel) -> None:
    panel._set_bar(3, 7)
    assert (panel.progress_bar.value, panel.progress_bar.max) == (3, 7)
    assert panel.progress_bar.native.updatesEnabled()


def test_with_tables_builds_dataframes_and_leaves_the_input() -> None:
    features = {"index": np.arange(3), "area": np.array([4, 5, 6])}
    tuples = [(np.zeros((2, 2)), {"name": "a", "features": features}, "labels")]
    ((data, kwargs, kind),) = with_tables(tuples)
    assert isinstance(kwargs["features"], pd.DataFrame)
    assert list(kwargs["features"]["area"]) == [4, 5, 6]
    assert kwargs["name"] == "a" and kind == "labels" and data is tuples[0][0]
    assert tuples[0][1]["features"] is features


def test_responsive_interpreter_restores_and_frees_the_run_cycles() -> None:
    class Node:
        pass

    interval = sys.getswitchinterval()
    assert gc.get_freeze_count() == 0
    with responsive_interpreter():
        assert sys.getswitchinterval() <= RUN_SWITCH_INTERVAL_S
        assert gc.get_freeze_count() > 0  # what existed before the run is not scanned
        with responsive_interpreter():  # a second run at the same time
            pass
        assert sys.getswitchinterval() <= RUN_SWITCH_INTERVAL_S  # the first still runs
        node = Node()
        node.self = node  # type: ignore[attr-defined]  # a cycle made during the run
        ref = weakref.ref(node)
        del node
    assert ref() is None  # the collection at the end freed it
    assert sys.getswitchinterval() == interval
    assert gc.get_freeze_count() == 0


def test_responsive_interpreter_keeps_an_applications_own_freeze() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with responsive_interpreter():
            pass
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()
