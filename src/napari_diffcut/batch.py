"""Batch segmentation of many images: resumable, atomic, optionally on a Dask cluster.

``run_batch(inputs, out_dir, settings)`` segments every image of a folder, a
glob or a list of files, and ``napari-diffcut batch INPUT --out DIR`` is its
command line. Without ``workers``/``scheduler`` it runs in this process with
one :class:`~napari_diffcut.engine.DiffCutEngine` (the model loads once); with
``workers=N`` it starts a local Dask cluster of N single-threaded worker
processes, and with ``scheduler="tcp://HOST:PORT"`` it uses an existing Dask
cluster (see :mod:`napari_diffcut._dask`).

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

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.io import IMAGE_SUFFIXES, read_image, write_json, write_labels

if TYPE_CHECKING:  # pragma: no cover
    from napari_diffcut.engine import DiffCutEngine, Settings

LABELS_SUFFIX = ".diffcut.tif"
LEVELS_SUFFIX = ".levels.tif"
RECORD_SUFFIX = ".diffcut.json"
MANIFEST_NAME = "diffcut-manifest.json"
LOG_NAME = "diffcut-batch.log"
LOCK_NAME = ".diffcut-batch.lock"
#: The manifest is rewritten at most this often (plus at the end): rewriting a
#: manifest of thousands of images after every image would cost O(n^2) bytes.
MANIFEST_INTERVAL_S = 5.0
_OUTPUT_SUFFIXES = (LABELS_SUFFIX, LEVELS_SUFFIX, RECORD_SUFFIX)
_GLOB_MAGIC = "*?["

Reader = Callable[[Path], NDArray[Any]]


# --------------------------------------------------------------------------------------
# Inputs and output names


@dataclass(frozen=True)
class Job:
    """One image of a batch and the paths of its outputs.

    Attributes
    ----------
    key : str
        Input path relative to the input root, without suffix ("plate1/A01").
    input : Path
        Absolute path of the image.
    labels, levels, record : Path
        Absolute paths of the label TIFF, the levels TIFF and the settings JSON.
    replace : bool
        Outputs made with other settings exist and are to be replaced.
    """

    key: str
    input: Path
    labels: Path
    levels: Path
    record: Path
    replace: bool = False

    def outputs(self, levels: bool) -> list[Path]:
        """Output paths of this job, the settings JSON last."""
        return [self.labels, *([self.levels] if levels else []), self.record]


def _has_magic(text: str) -> bool:
    return any(c in text for c in _GLOB_MAGIC)


def _is_candidate(path: Path) -> bool:
    """A visible file that is not one of our own outputs."""
    name = path.name
    return path.is_file() and not name.startswith(".") and not name.endswith(_OUTPUT_SUFFIXES)


def find_images(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> tuple[Path, list[Path]]:
    """The images of a batch and the root their output names are relative to.

    Parameters
    ----------
    inputs : str, path or sequence of paths
        A folder (its image files, not its subfolders: ``.png``, ``.tif``...),
        a glob (``"data/**/*.tif"``; ``**`` recurses; any suffix the glob
        selects), a single file, or a list of files.

    Returns
    -------
    root : Path
        Absolute folder the output keys are relative to: the folder, the
        glob's leading part without wildcards, or the common parent of a list.
    paths : list of Path
        Absolute, sorted, unique image paths (our own outputs excluded).

    Raises
    ------
    ValueError
        When nothing matches.
    """
    if isinstance(inputs, (str, os.PathLike)):
        text = os.fspath(inputs)
        root, paths = _images_of_pattern(text)
    else:
        text = repr(list(inputs))
        root, paths = _listed_images([Path(x).expanduser() for x in inputs])
    if not paths:
        raise ValueError(
            f"inputs {text} matched no image (a folder is searched for {', '.join(IMAGE_SUFFIXES)})"
        )
    return root.resolve(), sorted({x.resolve() for x in paths})


def _images_of_pattern(text: str) -> tuple[Path, list[Path]]:
    """(root, paths) of a folder, a glob or a single file."""
    import glob

    p = Path(text).expanduser()
    if p.is_dir():
        paths = [c for c in p.iterdir() if c.suffix.lower() in IMAGE_SUFFIXES]
        return p, [c for c in paths if _is_candidate(c)]
    if _has_magic(text):
        # The root is the pattern's leading folders without wildcards, so that
        # "data/**/*.tif" mirrors the tree below data/ in the output folder.
        parts = p.parts
        first_magic = next(i for i, part in enumerate(parts) if _has_magic(part))
        root = Path(*parts[:first_magic]) if first_magic else Path()
        matches = [Path(m) for m in glob.glob(str(p), recursive=True)]
        return root, [m for m in matches if _is_candidate(m)]
    if p.is_file():
        return p.parent, [p]
    raise ValueError(
        f"inputs {text!r} is neither a folder, an image file nor a glob that "
        "matches files; pass a folder, a file or a quoted pattern such as "
        "'data/**/*.tif'"
    )


def _listed_images(paths: list[Path]) -> tuple[Path, list[Path]]:
    """(common parent folder, paths) of an explicit list of files."""
    missing = [str(x) for x in paths if not x.is_file()]
    if missing:
        raise ValueError(f"inputs: {len(missing)} file(s) not found, e.g. {missing[0]!r}")
    if not paths:
        return Path(), []
    return Path(os.path.commonpath([x.resolve().parent for x in paths])), paths


def output_key(path: Path, root: Path) -> str:
    """``root/plate1/A01.ome.tif`` -> ``"plate1/A01"`` (suffix and ``.ome`` dropped).

    Only the last suffix goes (and ``.ome`` before it), so ``img.001.tif`` and
    ``img.002.tif`` keep distinct keys.
    """
    rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
    stem = rel.name[: -len(rel.suffix)] if rel.suffix else rel.name
    if stem.lower().endswith(".ome"):
        stem = stem[:-4]
    return (rel.parent / stem).as_posix()


def plan_jobs(paths: Sequence[Path], root: Path, out_dir: Path) -> list[Job]:
    """One :class:`Job` per image, with output paths under ``out_dir``.

    Raises
    ------
    ValueError
        When two inputs map to the same output key (``a.png`` and ``a.tif`` in
        one folder), which would make them overwrite each other.
    """
    jobs: dict[str, Job] = {}
    for path in paths:
        key = output_key(path, root)
        if key in jobs:
            raise ValueError(
                f"inputs {jobs[key].input} and {path} would both write "
                f"{key}{LABELS_SUFFIX}; "
                "select one of them with a narrower glob (e.g. '*.tif')"
            )
        base = out_dir / key
        jobs[key] = Job(
            key=key,
            input=path,
            labels=base.with_name(base.name + LABELS_SUFFIX),
            levels=base.with_name(base.name + LEVELS_SUFFIX),
            record=base.with_name(base.name + RECORD_SUFFIX),
        )
    return list(jobs.values())


# --------------------------------------------------------------------------------------
# Done / missing / conflict


def settings_difference(record: Any, settings: Settings) -> str:
    """Empty when a settings record was made with ``settings``, else what differs.

    The requested settings are read from the record's ``batch_settings``. A
    setting absent there (written by an older version, before the setting
    existed) matches when its requested value is the default, which by
    construction reproduces the older behaviour.
    """
    from napari_diffcut.engine import Settings

    saved = record.get("batch_settings") if isinstance(record, dict) else None
    if not isinstance(saved, dict):
        return "settings JSON has no batch_settings (not written by napari-diffcut batch)"
    # Compare in JSON form (lists, string keys), the form the record was saved in.
    wanted = _json_form(settings.as_dict())
    defaults = _json_form(Settings().as_dict())
    diffs = []
    for name, value in wanted.items():
        if name not in saved:
            if value != defaults.get(name):
                diffs.append(f"{name} absent (requested {value!r})")
        elif saved[name] != value:
            diffs.append(f"{name}={saved[name]!r} (requested {value!r})")
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return "; ".join(diffs[:3]) + more


def _json_form(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data))


def output_state(job: Job, settings: Settings, *, levels: bool) -> tuple[str, str]:
    """``("done" | "missing" | "conflict", reason)`` for a job's outputs.

    done: the settings JSON matches ``settings`` and the label TIFF (and,
    when ``levels``, a levels TIFF that the JSON records) exist. missing: no
    JSON (never run, failed, or stopped before its JSON was renamed into
    place), or the JSON matches but an image is gone or its levels were not
    written with it. conflict: the JSON is unreadable or was made with other
    settings.
    """
    if not job.record.is_file():
        return "missing", "no settings JSON"
    try:
        record = json.loads(job.record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return "conflict", f"unreadable settings JSON ({type(exc).__name__}: {exc})"
    diff = settings_difference(record, settings)
    if diff:
        return "conflict", diff
    if not job.labels.is_file():
        return "missing", "label TIFF missing"
    # The JSON names the levels TIFF only when it was written with these labels;
    # a levels file alone may be left from a run with other settings.
    if levels and not (job.levels.is_file() and "levels_output" in record):
        return "missing", "levels TIFF missing"
    return "done", ""


# --------------------------------------------------------------------------------------
# One image (runs in this process or on a Dask worker)


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
    """Write the label TIFF, the levels TIFF (if ``levels``), then the settings JSON.

    ``seg`` is what the engine returns: a :class:`~napari_diffcut.engine.Segmentation`
    for an image, or a stack / tiled result (labels of the whole input; a stack
    has no single levels list, so ``levels`` is refused for it).
    Each file is written atomically (temporary file, then rename). The JSON
    comes last, so a run stopped in between leaves an image that is not done
    and is redone next time. When replacing outputs made with other settings,
    their JSON is removed first for the same reason, and so is their levels
    TIFF when no new one is written (it would not match the new labels).
    """
    if levels and not hasattr(seg, "levels"):
        raise DiffCutError(
            f"levels=True (--levels) is not available for a {type(seg).__name__} "
            f"(labels of shape {tuple(seg.labels.shape)}); run without it"
        )
    if job.replace:
        job.record.unlink(missing_ok=True)
        if not levels:
            job.levels.unlink(missing_ok=True)
    write_labels(job.labels, np.asarray(seg.labels))
    record = dict(
        getattr(seg, "settings", {}),
        # The requested settings, kept apart: the engine's record also holds
        # derived values under setting names (e.g. the working size it used).
        batch_settings=settings.as_dict(),
        input=str(job.input),
        output=str(job.labels),
        threshold_used=getattr(seg, "threshold", None),
        batch_key=job.key,
        worker=_here(),
    )
    if levels:
        write_labels(job.levels, np.stack([np.asarray(level) for level in seg.levels]))
        record["levels_output"] = str(job.levels)
    write_json(job.record, record)
    return job.outputs(levels)


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
        ``reader(path) -> array``; default :func:`napari_diffcut.io.read_image`.

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


def _iter_in_process(
    jobs: Sequence[Job], settings: Settings, *, levels: bool, reader: Reader | None
) -> Iterator[ImageResult]:
    """Run the jobs one after the other with one engine (one model load)."""
    from napari_diffcut.engine import DiffCutEngine

    engine = DiffCutEngine()
    try:
        for job in jobs:
            yield process_image(job, settings, levels=levels, engine=engine, reader=reader)
    finally:
        engine.unload()


# --------------------------------------------------------------------------------------
# Driver: summary, manifest, log, progress, lock, temporary files


@dataclass
class BatchSummary:
    """Outcome of :func:`run_batch`.

    Attributes
    ----------
    out_dir : Path
        Output folder.
    done : list of str
        Keys segmented by this run.
    skipped : list of str
        Keys already done before this run.
    failed : dict of str to str
        Key -> reason (tracebacks are in :attr:`log`).
    seconds : float
        Wall time of the run.
    status : str
        "completed", "interrupted" (Ctrl-C) or "aborted" (an error stopped the
        run, e.g. the model could not be loaded).
    results : list of ImageResult
        Per-image results of this run, in completion order.
    """

    out_dir: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    status: str = "running"
    results: list[ImageResult] = field(default_factory=list)

    @property
    def manifest(self) -> Path:
        """Path of the run manifest."""
        return self.out_dir / MANIFEST_NAME

    @property
    def log(self) -> Path:
        """Path of the failure log."""
        return self.out_dir / LOG_NAME

    def __str__(self) -> str:
        n = len(self.done) + len(self.skipped) + len(self.failed)
        text = (
            f"{n} images: {len(self.done)} done, "
            f"{len(self.skipped)} skipped (already done), "
            f"{len(self.failed)} failed in {self.seconds:.1f}s -> {self.out_dir}"
        )
        if self.status != "completed":
            text += f" [{self.status}; run the same command again to resume]"
        for key, reason in list(self.failed.items())[:10]:
            text += f"\n  failed {key}: {reason}"
        if len(self.failed) > 10:
            text += f"\n  ... and {len(self.failed) - 10} more"
        if self.failed:
            text += f"\n  details: {self.log}"
        return text


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _Recorder:
    """Driver-side bookkeeping: summary, manifest, failure log and progress bar."""

    def __init__(
        self,
        out_dir: Path,
        settings: Settings,
        jobs: Sequence[Job],
        skipped: Sequence[Job],
        *,
        levels: bool,
        run_info: dict[str, Any],
        progress: bool,
        total: int,
    ) -> None:
        from tqdm.auto import tqdm  # a dependency of huggingface_hub, hence always there

        from napari_diffcut import __version__

        self.start = time.perf_counter()
        self.out_dir = out_dir
        self.levels = levels
        self.jobs = {job.key: job for job in jobs}
        self.summary = BatchSummary(out_dir, skipped=[job.key for job in skipped])
        self.progress = tqdm(
            total=total,
            unit="image",
            desc="napari-diffcut batch",
            file=sys.stderr,
            disable=not progress,
        )
        old = self._read_manifest()
        images = dict(old.get("images", {})) if isinstance(old.get("images"), dict) else {}
        skipped_keys = set(self.summary.skipped)
        for job in jobs:
            previous = images.get(job.key, {})
            if job.key in skipped_keys and previous.get("status") == "done":
                continue
            images[job.key] = self._entry(job, "done" if job.key in skipped_keys else "pending")
        self.run = dict(run_info, started=_now(), finished=None, status="running")
        runs = old.get("runs", []) if isinstance(old.get("runs"), list) else []
        self.manifest: dict[str, Any] = {
            "napari_diffcut_version": __version__,
            "python": platform.python_version(),
            "settings": settings.as_dict(),
            "levels": levels,
            "updated": _now(),
            "runs": [*runs, self.run],
            "images": images,
        }
        self._last_write = 0.0
        self.flush(force=True)

    def _read_manifest(self) -> dict[str, Any]:
        path = self.out_dir / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _entry(self, job: Job, status: str, result: ImageResult | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "input": str(job.input),
            "status": status,
            "outputs": [p.relative_to(self.out_dir).as_posix() for p in job.outputs(self.levels)]
            if status == "done"
            else [],
        }
        if result is not None:
            entry.update(seconds=round(result.seconds, 3), worker=result.worker, finished=_now())
            if result.error:
                entry["error"] = result.error
            if result.note:
                entry["note"] = result.note
        return entry

    def record(self, result: ImageResult) -> None:
        """Account for one finished image."""
        job = self.jobs[result.key]
        self.summary.results.append(result)
        if result.status == "done":
            self.summary.done.append(result.key)
        else:
            self.summary.failed[result.key] = result.error
            self._log_failure(job, result)
        self.manifest["images"][result.key] = self._entry(job, result.status, result)
        self.progress.set_postfix(failed=len(self.summary.failed), refresh=False)
        self.progress.update(1)
        self.flush()

    def _log_failure(self, job: Job, result: ImageResult) -> None:
        details = result.details.rstrip().replace("\n", "\n    ")
        where = result.worker or "the cluster"
        self.log(f"FAILED {job.key} ({job.input}) on {where}: {result.error}\n    {details}")

    def log(self, message: str) -> None:
        """Append a timestamped block to the log (opened per write: crash-safe)."""
        with open(self.out_dir / LOG_NAME, "a", encoding="utf-8") as fh:
            fh.write(f"{_now()} {message}\n")

    def flush(self, *, force: bool = False) -> None:
        """Rewrite the manifest atomically, at most every MANIFEST_INTERVAL_S."""
        if not force and time.perf_counter() - self._last_write < MANIFEST_INTERVAL_S:
            return
        self.manifest["updated"] = _now()
        self.run.update(
            done=len(self.summary.done),
            skipped=len(self.summary.skipped),
            failed=len(self.summary.failed),
        )
        write_json(self.out_dir / MANIFEST_NAME, self.manifest)
        self._last_write = time.perf_counter()

    def close(self, status: str) -> BatchSummary:
        """Final manifest, log line and summary."""
        self.progress.close()
        self.summary.status = status
        self.summary.seconds = time.perf_counter() - self.start
        self.run.update(status=status, finished=_now())
        self.flush(force=True)
        s = self.summary
        self.log(
            f"END {status}: {len(s.done)} done, {len(s.skipped)} skipped, {len(s.failed)} failed"
        )
        return s


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

    :func:`napari_diffcut.io.atomic_write_bytes` writes ``.NAME.XXXXXXXX.tmp``
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
    from napari_diffcut.engine import Settings

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
        ``reader(path) -> array``, default :func:`napari_diffcut.io.read_image`
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
        rec = _Recorder(
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
    rec: _Recorder,
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
        results = _iter_in_process(todo, settings, levels=levels, reader=reader)
    else:
        try:
            from napari_diffcut._dask import iter_results
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``napari-diffcut batch`` (see :func:`napari_diffcut.cli.main`)."""
    from napari_diffcut.cli import add_segment_options

    p = subparsers.add_parser(
        "batch",
        help="segment every image of a folder or glob; resumable; optionally on Dask",
        description="Segment every image of INPUT into --out DIR. Images already "
        "done with the same settings are skipped, so the command can be stopped and "
        "run again. Outputs made with other settings are refused unless --overwrite. "
        "Exit status 0 when every image is done, 1 when "
        "some failed (see DIR/diffcut-batch.log), 2 on a usage error.",
    )
    p.add_argument(
        "input",
        help="folder (its images, not subfolders), image file, or quoted glob "
        "such as 'data/**/*.tif'",
    )
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument(
        "--levels",
        action="store_true",
        help="also write every hierarchy level (KEY.levels.tif)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo images whose outputs were made with other settings",
    )
    cluster = p.add_mutually_exclusive_group()
    cluster.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="run on a local Dask cluster of N worker processes (1 thread each)",
    )
    cluster.add_argument(
        "--scheduler",
        default=None,
        help="run on an existing Dask cluster, e.g. tcp://10.0.0.5:8786",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_segment_options(p)
    p.set_defaults(func=_batch_command)
    return p


def _batch_command(args: argparse.Namespace) -> int:
    from napari_diffcut.cli import settings_from_args

    summary = run_batch(
        args.input,
        args.out,
        settings_from_args(args),
        workers=args.workers,
        scheduler=args.scheduler,
        levels=args.levels,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(summary)
    return 1 if summary.failed else 0
