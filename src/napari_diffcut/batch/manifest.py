"""The batch manifest and log: what was done, with which settings, and what failed.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_diffcut.batch.jobs import (
    LOG_NAME,
    MANIFEST_INTERVAL_S,
    MANIFEST_NAME,
    Job,
)
from napari_diffcut.batch.work import (
    ImageResult,
)
from napari_diffcut.files.io import write_json

if TYPE_CHECKING:  # pragma: no cover
    from napari_diffcut.pipeline.settings import Settings


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


class Recorder:
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

        from napari_diffcut.core.version import __version__

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
