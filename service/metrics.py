"""Prometheus metrics of a node, computed from its :class:`NodeStatus` at each scrape.

Each node gets its own ``CollectorRegistry`` (not prometheus_client's global one), holding a
collector over the node's status and the client's ``ProcessCollector`` (``process_*``: CPU,
memory, open files of the node process). Counts come from the spool's index, so a series
deleted by retention (``[spool] keep_days``) leaves the per-state, per-grade and per-reason
gauges; counters that the index holds (instances received, send failures) can fall then too.

Workers, local processes or fleet workers alike, are labelled ``worker``, ``host`` and ``device``;
their counters (jobs done) start again when the node restarts. The queue gauges exist in fleet
mode only (in local mode ``liverfat_series{state="complete"}`` is the queue).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from liverfat import __version__
from liverfat.service.health import NodeStatus, assess
from liverfat.service.workers import QueueInfo, WorkerInfo

WORKER_LABELS = ["worker", "host", "device"]


class NodeCollector(Collector):
    """The ``liverfat_*`` metrics; ``status`` is called once per scrape."""

    def __init__(self, status: Callable[[], NodeStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        counts = status.counts
        yield InfoMetricFamily("liverfat_build", "The liverfat version this node runs.", value={"version": __version__})
        yield GaugeMetricFamily("liverfat_healthy", "1 when /healthz answers 200, 0 when it answers 503.",
                                value=float(assess(status).ok))  # fmt: skip
        yield CounterMetricFamily("liverfat_instances_received", "Instances received and held in the spool.",
                                  value=counts.instances)  # fmt: skip
        yield _labelled("liverfat_series", "Series versions by job state.", "state",
                        {state.value: n for state, n in counts.jobs.items()})  # fmt: skip
        yield _labelled("liverfat_series_by_grade", "Ended series versions by grade.", "grade", counts.grades)
        yield _labelled("liverfat_series_by_reason", "Ended series versions by finding code (why not graded, "
                        "warnings); a version with two findings counts under both.", "reason",
                        counts.reasons)  # fmt: skip
        buckets = [(floatToGoString(le), float(n)) for le, n in counts.processing_buckets.items()]
        yield HistogramMetricFamily("liverfat_processing_seconds", "Time to process one series, from claim to outputs "
                                    "recorded.", buckets=[*buckets, ("+Inf", float(counts.processing_count))],
                                    sum_value=counts.processing_sum_s)  # fmt: skip
        yield CounterMetricFamily("liverfat_send_failures", "Failed C-STORE attempts to destinations.",
                                  value=counts.send_failures)  # fmt: skip
        yield _labelled("liverfat_outbox", "Result files by send state.", "state",
                        {state.value: n for state, n in counts.outbox.items()})  # fmt: skip
        yield _labelled("liverfat_destination_failing_seconds", "How long results to a destination have failed.",
                        "destination", {b.destination: round(status.time - b.failing_since, 1)
                                        for b in counts.destinations if b.failing_since is not None})  # fmt: skip
        yield GaugeMetricFamily("liverfat_spool_free_bytes", "Free space on the spool's file system.",
                                value=status.spool_free_bytes)  # fmt: skip
        components = {"listener": status.listener_up, "worker": status.worker_up,
                      "model": None if status.model is None else status.model.loaded}  # fmt: skip
        yield _labelled("liverfat_up", "1 when the component runs (the model: is loaded).", "component",
                        {name: float(up) for name, up in components.items() if up is not None})  # fmt: skip
        yield CounterMetricFamily("liverfat_worker_restarts", "Times a worker process died and was started again, "
                                  "all workers together.", value=status.worker_restarts)  # fmt: skip
        if status.workers is not None:
            yield from _workers(status.workers, status.time)
        if status.queue is not None:
            yield from _queue(status.queue)


def _workers(workers: tuple[WorkerInfo, ...], now: float) -> Iterator[Metric]:
    up = sum(w.up for w in workers)
    yield _labelled("liverfat_workers", "Workers by state.", "state", {"up": up, "down": len(workers) - up})
    states = GaugeMetricFamily("liverfat_worker_up", "1 when the worker runs.", labels=WORKER_LABELS)
    done = CounterMetricFamily("liverfat_worker_jobs_done", "Series versions the worker finished: a local worker "
                               "since the node started, a fleet worker since it started.", labels=WORKER_LABELS)  # fmt: skip
    seen = GaugeMetricFamily("liverfat_worker_last_seen_seconds", "Seconds since the worker was last seen "
                             "(0 while a local worker runs).", labels=WORKER_LABELS)  # fmt: skip
    for worker in workers:
        labels = [worker.name, worker.host, worker.device]
        states.add_metric(labels, float(worker.up))
        done.add_metric(labels, worker.jobs_done)
        if worker.last_seen is not None:
            seen.add_metric(labels, round(max(now - worker.last_seen, 0.0), 1))
    yield from (states, done, seen)


def _queue(queue: QueueInfo) -> Iterator[Metric]:
    yield GaugeMetricFamily("liverfat_queue_connected", "1 when the node is connected to the broker.",
                            value=float(queue.connected))  # fmt: skip
    yield GaugeMetricFamily("liverfat_queue_waiting", "Series tasks ready in the broker's queue.", value=queue.waiting)
    yield GaugeMetricFamily("liverfat_queue_in_flight", "Series published to the fleet whose outcome the node has "
                            "not recorded yet (processing in its ledger).", value=queue.in_flight)  # fmt: skip
    yield GaugeMetricFamily("liverfat_queue_dead_lettered", "Series dead-lettered after the delivery limit.",
                            value=queue.dead_lettered)  # fmt: skip


def _labelled(name: str, help_text: str, label: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=[label])
    for key, value in values.items():
        family.add_metric([key], float(value))
    return family


def node_registry(status: Callable[[], NodeStatus]) -> CollectorRegistry:
    """A registry of its own for one node: its ``liverfat_*`` metrics and its process metrics."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(status))
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape body and its content type: OpenMetrics when the scraper asks for it, else Prometheus text."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
