"""The sender: delivers queued results to the destinations by C-STORE, with retries and backoff.

The outbox lives in the spool's SQLite index, so it survives restarts: a destination that
is down for an hour gets everything once it is back, as long as ``[send] max_attempts``
lasts; after that a row is ``failed`` until ``liverfat resend SERIES_UID``.
Each association proposes presentation contexts for exactly the SOP classes (and transfer
syntaxes) of the files it carries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from liverfat.service.config import Destination, NodeConfig, SendSection, parse_destination
from liverfat.service.spool import Send, Spool
from liverfat.service.tls import client_context

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the outbox is checked for due rows
SUCCESS_CATEGORIES = ("Success", "Warning")  # PS3.4 B.2.3: warnings (coercion, ...) mean stored


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
    """Sends due outbox rows, one association per destination per round."""

    def __init__(self, config: NodeConfig, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self.policy = RetryPolicy.from_section(config.send)
        self.ae = AE(ae_title=config.node.ae_title)
        for attribute in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(self.ae, attribute, config.send.timeout_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="liverfat-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the file in hand (bounded by the timeouts) and stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_due()
            except Exception:  # the thread must outlive one bad round; the rows stay queued
                log.exception("sender round failed; retrying in %.1f s", POLL_S)
            self._stop.wait(POLL_S)

    def send_due(self, now: float | None = None) -> int:
        """Send every due row; returns how many were delivered."""
        due = self.spool.due_sends(time.time() if now is None else now)
        by_destination: dict[str, list[Send]] = {}
        for send in due:
            by_destination.setdefault(send.destination, []).append(send)
        return sum(self._deliver(parse_destination(name), sends) for name, sends in by_destination.items())

    def _deliver(self, destination: Destination, sends: Sequence[Send]) -> int:
        present = [s for s in sends if s.path.is_file()]
        for missing in (s for s in sends if not s.path.is_file()):
            self._failed(missing, f"result file {missing.path} is missing", give_up=True)
        if not present:
            return 0
        contexts = sorted({(s.sop_class_uid, s.transfer_syntax_uid) for s in present})
        tls = client_context(self.config.tls)
        assoc = self.ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                                  contexts=[build_context(sop, [syntax]) for sop, syntax in contexts],
                                  tls_args=(tls, destination.host) if tls else None)  # fmt: skip
        if not assoc.is_established:
            why = _association_failure(assoc)
            for send in present:
                self._failed(send, f"association with {destination} failed: {why}")
            return 0
        delivered = 0
        try:
            for send in present:
                if self._stop.is_set() or not assoc.is_established:
                    break
                delivered += self._store(assoc, destination, send)
        finally:
            if assoc.is_established:
                assoc.release()
        if delivered:
            log.info("sent %d result file(s) to %s", delivered, destination)
        return delivered

    def _store(self, assoc: Association, destination: Destination, send: Send) -> int:
        status = assoc.send_c_store(send.path)
        code = status.get("Status") if status else None
        if code is not None and code_to_category(code) in SUCCESS_CATEGORIES:
            self.spool.mark_sent(send.id)
            log.debug("stored %s at %s (status 0x%04X)", send.sop_instance_uid, destination, code)
            return 1
        why = "no response (association aborted or timed out)" if code is None else f"status 0x{code:04X}"
        self._failed(send, f"C-STORE of {send.path.name} to {destination}: {why}")
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


def _association_failure(assoc: Association) -> str:
    if assoc.is_rejected:
        return "rejected by the destination (check its AE title and that it knows ours)"
    if assoc.is_aborted:
        return "aborted (destination unreachable, or TLS refused)"
    return "no connection"
