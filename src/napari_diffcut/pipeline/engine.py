"""Keeping a loaded model between runs, and draining progress generators.

:class:`ModelCache` loads the diffusion model on the first diffusion run and
reloads it only when the model, device, dtype, revision or pickle setting
changes. :class:`~napari_diffcut.large.dispatch.DiffCutEngine` adds the
``segment`` methods on top of it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from napari_diffcut.pipeline.settings import Progress, Settings


class ModelCache:
    """Keeps a loaded model between runs; one per widget or batch worker.

    The model is loaded on the first diffusion run and reloaded only when the
    model, device, dtype, revision or pickle setting changes.
    """

    def __init__(self) -> None:
        self._model: Any = None
        self._key: tuple[Any, ...] | None = None

    def model_for(self, settings: Settings) -> Any:
        """The loaded model for ``settings`` (loading it when needed)."""
        s = settings
        key = (s.model, s.device, s.dtype, s.revision, s.allow_pickle)
        if self._key != key:
            from napari_diffcut.attention.preflight import check_model, hub_offline_if

            # A missing folder or an uncached model with no network fails here at
            # once, before torch and diffusers are imported (tens of seconds on a
            # small machine) and before huggingface_hub retries the hub.
            from napari_diffcut.attention.weights_check import check_model_files, load_error

            # A truncated .safetensors or an absurd UNet config is named before the
            # layout check would misread it as "only pickled weights" (issue 12.7).
            check_model_files(s.model)
            found = check_model(s.model, revision=s.revision, allow_pickle=s.allow_pickle)
            from napari_diffcut.attention.model import load_model

            self.unload()
            try:
                # Cached but the hub unreachable: read the cache only, no hub retries
                # (the API and the widget, like the command line).
                with hub_offline_if(found.offline):
                    self._model = load_model(
                        s.model, device=s.device, dtype=s.dtype, revision=s.revision,
                        allow_pickle=s.allow_pickle,
                    )
            except Exception as exc:
                # A file that cannot be unpickled safely is one line, not a traceback.
                err = load_error(s.model, exc)
                if err is None:
                    raise
                raise err from None
            self._key = key
        return self._model

    @property
    def loaded(self) -> bool:
        """Whether a model is in memory."""
        return self._model is not None

    def unload(self) -> None:
        """Free the model (and GPU memory)."""
        was_cuda = self._model is not None and self._model.device.type == "cuda"
        self._model = None
        self._key = None
        if was_cuda:
            import torch

            torch.cuda.empty_cache()


def drain(
    gen: Generator[Progress, None, Any], progress: Callable[[Progress], None] | None = None
) -> Any:
    """Run a progress generator to the end, passing events to ``progress``."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(event)
