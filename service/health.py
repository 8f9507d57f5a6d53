"""Health and metrics: a pure verdict computed from the node's state, and its HTTP rendering.

``GET /healthz`` answers 200 with ``{"status": "ok", ...}`` or 503 with the problems; a
destination whose results have failed for ``[send] unhealthy_after_s`` is a problem, named with
the reason and since when (before that it is a warning);
``GET /metrics`` answers the Prometheus text format (version 0.0.4). The server is the
standard library's ``ThreadingHTTPServer`` on a daemon thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import SendSection
from liverfat.service.spool import DestinationBacklog, JobState, OutboxState, SpoolCounts

log = logging.getLogger(__name__)

STALE_SEND_S = 3600.0  # a result still unsent after this long suggests the destination is unreachable
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class NodeStatus:
    """Everything the verdict and the metrics are computed from; ``None`` means not known here."""

    counts: SpoolCounts
    spool_free_bytes: int
    min_free_bytes: int
    destinations: int
    listener_up: bool | None = None
    worker_up: bool | None = None
    spool_full: bool | None = None  # the node's disk-full state (service/diskspace.py)
    time: float = field(default_factory=time.time)
    unhealthy_after_s: float = SendSection.unhealthy_after_s  # [send] unhealthy_after_s


@dataclass(frozen=True)
class Health:
    ok: bool
    problems: tuple[str, ...]  # the node cannot do its job: 503
    warnings: tuple[str, ...]  # it can, but someone should look

    def to_json(self, status: NodeStatus) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "unhealthy",
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "series": {state.value: n for state, n in status.counts.jobs.items()},
            "outbox": {state.value: n for state, n in status.counts.outbox.items()},
            "listener_up": status.listener_up,
            "worker_up": status.worker_up,
            "destinations_failing": [_failing_json(b, status) for b in status.counts.destinations
                                     if b.failing_since is not None],
        }


def assess(status: NodeStatus) -> Health:
    """The node's health from its state; no I/O."""
    problems, warnings = [], []
    if status.listener_up is False:
        problems.append("the DICOM listener is not running")
    if status.worker_up is False:
        problems.append("the worker process is not running")
    if status.spool_free_bytes < status.min_free_bytes:
        problems.append(f"spool has {status.spool_free_bytes // 2**20} MiB free, below the "
                        f"{status.min_free_bytes // 2**20} MiB minimum: new instances are refused")  # fmt: skip
    if status.spool_full:
        problems.append(f"the spool's disk is full ({status.spool_free_bytes // 2**10} KiB free): new instances are "
                        "answered 0xA700 and no series is processed until space returns")  # fmt: skip
    if status.destinations == 0:
        warnings.append("no destination configured: results stay in the spool ([send] destinations)")
    for backlog in status.counts.destinations:
        if backlog.failing_since is not None:
            failing_s = status.time - backlog.failing_since
            (problems if failing_s >= status.unhealthy_after_s else warnings).append(_failing_text(backlog, failing_s))
    failed_sends = status.counts.outbox[OutboxState.FAILED]
    if failed_sends:
        warnings.append(f"{failed_sends} result file(s) could not be sent; see `liverfat status`, "
                        "then `liverfat resend`")  # fmt: skip
    oldest = status.counts.oldest_pending_send_at
    if oldest is not None and status.time - oldest > STALE_SEND_S:
        warnings.append(f"a result has waited {(status.time - oldest) / 3600:.1f} h to be sent; is the destination up?")
    failed_jobs = status.counts.jobs[JobState.FAILED]
    if failed_jobs:
        warnings.append(f"{failed_jobs} series failed; see `liverfat status`")
    return Health(ok=not problems, problems=tuple(problems), warnings=tuple(warnings))


def _failing_text(backlog: DestinationBacklog, failing_s: float) -> str:
    since = _utc(backlog.failing_since or 0.0)
    return (f"destination {backlog.destination} failing since {since} ({_duration(failing_s)}): {backlog.last_error}; "
            f"{backlog.pending} result file(s) wait")  # fmt: skip


def _failing_json(backlog: DestinationBacklog, status: NodeStatus) -> dict[str, Any]:
    since = backlog.failing_since or 0.0
    return {"destination": backlog.destination, "failing_since": _utc(since), "failing_s": round(status.time - since, 1),
            "reason": backlog.last_error, "waiting": backlog.pending}  # fmt: skip


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


def render_metrics(status: NodeStatus) -> str:
    """The Prometheus exposition text for ``status``."""
    counts = status.counts
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"))
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    metric("liverfat_instances_received_total", "counter", "Instances received and held in the spool.",
           [("", counts.instances)])  # fmt: skip
    metric("liverfat_series", "gauge", "Series versions by job state.",
           [(f'{{state="{state.value}"}}', n) for state, n in counts.jobs.items()])  # fmt: skip
    buckets: list[tuple[str, float]] = [(f'_bucket{{le="{_number(le)}"}}', n)
                                         for le, n in counts.processing_buckets.items()]  # fmt: skip
    buckets += [('_bucket{le="+Inf"}', counts.processing_count), ("_sum", counts.processing_sum_s),
                ("_count", counts.processing_count)]  # fmt: skip
    lines.extend(("# HELP liverfat_processing_seconds Time to process one series, from claim to outputs recorded.",
                  "# TYPE liverfat_processing_seconds histogram"))  # fmt: skip
    lines.extend(f"liverfat_processing_seconds{suffix} {_number(value)}" for suffix, value in buckets)
    metric("liverfat_send_failures_total", "counter", "Failed C-STORE attempts to destinations.",
           [("", counts.send_failures)])  # fmt: skip
    metric("liverfat_outbox", "gauge", "Result files by send state.",
           [(f'{{state="{state.value}"}}', n) for state, n in counts.outbox.items()])  # fmt: skip
    metric("liverfat_destination_failing_seconds", "gauge", "How long results to a destination have failed.",
           [(f'{{destination="{b.destination}"}}', round(status.time - b.failing_since, 1))
            for b in counts.destinations if b.failing_since is not None])  # fmt: skip
    metric("liverfat_spool_free_bytes", "gauge", "Free space on the spool's file system.",
           [("", status.spool_free_bytes)])  # fmt: skip
    metric("liverfat_up", "gauge", "1 when the component runs.",
           [(f'{{component="{name}"}}', float(bool(up))) for name, up in
            (("listener", status.listener_up), ("worker", status.worker_up)) if up is not None])  # fmt: skip
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class HealthServer:
    """``/healthz`` and ``/metrics`` over HTTP; ``status`` is called once per request."""

    def __init__(self, host: str, port: int, status: Callable[[], NodeStatus]) -> None:
        try:
            self._server = ThreadingHTTPServer((host, port), _handler_class(status))
        except OSError as error:
            why = f"cannot listen on {host}:{port} ([http] host, port): {error}"
            raise LiverfatError(Reason.CONFIG_INVALID, why) from error
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="liverfat-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("health and metrics on http://%s:%d/healthz and /metrics", self._server.server_address[0], self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_class(status: Callable[[], NodeStatus]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                current = status()
                health = assess(current)
                self._reply(200 if health.ok else 503, "application/json",
                            json.dumps(health.to_json(current), indent=2) + "\n")  # fmt: skip
            elif path == "/metrics":
                self._reply(200, METRICS_CONTENT_TYPE, render_metrics(status()))
            else:
                self._reply(404, "text/plain; charset=utf-8", "try /healthz or /metrics\n")

        def _reply(self, code: int, content_type: str, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard library's signature)
            log.debug("http %s " + format, self.client_address[0], *args)

    return Handler
