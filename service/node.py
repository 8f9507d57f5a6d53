"""``liverfat serve``: the listener, the series clock, the workers, the sender and the HTTP endpoints.

Stages follow mercure's split (receiver, router, processor, dispatcher) but run as threads
of one process plus the workers and, with ``[node] receivers`` above 1, the receiver processes
that serve the associations the node accepts (``service/receivers.py``), all sharing the spool's
SQLite index. The main thread runs the series clock (stable series become complete) and ticks
the node's :class:`Workers`: in local mode (the default) ``LocalWorkers`` (``service/worker_pool.py``),
worker processes on this host that are restarted when they die, their series put back in the
queue. SIGTERM or SIGINT stops the listener, lets the workers finish the series in hand for
``[worker] shutdown_grace_s`` and parks them otherwise.

A full spool disk never stops the node (see ``diskspace``): index writes that fail for lack of
space are retried at the next tick; after a restart, no series completes before the clocks of
those still receiving have been restarted, and no worker starts before the series it might find
in hand have been recorded as re-queued.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import shutil
import signal
import sqlite3
import threading
import time
from types import FrameType
from typing import Any, TextIO

from liverfat.analysis import BackendLoader
from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import NodeConfig
from liverfat.service.diskspace import PROBE_S, DiskSpace, is_disk_full
from liverfat.service.health import NodeStatus, assess
from liverfat.service.http_server import HttpServer
from liverfat.service.report import status_report
from liverfat.service.retention import purge_expired
from liverfat.service.receivers import Listener, make_listener
from liverfat.service.sender import Sender
from liverfat.service.spool import Spool
from liverfat.service.spool_db import SPOOL_FOLDER_MODE
from liverfat.service.worker_pool import LocalWorkers
from liverfat.service.workers import Workers

log = logging.getLogger(__name__)

TICK_S = 0.5  # series clock and worker watch
RETENTION_INTERVAL_S = 600.0  # how often expired series are looked for ([spool] keep_days)
LOCK_FILE = "node.lock"


class Node:
    """The running node; :meth:`start`, then :meth:`tick` repeatedly, then :meth:`stop`.

    ``load_model`` replaces the configured model (tests pass a fake backend's loader; it
    must be picklable, that is a module-level function or class).
    """

    def __init__(self, config: NodeConfig, load_model: BackendLoader | None = None) -> None:
        self.config = config
        self.load_model = load_model
        self._retention_at = 0.0  # monotonic time of the next retention pass
        self._lock_file: TextIO | None = None
        self._clocks_restarted = False  # no series completes before the clocks restart after a start
        self._probe_at = 0.0  # monotonic time of the next try to write the disk reserve again
        self.space = DiskSpace(config.spool.dir)
        self.spool: Spool | None = None
        self.workers: Workers | None = None
        self.scp: Listener | None = None
        self.sender: Sender | None = None
        # rung by the workers once a series' results are queued: the sender sends at once, not at its next poll
        self.results_queued = multiprocessing.get_context("spawn").Event()
        self.http: HttpServer | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        config = self.config
        config.spool.dir.mkdir(mode=SPOOL_FOLDER_MODE, parents=True, exist_ok=True)
        self._lock_file = _lock_spool(config)
        self.space.check()  # before the index opens: its -shm file needs room
        min_free = config.spool.min_free_disk_mb * 2**20
        self.spool = Spool(config.spool.dir, min_free_bytes=min_free, space=self.space)
        spool = self.spool
        leftovers = spool.clear_tmp() + spool.remove_partial_instances() + spool.remove_unindexed_files()
        if not self.space.restore():
            log.error("the spool's disk is full (%d KiB free): new instances are answered 0xA700 and no series is "
                      "processed until space returns", self.space.free_bytes() // 1024)  # fmt: skip
        self._clocks_restarted = False
        if self._restart_clocks() and leftovers:
            log.info("restart: %d partial or unacknowledged file(s) removed", leftovers)
        self.workers = self._make_workers(spool)
        self.workers.start()
        _warn_about_defaults(config)
        self.scp = make_listener(config, Spool(config.spool.dir, min_free_bytes=min_free, space=self.space),
                                 on_release=self._on_release)  # fmt: skip
        self.scp.start()
        self.sender = Sender(config, Spool(config.spool.dir), self.results_queued)
        self.sender.start()
        if config.http.port:
            self.http = HttpServer(config.http, self.status, self.report)
            self.http.start()
        log.info("node %s ready: spool %s, stable after %.0f s, %d destination(s)", config.node.ae_title,
                 config.spool.dir, config.series.stable_seconds, len(config.send.destinations))  # fmt: skip

    def _make_workers(self, spool: Spool) -> Workers:
        """Who processes the complete series: local worker processes, or the fleet with ``[queue] broker``."""
        if self.config.queue.broker:
            from liverfat.service.fleet.dispatch import FleetDispatcher  # Celery: only in fleet mode

            return FleetDispatcher(self.config, spool, self.space, self.results_queued)
        return LocalWorkers(self.config, spool, self.space, self.load_model, results_queued=self.results_queued)

    def tick(self, now: float | None = None) -> None:
        """Complete the stable series and tick the workers; the main thread calls this every ``TICK_S``."""
        assert self.spool is not None and self.workers is not None, "start() first"
        self._watch_space()
        self.workers.tick()
        if not self._clocks_restarted and not self._restart_clocks():
            return  # series complete once the clocks have been restarted
        spool = self.spool
        completed = self.space.write("completing stable series",
                                     lambda: spool.complete_stable(self.config.series.stable_seconds, now))  # fmt: skip
        if completed:
            log.info("%d series complete (no new instance for %.0f s)", len(completed),
                     self.config.series.stable_seconds)  # fmt: skip
            self.workers.wake()
        if self.config.spool.keep_days > 0 and time.monotonic() >= self._retention_at:
            self._retention_at = time.monotonic() + RETENTION_INTERVAL_S
            self._purge_expired(now)

    def _watch_space(self) -> None:
        """Enter the disk-full state when space runs low; leave it once the reserve can be written again."""
        self.space.check()
        if self.space.is_full() and time.monotonic() >= self._probe_at:
            self._probe_at = time.monotonic() + PROBE_S
            if self.space.restore():
                log.info("space returned on the spool's disk (%d MiB free): receiving and processing again",
                         self.space.free_bytes() // 2**20)  # fmt: skip
                if self.workers is not None:
                    self.workers.wake()

    def _restart_clocks(self) -> bool:
        """After a start, give every series still receiving a full stable wait; whether that is recorded.

        While the node was down its senders could not reach it (see ``Spool.restart_clocks``).
        """
        assert self.spool is not None
        spool = self.spool
        receiving = self.space.write("restarting the series clocks", spool.restart_clocks)
        if receiving is None:
            return False
        if receiving:
            log.info("restart: %d series still receiving (complete %.0f s from now unless more arrives)", receiving,
                     self.config.series.stable_seconds)  # fmt: skip
        self._clocks_restarted = True
        return True

    def _purge_expired(self, now: float | None) -> None:
        """One retention pass; a failure is logged and retried at the next pass, the node keeps serving."""
        assert self.spool is not None
        keep_days = self.config.spool.keep_days
        try:
            purged = purge_expired(self.spool, keep_days, now)
        except (OSError, sqlite3.Error) as error:
            log.error("retention: could not delete expired series ([spool] keep_days = %g): %s", keep_days, error)
            return
        if purged.series:
            log.info("retention: deleted %d series ended more than %g days ago ([spool] keep_days): %d instance "
                     "file(s), %d result folder(s), %d MiB", purged.series, keep_days, purged.instances,
                     purged.result_folders, purged.bytes_freed // 2**20)  # fmt: skip

    def stop(self) -> None:
        """Stop receiving, finish or park the series in hand, stop sending; idempotent."""
        if self.scp is not None:
            self.scp.stop()
            self.scp.spool.close()
            self.scp = None
        if self.workers is not None:
            self.workers.stop()
            self.workers = None
        if self.sender is not None:
            self.sender.stop()
            self.sender.spool.close()
            self.sender = None
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        log.info("node stopped")

    def status(self) -> NodeStatus:
        assert self.spool is not None, "start() first"
        return NodeStatus(
            counts=self.spool.counts(),
            spool_free_bytes=shutil.disk_usage(self.config.spool.dir).free,
            min_free_bytes=self.config.spool.min_free_disk_mb * 2**20,
            nearly_full_bytes=self.config.spool.nearly_full_margin_mb * 2**20,
            destinations=len(self.config.send.destinations),
            unhealthy_after_s=self.config.send.unhealthy_after_s,
            listener_up=self.scp is not None and self.scp.running,
            workers=None if self.workers is None else self.workers.workers(),
            queue=None if self.workers is None else self.workers.queue(),
            spool_full=self.space.is_full(),
        )

    def report(self) -> dict[str, Any]:
        """The status page's data (``service/report.py``)."""
        assert self.spool is not None, "start() first"
        status = self.status()
        return status_report(self.config, status, assess(status), self.spool, running=True)

    def _on_release(self, series_uids: list[str]) -> None:
        """An association ended with a release: noted (see ``UNRELEASED_NOTE``), and the fast path to completion.

        The series complete at once with ``[series] complete_on_release``.
        """
        spool = self.scp.spool if self.scp is not None else None
        if spool is None:
            return

        def note() -> bool:  # ``space.write`` says ``None`` for a full disk: the note itself returns nothing
            spool.note_released(series_uids)
            return True

        if self.space.write("noting a release", note) is None:
            return
        if not self.config.series.complete_on_release:
            return
        completed = self.space.write("completing released series", lambda: spool.complete_series(series_uids))
        if completed and self.workers is not None:
            self.workers.wake()


def run(config: NodeConfig, load_model: BackendLoader | None = None) -> int:
    """Run the node until SIGTERM or SIGINT; returns the exit status (0 after a clean stop)."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    node = Node(config, load_model)
    try:
        if _start_when_the_index_opens(node, stop):
            while not stop.wait(TICK_S):
                node.tick()
    finally:
        node.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _start_when_the_index_opens(node: Node, stop: threading.Event) -> bool:
    """Start the node; on a disk too full to open the spool's index, try again every ``PROBE_S`` until stopped.

    The node's reserve normally leaves the index room (see ``diskspace``); this is for a disk that
    something else filled completely while the node was in its disk-full state or stopped.
    """
    while True:
        try:
            node.start()
            return True
        except (sqlite3.Error, OSError) as error:
            if not is_disk_full(error):
                raise
            log.error("cannot open the spool's index %s: the disk is full (%s); trying again every %.0f s",
                      node.config.spool.dir, error, PROBE_S)  # fmt: skip
            node.stop()
        if stop.wait(PROBE_S):
            return False


def spool_in_use(config: NodeConfig) -> bool:
    """Whether a node is running on this spool (it holds the spool's lock)."""
    path = config.spool.dir / LOCK_FILE
    if not path.exists():
        return False
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _lock_spool(config: NodeConfig) -> TextIO:
    """An exclusive lock on the spool: two nodes on one spool would process series twice."""
    handle = (config.spool.dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        why = f"spool {config.spool.dir} is in use by another liverfat node ({LOCK_FILE} is locked)"
        raise LiverfatError(Reason.SPOOL_IN_USE, why) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except OSError as error:  # the PID is for people; the lock is what counts (a full disk lands here)
        log.warning("cannot write the node's PID into %s: %s", config.spool.dir / LOCK_FILE, error)
    return handle


def _warn_about_defaults(config: NodeConfig) -> None:
    if not config.send.destinations:
        log.warning("NO DESTINATION CONFIGURED: results are written to %s but sent nowhere. Set [send] destinations "
                    "(or LIVERFAT_SEND_DESTINATIONS=AE@host:port), then `liverfat resend SERIES_UID` sends "
                    "earlier results", config.spool.dir / "results")  # fmt: skip
    if not config.node.allowed_callers:
        log.warning("accepting associations from any calling AE title; set [node] allowed_callers to restrict")
    if config.source is None:
        log.warning("no configuration file: running on embedded defaults (AE %s, port %d, spool %s)",
                    config.node.ae_title, config.node.port, config.spool.dir)  # fmt: skip
