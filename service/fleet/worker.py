"""The fleet worker (``liverfat worker``): a Celery worker on a GPU (or CPU) host analysing series tasks.

One Celery worker per host (or per ``[worker] name``), named ``liverfat@<name>`` (default
``<host>-<devices>``), with one prefork child per
planned slot (``worker_pool.plan_workers``: one per GPU, pinned with ``CUDA_VISIBLE_DEVICES``, or
``[worker] count`` CPU children splitting the cores). Each child loads this host's ``[model]``
once and keeps it; each task is analysed with the PUBLISHER's settings (carried in the task).

A task (:func:`process_task`) reads the series from the shared storage (paths mapped by
``[queue] path_map``), writes its outputs into a staging folder inside ``out_dir`` (``staging``),
records the outcome there (``job.json``) and renames the series' folder into ``out_dir``
atomically; then it
publishes the :class:`~.messages.Completion` to the task's ``reply_to`` queue, and only then is
the message acknowledged (``acks_late``). So the same task delivered again (a re-publish after a
node restart, a redelivery after a broker restart) finds the finished folder and publishes the
same completion without analysing again; a child killed mid-series leaves only its staging
folder, and the broker hands the message to a worker again (or dead-letters it after the
delivery limit, see ``dead_letters``).

Names are unique in a fleet: a worker whose name another connected worker answers to (Celery's
``ping``) exits 2 with one line saying so before it consumes, as does one that loses the race
for the name's remote-control queue. Each worker answers ``liverfat_identity`` (``identity``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, NoReturn

from amqp.exceptions import AMQPError, ResourceLocked
from billiard.process import current_process
from celery import Celery, signals
from celery.worker.consumer import Consumer
from kombu.exceptions import OperationalError
from pydantic import TypeAdapter, ValidationError

from liverfat import __version__
from liverfat.analysis import BackendLoader, ModelCache, safe_folder_name, write_json_atomically
from liverfat.errors import LiverfatError, Reason
from liverfat.files import fsync_folder
from liverfat.service.config import NodeConfig
from liverfat.service.fleet.broker import BrokerClient, BrokerUnavailable, celery_app, redacted
from liverfat.service.fleet.identity import FleetIdentity, announce
from liverfat.service.fleet.messages import (
    JOB_RECORD,
    PUBLISHER_SECTIONS,
    TASK_NAME,
    Completion,
    SeriesTask,
    WorkerIdentity,
    job_result_from_json,
    job_result_to_json,
)
from liverfat.service.fleet.paths import PathMap
from liverfat.service.fleet.staging import remove_stale_staging, staging_folder
from liverfat.service.series_job import ResearchOptions, analyze_series_files
from liverfat.service.spool_types import JobResult, JobState
from liverfat.service.worker import ModelLoader, settle_process
from liverfat.service.worker_pool import WorkerSlot, plan_workers

log = logging.getLogger(__name__)

PUBLISH_RETRY_S = (1.0, 30.0)  # publishing a completion while the broker is away: first delay, cap (doubling)
CHILD_START_S = 600.0  # a child loads its model before it says it is ready (Celery's default allows 4 s)
NAME_CHECK_S = 1.0  # how long a connected worker of the same name is given to answer the ping
NAME_TAKEN_EXIT = 2
_NODE_CONFIG = TypeAdapter(NodeConfig)


def worker_name(slots: Sequence[WorkerSlot], name: str | None = None, host: str | None = None) -> str:
    """``liverfat@<name>``; without a name ``liverfat@<host>-cpu`` or ``liverfat@<host>-cuda0-1`` (the GPUs its
    children use)."""
    if name is None:
        gpus = [slot.device.removeprefix("cuda:") for slot in slots if slot.device.startswith("cuda:")]
        name = f"{host or socket.gethostname()}-{'cuda' + '-'.join(gpus) if gpus else 'cpu'}"
    return f"liverfat@{name}"


def task_config(settings: Mapping[str, Mapping[str, Any]], own: NodeConfig) -> NodeConfig:
    """The configuration a task is analysed with: the publisher's settings, this host's ``[model]``."""
    sections: dict[str, Any] = {name: dict(settings.get(name, {})) for name in PUBLISHER_SECTIONS}
    worker = {"ineligible_result": settings.get("worker", {}).get("ineligible_result", "nothing")}
    node = {"ae_title": settings.get("node", {}).get("ae_title", own.node.ae_title)}
    try:
        return _NODE_CONFIG.validate_python({**sections, "worker": worker, "node": node, "model": own.model})
    except ValidationError as error:
        raise LiverfatError(Reason.CONFIG_INVALID, f"the task's settings are invalid: {error}") from error


@dataclass
class ChildState:
    """What a worker child keeps between tasks: its model, its broker connection, who it is."""

    config: NodeConfig
    paths: PathMap
    models: ModelCache
    client: BrokerClient
    identity: WorkerIdentity


def process_task(task: SeriesTask, state: ChildState) -> JobResult:
    """Analyse ``task`` once: a finished folder from an earlier delivery is re-read, not analysed again."""
    out_dir = Path(state.paths.local(task.out_dir))
    final = out_dir / safe_folder_name(task.series_uid)
    done = read_record(final, task.task_id)
    if done is not None:
        log.info("series %s v%d: already done by an earlier delivery (%s), completion sent again", task.series_uid,
                 task.version, done.state.value, extra={"task": task.task_id})  # fmt: skip
        return done
    staging = staging_folder(out_dir, task.task_id, state.identity.host, os.getpid())
    remove_stale_staging(out_dir, task.task_id, state.identity.host)
    started = time.monotonic()
    log.info("series %s v%d: processing %d file(s)", task.series_uid, task.version, len(task.files),
             extra={"task": task.task_id})  # fmt: skip
    try:
        config = task_config(task.settings, state.config)
        files = [Path(state.paths.local(path)) for path in task.files]
        result = analyze_series_files(task.series_uid, files, staging, staging, config, state.models,
                                      ResearchOptions.from_json(task.settings.get("research")))  # fmt: skip
    except Exception as error:  # the boundary of one task: a failed outcome, and the next task
        log.exception("series %s v%d failed", task.series_uid, task.version, extra={"task": task.task_id})
        why = error.message if isinstance(error, LiverfatError) else f"{type(error).__name__}: {error}"
        result = JobResult(JobState.FAILED, error=why)
    prefix = PurePosixPath(task.out_dir).relative_to(task.root)
    result = replace(result, processing_s=time.monotonic() - started,
                     outputs=tuple(replace(o, path=str(prefix / o.path)) for o in result.outputs))  # fmt: skip
    try:
        return _publish_folder(staging / final.name, final, result, task.task_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_record(folder: Path, task_id: str) -> JobResult | None:
    """The outcome ``task_id`` recorded in a finished series folder; ``None`` when there is none (yet).

    A folder left by another task (a research case analysed again with other settings, or by a
    local ``analyze``) is not this task's result: it is replaced when this task's is ready.
    """
    try:
        record = json.loads((folder / JOB_RECORD).read_text())
    except FileNotFoundError:
        return None
    return job_result_from_json(record["result"]) if record.get("task_id") == task_id else None


def _publish_folder(staged: Path, final: Path, result: JobResult, task_id: str) -> JobResult:
    """Record ``result`` in ``staged`` and rename it to ``final``; if another delivery got there first, its result.

    A ``final`` folder that holds another task's outcome (or none) is moved aside within the same
    folder, replaced, and then deleted.
    """
    staged.mkdir(parents=True, exist_ok=True)
    write_json_atomically(staged / JOB_RECORD, {"task_id": task_id, "result": job_result_to_json(result)})
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        staged.rename(final)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        done = read_record(final, task_id)
        if done is not None:
            return done
        outdated = staged.parent / f"{final.name}.outdated"
        final.rename(outdated)
        staged.rename(final)
        shutil.rmtree(outdated, ignore_errors=True)
    fsync_folder(final.parent)
    return result


def publish_completion(state: ChildState, reply_to: str, completion: Completion) -> None:
    """Publish until the broker confirms it: the task is acknowledged only after this returns."""
    delay = PUBLISH_RETRY_S[0]
    while True:
        try:
            state.client.publish_completion(reply_to, completion)
            return
        except BrokerUnavailable as error:
            log.warning("cannot publish the completion of task %s yet (%s); retrying in %.0f s", completion.task_id,
                        error.message, delay)  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 2, PUBLISH_RETRY_S[1])


class SeriesConsumer(Consumer):
    """Celery's consumer, refusing a name another worker uses, without native delayed delivery.

    The name is checked on every connection, before any queue is consumed: a worker started
    before the broker, or one that reconnects, checks once it reaches the broker. Delayed
    delivery: liverfat sends no ETA tasks, and that step would declare 28 quorum queues and 29
    exchanges (``celery_delayed_*``) on the broker for them.
    """

    class Blueprint(Consumer.Blueprint):
        default_steps: ClassVar[list[str]] = [step for step in Consumer.Blueprint.default_steps
                                              if not step.endswith(":DelayedDelivery")]  # fmt: skip

    def connect(self) -> Any:
        connection = super().connect()
        if name_in_use(self.app, self.hostname):
            name_taken(self.hostname)
        return connection

    def start(self) -> None:
        try:
            super().start()
        except ResourceLocked:  # the name's remote-control queue: a worker of that name connected after the check
            name_taken(self.hostname)


def name_in_use(app: Celery, name: str) -> bool:
    """Whether a worker called ``name`` answers a ping now; ``False`` when the broker cannot be asked."""
    connection = app.connection_for_write()
    try:
        connection.ensure_connection(max_retries=1)
        return bool(app.control.ping(destination=[name], timeout=NAME_CHECK_S, connection=connection))
    except (OSError, OperationalError, AMQPError) as error:  # the consumer's own connection will find out
        log.debug("cannot ask the broker whether %s is connected: %s", name, error)
        return False
    finally:
        connection.release()


def name_taken(name: str) -> NoReturn:
    """Stop this worker (exit 2) with one line saying why."""
    log.error("a liverfat worker named %s is already connected to the broker; give this one another [worker] name "
              "(LIVERFAT_WORKER_NAME)", name)  # fmt: skip
    sys.exit(NAME_TAKEN_EXIT)


class FleetWorker:
    """The Celery worker of this host: its app, its slots, and the state each child builds."""

    def __init__(self, config: NodeConfig, load_model: BackendLoader | None = None) -> None:
        self.config = config
        self.load_model = load_model
        self.paths = PathMap.from_config(config.queue)
        self.slots = plan_workers(config.worker)
        self.name = worker_name(self.slots, config.worker.name)
        self.app = celery_app(config.queue)
        self.app.conf.worker_proc_alive_timeout = CHILD_START_S
        self.app.conf.task_acks_on_failure_or_timeout = False  # a task that raised (a bug) is dead-lettered, not lost
        self.state: ChildState | None = None
        self.app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)(self.run_task)
        signals.worker_process_init.connect(self._child_started, weak=False)

    def run(self) -> int:
        """Consume ``liverfat.series`` until stopped (SIGTERM: finish the series in hand; SIGQUIT: now)."""
        if name_in_use(self.app, self.name):  # before any child loads a model (the consumer checks again)
            name_taken(self.name)
        log.info("fleet worker %s: %d child(ren) on %s, broker %s", self.name, len(self.slots),
                 ", ".join(slot.device for slot in self.slots), redacted(self.config.queue.broker))  # fmt: skip
        announce(self.app, FleetIdentity(host=socket.gethostname(), devices=tuple(slot.device for slot in self.slots),
                                         pid=os.getpid(), version=__version__, model=self.config.model.name,
                                         precision=self.config.model.precision))  # fmt: skip
        worker = self.app.Worker(hostname=self.name, concurrency=len(self.slots), pool="prefork", optimization="fair",
                                 consumer_cls=SeriesConsumer,
                                 without_gossip=True, without_mingle=True, without_heartbeat=True, quiet=True,
                                 loglevel=self.config.log.level)  # fmt: skip
        worker.start()
        return int(worker.exitcode or 0)

    def _child_started(self, **_: Any) -> None:
        """In each new child (also one that replaces a killed child): pin its slot, load the model once."""
        index = getattr(current_process(), "index", 0)
        slot = self.slots[index % len(self.slots)]
        slot.pin()
        model = self.config.model if slot.model_device is None else replace(self.config.model, device=slot.model_device)
        models = ModelCache(self.load_model or ModelLoader(model))
        identity = WorkerIdentity(self.name, socket.gethostname(), slot.device, os.getpid())
        self.state = ChildState(self.config, self.paths, models, BrokerClient(self.app), identity)
        try:
            backend = models.get()
            log.info("model loaded: %s %s on %s", backend.info.name, backend.info.version, backend.info.device)
        except LiverfatError as error:  # reported; each series tries the load again (ModelCache) and fails with it
            log.error("cannot load model %r: %s; series will fail until this is fixed", model.name, error.message)
        except Exception:
            log.exception("cannot load model %r; series will fail until this is fixed", model.name)
        settle_process()

    def run_task(self, message: dict[str, Any]) -> None:
        """The ``liverfat.analyze_series`` task: analyse (or re-read), publish the completion, return (acked)."""
        if self.state is None:
            raise RuntimeError("the fleet worker child was not initialised")
        task = SeriesTask.from_json(message)
        result = process_task(task, self.state)
        publish_completion(self.state, task.reply_to, Completion.of(task, result, self.state.identity))
        hu = "" if result.parenchymal_hu is None else f", DL-parenchymal {result.parenchymal_hu:.1f} HU"
        log.info("series %s v%d: %s, grade %s%s, %d output(s), completion sent to %s", task.series_uid, task.version,
                 result.state.value, result.grade, hu, len(result.outputs), task.reply_to,
                 extra={"task": task.task_id})  # fmt: skip
