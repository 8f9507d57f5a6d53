"""The sender: delivers queued results to the destinations by C-STORE, with retries and backoff.

The outbox lives in the spool's SQLite index, so it survives restarts and crashes: a row
leaves ``pending`` only when the destination answered its C-STORE with success.
Each destination has its own thread, so one that is down or silent never delays another.

A destination that cannot be reached (no connection, no answer within ``acse_timeout_s``,
an association that breaks) is *down*: its rows are not attempted, and so do not use up
``[send] max_attempts``, while the sender probes it with C-ECHO every ``probe_interval_s``;
the first probe it answers sends everything it has waiting at once. A destination that
answers but refuses (association rejected, a failure status) gets its rows retried with
exponential backoff; after ``max_attempts`` a row is ``failed`` until
``liverfat resend SERIES_UID``. Each association proposes presentation contexts for exactly
the SOP classes (and transfer syntaxes) of the files it carries.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from liverfat.service.config import Destination, NodeConfig, SendSection, parse_destination
from liverfat.service.spool import Send, Spool
from liverfat.service.tls import client_context
from liverfat.service.workers import Doorbell

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the outbox is checked for due rows when nobody says results were queued
BATCH = 500  # rows per association
SUCCESS_CATEGORIES = ("Success", "Warning")  # PS3.4 B.2.3: warnings (coercion, ...) mean stored


class Reachability(StrEnum):
    UNKNOWN = "unknown"  # not tried since the sender started
    UP = "up"  # answered the last association request, accepting or rejecting it
    DOWN = "down"  # no connection, no answer, or the association broke: probed, rows not attempted


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``first_delay_s * backoff_factor ** (n - 1)`` after the n-th failure, capped."""

    max_attempts: int
    first_delay_s: float
    backoff_factor: float
    max_delay_s: float

    @classmethod
    def from_section(cls, send: SendSection) -> RetryPolicy:
        return cls(send.max_attempts, send.first_delay_s, send.backoff_factor, send.max_delay_s)

    def delay_s(self, failures: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * self.backoff_factor ** max(failures - 1, 0))

    def retry_at(self, attempts: int, now: float) -> float | None:
        """When to try again after ``attempts`` failed attempts, or ``None`` to give up."""
        return None if attempts >= self.max_attempts else now + self.delay_s(attempts)


class Sender:
    """The outbox's sender: one :class:`DestinationSender` per destination, each on its own thread.

    ``results_queued`` is set by whoever queues outbox rows (a worker process that recorded a
    series' results, the fleet dispatcher): every destination then starts a round at once
    instead of at its next poll, up to ``POLL_S`` later.
    """

    def __init__(self, config: NodeConfig, spool: Spool, results_queued: Doorbell | None = None) -> None:
        self.config = config
        self.spool = spool
        self._results_queued = threading.Event() if results_queued is None else results_queued
        self._configured = {str(destination): destination for destination in config.send.destinations}
        self._stop = threading.Event()
        self._destinations: dict[str, DestinationSender] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._thread: threading.Thread | None = None

    def destination(self, name: str) -> DestinationSender:
        """The sender for destination ``name`` (``AE@host:port``, the outbox's key), made on first use.

        A configured destination is used as configured. Outbox rows may name one that is no
        longer in the configuration (queued before it was removed): they are still sent, to
        the destination their text names.
        """
        if name not in self._destinations:
            destination = self._configured.get(name) or parse_destination(name)
            self._destinations[name] = DestinationSender(destination, self.config, self.spool, self._stop)
        return self._destinations[name]

    def send_due(self, now: float | None = None) -> int:
        """One round for every destination in turn, on the calling thread; returns how many files were delivered."""
        return sum(self.destination(name).send_due(now) for name in self._names())

    def start(self) -> None:
        """Start a thread per destination, and one that adds a thread for a destination that appears later."""
        self._thread = threading.Thread(target=self._watch, name="liverfat-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the file in hand on every destination (bounded by the timeouts) and stop."""
        self._stop.set()
        self._results_queued.set()  # ends the watch's wait
        for sender in self._destinations.values():
            sender.wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for thread in self._threads.values():
            thread.join()
        self._threads.clear()

    def _names(self) -> list[str]:
        """The configured destinations, then any other that outbox rows still wait for."""
        others = [name for name in self.spool.pending_destinations() if name not in self._configured]
        return [*self._configured, *others]

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                for name in self._names():
                    if name not in self._threads:
                        self._threads[name] = thread = threading.Thread(
                            target=self.destination(name).run, name=f"liverfat-send-{name}", daemon=True)  # fmt: skip
                        thread.start()
            except Exception:  # a spool error must not end the watch; the rows stay queued
                log.exception("sender: could not list the destinations; retrying in %.1f s", POLL_S)
            if self._results_queued.wait(POLL_S):
                self._results_queued.clear()  # before the rounds: rows queued from here on ring again
                for sender in list(self._destinations.values()):
                    sender.wake()


class DestinationSender:
    """Sends one destination's outbox rows; owned by one thread (or called in turn by :meth:`Sender.send_due`)."""

    def __init__(self, destination: Destination, config: NodeConfig, spool: Spool, stop: threading.Event) -> None:
        self.destination = destination
        self.name = str(destination)
        self.config = config
        self.spool = spool
        self.policy = RetryPolicy.from_section(config.send)
        self.reachability = Reachability.UNKNOWN
        self._stop = stop
        self._wake = threading.Event()
        self._next_probe_at = 0.0
        self._catch_up = False  # after a successful probe: send every pending row, due or not
        self._association_s = 0.0  # how long the last association request took
        self.ae = AE(ae_title=config.node.ae_title)
        send = config.send
        self.ae.connection_timeout = send.connect_timeout_s
        self.ae.acse_timeout = send.acse_timeout_s
        self.ae.dimse_timeout = send.dimse_timeout_s
        self.ae.network_timeout = send.timeout_s

    def run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the round: a wake during it starts the next one at once
            try:
                self.send_due()
            except Exception:  # the thread must outlive one bad round; the rows stay queued
                log.exception("sender round for %s failed; retrying in %.1f s", self.name, POLL_S)
            self._wake.wait(POLL_S)

    def wake(self) -> None:
        """Start the next round now (rows were queued, or the sender stops)."""
        self._wake.set()

    def send_due(self, now: float | None = None) -> int:
        """One round: send the due rows, or probe a destination that is down; returns how many were delivered."""
        now = time.time() if now is None else now
        if self.reachability is Reachability.UP:
            return self._deliver(self.spool.due_sends(math.inf if self._catch_up else now, BATCH, self.name))
        pending = self.spool.due_sends(math.inf, BATCH, self.name)
        if not pending:
            self.reachability = Reachability.UNKNOWN
            return 0
        waiting_for_retry = len(pending) > len(self.spool.due_sends(now, BATCH, self.name))
        if self.reachability is Reachability.UNKNOWN and not waiting_for_retry:
            return self._deliver(pending)  # nothing failed before: the send itself finds out
        if now < self._next_probe_at:
            return 0
        why = self.probe(pending)
        if why is not None:
            self._down(why)
            return 0
        log.info("destination %s answers again: sending the %s result file(s) waiting for it", self.name,
                 f"{len(pending)}+" if len(pending) == BATCH else len(pending))  # fmt: skip
        self.reachability, self._catch_up = Reachability.UP, True
        return self._deliver(pending)

    def probe(self, sends: Sequence[Send] = ()) -> str | None:
        """C-ECHO the destination: ``None`` when it answers (an association rejected is an answer), else why not.

        The association also proposes the contexts ``sends`` need: a requestor whose every
        context is refused aborts, which would look like a destination that is down.
        """
        contexts = [build_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        contexts += _contexts(sends)
        assoc = self._associate(contexts)
        if assoc.is_rejected:
            return None
        if not assoc.is_established:
            return self._association_failure(assoc)
        try:
            if not any(cx.abstract_syntax == Verification for cx in assoc.accepted_contexts):
                return None  # it accepted the association for storage: that answers the question
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        return None if status else "the C-ECHO got no response"

    def _associate(self, contexts: list[PresentationContext]) -> Association:
        tls = client_context(self.config.tls)
        destination = self.destination
        started = time.monotonic()
        assoc = self.ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                                  contexts=contexts, tls_args=(tls, destination.host) if tls else None)  # fmt: skip
        self._association_s = time.monotonic() - started
        return assoc

    def _down(self, why: str) -> None:
        """Mark the destination down; the next probe is ``probe_interval_s`` after this attempt ended."""
        first = self.reachability is not Reachability.DOWN
        self.reachability, self._catch_up = Reachability.DOWN, False
        self._next_probe_at = time.time() + self.config.send.probe_interval_s
        (log.warning if first else log.debug)(
            "destination %s is down (%s): its results wait; probing it with C-ECHO every %.0f s",
            self.name, why, self.config.send.probe_interval_s)  # fmt: skip

    def _deliver(self, sends: Sequence[Send]) -> int:
        present = [s for s in sends if s.path.is_file()]
        for missing in (s for s in sends if not s.path.is_file()):
            self._failed(missing, f"result file {missing.path} is missing", give_up=True)
        if not present:
            if not sends:
                self._catch_up = False
            return 0
        assoc = self._associate(_contexts(present))
        if not assoc.is_established:
            why = self._association_failure(assoc)
            for send in present:
                self._failed(send, f"association with {self.name} failed: {why}")
            if assoc.is_rejected:
                self.reachability = Reachability.UP  # it answers and refuses: rows back off, no probing
            else:
                self._down(why)
            return 0
        self.reachability = Reachability.UP
        delivered = 0
        try:
            for send in present:
                if self._stop.is_set() or not assoc.is_established:
                    break
                delivered += self._store(assoc, send)
        finally:
            if assoc.is_established:
                assoc.release()
        if self.reachability is Reachability.UP and len(sends) < BATCH:
            self._catch_up = False
        if delivered:
            log.info("sent %d result file(s) to %s", delivered, self.name)
        return delivered

    def _store(self, assoc: Association, send: Send) -> int:
        try:
            status = assoc.send_c_store(send.path)
        except (ValueError, OSError) as error:  # no accepted presentation context, an unreadable file
            self._failed(send, f"C-STORE of {send.path.name} to {self.name}: {error}")
            return 0
        code = status.get("Status") if status else None
        if code is not None and code_to_category(code) in SUCCESS_CATEGORIES:
            self.spool.mark_sent(send.id)
            log.debug("stored %s at %s (status 0x%04X)", send.sop_instance_uid, self.name, code)
            return 1
        if code is None:
            why = f"no response within [send] dimse_timeout_s = {self.config.send.dimse_timeout_s:g} s, or aborted"
            self._down(why)
        else:
            why = f"status 0x{code:04X}"
        self._failed(send, f"C-STORE of {send.path.name} to {self.name}: {why}")
        return 0

    def _failed(self, send: Send, error: str, give_up: bool = False) -> None:
        now = time.time()
        retry_at = None if give_up else self.policy.retry_at(send.attempts + 1, now)
        self.spool.mark_send_failed(send.id, error, retry_at)
        if retry_at is None:
            log.error("gave up sending %s after %d attempt(s): %s; `liverfat resend` queues it again",
                      send.path.name, send.attempts + 1, error)  # fmt: skip
        else:
            log.warning("%s; attempt %d of %d, next in %.0f s", error, send.attempts + 1, self.policy.max_attempts,
                        retry_at - now)  # fmt: skip

    def _association_failure(self, assoc: Association) -> str:
        send = self.config.send
        if assoc.is_rejected:
            return "rejected by the destination (check its AE title and that it knows ours)"
        if self._association_s >= min(send.acse_timeout_s, send.connect_timeout_s) * 0.9:
            return (f"no answer within the timeouts ([send] connect_timeout_s = {send.connect_timeout_s:g} s, "
                    f"acse_timeout_s = {send.acse_timeout_s:g} s)")  # fmt: skip
        return "connection refused or closed (destination down or unreachable, or TLS refused)"


def _contexts(sends: Sequence[Send]) -> list[PresentationContext]:
    """One presentation context per SOP class and transfer syntax of ``sends``."""
    pairs = sorted({(s.sop_class_uid, s.transfer_syntax_uid) for s in sends})
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
