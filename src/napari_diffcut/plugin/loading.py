"""An engine whose model load can be walked away from: Cancel works while it loads.

Loading Stable Diffusion weights is one blocking library call (tens of
seconds on a CPU) that no thread can interrupt. :class:`BackgroundLoadEngine`
runs it in a helper thread and waits for it in short steps, asking
``should_stop`` between them; when a run is cancelled the wait ends at once
(:class:`LoadCancelledError`) and the load goes on in the background. The model it
loads is kept for the next run (or freed, if the engine was closed meanwhile);
a later run waits for that load rather than starting a second one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from napari_diffcut.large.dispatch import DiffCutEngine

if TYPE_CHECKING:
    from napari_diffcut.pipeline.settings import Settings

#: Seconds between two looks at ``should_stop`` while a model loads.
POLL_S = 0.05
#: Loads shorter than this were a cache hit, not a load: they are not timed.
CACHE_HIT_S = 0.5


class LoadCancelledError(Exception):
    """The run was cancelled while its model loaded; the load finishes in the background."""


class BackgroundLoadEngine(DiffCutEngine):
    """A :class:`~napari_diffcut.large.dispatch.DiffCutEngine` with a cancellable wait on loads.

    Attributes
    ----------
    should_stop : callable
        Asked every :data:`POLL_S` seconds while a model loads (the widget
        sets it to its worker's abort flag).
    last_load_s : float or None
        Seconds the last real model load took (None before the first).
    """

    def __init__(self) -> None:
        super().__init__()
        self.should_stop: Callable[[], bool] = lambda: False
        self.last_load_s: float | None = None
        self._load_lock = threading.Lock()
        self._closed = False
        self._loading = 0  # loads in flight (for loading_in_background)

    @property
    def loading_in_background(self) -> bool:
        """Whether a model load is still running (e.g. after a cancelled run)."""
        return self._loading > 0

    def model_for(self, settings: Settings) -> Any:
        """The model for ``settings``; :class:`LoadCancelledError` if stopped meanwhile."""
        if self.should_stop():  # cancelled before the load began: start none
            raise LoadCancelledError("")
        box: dict[str, Any] = {}
        self._loading += 1
        thread = threading.Thread(
            target=self._load, args=(settings, box), name="diffcut-model-load", daemon=True
        )
        thread.start()
        while thread.is_alive():
            thread.join(POLL_S)
            if thread.is_alive() and self.should_stop():
                raise LoadCancelledError(self.cancel_note())
        if "error" in box:
            raise box["error"]
        return box["model"]

    def _load(self, settings: Settings, box: dict[str, Any]) -> None:
        """The load itself (helper thread): one at a time, timed, freed if closed meanwhile."""
        try:
            with self._load_lock:
                start = time.perf_counter()
                try:
                    box["model"] = super().model_for(settings)
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting run
                    box["error"] = exc
                seconds = time.perf_counter() - start
                if seconds > CACHE_HIT_S:
                    self.last_load_s = seconds
                if self._closed:
                    box.pop("model", None)
                    super().unload()
        finally:
            self._loading -= 1

    def cancel_note(self) -> str:
        """What a cancel during a load means, in words, with the time a load takes here."""
        took = "" if self.last_load_s is None else f" (the last load took {self.last_load_s:.0f} s)"
        return (
            "the model load cannot be interrupted: it finishes in the background"
            f"{took} and the model is kept for the next run"
        )

    def close(self) -> None:
        """Free the model now, and any model a background load brings later."""
        self._closed = True
        self.unload()


__all__ = ["POLL_S", "BackgroundLoadEngine", "LoadCancelledError"]
