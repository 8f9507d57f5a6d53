"""The fleet as a node sees it: its Celery workers and the broker's queues, polled in a background thread.

Every ``POLL_S`` the poller asks every ``liverfat worker`` for its statistics (Celery's remote
control ``stats``, answered by the worker's main process even while its children analyse) and
each worker it has not met, or whose process changed, for its host and devices (``liverfat_identity``,
``identity``; a worker that does not answer it is shown by its name, device unknown), and
reads the depth of ``liverfat.series`` and ``liverfat.dead`` (passive declares). A worker is
``up`` when it answered the last poll; one that stops answering stays listed, down, with the
time it was last seen, for ``FORGET_AFTER_S``. Nothing here blocks the node: the node's threads
read the last :class:`FleetSnapshot`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from amqp.exceptions import AMQPError
from celery import Celery
from kombu.exceptions import OperationalError

from liverfat.service.fleet.broker import BrokerClient, BrokerUnavailable
from liverfat.service.fleet.identity import IDENTITY_COMMAND, FleetIdentity
from liverfat.service.fleet.messages import DEAD_QUEUE, SERIES_QUEUE
from liverfat.service.workers import WorkerInfo

log = logging.getLogger(__name__)

POLL_S = 10.0
REPLY_TIMEOUT_S = 2.0  # how long the workers' answers are waited for
FORGET_AFTER_S = 86400.0  # a worker not seen for this long is no longer listed (a host taken out of the fleet)


@dataclass(frozen=True)
class Answer:
    """What one worker answered: its ``stats``, and who it is (``None``: it did not say)."""

    stats: Mapping[str, Any]
    identity: FleetIdentity | None


def host_and_device(name: str, identity: FleetIdentity | None) -> tuple[str, str]:
    """Where a worker runs, from its identity; one that gave none: its name's part after ``@``, device unknown."""
    if identity is None:
        return name.partition("@")[2] or name, "unknown"
    return identity.host, identity.device


@dataclass(frozen=True)
class FleetSnapshot:
    """The last poll: every worker known, and the messages waiting in the broker's queues."""

    workers: tuple[WorkerInfo, ...] = ()
    waiting: int = 0  # ready in liverfat.series
    dead_waiting: int = 0  # ready in liverfat.dead (not yet turned into failed completions)


class FleetMonitor:
    """A daemon thread polling the fleet every ``POLL_S``; :attr:`snapshot` is safe to read from any thread."""

    def __init__(self, app: Celery, poll_s: float = POLL_S) -> None:
        self.app = app
        self.poll_s = poll_s
        self.snapshot = FleetSnapshot()
        self._seen: dict[str, WorkerInfo] = {}
        self._known: dict[str, tuple[int | None, FleetIdentity | None]] = {}  # name: (the pid asked, its answer)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        client = BrokerClient(self.app)
        try:
            while not self._stop.is_set():
                self.poll(client)
                self._stop.wait(self.poll_s)
        finally:
            client.close()

    def poll(self, client: BrokerClient) -> None:
        """Ask the workers and the queues once; a broker that cannot be reached leaves every worker down."""
        now = time.time()
        try:
            waiting, dead = client.depth(SERIES_QUEUE).ready, client.depth(DEAD_QUEUE).ready
            replies = self._ask()
        except BrokerUnavailable as error:
            log.debug("fleet status: %s", error.message)
            waiting, dead, replies = self.snapshot.waiting, self.snapshot.dead_waiting, {}
        for name, answer in replies.items():
            host, device = host_and_device(name, answer.identity)
            done = sum(int(count) for count in (answer.stats.get("total") or {}).values())
            self._seen[name] = WorkerInfo(name=name, host=host, device=device, up=True, restarts=0, jobs_done=done,
                                          last_seen=now, model=None)  # fmt: skip
        for name, worker in list(self._seen.items()):
            if name not in replies:
                if worker.last_seen is not None and now - worker.last_seen > FORGET_AFTER_S:
                    del self._seen[name]
                    self._known.pop(name, None)
                elif worker.up:
                    log.warning("fleet worker %s on %s (%s) did not answer", name, worker.host, worker.device)
                    self._seen[name] = replace(worker, up=False)
        self.snapshot = FleetSnapshot(tuple(sorted(self._seen.values(), key=lambda w: w.name)), waiting, dead)

    def _ask(self) -> dict[str, Answer]:
        """Every worker's answers by name, on a connection of its own that gives up at once when down.

        (Celery's broadcast would otherwise retry connecting forever, as the fleet's app is configured to.)
        """
        connection = self.app.connection_for_write()
        try:
            connection.ensure_connection(max_retries=1)
            stats: dict[str, Mapping[str, Any]] = self.app.control.inspect(timeout=REPLY_TIMEOUT_S,
                                                                           connection=connection).stats() or {}  # fmt: skip
            new = [name for name, answer in stats.items() if self._known.get(name, (None,))[0] != answer.get("pid")]
            if new:
                self._identify(new, stats, connection)
        except (OSError, OperationalError, AMQPError) as error:
            raise BrokerUnavailable(self.app.conf.broker_url, error) from error
        finally:
            connection.release()
        return {name: Answer(answer, self._known.get(name, (None, None))[1]) for name, answer in stats.items()}

    def _identify(self, names: list[str], stats: Mapping[str, Mapping[str, Any]], connection: Any) -> None:
        """Ask ``names`` who they are, once per worker process (a restarted worker has a new pid); one that does not
        answer in time is asked again at the next poll."""
        replies = self.app.control.broadcast(IDENTITY_COMMAND, destination=names, reply=True, timeout=REPLY_TIMEOUT_S,
                                             connection=connection) or []  # fmt: skip
        answers = {name: answer for reply in replies for name, answer in reply.items()}
        for name in (name for name in names if name in answers):
            try:
                identity: FleetIdentity | None = FleetIdentity.from_json(answers[name])
            except (KeyError, TypeError, ValueError):
                log.info("fleet worker %s did not say who it is (%s); shown by its name", name, answers.get(name))
                identity = None
            self._known[name] = (stats[name].get("pid"), identity)
