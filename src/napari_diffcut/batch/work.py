"""One image of a batch: read, segment, write its outputs atomically.

:func:`process_image` is what a local run and every Dask worker call per
image; it never raises for a bad image but returns a failed
:class:`ImageResult` with a one-line reason.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_diffcut.batch.jobs import (
    Job,
    Reader,
    output_state,
)
from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.files.io import read_image
from napari_diffcut.files.outputs import OutputPlan, plan_outputs, write_run_outputs

if TYPE_CHECKING:  # pragma: no cover
    from napari_diffcut.large.dispatch import DiffCutEngine
    from napari_diffcut.pipeline.settings import Settings


@dataclass(frozen=True)
class ImageResult:
    """What happened to one image.

    Attributes
    ----------
    key : str
        The job's key.
    status : {"done", "failed"}
        Segmented and written, or not.
    error : str
        One-line reason of a failure.
    details : str
        Traceback of a failure (for the log file).
    fatal : bool
        The model could not be loaded: every image would fail, so the batch stops.
    seconds : float
        Time spent on this image.
    worker : str
        "host:pid" of the process that ran it.
    loaded_model : bool
        This image made its worker load the model (once per worker process).
    note : str
        Extra information (e.g. outputs found complete after a worker restart).
    """

    key: str
    status: str
    error: str = ""
    details: str = ""
    fatal: bool = False
    seconds: float = 0.0
    worker: str = ""
    loaded_model: bool = False
    note: str = ""


def _here() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def one_line(exc: BaseException) -> str:
    """``"Type: first line of the message"`` (the log keeps the full traceback)."""
    lines = str(exc).strip().splitlines()
    more = " [...]" if len(lines) > 1 else ""
    return f"{type(exc).__name__}: {lines[0] if lines else ''}{more}"


def _failure(job: Job, exc: BaseException, start: float, *, fatal: bool = False) -> ImageResult:
    return ImageResult(
        key=job.key,
        status="failed",
        error=one_line(exc),
        details="".join(traceback.format_exception(exc)),
        fatal=fatal,
        seconds=time.perf_counter() - start,
        worker=_here(),
    )


def write_outputs(job: Job, seg: Any, settings: Settings, *, levels: bool) -> list[Path]:
    """Write the label TIFF, the levels TIFF (if ``levels``) and the settings JSON together.

    ``seg`` is what the engine returns: a :class:`Segmentation`
    for an image, or a stack / tiled result (labels of the whole input; a stack
    has no single levels list, so ``levels`` is refused for it).
    The outputs are staged in a hidden folder and renamed into place with the
    JSON last (:mod:`napari_diffcut.files.outputs`), so a run stopped at any
    moment leaves an image that is either done or not done (and redone next
    time). Outputs made with other settings are replaced the same way, and an
    old levels TIFF goes when no new one is written (it would not match the
    new labels).
    """
    if levels and not hasattr(seg, "levels"):
        raise DiffCutError(
            f"levels=True (--levels) is not available for a {type(seg).__name__} "
            f"(labels of shape {tuple(seg.labels.shape)}); run without it"
        )
    plan = job_plan(job, levels=levels)
    record = dict(
        getattr(seg, "settings", {}),
        # The requested settings, kept apart: the engine's record also holds
        # derived values under setting names (e.g. the working size it used).
        batch_settings=settings.as_dict(),
        input=str(job.input),
        threshold_used=getattr(seg, "threshold", None),
        batch_key=job.key,
        worker=_here(),
    )
    stack = np.stack([np.asarray(level) for level in seg.levels]) if levels else None
    return write_run_outputs(plan, np.asarray(seg.labels), stack, record)


def job_plan(job: Job, *, levels: bool) -> OutputPlan:
    """The checked output plan of a job (raises DiffCutError before any work).

    The batch replaces its own outputs of an image that is not done (its
    conflict rules decide when that is allowed); files it did not write, and
    the input, are never replaced.
    """
    return plan_outputs(
        job.labels, inputs=[job.input], levels=levels, overwrite=True,
        names=(job.labels, job.levels, job.record), owned=True,
    )


def process_image(
    job: Job,
    settings: Settings,
    *,
    levels: bool,
    engine: DiffCutEngine,
    reader: Reader | None = None,
) -> ImageResult:
    """Segment one image and write its outputs; never raises for a bad image.

    Parameters
    ----------
    job : Job
        The image and its output paths.
    settings : Settings
        Run settings.
    levels : bool
        Also write every hierarchy level.
    engine : DiffCutEngine
        Keeps the model loaded between images of this process.
    reader : callable, optional
        ``reader(path) -> array``; default :func:`napari_diffcut.files.io.read_image`.

    Returns
    -------
    ImageResult
        status "done" or "failed" (with the reason). ``fatal`` is set when the
        model cannot be loaded.
    """
    start = time.perf_counter()
    state, reason = output_state(job, settings, levels=levels)
    if state == "done":
        # The driver submits only images that were not done, so this is a retry
        # of a task whose first attempt wrote everything and then lost its
        # worker before reporting: writing again would duplicate the work.
        return ImageResult(
            job.key,
            "done",
            worker=_here(),
            note="outputs found complete (retried task)",
        )
    if state == "conflict" and not job.replace:
        return _failure(
            job,
            DiffCutError(f"outputs with other settings appeared during the run: {reason}"),
            start,
        )
    had_model = engine.loaded
    if settings.backbone == "diffusion":
        try:
            engine.model_for(settings)
        except Exception as exc:  # noqa: BLE001 - reported; the driver stops the batch
            return _failure(job, exc, start, fatal=True)
    try:
        job_plan(job, levels=levels)  # refuse before computing, not after
        image = (reader or read_image)(job.input)
        seg = engine.segment(image, settings)
        write_outputs(job, seg, settings, levels=levels)
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop a batch
        return _failure(job, exc, start)
    return ImageResult(
        job.key,
        "done",
        seconds=time.perf_counter() - start,
        worker=_here(),
        loaded_model=engine.loaded and not had_model,
    )


def iter_in_process(
    jobs: Sequence[Job], settings: Settings, *, levels: bool, reader: Reader | None
) -> Iterator[ImageResult]:
    """Run the jobs one after the other with one engine (one model load).

    Yields
    ------
    ImageResult
        One per job, in order.
    """
    from napari_diffcut.large.dispatch import DiffCutEngine

    engine = DiffCutEngine()
    try:
        for job in jobs:
            yield process_image(job, settings, levels=levels, engine=engine, reader=reader)
    finally:
        engine.unload()
