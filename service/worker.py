"""The worker: one process that takes complete series from the queue and analyses them, one at a time.

It loads the model once and keeps it. Each job goes through ``analyze_dicom_series`` (the
same code as ``liverfat analyze``): header eligibility first, so an ineligible series is
rejected without its pixels being read; then the measurement and the DICOM outputs, which
are queued for every destination in the same transaction that marks the job done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import replace
from multiprocessing.synchronize import Event
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from liverfat.dicom_io.errors import LiverfatError
from liverfat.dicom_io.read import discover
from liverfat.inference.backend import Backend
from liverfat.service.analyze import AnalyzeOptions, BackendLoader, ModelCache, Outcome, analyze_dicom_series
from liverfat.service.config import NodeConfig, analysis_config, eligibility_policy, output_settings
from liverfat.service.logs import configure_logging
from liverfat.service.spool import Job, JobResult, JobState, OutputFile, Spool

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long an idle worker sleeps unless woken
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STATES = {Outcome.PROCESSED: JobState.DONE, Outcome.REJECTED: JobState.REJECTED, Outcome.FAILED: JobState.FAILED}


class ModelLoader:
    """The configured model, loaded in the worker process (picklable, unlike a closure)."""

    def __init__(self, name: str, device: str) -> None:
        self.name = name
        self.device = device

    def __call__(self) -> Backend:
        from liverfat.inference.models import load_backend

        return load_backend(self.name, device=self.device)


def run_worker(config: NodeConfig, load_model: BackendLoader | None, stop: Event, wake: Event) -> None:
    """Entry point of the worker process: loop until ``stop`` is set or the node process is gone."""
    _die_with_parent()
    configure_logging(config.log)
    terminated: list[int] = []  # a plain list: a signal handler must not take the locks an Event uses
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the node decides
    signal.signal(signal.SIGTERM, lambda signum, _frame: terminated.append(signum))  # finish the series in hand
    spool = Spool(config.spool.dir)
    loader = load_model or ModelLoader(config.model.name, config.model.device)
    models = ModelCache(loader)
    try:
        backend = models.get()
        log.info("model loaded: %s %s on %s", backend.info.name, backend.info.version, backend.info.device)
    except LiverfatError as error:
        log.error("cannot load model %r: %s; series will fail until this is fixed", config.model.name, error.message)
    while not terminated and not stop.is_set() and _parent_alive():
        job = spool.claim_next()
        if job is None:
            wake.wait(IDLE_WAIT_S)
            wake.clear()
            continue
        process_job(job, spool, config, models)
    spool.close()
    log.info("worker stopped")


def process_job(job: Job, spool: Spool, config: NodeConfig, models: ModelCache) -> JobResult:
    """Analyse one claimed job and record the outcome (and the sends it needs)."""
    started = time.monotonic()
    log.info("series %s v%d: processing %d instance(s), attempt %d", job.series_uid, job.version, job.n_instances,
             job.attempts, extra={"job": job.id})  # fmt: skip
    try:
        result = _analyze(job, spool, config, models)
    except Exception as error:  # the boundary of one job: record it and keep the queue going
        log.exception("series %s v%d failed", job.series_uid, job.version, extra={"job": job.id})
        result = JobResult(JobState.FAILED, error=f"{type(error).__name__}: {error}")
    elapsed = time.monotonic() - started
    result = replace(result, processing_s=elapsed)
    spool.finish_job(job.id, result, [str(d) for d in config.send.destinations])
    hu = "" if result.parenchymal_hu is None else f", DL-parenchymal {result.parenchymal_hu:.1f} HU"
    log.info("series %s v%d: %s, grade %s%s, %d output(s), %.1f s", job.series_uid, job.version, result.state.value,
             result.grade, hu, len(result.outputs), elapsed, extra={"job": job.id})  # fmt: skip
    return result


def _analyze(job: Job, spool: Spool, config: NodeConfig, models: ModelCache) -> JobResult:
    started = time.monotonic()
    found = discover(spool.job_files(job))
    discover_s = time.monotonic() - started
    matching = [s for s in found.series if s.series_uid == job.series_uid]
    if not matching:
        reasons = tuple(skipped.finding.to_json() for skipped in found.skipped)
        return JobResult(JobState.REJECTED, reasons=reasons, error="no readable CT instance in the series")
    options = AnalyzeOptions(out_dir=spool.results_dir / str(job.id), policy=eligibility_policy(config),
                             config=analysis_config(config), site=output_settings(config),
                             not_applicable_sr=config.worker.ineligible_result == "sr")  # fmt: skip
    report = analyze_dicom_series(matching[0], options, models)
    result = report.result
    dicom_files = [path for path in report.outputs if path.suffix == ".dcm"]
    _fsync_files(report.outputs)
    return JobResult(
        state=STATES[report.outcome],
        grade=result.grade.value,
        parenchymal_hu=result.parenchymal_hu,
        reasons=tuple(f.to_json() for f in result.reasons),
        timings={"discover": discover_s, **result.timings_s},
        outputs=tuple(_output_file(path, spool.root) for path in dicom_files),
        error="; ".join(f.message for f in result.reasons) if report.outcome is Outcome.FAILED else None,
    )


def _output_file(path: Path, root: Path) -> OutputFile:
    meta = read_file_meta_info(path)
    return OutputFile(str(path.relative_to(root)), str(meta.MediaStorageSOPClassUID),
                      str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID))  # fmt: skip


def _fsync_files(paths: Sequence[Path]) -> None:
    """The outbox will point at these files: make them durable before the job is recorded done."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder in {path.parent for path in paths}:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the node process dies (even by SIGKILL).

    Otherwise an orphaned worker could keep processing while a restarted node starts a
    second one. Elsewhere, :func:`_parent_alive` is checked between jobs.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if hasattr(libc, "prctl"):
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _parent_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()
