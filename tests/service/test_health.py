"""Health verdicts (pure), the Prometheus text, and the HTTP endpoints on a real socket."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import replace

from liverfat.service.health import HealthServer, NodeStatus, assess, render_metrics
from liverfat.service.spool import PROCESSING_BUCKETS_S, DestinationBacklog, JobState, OutboxState, SpoolCounts


def counts(**changes: object) -> SpoolCounts:
    base = SpoolCounts(
        jobs={state: 0 for state in JobState}, outbox={state: 0 for state in OutboxState}, instances=0,
        send_failures=0, processing_count=0, processing_sum_s=0.0,
        processing_buckets={le: 0 for le in PROCESSING_BUCKETS_S}, oldest_pending_send_at=None,
    )  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


def status(**changes: object) -> NodeStatus:
    base = NodeStatus(counts=counts(), spool_free_bytes=10 * 2**30, min_free_bytes=2**20, destinations=1,
                      listener_up=True, worker_up=True, time=10_000.0)  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_running_node_with_a_destination_is_healthy_without_warnings() -> None:
    health = assess(status())
    assert health.ok and health.problems == () and health.warnings == ()


def test_a_dead_worker_or_listener_or_full_spool_is_a_problem() -> None:
    assert "worker process is not running" in assess(status(worker_up=False)).problems[0]
    assert "listener is not running" in assess(status(listener_up=False)).problems[0]
    full = assess(status(spool_free_bytes=100))
    assert not full.ok and "new instances are refused" in full.problems[0]


def test_missing_destination_failed_sends_and_stale_results_are_warnings() -> None:
    jobs = {state: 0 for state in JobState} | {JobState.FAILED: 2}
    outbox = {state: 0 for state in OutboxState} | {OutboxState.FAILED: 3}
    health = assess(status(destinations=0, counts=counts(jobs=jobs, outbox=outbox, oldest_pending_send_at=1.0)))
    assert health.ok
    text = " | ".join(health.warnings)
    assert "no destination configured" in text and "3 result file(s) could not be sent" in text
    assert "waited 2.8 h" in text and "2 series failed" in text


FAILING = DestinationBacklog("PACS@10.0.0.5:104", pending=4, failing_since=9_800.0,
                             last_error="association with PACS@10.0.0.5:104 failed: connection refused")  # fmt: skip


def test_a_failing_destination_is_a_warning_then_a_problem_after_unhealthy_after_s_with_its_name_reason_and_since() -> None:
    waiting = DestinationBacklog("BACKUP@10.0.0.6:104", pending=2, failing_since=None, last_error=None)
    early = assess(status(counts=counts(destinations=(FAILING, waiting)), unhealthy_after_s=300.0))
    assert early.ok and early.problems == ()
    (warning,) = early.warnings
    assert warning == ("destination PACS@10.0.0.5:104 failing since 1970-01-01T02:43:20Z (3 min 20 s): association "
                       "with PACS@10.0.0.5:104 failed: connection refused; 4 result file(s) wait")  # fmt: skip
    late_status = status(counts=counts(destinations=(FAILING, waiting)), unhealthy_after_s=180.0)
    late = assess(late_status)
    assert not late.ok and late.problems == (warning,) and late.warnings == ()
    assert late.to_json(late_status)["destinations_failing"] == [
        {"destination": "PACS@10.0.0.5:104", "failing_since": "1970-01-01T02:43:20Z", "failing_s": 200.0,
         "reason": "association with PACS@10.0.0.5:104 failed: connection refused", "waiting": 4}
    ]  # fmt: skip
    assert 'liverfat_destination_failing_seconds{destination="PACS@10.0.0.5:104"} 200' in render_metrics(late_status)


def test_metrics_render_counters_gauges_and_a_histogram() -> None:
    buckets = {le: (1 if le >= 10 else 0) for le in PROCESSING_BUCKETS_S}
    jobs = {state: 0 for state in JobState} | {JobState.DONE: 1}
    text = render_metrics(status(counts=counts(instances=61, send_failures=4, jobs=jobs, processing_count=1,
                                               processing_sum_s=8.5, processing_buckets=buckets)))  # fmt: skip
    lines = text.splitlines()
    assert "liverfat_instances_received_total 61" in lines
    assert 'liverfat_series{state="done"} 1' in lines and 'liverfat_series{state="failed"} 0' in lines
    assert 'liverfat_processing_seconds_bucket{le="5"} 0' in lines
    assert 'liverfat_processing_seconds_bucket{le="10"} 1' in lines
    assert 'liverfat_processing_seconds_bucket{le="+Inf"} 1' in lines
    assert "liverfat_processing_seconds_sum 8.5" in lines and "liverfat_processing_seconds_count 1" in lines
    assert "liverfat_send_failures_total 4" in lines
    assert 'liverfat_up{component="worker"} 1' in lines
    assert "# TYPE liverfat_processing_seconds histogram" in lines


def test_http_endpoints_answer_200_when_healthy_and_503_when_not() -> None:
    current = {"status": status()}
    server = HealthServer("127.0.0.1", 0, lambda: current["status"])
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            assert response.status == 200 and json.load(response)["status"] == "ok"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert b"liverfat_instances_received_total 0" in response.read()
        current["status"] = status(worker_up=False)
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
            raise AssertionError("an unhealthy node must answer 503")
        except urllib.error.HTTPError as error:
            assert error.code == 503 and "worker process" in json.load(error)["problems"][0]
        current["status"] = status(counts=counts(destinations=(FAILING,)), unhealthy_after_s=60.0)
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
            raise AssertionError("a destination failing past unhealthy_after_s must answer 503")
        except urllib.error.HTTPError as error:
            body = json.load(error)
            assert error.code == 503 and body["problems"][0].startswith("destination PACS@10.0.0.5:104 failing since")
            assert body["destinations_failing"][0]["reason"].endswith("connection refused")
    finally:
        server.stop()
