"""Receiver processes: ``[node] receivers`` processes serve the associations the node accepts.

One Python process serves its associations on threads that share one interpreter lock, so it uses
one core however many associations it holds (on the 2 cores here, one and two receivers take four
associations at the same rate, about 450 instances/s: the disk and the senders share the cores).
With ``receivers`` above 1 the node keeps the one listening socket, accepts each connection and
hands it (``SCM_RIGHTS`` over a Unix socket pair) to the receiver process with the fewest open
connections, which runs the association with the very same
:class:`~liverfat.service.scp.StorageSCP` handlers into its own connection to the spool's index
(SQLite WAL: concurrent commits wait for each other, ``spool_db.BUSY_TIMEOUT_S``). Accepting in one
place spreads the associations evenly (``SO_REUSEPORT`` hashes connections: four associations over
two sockets land 4-0 one time in eight) and keeps ``[node] max_associations`` node-wide: the
connection that would exceed it is handed with a flag, and its receiver refuses the association
("local limit exceeded"), as the in-process listener refuses one over the limit. ``receivers = 1``
keeps the listener in the node process (:func:`make_listener`).

Each receiver sends back, over the same socket pair, the series of an association that ended
with a release (the node then calls its ``on_release``, as the in-process listener does) and the
closing of each connection (the counts behind the choice and the limit). A receiver that dies
while the node runs is logged and restarted; the associations it served end without a Success
for the instance in transfer, which their senders send again. What it left in the spool is what
a crash leaves, and harmless while the node runs: a file in ``tmp/`` or a named file without a
row is never read (both are removed at the next start), and a row whose file's fsyncs it did not
live to wait for makes a re-sent copy wait for them (``Spool.store_instance``). Stopping the node
closes the listener and the socket pairs: each receiver aborts its associations (no Success for
stores in flight) and exits. A receiver also stops when the node process is gone (the socket pair
closes with it), and ignores SIGINT and SIGTERM, which a terminal or a service manager sends to
the whole process group: the node decides.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from typing import Protocol

from liverfat.service.config import NodeConfig
from liverfat.service.diskspace import DiskSpace
from liverfat.service.logs import configure_logging
from liverfat.service.scp import StorageSCP, accept_each, close_listening, listen, shut
from liverfat.service.spool import Spool
from liverfat.service.worker_pool import usable_cores

log = logging.getLogger(__name__)

AUTO_MAX_RECEIVERS = 4  # a PACS sends a few series at once; more processes than that only cost memory
RESTART_DELAY_S = (1.0, 60.0)  # a dead receiver's restart backoff: first delay, cap (doubled per quick death)
RECEIVER_STEADY_S = 60.0  # a receiver that lived this long restarts after the first delay again
STOP_S = 10.0  # a receiver still running this long after the node asked it to stop is killed
MESSAGE_BYTES = 65536  # the largest message on a socket pair
SERIES_PER_MESSAGE = 500  # a released association's series UIDs (at most 64 characters each), a message per 500
CLOSED = "closed"
RELEASED = "released"


class Listener(Protocol):
    """What the node needs of its listener: :class:`StorageSCP` in the node process, or :class:`ReceiverPool`."""

    spool: Spool  # the node's connection for what the listener reports (releases)

    @property
    def port(self) -> int: ...

    @property
    def running(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def receiver_count(config: NodeConfig) -> int:
    """``[node] receivers``, with ``"auto"`` as the usable cores up to ``AUTO_MAX_RECEIVERS``."""
    receivers = config.node.receivers
    return min(usable_cores(), AUTO_MAX_RECEIVERS) if receivers == "auto" else receivers


def make_listener(config: NodeConfig, spool: Spool, on_release: Callable[[list[str]], None]) -> Listener:
    """The node's listener for ``[node] receivers``: one process serves in the node's, several in their own."""
    count = receiver_count(config)
    if count == 1:
        return StorageSCP(config, spool, on_release=on_release)
    return ReceiverPool(config, spool, on_release, count)


@dataclass
class _Receiver:
    """One receiver process as the node sees it across its restarts (fields under the pool's lock)."""

    name: str  # "receiver-0", ...
    process: SpawnProcess | None = None
    channel: socket.socket | None = None  # the node's end of the socket pair
    open: int = 0  # connections handed to it and not yet closed
    handed: int = 0  # connections handed to it since the node started
    started_at: float = 0.0  # monotonic
    restart_delay_s: float = RESTART_DELAY_S[0]


class ReceiverPool:
    """``count`` receiver processes behind the node's one listening socket (see the module docstring).

    ``on_release`` is called on a thread of the node process, one per receiver.
    """

    def __init__(self, config: NodeConfig, spool: Spool, on_release: Callable[[list[str]], None],
                 count: int) -> None:  # fmt: skip
        self.config = config
        self.spool = spool
        self.on_release = on_release
        self.receivers = [_Receiver(f"receiver-{n}") for n in range(count)]
        self._context = multiprocessing.get_context("spawn")
        self._changed = threading.Condition()  # guards the receivers' fields; notified when one comes up
        self._listener: socket.socket | None = None
        self._address = (config.node.host, config.node.port)  # the bound address, once listening
        self._threads: list[threading.Thread] = []
        self._stopping = False

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the listener is not started")
        return int(self._listener.getsockname()[1])

    @property
    def running(self) -> bool:
        """Listening, with at least one receiver process up to serve what it accepts."""
        with self._changed:
            return self._listener is not None and any(_up(r) for r in self.receivers)

    def start(self) -> None:
        node = self.config.node
        address = (node.host, node.port)
        self._listener = listen(address)
        self._address = (node.host, self.port)
        for receiver in self.receivers:
            self._spawn(receiver)
            self._thread(self._watch, receiver, name=f"liverfat-{receiver.name}-watch")
        self._thread(self._accept, name="liverfat-accept")
        tls = " with TLS" if self.config.tls.enabled else ""
        log.info("listening as %s on %s:%d%s, %d receiver processes", node.ae_title, node.host, self.port, tls,
                 len(self.receivers))  # fmt: skip

    def stop(self) -> None:
        """Close the listener, stop the receivers (stores in flight get no Success); idempotent."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            listener, self._listener = self._listener, None
            channels = [r.channel for r in self.receivers if r.channel is not None]
        if listener is not None:
            close_listening(listener)
        for channel in channels:  # the receiver reads the end of its socket pair: it stops and exits
            shut(channel, socket.SHUT_WR)
        deadline = time.monotonic() + STOP_S
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        for receiver in self.receivers:
            process = receiver.process
            if process is not None and process.is_alive():
                log.warning("receiver process %d (%s) did not stop within %.0f s: killed", process.pid,
                            receiver.name, STOP_S)  # fmt: skip
                process.kill()
                process.join()
        for thread in self._threads:
            thread.join()
        self._threads = []

    # -- the node's threads ---------------------------------------------------------------

    def _thread(self, target: Callable[..., None], *args: object, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        """Accept connections and hand each to the receiver with the fewest open ones."""
        listener = self._listener
        assert listener is not None
        accept_each(listener, lambda: self._stopping, self._hand)

    def _hand(self, connection: socket.socket, address: tuple[str, int]) -> None:
        """Send the connection to the receiver with the fewest open ones; the node's own copy is closed."""
        with connection, self._changed:
            while not self._stopping and not any(_up(r) for r in self.receivers):
                self._changed.wait()  # every receiver restarting: the connection waits (the sender's timeout runs)
            if self._stopping:
                return
            receiver = min((r for r in self.receivers if _up(r)), key=lambda r: r.open)
            over_limit = sum(r.open for r in self.receivers) >= self.config.node.max_associations
            assert receiver.channel is not None
            message = json.dumps([address[0], address[1], over_limit]).encode()
            try:  # under the lock: a receiver's death resets its count, never between the send and the count
                socket.send_fds(receiver.channel, [message], [connection.fileno()], socket.MSG_DONTWAIT)
            except OSError as error:  # it died just now, or stopped reading: the sender is not answered, retries
                log.warning("could not hand the connection from %s to %s: %s", address[0], receiver.name, error)
                return
            receiver.open += 1
            receiver.handed += 1

    def _spawn(self, receiver: _Receiver) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = self._context.Process(target=run_receiver, name=f"liverfat-{receiver.name}",
                                        args=(self.config, self._address, theirs), daemon=True)  # fmt: skip
        process.start()
        theirs.close()  # the receiver holds it now: when it exits, our end reads the end of the pair
        with self._changed:
            receiver.process, receiver.channel, receiver.open = process, ours, 0
            receiver.started_at = time.monotonic()
            if self._stopping:  # stop() has told the others already
                shut(ours, socket.SHUT_WR)
            self._changed.notify_all()
        log.info("receiver process %d started: %s", process.pid, receiver.name)

    def _watch(self, receiver: _Receiver) -> None:
        """Read a receiver's reports until its process ends; restart it unless the node stops."""
        while True:
            self._read(receiver)
            process, channel = receiver.process, receiver.channel
            assert process is not None and channel is not None
            process.join()
            with self._changed:
                cut, receiver.open, receiver.channel = receiver.open, 0, None
            channel.close()
            if self._stopping and process.exitcode == 0:
                log.info("receiver process %d (%s) stopped", process.pid, receiver.name)
                return
            if self._stopping:
                log.warning("receiver process %d (%s) %s while the node stopped", process.pid, receiver.name,
                            _exit(process.exitcode))  # fmt: skip
                return
            if time.monotonic() - receiver.started_at > RECEIVER_STEADY_S:
                receiver.restart_delay_s = RESTART_DELAY_S[0]
            delay, receiver.restart_delay_s = receiver.restart_delay_s, min(receiver.restart_delay_s * 2,
                                                                            RESTART_DELAY_S[1])  # fmt: skip
            log.error("receiver process %d (%s) %s; %d connection(s) it served were cut off (their senders get no "
                      "Success for the instance in transfer and send it again); restarting it in %.0f s",
                      process.pid, receiver.name, _exit(process.exitcode), cut, delay)  # fmt: skip
            with self._changed:
                self._changed.wait_for(lambda: self._stopping, delay)
            if self._stopping:
                return
            self._spawn(receiver)

    def _read(self, receiver: _Receiver) -> None:
        channel = receiver.channel
        assert channel is not None
        while True:
            try:
                message = channel.recv(MESSAGE_BYTES)
            except OSError:
                return
            if not message:
                return
            kind, series = json.loads(message)
            if kind == CLOSED:
                with self._changed:
                    receiver.open = max(receiver.open - 1, 0)
            elif kind == RELEASED:
                try:
                    self.on_release(series)
                except Exception:  # noqa: BLE001  # as pynetdicom treats a failing handler: logged, the reader goes on
                    log.exception("could not handle the release of series %s", ", ".join(series[:8]))


def _up(receiver: _Receiver) -> bool:
    """Whether it serves: its watcher closes the channel once the process has ended."""
    return receiver.channel is not None


def _exit(code: int | None) -> str:
    """A process's end in words: "was killed by SIGKILL", "exited with code 1"."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# -- the receiver process ---------------------------------------------------------------------


def run_receiver(config: NodeConfig, address: tuple[str, int], channel: socket.socket) -> None:
    """Entry point of a receiver process: serve the connections the node hands over until it closes the pair."""
    configure_logging(config.log)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and a group's SIGTERM reach it too: the node decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spool = Spool(config.spool.dir, min_free_bytes=config.spool.min_free_disk_mb * 2**20,
                  space=DiskSpace(config.spool.dir))  # fmt: skip
    report = _Reporter(channel)
    scp = StorageSCP(config, spool, on_release=lambda series: report(RELEASED, series),
                     on_closed=lambda: report(CLOSED, []))  # fmt: skip
    scp.start_handed(address)
    try:
        while True:
            message, fds, _, _ = socket.recv_fds(channel, MESSAGE_BYTES, 1)
            if not message:
                break  # the node closed its end: it stops, or is gone
            host, port, over_limit = json.loads(message)
            if not fds:
                continue
            connection = socket.socket(fileno=fds[0])
            try:
                scp.serve(connection, (host, port), over_limit)
            except Exception as error:  # noqa: BLE001  # the association did not start: one connection lost, not the receiver
                if isinstance(error, OSError):  # gone before it was served (TLS wraps need a connected socket)
                    log.debug("the connection from %s closed before it was served: %s", host, error)
                else:
                    log.exception("could not serve the connection from %s", host)
                connection.close()
                report(CLOSED, [])
    finally:
        scp.stop()
        spool.close()


class _Reporter:
    """Sends a receiver's reports to the node; association threads share the socket pair."""

    def __init__(self, channel: socket.socket) -> None:
        self._channel = channel
        self._lock = threading.Lock()

    def __call__(self, kind: str, series: list[str]) -> None:
        chunks = [series[start : start + SERIES_PER_MESSAGE] for start in range(0, len(series), SERIES_PER_MESSAGE)]
        with self._lock:
            try:
                for chunk in chunks or [[]]:
                    self._channel.send(json.dumps([kind, chunk]).encode())
            except OSError:
                pass  # the node is gone or stopping: nothing is waiting for the report
