"""Fleet mode's :class:`~liverfat.service.workers.Workers`: the node publishes its series, the fleet analyses them.

With ``[queue] broker`` the node runs no worker process. A dispatcher thread, with its own
broker connection, does all the node's broker I/O, so a broker that is down or slow never stalls
the series clock, the listener or ``/healthz``:

- it claims each complete job from the spool (``claimed_by = "fleet"``) and publishes it as one
  :class:`~.messages.SeriesTask` (the series' files and result folder in the spool, which the
  workers share); a publish the broker does not confirm puts the job back in the queue without
  counting the attempt, and it is published again once the broker answers;
- it takes the :class:`~.messages.Completion` messages from the node's reply queue
  (``liverfat.done.<AE title>``) and records each with ``Spool.finish_job``, which queues the
  outputs for the destinations as in local mode (the sender sends them); a completion is
  acknowledged only after its record is committed, and one received again (a task delivered
  twice) is acknowledged and ignored; staging folders that workers which died left in the
  job's result folder are removed then;
- it turns dead letters (``liverfat.dead``) into failed completions for their publishers
  (``dead_letters``): the node's own come back through its reply queue and are recorded
  failed with reason ``dead_lettered``.

When the node starts, the jobs a stopped node left ``processing`` are published again with the
same task id (the worker does each task once: it re-reads a finished result instead of
analysing again). :meth:`FleetDispatcher.stop` leaves the jobs in flight ``processing``: they are
in the broker, and their completions wait in the reply queue for the next start. The workers
and queue depths shown by health, ``/metrics`` and ``liverfat status`` come from
``fleet_status``.
"""

from __future__ import annotations

import functools
import logging
import threading

from liverfat.errors import Reason
from liverfat.service.config import NodeConfig
from liverfat.service.diskspace import DiskSpace
from liverfat.service.fleet.broker import BrokerClient, BrokerUnavailable, celery_app
from liverfat.service.fleet.dead_letters import forward_dead_letters
from liverfat.service.fleet.fleet_status import FleetMonitor
from liverfat.service.fleet.messages import Completion, SeriesTask, node_reply_queue, publisher_settings, task_id
from liverfat.service.fleet.staging import remove_staging
from liverfat.service.fleet.urls import redacted
from liverfat.service.spool import Job, JobState, Spool
from liverfat.service.workers import Doorbell, QueueInfo, WorkerInfo

log = logging.getLogger(__name__)

CLAIMED_BY = "fleet"  # jobs.claimed_by of a job handed to the broker
POLL_S = 0.5  # how often the reply queue is read while the broker answers
RETRY_S = (0.5, 5.0)  # trying the broker again after it failed: first delay, cap (doubling)
STOP_S = 10.0  # how long stop() waits for a thread in the middle of a broker call
BROKER_DOWN = ("the broker could not be reached to publish this series; published again once it can be, not "
               "counted as an attempt")  # fmt: skip
DEAD_LETTERED_SQL = ("SELECT COUNT(DISTINCT jobs.id) AS n FROM jobs, json_each(jobs.reasons) AS reason "
                     "WHERE jobs.state = ? AND json_extract(reason.value, '$.code') = ?")  # fmt: skip


class FleetDispatcher:
    """The node's side of the fleet (see the module docstring); ``wake`` from any thread, the rest the main thread's."""

    def __init__(self, config: NodeConfig, spool: Spool, space: DiskSpace,
                 results_queued: Doorbell | None = None) -> None:  # fmt: skip
        self.config, self.spool, self.space = config, spool, space
        self.results_queued = threading.Event() if results_queued is None else results_queued  # for the Sender
        self.app = celery_app(config.queue)
        self.broker = redacted(config.queue.broker)
        self.publisher = config.node.ae_title
        self.reply_to = node_reply_queue(config.node.ae_title)
        self.settings = publisher_settings(config)
        self.destinations = [str(d) for d in config.send.destinations]
        self.monitor = FleetMonitor(self.app)
        self._reachable: bool | None = None  # how the dispatcher's last cycle went (None: not tried yet)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._republished = False  # jobs left processing by a stopped node: published again once, first
        self._unparked: set[int] = set()  # jobs whose publish failed and whose return to the queue is not recorded
        self._thread = threading.Thread(target=self._run, name="fleet-dispatch", daemon=True)

    # -- Workers --------------------------------------------------------------------------

    def start(self) -> None:
        log.info("fleet mode: series are published to %s, completions read from %s", self.broker, self.reply_to)
        self._thread.start()
        self.monitor.start()

    def tick(self) -> None:
        """Nothing: the dispatcher thread keeps its own clock (``POLL_S``) and the node wakes it for new series."""

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.monitor.stop(STOP_S)
        if self._thread.is_alive():
            self._thread.join(STOP_S)
            if self._thread.is_alive():
                log.warning("the fleet dispatcher still waits for the broker after %.0f s; stopping anyway", STOP_S)

    @property
    def connected(self) -> bool:
        """Whether the dispatcher's last cycle reached the broker (any thread may ask)."""
        return self._reachable is True

    def workers(self) -> tuple[WorkerInfo, ...]:
        return self.monitor.snapshot.workers

    def queue(self) -> QueueInfo | None:
        snapshot = self.monitor.snapshot
        in_flight = self.spool.read_committed("SELECT COUNT(*) AS n FROM jobs WHERE state = ?", (JobState.PROCESSING,))
        recorded = self.spool.read_committed(DEAD_LETTERED_SQL, (JobState.FAILED, Reason.DEAD_LETTERED.value))
        return QueueInfo(broker=self.broker, connected=self.connected, waiting=snapshot.waiting,
                         in_flight=int(in_flight[0]["n"]), dead_lettered=snapshot.dead_waiting + int(recorded[0]["n"]))  # fmt: skip

    # -- the dispatcher thread ------------------------------------------------------------

    def _run(self) -> None:
        client = BrokerClient(self.app)
        delay = RETRY_S[0]
        while not self._stop.is_set():
            self._wake.clear()
            if self._try_cycle(client):
                delay = RETRY_S[0]
                self._wake.wait(POLL_S)
            else:
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_S[1])
        client.close()

    def _try_cycle(self, client: BrokerClient) -> bool:
        """One cycle; whether it went through. A broker outage is logged once, any other error each time.

        After a failure the connection is dropped, so a message taken but not acknowledged goes
        back to its queue.
        """
        try:
            self._cycle(client)
        except BrokerUnavailable as error:
            client.close()
            if self._reachable is not False:
                log.error("%s: complete series wait in the spool and are published once it answers", error.message)
            self._reachable = False
            return False
        except Exception:  # the thread must outlive anything (an index error, a bug): the node keeps receiving
            client.close()
            log.exception("fleet dispatcher: unexpected error; trying again")
            return False
        if not self._reachable:
            log.info("broker %s reached: complete series are published", self.broker)
        self._reachable = True
        return True

    def _cycle(self, client: BrokerClient) -> None:
        """Publish what is complete, forward dead letters, record completions."""
        client.declare(self.reply_to)  # before any task names it (again after a broker that lost its queues)
        if not self._republished:
            self._republish(client)
        self._return_unparked()
        while not self._stop.is_set() and not self.space.is_full() and not self._unparked:
            job = self.space.write("handing a series over", functools.partial(self.spool.claim_next, CLAIMED_BY))
            if job is None:
                break
            self._publish(client, job)
        forward_dead_letters(client)
        self._record_completions(client)

    def _republish(self, client: BrokerClient) -> None:
        rows = self.spool.query("SELECT * FROM jobs WHERE state = ? ORDER BY id", (JobState.PROCESSING,))
        for job in (Job.from_row(row) for row in rows):
            client.publish_task(self._task(job))  # a failure: the whole set again at the next cycle (harmless)
        if rows:
            log.info("restart: %d series in flight when the node stopped published again (same task ids)", len(rows))
        self._republished = True

    def _publish(self, client: BrokerClient, job: Job) -> None:
        task = self._task(job)
        try:
            client.publish_task(task)
        except BrokerUnavailable:
            self._unparked.add(job.id)
            self._return_unparked()
            raise
        log.info("series %s v%d: %d instance(s) published to the fleet (task %s)", job.series_uid, job.version,
                 len(task.files), task.task_id, extra={"job": job.id})  # fmt: skip
        if job.note:
            log.warning("series %s v%d: %s", job.series_uid, job.version, job.note, extra={"job": job.id})

    def _return_unparked(self) -> None:
        """Jobs whose publish failed back to ``complete`` (a full disk can delay the record; nothing is claimed meanwhile)."""
        for job_id in sorted(self._unparked):
            if self.space.write("returning an unpublished series", functools.partial(
                    self.spool.park_processing, BROKER_DOWN, job_id)) is not None:  # fmt: skip
                self._unparked.discard(job_id)

    def _task(self, job: Job) -> SeriesTask:
        return SeriesTask.create(kind="node", publisher=self.publisher, series_uid=job.series_uid, version=job.version,
                                 files=self.spool.job_files(job), out_dir=self.spool.results_dir / str(job.id),
                                 root=self.spool.root, reply_to=self.reply_to, settings=self.settings,
                                 job_id=job.id)  # fmt: skip

    def _record_completions(self, client: BrokerClient) -> None:
        for delivery in client.fetch(self.reply_to):
            try:
                completion = delivery.completion
            except (KeyError, TypeError, ValueError) as error:
                log.error("dropping a message in %s that is no completion: %s: %s", self.reply_to,
                          type(error).__name__, error)  # fmt: skip
                delivery.ack()
                continue
            if self.space.write("recording a completion", functools.partial(self._record, completion)) is None:
                delivery.reject()  # the disk is full: it waits in the broker until space returns
                return
            delivery.ack()

    def _record(self, completion: Completion) -> bool:
        """Record one completion in the ledger; ``False`` for one already recorded or not this node's."""
        job = self._job(completion.job_id)
        if job is None or completion.task_id != task_id(self.publisher, job.series_uid, job.version):
            log.warning("ignoring a completion of task %s: no such series version in this spool (job %s)",
                        completion.task_id, completion.job_id)  # fmt: skip
            return False
        result = completion.result
        if not self.spool.finish_job(job.id, result, self.destinations):
            log.info("series %s v%d: a completion for it while %s (received again), ignored", job.series_uid,
                     job.version, job.state.value, extra={"job": job.id})  # fmt: skip
            return False
        self.results_queued.set()
        self._remove_staging(job, completion.task_id)
        worker = "the broker" if completion.worker is None else f"{completion.worker.name} ({completion.worker.device})"
        hu = "" if result.parenchymal_hu is None else f", DL-parenchymal {result.parenchymal_hu:.1f} HU"
        error = f": {result.error}" if result.error else ""
        log.info("series %s v%d: %s by %s, grade %s%s, %d output(s)%s", job.series_uid, job.version,
                 result.state.value, worker, result.grade, hu, len(result.outputs), error, extra={"job": job.id})  # fmt: skip
        return True

    def _remove_staging(self, job: Job, task: str) -> None:
        """Staging folders of the job's deliveries whose worker died (a host that went away leaves one behind)."""
        for name in remove_staging(self.spool.results_dir / str(job.id), task):
            log.info("series %s v%d: removed %s, left by a worker that stopped mid-series", job.series_uid,
                     job.version, name, extra={"job": job.id})  # fmt: skip

    def _job(self, job_id: int | None) -> Job | None:
        rows = [] if job_id is None else self.spool.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None
