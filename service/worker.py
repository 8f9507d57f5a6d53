"""A worker: one process that takes complete series from the queue and analyses them, one at a time.

The node runs one or more (``service/worker_pool.py``); each claims jobs in its own name.

It loads the model once and keeps it. Each job goes through ``liverfat.analysis.analyze_dicom_series`` (the
same code as ``liverfat analyze``): header eligibility first, so an ineligible series is
rejected without its pixels being read; then the measurement and the DICOM outputs, which
are queued for every destination in the same transaction that marks the job done.

A full spool disk (see ``diskspace``) is not the series' fault: its partial results are
deleted, the job is parked without counting the attempt, and the worker takes no series
until space returns, then waits a little longer after each further disk-full park.
"""

from __future__ import annotations

import errno
import gc
import logging
import multiprocessing
import shutil
import signal
import sqlite3
import time
from dataclasses import dataclass, replace
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import TYPE_CHECKING

from liverfat.analysis import BackendLoader, ModelCache
from liverfat.dicom_io.outputs import warm_up
from liverfat.errors import LiverfatError
from liverfat.inference.backend import Backend
from liverfat.service.config import ModelSection, NodeConfig
from liverfat.service.diskspace import DiskSpace, is_disk_full
from liverfat.service.heap import keep_freed_memory
from liverfat.service.libc import c_library
from liverfat.service.logs import configure_logging
from liverfat.service.series_job import analyze_series_files
from liverfat.service.spool import Job, JobResult, JobState, Spool
from liverfat.service.workers import ModelState

if TYPE_CHECKING:
    from liverfat.service.worker_pool import WorkerSlot

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long an idle worker sleeps unless woken
DISK_FULL_RETRY_S = (5.0, 300.0)  # after a disk-full park, no new series for this long: first, cap (doubling)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class WorkerReport:
    """What a worker tells the node: how a model load went, or that it recorded a job's outcome."""

    worker: str
    model: ModelState | None = None
    jobs_done: int = 0


class ModelLoader:
    """The configured model, loaded in the worker process (picklable, unlike a closure)."""

    def __init__(self, model: ModelSection) -> None:
        self.model = model

    def __call__(self) -> Backend:
        from liverfat.inference.models.registry import load_backend

        return load_backend(self.model.name, device=self.model.device, cache_dir=self.model.cache,
                            precision=self.model.precision)  # fmt: skip


class ReportingLoader:
    """A model loader that tells the node how each load went, so its health can say why series would fail.

    ``ModelCache`` keeps the first backend that loads; until one does, every series tries again
    (weights installed while the node runs are picked up) and each try is reported.
    """

    def __init__(self, worker: str, load_model: BackendLoader, reports: Queue[WorkerReport]) -> None:
        self.worker = worker
        self.load_model = load_model
        self.reports = reports

    def __call__(self) -> Backend:
        try:
            backend = self.load_model()
        except Exception as error:  # reported, then raised to the caller as before
            why = error.message if isinstance(error, LiverfatError) else f"{type(error).__name__}: {error}"
            self._report(ModelState(loaded=False, detail=why, at=time.time()))
            raise
        info = backend.info
        self._report(ModelState(loaded=True, detail=f"{info.name} {info.version} on {info.device}", at=time.time()))
        return backend

    def _report(self, model: ModelState) -> None:
        self.reports.put(WorkerReport(self.worker, model=model))


def run_worker(config: NodeConfig, load_model: BackendLoader | None, slot: WorkerSlot, stop: Event, wake: Event,
               results_queued: Event, reports: Queue[WorkerReport]) -> None:  # fmt: skip
    """Entry point of a worker process: loop until ``stop`` is set or the node process is gone.

    ``results_queued`` is set after each recorded series, for the node's sender (``Sender``).

    Nothing has touched CUDA yet (the model loads below): ``slot.pin()`` chooses the GPU first.
    """
    _die_with_parent()
    slot.pin()
    configure_logging(config.log)
    terminated: list[int] = []  # a plain list: a signal handler must not take the locks an Event uses
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the node decides
    signal.signal(signal.SIGTERM, lambda signum, _frame: terminated.append(signum))  # finish the series in hand
    space = DiskSpace(config.spool.dir)
    spool = Spool(config.spool.dir, space=space)
    models = ModelCache(ReportingLoader(slot.name, load_model or ModelLoader(config.model), reports))
    try:
        backend = models.get()
        log.info("model loaded: %s %s on %s", backend.info.name, backend.info.version, backend.info.device)
    except LiverfatError as error:
        log.error("cannot load model %r: %s; series will fail until this is fixed", config.model.name, error.message)
    settle_process()
    unparked: dict[int, str] = {}  # jobs parked for space whose park could not be recorded yet
    resume_at, delay_s = 0.0, DISK_FULL_RETRY_S[0]
    while not terminated and not stop.is_set() and _parent_alive():
        job = None if space.is_full() or time.monotonic() < resume_at else _claim(spool, space, unparked, slot.name)
        if job is None:
            wake.wait(IDLE_WAIT_S)
            wake.clear()
            continue
        result = process_job(job, spool, config, models, space)
        if result.state in (JobState.COMPLETE, JobState.PROCESSING):  # parked for space, or not even that
            if result.state is JobState.PROCESSING:
                unparked[job.id] = str(result.error)
            resume_at, delay_s = time.monotonic() + delay_s, min(delay_s * 2, DISK_FULL_RETRY_S[1])
        else:
            delay_s = DISK_FULL_RETRY_S[0]
            results_queued.set()
            reports.put(WorkerReport(slot.name, jobs_done=1))
    spool.close()
    log.info("worker stopped")


def _claim(spool: Spool, space: DiskSpace, unparked: dict[int, str], worker: str) -> Job | None:
    """Record the parks that failed for lack of space, then take the next job; ``None`` while the disk is full."""
    try:
        for job_id, why in list(unparked.items()):
            spool.park_processing(why, job_id)
            del unparked[job_id]
        return spool.claim_next(worker)
    except sqlite3.Error as error:
        if not is_disk_full(error):
            raise
        space.release(f"cannot record a job's state: {error}")
        return None


def process_job(job: Job, spool: Spool, config: NodeConfig, models: ModelCache,
                space: DiskSpace | None = None) -> JobResult:  # fmt: skip
    """Analyse one claimed job and record the outcome (and the sends it needs).

    Returns the recorded result; its state is ``complete`` when the job was parked because
    the spool's disk is full, ``processing`` when even that could not be recorded.
    """
    started = time.monotonic()
    files = spool.job_files(job)
    log.info("series %s v%d: processing %d instance(s), attempt %d", job.series_uid, job.version, len(files),
             job.attempts, extra={"job": job.id})  # fmt: skip
    if job.note:
        log.warning("series %s v%d: %s", job.series_uid, job.version, job.note, extra={"job": job.id})
    try:
        result = analyze_series_files(job.series_uid, files, spool.results_dir / str(job.id), spool.root, config,
                                      models)  # fmt: skip
        if space is not None:
            space.check()
            if space.is_full():
                raise OSError(errno.ENOSPC, "the spool's disk filled up while this series was processed")
    except Exception as error:  # the boundary of one job: record it and keep the queue going
        if is_disk_full(error):
            return _park_for_space(job, spool, space, error)
        log.exception("series %s v%d failed", job.series_uid, job.version, extra={"job": job.id})
        result = JobResult(JobState.FAILED, error=f"{type(error).__name__}: {error}")
    elapsed = time.monotonic() - started
    result = replace(result, processing_s=elapsed)
    try:
        spool.finish_job(job.id, result, [str(d) for d in config.send.destinations])
    except sqlite3.Error as error:
        if not is_disk_full(error):
            raise
        return _park_for_space(job, spool, space, error)
    hu = "" if result.parenchymal_hu is None else f", DL-parenchymal {result.parenchymal_hu:.1f} HU"
    log.info("series %s v%d: %s, grade %s%s, %d output(s), %.1f s", job.series_uid, job.version, result.state.value,
             result.grade, hu, len(result.outputs), elapsed, extra={"job": job.id})  # fmt: skip
    return result


def _park_for_space(job: Job, spool: Spool, space: DiskSpace | None, error: BaseException) -> JobResult:
    """Delete the job's partial results and put it back in the queue, its attempt not counted."""
    why = f"parked: the spool's disk is full ({error}); processed again when space returns, not counted as an attempt"
    if space is not None:
        space.release(str(error))
    shutil.rmtree(spool.results_dir / str(job.id), ignore_errors=True)
    try:
        spool.park_processing(why, job.id)
    except sqlite3.Error as park_error:
        if not is_disk_full(park_error):
            raise
        log.error("series %s v%d: %s; recording that failed too (%s), retried when space returns", job.series_uid,
                  job.version, why, park_error, extra={"job": job.id})  # fmt: skip
        return JobResult(JobState.PROCESSING, error=why)
    log.warning("series %s v%d: %s", job.series_uid, job.version, why, extra={"job": job.id})
    return JobResult(JobState.COMPLETE, error=why)


def settle_process() -> None:
    """What a worker process does once its model is loaded, before its first series (local and fleet workers)."""
    warm_up()  # highdicom's tables, loaded here rather than in the first series' write stage
    keep_freed_memory()  # series after series reuse the same pages instead of faulting them in
    gc.freeze()  # the model and those tables live as long as the process: no full collection walks them again


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the node process dies (even by SIGKILL).

    Otherwise an orphaned worker could keep processing while a restarted node starts a
    second one. Elsewhere, :func:`_parent_alive` is checked between jobs.
    """
    libc = c_library()
    if libc is not None and hasattr(libc, "prctl"):
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _parent_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()
