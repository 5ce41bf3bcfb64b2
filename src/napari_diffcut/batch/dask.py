"""Dask distributed back end of :func:`napari_diffcut.batch.runner.run_batch`.

Imported only when a batch runs with ``workers`` or ``scheduler``, so
``distributed`` is needed only then (the ``cluster`` extra).

- :class:`EnginePlugin` is registered on every worker (also on workers that
  join or restart later): it holds one :class:`~napari_diffcut.large.dispatch.DiffCutEngine`
  per worker process, so each worker loads the model once, on its first image,
  on its own GPU when it has one (``device="auto"``).
- :func:`run_on_worker` is the task: it segments one image with that engine
  and writes the outputs straight to the output folder (atomic writes, see
  :func:`napari_diffcut.batch.runner.process_image`); the driver only collects small
  :class:`~napari_diffcut.batch.runner.ImageResult` records.
- A worker that dies mid-task (out of memory, killed job) is replaced by its
  nanny and the scheduler runs the task again elsewhere (up to
  ``distributed.scheduler.allowed-failures`` times, default 3); a retry never
  duplicates outputs because the task first checks whether they are complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker

from napari_diffcut.batch.jobs import Job, Reader
from napari_diffcut.batch.work import ImageResult, one_line, process_image
from napari_diffcut.core.errors import DiffCutError

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Worker

    from napari_diffcut.large.dispatch import DiffCutEngine
    from napari_diffcut.pipeline.settings import Settings

PLUGIN_NAME = "napari-diffcut-engine"


class EnginePlugin(WorkerPlugin):
    """Worker plugin that keeps one loaded :class:`DiffCutEngine` per worker process.

    The lock serialises tasks on a worker with several threads: one model,
    and one set of attention-capture processors on it, serve one image at a
    time (run one thread per worker and several workers instead).
    """

    name = PLUGIN_NAME

    def __init__(self) -> None:
        self.engine: DiffCutEngine | None = None
        self.lock: threading.Lock | None = None

    def setup(self, worker: Worker) -> None:
        """Create the (still empty) engine; the model loads on the first image."""
        from napari_diffcut.large.dispatch import DiffCutEngine

        self.engine = DiffCutEngine()
        self.lock = threading.Lock()

    def teardown(self, worker: Worker) -> None:
        """Free the model (and GPU memory) when the worker closes."""
        if self.engine is not None:
            self.engine.unload()


def run_on_worker(job: Job, settings: Settings, levels: bool, reader: Reader | None) -> ImageResult:
    """Dask task: segment one image with this worker's engine and write its outputs."""
    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, EnginePlugin) or plugin.engine is None or plugin.lock is None:
        # Registered before any task is submitted, so this is not expected; install
        # one here all the same, so that the model still loads once per worker.
        plugin = EnginePlugin()
        plugin.setup(worker)
        worker.plugins[PLUGIN_NAME] = plugin
    with plugin.lock:
        return process_image(job, settings, levels=levels, engine=plugin.engine, reader=reader)


def thread_env(workers: int) -> dict[str, str]:
    """Math-library threads per local worker: the cores shared out, at least one.

    The nanny sets OMP_NUM_THREADS=1 by default (dask's ``pre-spawn-environ``),
    which would leave cores idle with fewer workers than cores.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    n = str(max(1, cores // workers))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


@contextlib.contextmanager
def connect(workers: int | None, scheduler: str | None) -> Iterator[Client]:
    """A client of an existing scheduler, or of a new local cluster on 127.0.0.1."""
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise DiffCutError(
                f"could not connect to the Dask scheduler at {scheduler}: {exc}; "
                "check the address (cluster.scheduler_address) and that this "
                "machine can reach it"
            ) from None
        with client:
            yield client
        return
    # Everything on the loopback interface; the dashboard (or, without bokeh,
    # the scheduler's HTTP endpoints) on a free port, never on all interfaces.
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
            env=thread_env(workers or 1),
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _collect(future: Any, job: Job) -> ImageResult:
    """The task's result, or a failure when the task itself was lost."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: report and go on
        return ImageResult(
            job.key,
            "failed",
            error=one_line(exc),
            details=(
                f"The Dask task of {job.input} was lost: {exc!r}\n"
                "KilledWorker means that every worker that ran it died (up to "
                "distributed.scheduler.allowed-failures times), for instance out of "
                "memory; run the image alone to see why, or give workers more memory."
            ),
            note="task lost on the cluster",
        )


def iter_results(
    jobs: Sequence[Job],
    settings: Settings,
    *,
    levels: bool,
    reader: Reader | None,
    workers: int | None,
    scheduler: str | None,
) -> Iterator[ImageResult]:
    """Submit one task per job and yield results as they complete.

    Closing the generator (error, Ctrl-C) cancels the tasks that have not
    finished and, for a local cluster, shuts it down. On an existing cluster
    the worker plugin is removed at the end, so that its workers free the model
    (and GPU memory) for other work; the next batch registers it again anyway.
    """
    with connect(workers, scheduler) as client:
        try:
            client.register_plugin(EnginePlugin(), name=PLUGIN_NAME)
        except Exception as exc:  # noqa: BLE001 - any worker-side import error
            raise DiffCutError(
                "napari-diffcut could not start on the Dask workers "
                f"({one_line(exc)}); install the same napari-diffcut version "
                "in the workers' environment"
            ) from exc
        run = uuid.uuid4().hex[:8]
        futures = {
            client.submit(
                run_on_worker,
                job,
                settings,
                levels,
                reader,
                key=f"napari-diffcut-{run}-{i}",
                pure=False,
            ): job
            for i, job in enumerate(jobs)
        }
        try:
            for future in as_completed(list(futures)):
                job = futures.pop(future)
                yield _collect(future, job)
        finally:
            if futures:
                client.cancel(list(futures))
            if scheduler is not None:
                with contextlib.suppress(Exception):  # the cluster may be gone
                    client.unregister_worker_plugin(PLUGIN_NAME)
