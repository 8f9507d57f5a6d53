"""The node's local workers: ``[worker] count`` / ``devices`` worker processes claiming jobs from the spool.

:func:`plan_workers` decides the processes (pure; the fleet's ``liverfat worker`` plans its
Celery children with it too): with ``devices = "auto"`` one per visible GPU, each pinned with
``CUDA_VISIBLE_DEVICES`` so its model runs on ``cuda:0`` of its own process, else ``count``
CPU workers that split the cores between them; ``"cpu"``: ``count`` CPU workers; a list: one
per listed GPU. GPUs are counted without importing torch (:func:`visible_gpus`).

:class:`LocalWorkers` (the node's :class:`~liverfat.service.workers.Workers` in local mode) runs
them: every job is claimed in one transaction and records the worker that took it. A worker
that dies while the node lives is restarted (a backoff of its own) after its job only is put
back in the queue (or failed after ``[worker] max_attempts``); the others keep going. Jobs found
``processing`` when the node starts were interrupted by the whole node stopping: they are
re-queued without counting the attempt before any worker starts. :meth:`LocalWorkers.stop`
lets the workers finish the series in hand for ``[worker] shutdown_grace_s`` and parks them
otherwise. A full spool disk delays every record above to a later tick (see ``diskspace``),
and no worker (re)starts before its record is written.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import queue
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

from liverfat.analysis import BackendLoader
from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import NodeConfig, WorkerSection
from liverfat.service.diskspace import DiskSpace
from liverfat.service.spool import Spool
from liverfat.service.worker import WorkerReport, run_worker
from liverfat.service.workers import ModelState, QueueInfo, WorkerInfo

log = logging.getLogger(__name__)

PROC_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU the NVIDIA driver gives this process
RESTART_DELAY_S = (1.0, 60.0)  # a worker's restart backoff: first delay, cap
WORKER_STEADY_S = 60.0  # a worker that lived this long resets its restart backoff
NODE_STOPPED = "the node stopped while this series was processed; processed again, not counted as an attempt"
SHUTDOWN_PARK = "parked at shutdown; processed again after the restart"


@dataclass(frozen=True)
class WorkerSlot:
    """One planned worker process: its name, what it is pinned to and its share of the cores."""

    name: str  # "worker-0", ...
    device: str  # "cpu", or "cuda:N": the GPU's index as the planning process sees it
    cuda_visible_devices: str | None  # set in the worker before anything touches CUDA; None: left as inherited
    threads: int | None  # torch.set_num_threads in the worker; None: torch's default (a lone worker)
    model_device: str | None  # the worker's [model] device: "cuda:0" (its one GPU), "cpu"; None: as configured

    def pin(self) -> None:
        """In the worker process, first thing: its GPU, then its threads (torch is imported only for these)."""
        if self.cuda_visible_devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)


def visible_gpus(environ: Mapping[str, str] | None = None, proc: Path = PROC_GPUS) -> tuple[str, ...]:
    """The ``CUDA_VISIBLE_DEVICES`` entry of each GPU this process may use, without importing torch.

    ``CUDA_VISIBLE_DEVICES`` when set (CUDA ignores it from the first entry that is empty or
    negative on), else one GPU per folder in ``/proc/driver/nvidia/gpus`` (the NVIDIA driver's;
    absent without the driver), named by index.
    """
    listed = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        entries: list[str] = []
        for entry in (part.strip() for part in listed.split(",")):
            if not entry or entry.startswith("-"):
                break
            entries.append(entry)
        return tuple(entries)
    try:
        return tuple(str(index) for index in range(sum(1 for _ in proc.iterdir())))
    except OSError:
        return ()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


def plan_workers(worker: WorkerSection, gpus: Sequence[str] | None = None,
                 cores: int | None = None) -> list[WorkerSlot]:  # fmt: skip
    """The worker processes for ``[worker]``; ``gpus`` (:func:`visible_gpus`) and ``cores`` are detected if not given.

    GPU workers get the ``gpus`` entry of their index as ``CUDA_VISIBLE_DEVICES`` (the index
    itself when no GPU was detected: the worker's model load then says what is wrong). Several
    workers split ``cores`` evenly, at least one thread each.
    """
    gpus = visible_gpus() if gpus is None else tuple(gpus)
    cores = usable_cores() if cores is None else cores
    devices = worker.devices
    if isinstance(devices, tuple) or (devices == "auto" and gpus):
        indices = tuple(range(len(gpus))) if devices == "auto" else devices
        threads = _threads(cores, len(indices))
        return [WorkerSlot(f"worker-{n}", f"cuda:{index}", _gpu_entry(index, gpus), threads, "cuda:0")
                for n, index in enumerate(indices)]  # fmt: skip
    threads, model_device = _threads(cores, worker.count), "cpu" if devices == "cpu" else None
    return [WorkerSlot(f"worker-{n}", "cpu", None, threads, model_device) for n in range(worker.count)]


def _threads(cores: int, workers: int) -> int | None:
    return None if workers == 1 else max(1, cores // workers)


def _gpu_entry(index: int, gpus: Sequence[str]) -> str:
    if not gpus:
        return str(index)
    if index >= len(gpus):
        raise LiverfatError(Reason.CONFIG_INVALID, f"[worker] devices lists GPU {index}, but this host has "
                            f"{len(gpus)} visible GPU(s), 0 to {len(gpus) - 1}")  # fmt: skip
    return gpus[index]


@dataclass
class _Worker:
    """A worker process as the node sees it across its restarts (main thread only)."""

    slot: WorkerSlot
    process: SpawnProcess | None = None
    starts: int = 0
    started_at: float = 0.0  # monotonic
    restart_delay_s: float = RESTART_DELAY_S[0]
    start_at: float | None = 0.0  # monotonic time to (re)start it; None while it runs
    recovery: str | None = None  # why its job must go back to the queue before it starts again
    model: ModelState | None = None
    jobs_done: int = 0
    last_seen: float | None = None  # epoch s
    # Its reports (model loads, recorded jobs): a queue per process, as a process killed while writing
    # to a queue can leave the queue's lock held for good.
    reports: Queue[WorkerReport] | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


class LocalWorkers:
    """The node's worker processes on this host (see the module docstring); main thread only.

    ``load_model`` replaces the configured model (tests pass a fake backend's loader; it must
    be picklable, that is a module-level function or class).
    """

    def __init__(self, config: NodeConfig, spool: Spool, space: DiskSpace, load_model: BackendLoader | None = None,
                 slots: Sequence[WorkerSlot] | None = None, results_queued: Event | None = None) -> None:  # fmt: skip
        self.config, self.spool, self.space, self.load_model = config, spool, space, load_model
        if slots is None:  # a model configured on the CPU keeps every worker there
            slots = plan_workers(config.worker, gpus=() if config.model.device == "cpu" else None)
        self.host = socket.gethostname()
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._wake = self._context.Event()
        self.results_queued = self._context.Event() if results_queued is None else results_queued  # see run_worker
        self._workers = {slot.name: _Worker(slot) for slot in slots}
        self._park_at_start = True  # jobs left processing by a stopped node: re-queued before any worker starts

    # -- Workers --------------------------------------------------------------------------

    def start(self) -> None:
        self.tick()

    def tick(self) -> None:
        for worker in self._workers.values():
            self._read_reports(worker)
            self._watch(worker)
        if self._recover():
            now = time.monotonic()
            for worker in self._workers.values():
                if worker.start_at is not None and now >= worker.start_at:
                    self._start(worker)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        for worker in self._workers.values():
            self._watch(worker, stopping=True)  # a death not noticed yet counts as one (its job is recovered)
        running = [w for w in self._workers.values() if w.process is not None]
        if not running:
            return
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + self.config.worker.shutdown_grace_s
        for worker in running:
            assert worker.process is not None
            worker.process.join(max(deadline - time.monotonic(), 0.0))
        busy = [w for w in running if w.alive]
        if busy:
            log.warning("%s still busy after %.0f s: stopping and parking its series",
                        ", ".join(w.slot.name for w in busy), self.config.worker.shutdown_grace_s)  # fmt: skip
        for worker in busy:
            assert worker.process is not None
            worker.process.kill()  # nothing to clean up: the job is parked below and its outputs rewritten
            worker.process.join()
        for worker in running:
            self._read_reports(worker)
            worker.process, worker.start_at = None, None
        if self._recover():
            parked = self.space.write("parking at shutdown", lambda: self.spool.park_processing(SHUTDOWN_PARK))
            for job_id in parked or []:
                log.info("job %d parked: it will be processed again after the restart", job_id)

    def workers(self) -> tuple[WorkerInfo, ...]:
        now = time.time()
        return tuple(WorkerInfo(name=w.slot.name, host=self.host, device=w.slot.device, up=w.alive,
                                restarts=max(w.starts - 1, 0), jobs_done=w.jobs_done,
                                last_seen=now if w.alive else w.last_seen, model=w.model)
                     for w in self._workers.values())  # fmt: skip

    def queue(self) -> QueueInfo | None:
        return None

    # -- processes ------------------------------------------------------------------------

    def _start(self, worker: _Worker) -> None:
        slot = worker.slot
        config = self.config
        if slot.model_device is not None:
            config = replace(config, model=replace(config.model, device=slot.model_device))
        self._read_reports(worker)  # what the previous process said last
        worker.reports = self._context.Queue()
        args = (config, self.load_model, slot, self._stop, self._wake, self.results_queued, worker.reports)
        worker.process = self._context.Process(target=run_worker, name=f"liverfat-{slot.name}", args=args)
        worker.process.start()
        worker.starts += 1
        worker.started_at, worker.start_at = time.monotonic(), None
        log.info("worker process %d started: %s on %s", worker.process.pid, slot.name, slot.device)

    def _watch(self, worker: _Worker, stopping: bool = False) -> None:
        """Note a worker's death: its job is to be recovered, and it restarts after its backoff.

        While the node stops, a worker that exited cleanly (a SIGTERM to the whole process group
        reached it first: it finished its series) is not a death.
        """
        process = worker.process
        if process is None:
            return
        if process.is_alive():
            worker.last_seen = time.time()
            if time.monotonic() - worker.started_at > WORKER_STEADY_S:
                worker.restart_delay_s = RESTART_DELAY_S[0]
            return
        if stopping and process.exitcode == 0:
            log.info("worker process %d (%s) stopped", process.pid, worker.slot.name)
            worker.process = None
            return
        log.error("worker process %d died with exit code %s (%s); restarting in %.0f s", process.pid,
                  process.exitcode, worker.slot.name, worker.restart_delay_s)  # fmt: skip
        worker.process = None
        worker.start_at = time.monotonic() + worker.restart_delay_s
        worker.restart_delay_s = min(worker.restart_delay_s * 2, RESTART_DELAY_S[1])
        worker.recovery = f"the worker process died (exit code {process.exitcode}) while processing this series"

    def _recover(self) -> bool:
        """Record the re-queues due before a worker (re)starts; whether all of them are recorded.

        After a node-wide stop the attempt is not counted and nothing is restarted before the
        record; after a worker's death it counts (see ``Spool.recover``) and only its job returns.
        """
        spool = self.spool
        if self._park_at_start:
            parked = self.space.write("re-queueing after a restart", lambda: spool.park_processing(NODE_STOPPED))
            if parked is None:
                return False
            if parked:
                log.info("restart: %d series re-queued (not counted as an attempt)", len(parked))
            self._park_at_start = False
        for worker in self._workers.values():
            if worker.recovery is None:
                continue
            recover = functools.partial(spool.recover, self.config.worker.max_attempts, worker.recovery,
                                        claimed_by=worker.slot.name)  # fmt: skip
            recovered = self.space.write("re-queueing after a worker died", recover)
            if recovered is None:
                return False
            for job in recovered:
                log.error("series %s v%d: %s; now %s", job.series_uid, job.version, worker.recovery, job.state.value)
            worker.recovery = None
        return True

    def _read_reports(self, worker: _Worker) -> None:
        """Take a worker's reports (one reader: the main thread)."""
        while worker.reports is not None:
            try:
                report = worker.reports.get_nowait()
            except queue.Empty:
                return
            if report.model is not None:
                worker.model = report.model
            worker.jobs_done += report.jobs_done
