"""Batch segmentation of many images: resumable, atomic, optionally on a Dask cluster.

``run_batch(inputs, out_dir, settings)`` segments every image of a folder, a
glob or a list of files, and ``napari-diffcut batch INPUT --out DIR`` is its
command line. Without ``workers``/``scheduler`` it runs in this process with
one :class:`~napari_diffcut.large.dispatch.DiffCutEngine` (the model loads once); with
``workers=N`` it starts a local Dask cluster of N single-threaded worker
processes, and with ``scheduler="tcp://HOST:PORT"`` it uses an existing Dask
cluster (see :mod:`napari_diffcut.batch.dask`).

Output folder (``KEY`` is the input's path relative to the input folder, or to
the fixed part of the glob, without its suffix; subfolders are mirrored)::

    OUT/KEY.diffcut.tif        labels, uint32 compressed TIFF
    OUT/KEY.levels.tif         every hierarchy level, coarsest first (levels=True)
    OUT/KEY.diffcut.json       settings record, written last: it marks KEY as done
    OUT/diffcut-manifest.json  run manifest: inputs, outputs, status, settings, version
    OUT/diffcut-batch.log      one block per failed image, with its traceback

Rules that make a batch safe to stop and restart:

- every file is written to a temporary file beside it and renamed into place,
  and the settings JSON is written after the label images, so an image is
  *done* exactly when its JSON and label TIFF(s) exist and the JSON's settings
  equal the requested ones; done images are skipped;
- outputs made with *other* settings are never replaced silently: the run is
  refused before anything is computed unless ``overwrite=True``
  (``--overwrite``), which redoes them (old JSON removed first);
- a failing image (unreadable file, bad shape...) is logged and reported, and
  the batch goes on; failed images have no outputs and are retried by the next
  run;
- one batch per output folder at a time (an advisory lock file), and
  temporary files left by a killed process are removed at the start and end of
  a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from napari_diffcut.batch.jobs import (
    LOCK_NAME,
    MANIFEST_NAME,
    Job,
    Reader,
    find_images,
    output_state,
    plan_jobs,
)
from napari_diffcut.batch.manifest import BatchSummary, Recorder
from napari_diffcut.batch.work import (
    iter_in_process,
)
from napari_diffcut.core.errors import DiffCutError

if TYPE_CHECKING:  # pragma: no cover
    from napari_diffcut.pipeline.settings import Settings



# --------------------------------------------------------------------------------------
# Inputs and output names


# --------------------------------------------------------------------------------------
# Done / missing / conflict


# --------------------------------------------------------------------------------------
# One image (runs in this process or on a Dask worker)


# --------------------------------------------------------------------------------------
# Driver: summary, manifest, log, progress, lock, temporary files


@contextlib.contextmanager
def _output_lock(out_dir: Path) -> Iterator[None]:
    """Hold an advisory lock so that two batch runs never write one folder at once.

    ``flock`` is released by the OS when the process dies, so a crash leaves no
    stale lock. Where ``fcntl`` does not exist (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(out_dir / LOCK_NAME, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DiffCutError(
                f"another napari-diffcut batch is writing to {out_dir} "
                f"(lock {out_dir / LOCK_NAME}); "
                "wait for it to finish or choose another output folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def remove_stale_temporaries(jobs: Sequence[Job], out_dir: Path) -> int:
    """Delete temporary files left by a killed writer of the outputs or the manifest.

    :func:`napari_diffcut.files.io.atomic_write_bytes` writes ``.NAME.XXXXXXXX.tmp``
    beside ``NAME``. Each output folder is listed once, so this stays linear in
    the number of images. Returns the number of files removed.
    """
    by_dir: dict[Path, set[str]] = {out_dir: {MANIFEST_NAME}}
    for job in jobs:
        for path in (job.labels, job.levels, job.record):
            by_dir.setdefault(path.parent, set()).add(path.name)
    removed = 0
    for folder, names in by_dir.items():
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            name = entry.name
            if (
                name.startswith(".")
                and name.endswith(".tmp")
                and name[1:-4].rsplit(".", 1)[0] in names
            ):
                entry.unlink(missing_ok=True)
                removed += 1
    return removed


def _classify(
    jobs: Sequence[Job], settings: Settings, *, levels: bool, overwrite: bool
) -> tuple[list[Job], list[Job]]:
    """Split jobs into (to run, already done); refuse conflicts unless ``overwrite``."""
    todo: list[Job] = []
    done: list[Job] = []
    conflicts: list[tuple[Job, str]] = []
    for job in jobs:
        state, reason = output_state(job, settings, levels=levels)
        if state == "done":
            done.append(job)
        elif state == "conflict":
            conflicts.append((job, reason))
            todo.append(dataclasses.replace(job, replace=True))
        else:
            todo.append(job)
    if conflicts and not overwrite:
        job, reason = conflicts[0]
        raise ValueError(
            f"{len(conflicts)} image(s) in {job.record.parent} already have outputs "
            f"made with other settings (e.g. {job.record.name}: {reason}); pass "
            "overwrite=True (--overwrite) to "
            "redo them with the requested settings, or choose another output folder"
        )
    return todo, done


def _batch_settings(settings: Settings | None) -> Settings:
    """Validated settings; a local model folder becomes an absolute path.

    Workers may run in another folder (or on another machine with the same
    shared file system), where a relative path would point elsewhere.
    """
    from napari_diffcut.pipeline.settings import Settings

    if settings is None:
        settings = Settings()
    if not isinstance(settings, Settings):
        raise TypeError(
            f"settings must be a napari_diffcut.Settings or None, got {type(settings).__name__}"
        )
    model = Path(settings.model).expanduser()
    if settings.backbone == "diffusion" and model.is_dir():
        settings = dataclasses.replace(settings, model=str(model.resolve()))
    return settings


def _check_cluster(workers: int | None, scheduler: str | None) -> None:
    if workers is not None and scheduler is not None:
        raise ValueError(
            "pass either workers (a local cluster) or scheduler (an existing one), "
            f"got workers={workers!r} and scheduler={scheduler!r}"
        )
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if scheduler is not None and (not isinstance(scheduler, str) or "://" not in scheduler):
        raise ValueError(
            f"scheduler must be an address such as 'tcp://10.0.0.5:8786', got {scheduler!r}"
        )


def run_batch(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    settings: Settings | None = None,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    levels: bool = False,
    overwrite: bool = False,
    reader: Reader | None = None,
    progress: bool = False,
) -> BatchSummary:
    """Segment every image of a folder, glob or list; resumable; optionally on Dask.

    Parameters
    ----------
    inputs : str, path or sequence of paths
        A folder (its image files), a glob (``"data/**/*.tif"``), a file or a
        list of files; see :func:`find_images`.
    out_dir : str or path
        Output folder (created). See the module docstring for its layout.
    settings : Settings, optional
        Segmentation settings (default ``Settings()``).
    workers : int, optional
        Run on a local Dask cluster of this many worker processes (one thread
        each, each with its own model).
    scheduler : str, optional
        Address of an existing Dask scheduler (``"tcp://HOST:PORT"``); its
        workers must see ``inputs`` and ``out_dir`` under the same paths.
    levels : bool
        Also write every hierarchy level (``KEY.levels.tif``).
    overwrite : bool
        Redo images whose outputs were made with other settings (otherwise
        the run is refused before anything is computed).
    reader : callable, optional
        ``reader(path) -> array``, default :func:`napari_diffcut.files.io.read_image`
        (must be picklable to run on a cluster).
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    BatchSummary
        Done, skipped and failed images (failures also go to ``diffcut-batch.log``).

    Raises
    ------
    ValueError
        Bad arguments, no images, two inputs with one output name, or outputs
        made with other settings without ``overwrite``.
    DiffCutError
        The output folder is in use by another batch, the model cannot be
        loaded, or the Dask scheduler cannot be reached.
    KeyboardInterrupt
        After the manifest has been written; run again to resume.

    Examples
    --------
    >>> from napari_diffcut import Settings
    >>> settings = Settings(model="/models/sd15")
    >>> summary = run_batch("data/", "out/", settings, workers=2)  # doctest: +SKIP
    >>> print(summary)  # doctest: +SKIP
    """
    s = _batch_settings(settings)
    _check_cluster(workers, scheduler)
    out = Path(out_dir).expanduser().resolve()
    root, paths = find_images(inputs)
    if out != root and out.is_relative_to(root):
        # A glob with ** over the input tree must not pick up our own outputs.
        paths = [p for p in paths if not p.is_relative_to(out)]
    jobs = plan_jobs(paths, root, out)
    out.mkdir(parents=True, exist_ok=True)
    with _output_lock(out):
        remove_stale_temporaries(jobs, out)
        todo, skipped = _classify(jobs, s, levels=levels, overwrite=overwrite)
        run_info = {
            "inputs": os.fspath(inputs) if isinstance(inputs, (str, os.PathLike)) else "list",
            "root": str(root),
            "workers": workers,
            "scheduler": scheduler,
            "to_process": len(todo),
        }
        rec = Recorder(
            out,
            s,
            jobs,
            skipped,
            levels=levels,
            run_info=run_info,
            progress=progress,
            total=len(todo),
        )
        rec.log(f"START {len(jobs)} images, {len(skipped)} already done, {len(todo)} to process")
        status = "aborted"
        try:
            _execute(
                rec,
                todo,
                s,
                levels=levels,
                reader=reader,
                workers=workers,
                scheduler=scheduler,
            )
            status = "completed"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            summary = rec.close(status)
            remove_stale_temporaries(jobs, out)
            if status == "interrupted" and progress:
                print(f"napari-diffcut batch: {summary}", file=sys.stderr)
    return summary


def _execute(
    rec: Recorder,
    todo: Sequence[Job],
    settings: Settings,
    *,
    levels: bool,
    reader: Reader | None,
    workers: int | None,
    scheduler: str | None,
) -> None:
    """Run the jobs in process or on Dask, recording results; stop on a fatal one."""
    if not todo:
        return
    if workers is None and scheduler is None:
        results = iter_in_process(todo, settings, levels=levels, reader=reader)
    else:
        try:
            from napari_diffcut.batch.dask import iter_results
        except ImportError as exc:
            raise DiffCutError(
                f"workers/scheduler need Dask distributed ({exc}); "
                "pip install 'napari-diffcut[cluster]'"
            ) from exc
        results = iter_results(
            todo,
            settings,
            levels=levels,
            reader=reader,
            workers=workers,
            scheduler=scheduler,
        )
    # closing() stops the generator at once on an error or Ctrl-C, which cancels
    # the remaining Dask tasks and shuts a local cluster down.
    with contextlib.closing(results):
        for result in results:
            rec.record(result)
            if result.fatal:
                raise DiffCutError(
                    f"batch stopped: the model could not be loaded on {result.worker}: "
                    f"{result.error}; every image would fail the same way. Fix --model "
                    "(or --device, --dtype) and run the same command again: images "
                    "already done are kept"
                )


# --------------------------------------------------------------------------------------
# Command line: napari-diffcut batch


